"""The SFT stage: TRL's SFTTrainer on chat data, with smolforge's checks around it.

    python -m sft --config recipes/tiny/sft.yaml [--field value ...]

Steps, in order: parse the recipe (sft/config.py); load the tokenizer and install the chat template's
training variant (adding missing control tokens, then resizing the embeddings); load the model (our
core or any transformers causal LM); load, mix and validate the data (sft/data.py: bad rows fail here,
named); optionally measure generations before training (sft/generation.py); train with
`SFTTrainer`; save the final model, tokenizer (with its chat template) and stage.json atomically.

Where we deviate from TRL's SFTTrainer (all in `SFTTrainer` below or in the data checks):
  - a micro-batch with no trainable label is an error (TRL clamps the token count to 1 and returns
    a silent zero loss, sft_trainer.py `compute_loss`);
  - an example longer than max_length is an error unless `truncation: true` (TRL truncates, and
    without packing drops rows left with no assistant token);
  - TRL's `compute_loss` calls a fused LM head (`add_fused_lm_head`) on the backbone, so the core's
    z-loss term is not part of the SFT loss; the NLL is summed and divided by `num_items_in_batch`,
    the trainable-token count of the whole optimizer step, so gradient accumulation is exact;
  - `--resume_from_checkpoint true` picks the newest *complete* checkpoint-* (one with trainer_state.json,
    which the Trainer writes last); a finished output_dir is never overwritten;
  - the final save is `core.checkpoint.save_checkpoint` (with stage.json), LoRA merged into the weights;
  - every logged step is appended to output_dir/metrics.jsonl (core/metrics.py, main process).

SMOLFORGE_FAULT=kill_after_step:N / kill_in_checkpoint:N (tests only, core/faults.py) kill the process
with SIGKILL right after, or in the middle of, writing the checkpoint of step N, to test resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import trl
from datasets import Dataset

import chat_templates
import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint, save_checkpoint, trainer_resume_point
from core.decontaminate import NGramIndex, decontaminate_rows, evaluation_prompts
from core.faults import FaultCallback, FaultInjectionMixin
from core.metrics import MetricsCallback
from core.moe import MoEStepCallback
from core.recipe import parse_recipe, resolved_recipe

from .config import SFTConfig
from core.sources import ROW_SOURCE_KEYS, SourceSpec, load_rows
from core.trainer_defaults import load_stage_model, load_stage_tokenizer, lora_config

from .data import load_sources, validate_rows
from .generation import format_rates, generation_check


class EmptyMaskError(RuntimeError):
    """A micro-batch has no token to train on (assistant-only loss with an empty mask)."""


class SFTTrainer(FaultInjectionMixin, trl.SFTTrainer):
    """TRL's SFTTrainer that refuses a micro-batch whose loss mask is empty.

    TRL divides by `max(count, 1)`, so such a batch trains nothing and logs a loss of 0, which looks
    like success. The data checks reject rows with an empty mask before training; this guards the
    batches themselves (e.g. data passed straight to the trainer)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        # Causal LM: the label of position 0 is never predicted, so count from position 1, as
        # Trainer._get_num_items_in_batch does.
        if labels is not None and not (labels[..., 1:] != -100).any():
            raise EmptyMaskError(
                f"step {self.state.global_step}: a micro-batch of {labels.shape[0]} row(s) has no trainable token "
                f"(every label is -100): the assistant mask is empty. Check the chat template's {{% generation %}} "
                f"markers (chat_templates.check) and the data (sft/data.py validate_rows)")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def set_stop_tokens(model, tokenizer, end_of_turn: str) -> None:
    """Generation stops at the end of a turn (first), or at the tokenizer's eos.

    Done on the final model: Trainer rewrites `generation_config.eos_token_id` to the tokenizer's eos
    when training starts (transformers' `align_special_tokens`)."""
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    model.generation_config.eos_token_id = [eot_id, *[e for e in (tokenizer.eos_token_id,) if e not in (None, eot_id)]]
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def final_model(cfg: SFTConfig, trainer: SFTTrainer, tokenizer):
    """(model, full state dict or None) to save on the main process: a plain checkpoint, LoRA merged.

    Under FSDP the weights are sharded: they are gathered first (collective, every rank). With LoRA
    the gathered keys are the adapter model's, so they are loaded into an unsharded copy of it and
    merged there; saving the gathered dict as it is would write unmerged PEFT keys (issue 11)."""
    if not trainer.is_fsdp_enabled:
        return (trainer.model.merge_and_unload() if cfg.use_peft else trainer.model), None
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not cfg.use_peft:
        return trainer.model, state_dict
    if not trainer.accelerator.is_main_process:
        return None, None
    from peft import get_peft_model

    copy = get_peft_model(load_stage_model(cfg, tokenizer), lora_config(cfg))
    copy.load_state_dict(state_dict, strict=True)
    return copy.merge_and_unload(), None


