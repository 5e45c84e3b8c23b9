"""What every TRL stage config (sft, preference, rl, rl.reward_model, distill) sets the same way.

Each stage's config subclasses `StageFields` (and `LoraFields` where it trains adapters,
`DecontaminationFields` where its rows carry prompts) before its TRL
config, calls `device_defaults(self)` at the start of its `__post_init__`, and builds its LoRA adapter
with `lora_config(cfg, task_type)`:

    @dataclass
    class SFTConfig(LoraFields, StageFields, trl.SFTConfig): ...

A dataclass collects fields along the reversed MRO, so these declarations replace TrainingArguments'
fields of the same name (bf16, gradient_checkpointing, resume_from_checkpoint) with our defaults.
"""

from dataclasses import dataclass

import torch

from core.recipe import help_field


@dataclass
class StageFields:
    """TrainingArguments' fields whose TRL defaults do not suit a run here."""

    resume_from_checkpoint: str | None = help_field(
        "Continue an interrupted run: `true` (or `latest`) for the newest complete checkpoint-* in output_dir, or "
        "the path of one checkpoint (TrainingArguments' field, which Trainer scripts read the same way).",
        default=None)
    bf16: bool | None = help_field(
        "bf16 mixed precision; default: on with a bf16 CUDA device, off on CPU (TRL's default, on, fails on a CPU "
        "machine).", default=None)
    gradient_checkpointing: bool = help_field(
        "Recompute activations in the backward pass (TRL's default is on: it only costs time at tiny sizes; turn it "
        "on in GPU-scale recipes).", default=False)


@dataclass
class LoraFields:
    """LoRA through PEFT (`lora_config` builds the adapter config from these)."""

    use_peft: bool = help_field(
        "Train a LoRA adapter instead of every weight; it is merged into the saved model (and, in rl, into vLLM's "
        "weights at every sync). Preference: the reference is the model with the adapter disabled (TRL). Reward "
        "models: the score head is trained in full.", default=False)
    lora_r: int = help_field("LoRA rank.", default=16)
    lora_alpha: int = help_field("LoRA alpha (scale = alpha / r).", default=32)
    lora_dropout: float = help_field("LoRA dropout.", default=0.0)
    lora_target_modules: list[str] = help_field("Modules that get adapters ('all-linear' or names).",
                                                default_factory=lambda: ["all-linear"])


@dataclass
class DecontaminationFields:
    """The training rows' check against evaluation prompts (stages whose rows carry prompts: sft, rl)."""

    decontaminate_against: list[dict] = help_field(
        "Evaluation sets whose prompts no training row may contain ([{suite, split, data_path}] of "
        "rewards/suites.py): a row whose prompt shares a word 8-gram with one (open-r1's test, "
        "core/decontaminate.py) is dropped and counted before training. Held-out splits only: the tiny "
        "recipes train on the arithmetic train split. [] turns it off.",
        default_factory=lambda: [{"suite": "arithmetic", "split": "test"}])


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


def load_stage_tokenizer(cfg, pad: bool = True):
    """The stage's tokenizer (`tokenizer_name_or_path`, else the model's) with `cfg.chat_template`'s training
    variant installed when one is named; returns (tokenizer, added tokens).

    `pad`: add a distinct `<|pad|>` when the tokenizer has no pad token. SFT masks padding out of loss and
    attention, and a pad equal to the end of turn would be confused with a real one; a reward model reads its
    score at the last non-pad token, which a pad equal to eos would move off a reply ending in eos. The
    preference stage passes False: TRL then pads with eos (masked out of every loss), and an added token
    would change the vocabulary its reference model shares with the policy."""
    from transformers import AutoTokenizer

    import chat_templates

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    added = []
    if cfg.chat_template is not None:
        added = chat_templates.install(tokenizer, cfg.chat_template, variant="training", add_missing_tokens=True)
    if pad and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        added.append("<|pad|>")
    return tokenizer, added


def load_stage_model(cfg, tokenizer, auto_class=None, **kwargs):
    """`cfg.model_name_or_path` in fp32 master weights with the recipe's attention, its embeddings grown to
    the tokenizer's added tokens.

    TRL's `model_init_kwargs` mean what they mean in TRL, keyword arguments of from_pretrained: ours
    (attention implementation, fp32) are defaults they override; `kwargs` (e.g. num_labels) are fixed.
    New tokens' embeddings start at the mean of the others (transformers' default mean_resizing), so the
    first steps do not see outlier vectors."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    init = {"attn_implementation": cfg.attn_implementation, "dtype": torch.float32, **(cfg.model_init_kwargs or {}),
            **kwargs}
    model = auto_class.from_pretrained(cfg.model_name_or_path, **init)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model
