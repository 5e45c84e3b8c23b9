"""The preference stage's run: load the checkpoint and its tokenizer, load and check the data, build
the TRL trainer of `method` (DPOTrainer, KTOTrainer, or the experimental ORPOTrainer), train, and
save the final model, tokenizer (with its chat template) and stage.json atomically.

Where we deviate from TRL (all here or in preference/config.py, preference/data.py):
  - bad rows fail before the trainer is built, naming the source, row and field (TRL would drop a
    row whose prompt fills max_length, and truncate longer ones, silently);
  - the reference model (dpo, kto) is the starting checkpoint: loaded a second time as the policy
    was (core/lifecycle.py `load_policy`: added tokens' embeddings seeded alike) and handed to TRL,
    which prepares it for DDP, FSDP or ZeRO-3 (never a copy of the policy: under ZeRO-3 that copy
    holds empty partitions); or with `use_peft` the model with its adapter disabled, or with
    `precompute_ref_log_probs` the policy's log-probs computed once before the first step (TRL's
    ways). TRL would load the reference from `model_name_or_path` itself, but (1.16,
    `create_model_from_path`) it reads `config.auto_map`, which a config registered in-process (our
    core's) lacks, and it would miss control tokens the chat template added (embeddings resized here);
  - KTO: rows are ordered for TRL's KL baseline, which pairs each row with its batch neighbour's reply:
    labels alternate and rows of one prompt stand far apart (preference/data.py `kto_order`; pairs are
    unpaired first, `unpair`); TRL's own unpairing would give batches of a single label;
  - ORPO (the experimental trainer, tokenising as TRL's older trainers did) splits prompt and reply
    at one token position shared by chosen and rejected: the prefix of prompt, prompt + chosen and
    prompt + rejected that all three tokenise alike. TRL's ORPO splits each of the two at its own
    position, so when the prompt's last token merges with a reply's first (a prompt ending in a
    space, a reply starting with punctuation), chosen and rejected get different prompt token ids
    (its own check allows one token of difference). DPO and KTO already split at the common prefix;
  - `--resume_from_checkpoint true` takes the newest *complete* checkpoint-*, and a finished
    output_dir is never trained over (core/checkpoint.py `resume_point`);
  - the final save is `core.checkpoint.save_checkpoint` (stage.json), LoRA merged into the weights,
    and the generation config's stop tokens are the checkpoint's (the Trainer rewrites them to the
    tokenizer's eos when training starts);
  - every logged step goes to output_dir/metrics.jsonl (core/metrics.py) with TRL's names:
    `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
    `logps/chosen`, ... (dpo, orpo); `kl`, `rewards/chosen`, `rewards/rejected`, ... (kto); ORPO
    also logs `nll_loss` and `log_odds_ratio`.

SMOLFORGE_FAULT=kill_after_step:N / kill_in_checkpoint:N (tests only, core/faults.py) kill the process
with SIGKILL right after, or in the middle of, writing the checkpoint of step N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import trl
from datasets import Dataset
from trl.data_utils import common_prefix_length
from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

import chat_templates
import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint
from core.faults import FaultInjectionMixin
from core.lifecycle import (begin, finish, launch_summary, load_policy, preflight, stage_callbacks, stage_main,
                            stop_token_ids, train_metrics)
from core.trainer_defaults import lora_config

from .config import PreferenceConfig, trainer_args
from .data import kto_order, load_sources, unpair, validate_rows


class DPOTrainer(FaultInjectionMixin, trl.DPOTrainer):
    """TRL's DPOTrainer with the test-only kill-in-checkpoint hook."""


class KTOTrainer(FaultInjectionMixin, trl.KTOTrainer):
    """TRL's KTOTrainer with the test-only kill-in-checkpoint hook."""


class ORPOTrainer(FaultInjectionMixin, TRLORPOTrainer):
    """TRL's experimental ORPOTrainer, splitting chosen and rejected after the same prompt tokens."""

    def tokenize_row(self, feature, model=None) -> dict:
        # TRL calls build_tokenized_answer once per reply; the split both must share is decided here.
        tokenize = self.processing_class
        prompt_ids = tokenize(feature["prompt"], add_special_tokens=False)["input_ids"]
        self._shared_prompt_length = min(
            common_prefix_length(prompt_ids, tokenize(feature["prompt"] + feature[name],
                                                      add_special_tokens=False)["input_ids"])
            for name in ("chosen", "rejected"))
        return super().tokenize_row(feature, model)

    def build_tokenized_answer(self, prompt, answer):
        full = self.processing_class(prompt + answer, add_special_tokens=False)
        split = self._shared_prompt_length
        return dict(prompt_input_ids=full["input_ids"][:split], prompt_attention_mask=full["attention_mask"][:split],
                    input_ids=full["input_ids"][split:], attention_mask=full["attention_mask"][split:])


