"""The preference stage's run: load the checkpoint and its tokenizer, load and check the data, build
the TRL trainer of `method` (DPOTrainer, KTOTrainer, or the experimental ORPOTrainer), train, and
save the final model, tokenizer (with its chat template) and stage.json atomically.

Where we deviate from TRL (all here or in preference/config.py, preference/data.py):
  - bad rows fail before the trainer is built, naming the source, row and field (TRL would drop a
    row whose prompt fills max_length, and truncate longer ones, silently);
  - the reference model (dpo, kto) is the starting checkpoint: a frozen copy of the loaded model,
    or with `use_peft` the model with its adapter disabled, or with `precompute_ref_log_probs` the
    policy's log-probs computed once before the first step (TRL's ways). TRL would reload the
    reference from `model_name_or_path` itself, but (1.16, `create_model_from_path`) it reads
    `config.auto_map`, which a config registered in-process (our core's) lacks, and a reload would
    miss control tokens the chat template added (embeddings resized here);
  - KTO on paired rows: each pair becomes two adjacent rows (desirable, undesirable) before the
    trainer sees them; TRL's unpairing would give batches of a single label (preference/data.py);
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

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import trl
from datasets import Dataset
from trl.data_utils import common_prefix_length
from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

import chat_templates
import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint, save_checkpoint, trainer_resume_point
from core.faults import FaultCallback, FaultInjectionMixin
from core.metrics import MetricsCallback
from core.moe import MoEStepCallback
from core.recipe import parse_recipe, resolved_recipe
from core.trainer_defaults import load_stage_model, load_stage_tokenizer, lora_config

from .config import PreferenceConfig, trainer_args
from .data import load_sources, unpair, validate_rows


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


def stop_token_ids(cfg: PreferenceConfig, model, tokenizer) -> list[int] | int | None:
    """What generation should stop on after training: the template's end of turn first when a template
    is installed here, else the checkpoint's own generation config."""
    eos = model.generation_config.eos_token_id
    if cfg.chat_template is None:
        return eos
    eot_id = tokenizer.convert_tokens_to_ids(chat_templates.load(cfg.chat_template).end_of_turn)
    others = [e for e in ([eos] if isinstance(eos, int) else eos or []) if e != eot_id]
    return [eot_id, *others]


def final_model(cfg: PreferenceConfig, trainer):
    """(model, full state dict or None) to save on the main process: a plain checkpoint, LoRA merged."""
    if not trainer.is_fsdp_enabled:
        return (trainer.model.merge_and_unload() if cfg.use_peft else trainer.model), None
    return trainer.model, trainer.accelerator.get_state_dict(trainer.model_wrapped)


@dataclass
class PreparedRun:
    """A run ready to train: the trainer, and what the final save needs."""

    trainer: DPOTrainer | KTOTrainer | ORPOTrainer
    resume_from: str | None
    fingerprint: str
    stop_ids: list[int] | int | None
    summary: str


def prepare(cfg: PreferenceConfig) -> PreparedRun:
    """Everything before training: the run directory, tokenizer, data checks, model, reference, trainer."""
    if cfg.model_name_or_path is None:
        raise ValueError("model_name_or_path is required: the checkpoint to train (e.g. out/tiny/sft)")
    resume_from = trainer_resume_point(cfg)
    args = trainer_args(cfg)
    if cfg.use_peft and args.fsdp:
        raise ValueError("use_peft with FSDP is not supported by the preference stage: the merged LoRA weights "
                         "would have to be gathered from shards; use recipes/accelerate_configs/ddp.yaml")
    tokenizer, added = load_stage_tokenizer(cfg, pad=False)

    rows, origins = load_sources(cfg.sources)
    if isinstance(rows[0].get("chosen", rows[0].get("completion")), list) and not tokenizer.chat_template:
        raise ValueError(f"{origins[0]} is conversational but the tokenizer of {cfg.model_name_or_path} has no chat "
                         f"template; set chat_template (e.g. smollm3)")
    lengths = validate_rows(rows, origins, cfg.method, tokenizer, cfg.max_length, cfg.truncation)
    if cfg.method == "kto" and "chosen" in rows[0]:
        rows = unpair(rows)
    if any("chat_template_kwargs" in row for row in rows):
        # TRL unpacks each row's mapping; a source without the column (e.g. build_pairs' output beside
        # the built-in pairs) would reach it as None. An empty mapping renders with the template's defaults.
        rows = [{**row, "chat_template_kwargs": row.get("chat_template_kwargs") or {}} for row in rows]
    fingerprint = data_fingerprint([json.dumps(r, sort_keys=True) for r in rows])
    model = load_stage_model(cfg, tokenizer)
    stop_ids = stop_token_ids(cfg, model, tokenizer)

    trainer_kwargs = {}
    if cfg.method != "orpo" and not cfg.use_peft and not cfg.precompute_ref_log_probs:
        # The starting checkpoint, frozen (see the module docstring for why not TRL's reload).
        trainer_kwargs["ref_model"] = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = TRAINERS[cfg.method](
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=lora_config(cfg), callbacks=[MetricsCallback(cfg.output_dir), FaultCallback(), MoEStepCallback()], **trainer_kwargs)
    loss = "" if cfg.method == "orpo" else f", loss_type {cfg.loss_type}" + (
        f" weights {cfg.loss_weights}" if cfg.loss_weights else "")
    summary = (f"preference: method {cfg.method}{loss}, beta {cfg.beta}; {trainer.accelerator.num_processes} "
               f"process(es) (world size {args.world_size}, {trainer.accelerator.distributed_type}); {len(rows)} rows, "
               f"longest {max(lengths)} tokens"
               + (f"; added tokens {added} (embeddings resized to {len(tokenizer)})" if added else ""))
    return PreparedRun(trainer, resume_from, fingerprint, stop_ids, summary)


def run(cfg: PreferenceConfig) -> dict:
    prepared = prepare(cfg)
    trainer = prepared.trainer
    accelerator = trainer.accelerator
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.print(prepared.summary)
    if prepared.resume_from is not None:
        accelerator.print(f"resuming from {prepared.resume_from}")

    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    last_log = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {})
    metrics.update({f"last/{k}": v for k, v in last_log.items() if isinstance(v, (int, float))})

    final, state_dict = final_model(cfg, trainer)
    if accelerator.is_main_process:
        final.generation_config.eos_token_id = prepared.stop_ids
        final.generation_config.pad_token_id = trainer.processing_class.pad_token_id
        save_checkpoint(cfg.output_dir, final, trainer.processing_class, stage=f"preference/{cfg.method}",
                        recipe=resolved_recipe(cfg), parent=cfg.model_name_or_path,
                        data_fingerprint=prepared.fingerprint, metrics=metrics, state_dict=state_dict)
        print(f"final train loss {metrics.get('train_loss', float('nan')):.4f}; model written to {cfg.output_dir}")
    accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_recipe(PreferenceConfig, args=argv)
    return run(cfg)
