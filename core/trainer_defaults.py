"""What every TRL stage config (sft, preference, rl, rl.reward_model, distill) sets the same way.

Each stage's config subclasses its TRL config and calls `device_defaults(self)` at the start of its
`__post_init__`; each builds its LoRA adapter with `lora_config(cfg, task_type)`.
"""

import torch


def device_defaults(args) -> None:
    """`use_cpu` on a machine without an accelerator, and bf16 only where it runs.

    Without `use_cpu`, TrainingArguments under `accelerate launch --multi_gpu` on a CPU machine sets
    up world size 1 in every process (parallel_mode NOT_PARALLEL); with it, gloo DDP of the real world
    size (checked with 2 processes). TRL's bf16 default (on) fails on a CPU machine: `bf16: null`
    means on with a bf16-capable CUDA device, off elsewhere."""
    if not torch.accelerator.is_available():
        args.use_cpu = True
    if args.bf16 is None:
        args.bf16 = not args.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def lora_config(cfg, task_type: str = "CAUSAL_LM"):
    """PEFT's LoraConfig from a stage config's use_peft / lora_* fields, or None without `use_peft`.

    task_type SEQ_CLS (reward models): PEFT trains the score head in full (modules_to_save), as TRL's
    docs advise."""
    if not cfg.use_peft:
        return None
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type=task_type,
                      target_modules=targets[0] if targets == ["all-linear"] else targets)
