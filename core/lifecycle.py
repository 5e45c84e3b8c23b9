"""The lifecycle of every stage built on a TRL trainer (sft, preference, rl, rl.reward_model, distill),
written once (issue 29). A stage's `run()` reads as recipe -> data -> trainer -> train -> finish:

    resume_from = preflight(cfg, "sft")                  # required fields, LoRA policy, resume point: before any load
    tokenizer, added = chat_templates.load_tokenizer(...)  # the template is the stage's (core imports no stage
    model = load_policy(cfg, tokenizer)                    # package, nor chat_templates or rewards)
    trainer = SFTTrainer(model=model, ..., callbacks=stage_callbacks(cfg))
    begin(trainer, cfg, summary, resume_from)
    with whole_model(trainer) as full:                 # in-stage evaluation before training (None off the main
        before = evaluate(full) if full is not None else None   # process)
    result = trainer.train(resume_from_checkpoint=resume_from)
    finish(trainer, cfg, tokenizer, stage="sft", stop_ids=..., fingerprint=..., metrics=..., evaluate=...)

Distributed modes (`distributed_mode`), known from the launch before any model loads:
  - single / ddp / zero2 (any DeepSpeed stage below 3): every process holds the whole model;
  - fsdp: FSDP2 shards the parameters when training starts (Trainer wraps the model in `train()`);
  - zero3: DeepSpeed partitions the parameters at load (`zero3_init_flag`, shared/FACTS.md): a forward on one
    process alone, or a `copy.deepcopy`, sees empty (numel 0) parameters.
So evaluation before training gathers ZeRO-3's partitions on every process (`whole_model`), and everything after
training runs on one whole model that `finish` gathers from the shards first (every process takes part), builds
unsharded on the main process, merges LoRA into, evaluates and saves. A reference model is never a copy of the
policy: the preference stage loads it like the policy and TRL prepares it for ZeRO-3 / FSDP (its own mechanism).

LoRA: one policy for every stage (`LORA_REFUSED`): where the adapter cannot be merged into a plain checkpoint it
is refused before anything loads, with the same message in every stage.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from core.checkpoint import save_checkpoint, trainer_resume_point
from core.faults import FaultCallback
from core.metrics import MetricsCallback
from core.moe import MoEStepCallback
from core.recipe import resolved_recipe

# Launches under which LoRA is refused, and why (the same words in every stage).
LORA_REFUSED = {
    "fsdp": "FSDP2 shards the adapter with the base weights, and PEFT's merge needs both whole on one process; "
            "gathering them into a second, unsharded PEFT model to merge doubles the stage's memory at its end",
    "zero3": "DeepSpeed ZeRO-3 partitions the base weights and the adapter at load (zero3_init_flag), and PEFT "
             "cannot merge a partitioned adapter into the saved checkpoint",
}


def distributed_mode(args) -> str:
    """'fsdp', 'zero3', 'deepspeed' (ZeRO-1/2), 'ddp' or 'single': how this launch will hold the model.

    Read from the TrainingArguments and the variables `accelerate launch` sets (ACCELERATE_USE_FSDP,
    ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE), so it is known before any model loads (the
    Trainer builds its Accelerator only when the trainer is built, after the model)."""
    env = os.environ
    if args.fsdp or env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    hf_deepspeed = getattr(args, "hf_deepspeed_config", None)  # set only when `deepspeed` names a config
    if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" or (hf_deepspeed is not None and hf_deepspeed.is_zero3()):
        return "zero3"
    if args.deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def preflight(cfg, stage: str) -> str | None:
    """Before anything loads: the checkpoint to start from is named, LoRA suits the launch (`LORA_REFUSED`), and
    the checkpoint to resume from, if any (the newest complete one; core/checkpoint.py)."""
    if cfg.model_name_or_path is None:
        raise ValueError(f"{stage}: model_name_or_path is required: the checkpoint to train (an earlier stage's "
                         f"output directory or any Hugging Face checkpoint)")
    mode = distributed_mode(cfg)
    if cfg.use_peft and mode in LORA_REFUSED:
        raise ValueError(f"{stage}: use_peft (LoRA) is not supported under {mode}: {LORA_REFUSED[mode]}. Launch "
                         f"with recipes/accelerate_configs/ddp.yaml or zero2.yaml, or set use_peft: false")
    return trainer_resume_point(cfg)


def load_policy(cfg, tokenizer, auto_class=None, **kwargs):
    """`cfg.model_name_or_path` in fp32 master weights with the recipe's attention, its embeddings grown to the
    tokenizer's added tokens.

    TRL's `model_init_kwargs` mean what they mean in TRL, keyword arguments of from_pretrained: ours (attention
    implementation, fp32) are defaults they override; `kwargs` (e.g. num_labels) are fixed. New tokens'
    embeddings start at the mean of the others (transformers' mean_resizing), sampled from the seeded RNG, so
    a second load (the preference stage's reference model, `finish`'s unsharded copy) is the same model."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    init = {"attn_implementation": cfg.attn_implementation, "dtype": torch.float32, **(cfg.model_init_kwargs or {}),
            **kwargs}
    model = auto_class.from_pretrained(cfg.model_name_or_path, **init)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model.resize_token_embeddings(len(tokenizer))
    return model


