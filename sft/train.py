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

import trl
from datasets import Dataset

import chat_templates
import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint
from core.decontaminate import NGramIndex, decontaminate_rows
from core.faults import FaultInjectionMixin
from core.lifecycle import (BeforeAfter, begin, finish, launch_summary, load_policy, preflight, stage_callbacks,
                            stage_main, stop_token_ids, train_metrics)
from core.sources import ROW_SOURCE_KEYS, SourceSpec, load_rows
from core.trainer_defaults import lora_config
from rewards.suites import evaluation_prompts

from .config import SFTConfig

from .data import load_sources, validate_rows
from .generation import format_rates, generation_check


# What SFT installs on a checkpoint without a chat template (a pretrained base model), as it always did.
BASE_TEMPLATE = "smollm3"


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


def generation_eval(spec: dict, tokenizer, end_of_turn: str) -> BeforeAfter:
    """The `generation_eval` check (sft/generation.py) on the held-out prompts, before and after SFT."""
    rows, max_new_tokens = generation_rows(spec)

    def describe(before, after) -> str:
        return (f"held-out generations ({len(rows)} prompts x think/no-think), "
                + (f"before -> after SFT: {format_rates(before, after)}" if before is not None
                   else f"after SFT: {format_rates(after, after)}"))

    return BeforeAfter(lambda model: generation_check(model, tokenizer, end_of_turn, rows, max_new_tokens),
                       "generation/{}", "generation_before/{}", describe)


def load_data(cfg: SFTConfig, tokenizer) -> tuple[Dataset, str, str, int]:
    """(dataset, fingerprint, summary, rows dropped as contaminated): sources loaded, mixed, decontaminated and
    checked (bad rows fail here, named: sft/data.py)."""
    rows, origins = load_sources(cfg.sources, cfg.think_ratio, cfg.seed)
    if isinstance(rows[0].get("messages", rows[0].get("prompt")), list) and not tokenizer.chat_template:
        raise ValueError(f"{origins[0]} is conversational but the tokenizer of {cfg.model_name_or_path} has no chat "
                         f"template: set chat_template (chatml, smollm3, qwen3, llama3 or a .jinja path)")
    rows, origins, n_contaminated = decontaminate_rows(
        rows, NGramIndex(evaluation_prompts(cfg.decontaminate_against)), "sft", origins)
    lengths = validate_rows(rows, origins, tokenizer, cfg.max_length, cfg.truncation, cfg.assistant_only_loss)
    n_think = sum(bool((r.get("chat_template_kwargs") or {}).get("enable_thinking")) for r in rows)
    fingerprint = data_fingerprint([json.dumps(r, sort_keys=True) for r in rows])
    summary = (f"{len(rows)} conversations ({n_think} think, {len(rows) - n_think} no-think), {sum(lengths)} "
               f"tokens, longest {max(lengths)}")
    # Over-long rows were refused above unless truncation is on; with truncation on TRL truncates
    # (keep_start), and with packing bfd truncates each row to max_length.
    return Dataset.from_list(rows), fingerprint, summary, n_contaminated


def run(cfg: SFTConfig) -> dict:
    resume_from = preflight(cfg, "sft")
    tokenizer, added = chat_templates.load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                                                     cfg.chat_template, fallback=BASE_TEMPLATE)
    end_of_turn = chat_templates.end_of_turn(tokenizer)
    dataset, fingerprint, data_summary, n_contaminated = load_data(cfg, tokenizer)
    model = load_policy(cfg, tokenizer)
    stop_ids = stop_token_ids(model, tokenizer, end_of_turn)  # before the Trainer rewrites them
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(cfg), callbacks=stage_callbacks(cfg))
    begin(trainer, cfg, f"{launch_summary('sft', trainer, cfg)}; {data_summary}; template "
                        f"{cfg.chat_template or 'of the checkpoint'}"
                        + (f"; added tokens {added} (embeddings resized to {len(tokenizer)})" if added else ""),
          resume_from)
    check = generation_eval(cfg.generation_eval, tokenizer, end_of_turn) if cfg.generation_eval else None
    if check is not None:
        check.before(trainer, resume_from)

    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {**train_metrics(result), "data/rows_dropped_contaminated": n_contaminated}
    return finish(trainer, cfg, tokenizer, stage="sft", reload=lambda: load_policy(cfg, tokenizer),
                  stop_ids=stop_ids, fingerprint=fingerprint, metrics=metrics,
                  evaluate=check.after if check is not None else None)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(SFTConfig, run, argv)