TRAINERS = {"dpo": DPOTrainer, "kto": KTOTrainer, "orpo": ORPOTrainer}


def load_data(cfg: PreferenceConfig, tokenizer) -> tuple[Dataset, str, str]:
    """(dataset, fingerprint, summary): the sources loaded and checked (bad rows fail here, named:
    preference/data.py), KTO pairs unpaired."""
    rows, origins = load_sources(cfg.sources)
    if isinstance(rows[0].get("chosen", rows[0].get("completion")), list) and not tokenizer.chat_template:
        raise ValueError(f"{origins[0]} is conversational but the tokenizer of {cfg.model_name_or_path} has no chat "
                         f"template; set chat_template (e.g. smollm3)")
    lengths = validate_rows(rows, origins, cfg.method, tokenizer, cfg.max_length, cfg.truncation)
    if cfg.method == "kto":  # TRL's KL baseline pairs each row with its batch neighbour's reply
        rows = unpair(rows) if "chosen" in rows[0] else kto_order([r for r in rows if r["label"]],
                                                                  [r for r in rows if not r["label"]])
    if any("chat_template_kwargs" in row for row in rows):
        # TRL unpacks each row's mapping; a source without the column (e.g. build_pairs' output beside
        # the built-in pairs) would reach it as None. An empty mapping renders with the template's defaults.
        rows = [{**row, "chat_template_kwargs": row.get("chat_template_kwargs") or {}} for row in rows]
    fingerprint = data_fingerprint([json.dumps(r, sort_keys=True) for r in rows])
    return Dataset.from_list(rows), fingerprint, f"{len(rows)} rows, longest {max(lengths)} tokens"


def reference_model(cfg: PreferenceConfig, tokenizer) -> dict:
    """The trainer's `ref_model` argument: for dpo and kto, the starting checkpoint loaded a second time, which TRL
    prepares for DDP, FSDP or ZeRO-3 itself; None where TRL needs none (LoRA: the adapter disabled; precomputed
    reference log-probs). ORPO has no reference (no argument)."""
    if cfg.method == "orpo":
        return {}
    if cfg.use_peft or cfg.precompute_ref_log_probs:
        return {"ref_model": None}
    return {"ref_model": load_policy(cfg, tokenizer).eval().requires_grad_(False)}


@dataclass
class PreparedRun:
    """A run ready to train: the trainer, and what `finish` needs. (Tests read the trainer's tokenised data.)"""

    trainer: DPOTrainer | KTOTrainer | ORPOTrainer
    resume_from: str | None
    fingerprint: str
    stop_ids: list[int]


def prepare(cfg: PreferenceConfig) -> PreparedRun:
    """Everything before training: launch checks, tokenizer, data checks, model, reference, trainer."""
    resume_from = preflight(cfg, "preference")
    args = trainer_args(cfg)
    # No added pad: TRL then pads with eos (masked out of every loss), and an added token would change the
    # vocabulary the reference shares with the policy.
    tokenizer, added = chat_templates.load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                                                     cfg.chat_template, pad=False)
    dataset, fingerprint, data_summary = load_data(cfg, tokenizer)
    model = load_policy(cfg, tokenizer)
    stop_ids = stop_token_ids(model, tokenizer, chat_templates.end_of_turn(tokenizer))  # before the Trainer's
    trainer = TRAINERS[cfg.method](
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(cfg),
        callbacks=stage_callbacks(cfg), **reference_model(cfg, tokenizer))
    loss = "" if cfg.method == "orpo" else f", loss_type {cfg.loss_type}" + (
        f" weights {cfg.loss_weights}" if cfg.loss_weights else "")
    begin(trainer, cfg, f"{launch_summary('preference', trainer, args)}; method {cfg.method}{loss}, beta {cfg.beta}; "
                        f"{data_summary}"
                        + (f"; added tokens {added} (embeddings resized to {len(tokenizer)})" if added else ""),
          resume_from)
    return PreparedRun(trainer, resume_from, fingerprint, stop_ids)


def run(cfg: PreferenceConfig) -> dict:
    prepared = prepare(cfg)
    trainer = prepared.trainer
    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    metrics = train_metrics(result)
    last_log = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {})
    metrics.update({f"last/{k}": v for k, v in last_log.items() if isinstance(v, (int, float))})
    tokenizer = trainer.processing_class
    return finish(trainer, cfg, tokenizer, stage=f"preference/{cfg.method}", reload=lambda: load_policy(cfg, tokenizer),
                  stop_ids=prepared.stop_ids, fingerprint=prepared.fingerprint, metrics=metrics)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(PreferenceConfig, run, argv)