def stop_token_ids(model, tokenizer, end_of_turn: str | None = None) -> list[int]:
    """What generation stops on: the chat template's end of turn first (when the stage knows its template), then
    the checkpoint's generation config, then the tokenizer's eos, without repeats.

    The saved model gets these (`finish`): Trainer rewrites `generation_config.eos_token_id` to the tokenizer's
    eos when training starts (transformers' `align_special_tokens`)."""
    eos = model.generation_config.eos_token_id
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn)] if end_of_turn is not None else []
    for token_id in ([] if eos is None else [eos] if isinstance(eos, int) else list(eos)) + [tokenizer.eos_token_id]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def stage_callbacks(cfg) -> list:
    """What every stage's trainer reports and does per step: metrics.jsonl, the test-only fault switch, MoE's
    per-step expert counts and routing bias."""
    return [MetricsCallback(cfg.output_dir), FaultCallback(), MoEStepCallback()]


def begin(trainer, cfg, summary: str, resume_from: str | None) -> None:
    """The run directory exists and the run says what it is, once (main process)."""
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    trainer.accelerator.print(summary)
    if resume_from is not None:
        trainer.accelerator.print(f"resuming from {resume_from}")


def launch_summary(stage: str, trainer, cfg) -> str:
    """'<stage>: N process(es) (world size N, <distributed type>)', the first words of every stage's summary."""
    accelerator = trainer.accelerator
    return (f"{stage}: {accelerator.num_processes} process(es) (world size {cfg.world_size}, "
            f"{accelerator.distributed_type})")