def generation_rows(spec: dict) -> tuple[list[dict], int]:
    """The one-turn conversations of the `generation_eval` source, one per distinct question (each
    is asked in both modes; earlier turns are left out because they fix the mode of the whole chat)."""
    spec = dict(spec)
    max_new_tokens = spec.pop("max_new_tokens", 48)
    rows = {}
    for row in load_rows(SourceSpec.from_dict(spec, 0, keys=ROW_SOURCE_KEYS)):
        messages = row.get("messages") or []
        if [m["role"] for m in messages] == ["user", "assistant"]:
            rows.setdefault(messages[0]["content"], row)
    if not rows:
        raise ValueError(f"generation_eval {spec}: no one-turn (user, assistant) conversation to ask")
    return list(rows.values()), max_new_tokens


def run(cfg: SFTConfig) -> dict:
    if cfg.model_name_or_path is None:
        raise ValueError("model_name_or_path is required: the checkpoint to fine-tune (e.g. out/tiny/pretrain)")
    # Only complete checkpoints: the Trainer writes trainer_state.json last, and get_last_checkpoint
    # would take a half-written highest-numbered one (issue 11).
    resume_from = trainer_resume_point(cfg)
    template = chat_templates.load(cfg.chat_template)
    tokenizer, added = load_stage_tokenizer(cfg)
    model = load_stage_model(cfg, tokenizer)

    rows, origins = load_sources(cfg.sources, cfg.think_ratio, cfg.seed)
    rows, origins, n_contaminated = decontaminate_rows(
        rows, NGramIndex(evaluation_prompts(cfg.decontaminate_against)), "sft", origins)
    lengths = validate_rows(rows, origins, tokenizer, cfg.max_length, cfg.truncation, cfg.assistant_only_loss)
    n_think = sum(bool((r.get("chat_template_kwargs") or {}).get("enable_thinking")) for r in rows)
    fingerprint = data_fingerprint([json.dumps(r, sort_keys=True) for r in rows])
    # Over-long rows were refused above unless truncation is on; with truncation on TRL truncates
    # (keep_start), and with packing bfd truncates each row to max_length.
    train_dataset = Dataset.from_list(rows)

    callbacks = [MetricsCallback(cfg.output_dir), FaultCallback(), MoEStepCallback()]

    rates_before = None
    if cfg.generation_eval:
        eval_rows, max_new_tokens = generation_rows(cfg.generation_eval)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train_dataset, processing_class=tokenizer,
                         peft_config=lora_config(cfg), callbacks=callbacks)
    accelerator = trainer.accelerator
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.print(
        f"sft: {accelerator.num_processes} process(es) (world size {cfg.world_size}, {accelerator.distributed_type}); "
        f"{len(rows)} conversations ({n_think} think, {len(rows) - n_think} no-think), {sum(lengths)} tokens, "
        f"longest {max(lengths)}; template {template.name}"
        + (f"; added tokens {added} (embeddings resized to {len(tokenizer)})" if added else ""))
    if resume_from is not None:
        accelerator.print(f"resuming from {resume_from}")
    if cfg.generation_eval and accelerator.is_main_process and resume_from is None:
        rates_before = generation_check(model, tokenizer, template.end_of_turn, eval_rows, max_new_tokens)

    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["data/rows_dropped_contaminated"] = n_contaminated

    final, state_dict = final_model(cfg, trainer, tokenizer)
    if accelerator.is_main_process:
        set_stop_tokens(final, tokenizer, template.end_of_turn)
        if cfg.generation_eval and not trainer.is_fsdp_enabled:
            rates_after = generation_check(final, tokenizer, template.end_of_turn, eval_rows, max_new_tokens)
            metrics.update({f"generation/{k}": v for k, v in rates_after.items()})
            if rates_before is not None:
                metrics.update({f"generation_before/{k}": v for k, v in rates_before.items()})
                print(f"held-out generations ({len(eval_rows)} prompts x think/no-think), before -> after SFT: "
                      f"{format_rates(rates_before, rates_after)}")
            else:
                print(f"held-out generations after SFT: {format_rates(rates_after, rates_after)}")
        save_checkpoint(cfg.output_dir, final, tokenizer, stage="sft", recipe=resolved_recipe(cfg),
                        parent=cfg.model_name_or_path, data_fingerprint=fingerprint, metrics=metrics,
                        state_dict=state_dict)
        print(f"final train loss {metrics.get('train_loss', float('nan')):.4f}; model written to {cfg.output_dir}")
    accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_recipe(SFTConfig, args=argv)
    return run(cfg)