def is_partitioned(model) -> bool:
    """True when DeepSpeed ZeRO-3 holds `model`'s parameters in partitions (each process a slice)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def whole_model(trainer):
    """Before training: the policy, whole, on the main process (None elsewhere), for an evaluation there.

    Under ZeRO-3 the parameters were partitioned at load: every process gathers them (collective) for the
    duration; the others wait until the main process has finished. FSDP wraps the model only in `train()`, so
    before training it is whole on every process already."""
    model = trainer.model
    accelerator = trainer.accelerator
    gathered = contextlib.nullcontext()
    if is_partitioned(model):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gathered:
        if accelerator.is_main_process:
            with one_process_alone():
                yield model
        else:
            yield None
        accelerator.wait_for_everyone()


class BeforeAfter:
    """An in-stage evaluation, `measure(model) -> {name: value}`, taken on the whole model before training
    (`before`, every process calls it) and after (`after`, `finish`'s `evaluate`): the metrics under `after_key`
    and `before_key` (format strings of the name), and the line `describe(before or None, after)` prints."""

    def __init__(self, measure, after_key: str, before_key: str, describe):
        self.measure, self.after_key, self.before_key, self.describe = measure, after_key, before_key, describe
        self.taken: dict | None = None

    def before(self, trainer, resume_from: str | None) -> None:
        """Measure the starting model, unless the run resumes (the start is then another run's)."""
        if resume_from is None:
            with whole_model(trainer) as full:
                self.taken = self.measure(full) if full is not None else None

    def after(self, model) -> dict:
        after = self.measure(model)
        print(self.describe(self.taken, after), flush=True)
        return {**{self.after_key.format(k): v for k, v in after.items()},
                **{self.before_key.format(k): v for k, v in (self.taken or {}).items()}}


@contextlib.contextmanager
def one_process_alone():
    """Work on one whole model on one process while DeepSpeed ZeRO-3 is on (loading it, generating with it).

    While transformers has a ZeRO-3 config registered (the Trainer's arguments keep one; accelerate's
    `zero3_init_context_manager` clears only its own), it partitions every model it builds (deepspeed.zero.Init,
    collective) and `generate` synchronises every step with the other processes (`synced_gpus`): either, on the
    main process alone, waits forever for the others. Unregistered here with transformers' own switch, then put
    back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = reference() if reference is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered is not None:
            hf_deepspeed.set_hf_deepspeed_config(registered)


def final_model(trainer, cfg, reload):
    """The trained model, whole and plain (LoRA merged), on the main process; None on the others.

    Where the parameters are sharded (FSDP, ZeRO-3) every process takes part in gathering the full state dict
    (collective; accelerate's `get_state_dict`, ZeRO-3 through `zero3_save_16bit_model`), and the main process
    loads it into an unsharded model from `reload()` (the stage's own loader)."""
    accelerator = trainer.accelerator
    sharded = trainer.is_fsdp_enabled or is_partitioned(trainer.model)
    if not sharded:
        if not accelerator.is_main_process:
            return None
        model = accelerator.unwrap_model(trainer.model)
        return model.merge_and_unload() if cfg.use_peft else model
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)  # every process
    if not accelerator.is_main_process:
        return None
    with one_process_alone():
        model = reload()
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()})
    return model


def finish(trainer, cfg, tokenizer, *, stage: str, reload, stop_ids: list[int] | None, fingerprint: str | None,
           metrics: dict, evaluate=None, parent=None) -> dict:
    """After training: gather the whole model (`final_model`), restore the generation config's stop tokens, run
    `evaluate(model) -> dict` on it (main process), save it with stage.json (core/checkpoint.py), and wait for
    every process. Returns the metrics, with the evaluation's."""
    final = final_model(trainer, cfg, reload)
    if final is not None:
        if stop_ids is not None:
            final.generation_config.eos_token_id = stop_ids
            final.generation_config.pad_token_id = tokenizer.pad_token_id
        with one_process_alone():
            if evaluate is not None:
                metrics.update(evaluate(final))
            save_checkpoint(cfg.output_dir, final, tokenizer, stage=stage, recipe=resolved_recipe(cfg),
                            parent=cfg.model_name_or_path if parent is None else parent,
                            data_fingerprint=fingerprint, metrics=metrics)
        print(f"final train loss {metrics.get('train_loss', float('nan')):.4f}; model written to {cfg.output_dir}")
    trainer.accelerator.wait_for_everyone()
    return metrics


def train_metrics(result) -> dict:
    """The numbers of Trainer.train's result (runtime, samples per second, train_loss, ...)."""
    return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}


def stage_main(config_class, run, argv: list[str] | None = None) -> dict:
    """`python -m <stage>`: parse the recipe into the stage's config, run it."""
    from core.recipe import parse_recipe

    (cfg,) = parse_recipe(config_class, args=argv)
    return run(cfg)
