"""Reward-model training: TRL's RewardTrainer on preference pairs, with smolforge's checks around it.

    python -m rl.reward_model --config recipes/tiny/reward_model.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 -m rl.reward_model --config recipes/tiny/reward_model.yaml

The model is a sequence classifier with one output (`AutoModelForSequenceClassification`, num_labels=1):
our core gets `SmolForgeForSequenceClassification` (core/modeling.py), any other HF checkpoint its own
`*ForSequenceClassification`; a causal LM's decoder is kept and the score head starts fresh. The loss is
TRL's Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected [- margin]), plus
`center_rewards_coefficient * mean((r_chosen + r_rejected)^2)` when set. GRPO uses the result through
rewards/reward_model_scorer.py.

Data (core/sources.py `sources`): rows with `chosen` and `rejected`, and optionally `prompt`, in TRL's
two formats: strings (standard: the text is scored as it is, with the tokenizer's eos appended, as TRL
does) or message lists (conversational: `prompt + chosen` rendered with the chat template). Optional
columns: `margin` (a number), `chat_template_kwargs` (e.g. {enable_thinking: false}), `tools`.
`builtin:arithmetic_preferences` (core/arithmetic.py `reward_model_pairs`) holds the arithmetic
assistant's pairs: the concise right answer over a concise wrong one, a rambling right one, or one with no answer.

Steps, in order: parse the recipe (rl/reward_model_config.py); load the tokenizer and install the chat
template (adding missing control tokens); load the model and resize its embeddings; load and validate
every pair (bad rows fail here, named); score the held-out pairs (`eval_sources`); train with
`RewardTrainer`; score the held-out pairs again and print both accuracies; save the final model,
tokenizer and stage.json atomically.

Where we deviate from TRL's RewardTrainer (all in the data checks or around the trainer):
  - a row longer than `max_length` is an error naming it (TRL filters it out without a word);
  - a row TRL cannot use fails before training, naming the source, row and field: a missing `chosen` or
    `rejected`, strings mixed with message lists (TRL decides the format from the first row and then
    mis-tokenises or crashes in `datasets.map`), a message the chat template refuses, a pair whose two
    sides are identical (its loss is a constant log 2: it teaches nothing);
  - held-out accuracy is counted over all pairs (TRL's `eval_accuracy` is a mean of per-batch means);
  - `--resume_from_checkpoint true` picks the newest *complete* checkpoint-*; a finished output_dir is
    never overwritten; the final save is `core.checkpoint.save_checkpoint` (LoRA merged, stage.json);
  - every logged step is appended to output_dir/metrics.jsonl (core/metrics.py, main process).

SMOLFORGE_FAULT=kill_after_step:N / kill_in_checkpoint:N (tests only, core/faults.py) kill the process
with SIGKILL right after, or in the middle of, writing the checkpoint of step N, to test resume.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
import trl
from datasets import Dataset
from jinja2 import TemplateError
from transformers import AutoModelForSequenceClassification, set_seed
from trl.trainer.reward_trainer import DataCollatorForPreference, suppress_seqcls_warning

import chat_templates
import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint
from core.faults import FaultInjectionMixin
from core.lifecycle import (BeforeAfter, begin, finish, launch_summary, load_policy, preflight, stage_callbacks,
                            stage_main, train_metrics)
from core.sources import labelled_rows
from core.trainer_defaults import lora_config

from .reward_model_config import RewardModelConfig


class PreferenceDataError(ValueError):
    """A source or row is unusable; the message names the source, row and field."""


class RewardTrainer(FaultInjectionMixin, trl.RewardTrainer):
    """TRL's RewardTrainer with the fault injection every stage's resume tests use."""


# --- data ------------------------------------------------------------------------------------------

def load_pairs(sources: list[dict], field: str = "sources") -> tuple[list[dict], list[str]]:
    """Every row of every source, and where each came from ("source <path> row <i>") for errors."""
    if not sources:
        raise PreferenceDataError(f"{field} is empty: give at least one source, e.g. "
                                  f"{{path: 'builtin:arithmetic_preferences'}}")
    labelled = list(labelled_rows(sources))
    return [row for row, _ in labelled], [where for _, where in labelled]


def pair_format(row: dict, where: str) -> str:
    """'conversational' (message lists) or 'standard' (strings); an error naming the row otherwise.

    A field holding None counts as missing: `datasets` fills a column some rows lack with None."""
    missing = [name for name in ("chosen", "rejected") if row.get(name) is None]
    if missing:
        fields = sorted(key for key, value in row.items() if value is not None)
        raise PreferenceDataError(f"{where} has no {' or '.join(map(repr, missing))} field (fields: {fields}); "
                                  f"preference rows need 'chosen' and 'rejected' (+ optional 'prompt')")
    present = [name for name in ("prompt", "chosen", "rejected") if row.get(name) is not None]
    kinds = {name: "standard" if isinstance(row[name], str) else "conversational" if isinstance(row[name], list)
             else type(row[name]).__name__ for name in present}
    for name, kind in kinds.items():
        if kind not in ("standard", "conversational"):
            raise PreferenceDataError(f"{where}: field {name!r} is {kind}; give a string or a list of "
                                      f"{{role, content}} messages")
    if len(set(kinds.values())) > 1:
        raise PreferenceDataError(f"{where} mixes strings and message lists ({kinds}); give all of "
                                  f"{present} in one format")
    return next(iter(kinds.values()))


def _check_conversation(row: dict, where: str) -> None:
    for name in ("prompt", "chosen", "rejected"):
        if row.get(name) is None:
            continue
        try:
            chat_templates.validate_messages(row[name])
        except (TypeError, ValueError) as error:
            raise PreferenceDataError(f"{where}: field {name!r}: {error}") from error
    try:
        chat_templates.template.check_enable_thinking((row.get("chat_template_kwargs") or {}).get("enable_thinking"))
    except TypeError as error:
        raise PreferenceDataError(f"{where}: field 'chat_template_kwargs': {error}") from error
    for name in ("chosen", "rejected"):
        if row[name][-1]["role"] != "assistant":
            raise PreferenceDataError(f"{where}: field {name!r} ends with a {row[name][-1]['role']!r} message; the "
                                      f"reward model scores an assistant reply, so it must end with an assistant turn")


def tokenize_pair(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(chosen ids, rejected ids) as TRL's RewardTrainer tokenizes them (`_prepare_dataset`): message lists
    rendered with the chat template (prompt + reply, no generation prompt), strings with eos appended."""
    prompt = row.get("prompt")
    if isinstance(row["chosen"], list):
        tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
        kwargs = {"tools": tools, **(row.get("chat_template_kwargs") or {})}
        return tuple(tokenizer.apply_chat_template((prompt or []) + row[name], tokenize=True, return_dict=True,
                                                   **kwargs)["input_ids"] for name in ("chosen", "rejected"))
    eos = tokenizer.eos_token
    return tuple(tokenizer((prompt or "") + text + ("" if text.endswith(eos) else eos))["input_ids"]
                 for text in (row["chosen"], row["rejected"]))


def validate_pairs(rows: list[dict], origins: list[str], tokenizer, max_length: int | None) -> list[int]:
    """Check every pair as the trainer will see it; return the longer side's token count of each.

    Renders each pair with the tokenizer's chat template (the one TRL will use), so a pair the template
    refuses fails here, before any training, with the template's own message."""
    formats = {}
    lengths = []
    for row, where in zip(rows, origins):
        kind = pair_format(row, where)
        formats.setdefault(kind, where)
        if len(formats) > 1:
            raise PreferenceDataError(f"{where} is {kind} but {formats[next(iter(formats))]} is "
                                      f"{next(iter(formats))}: TRL trains on one format at a time, convert one of them")
        if kind == "conversational":
            _check_conversation(row, where)
        elif (row.get("prompt") is not None and not row["prompt"]) or not row["chosen"] or not row["rejected"]:
            raise PreferenceDataError(f"{where}: 'prompt', 'chosen' and 'rejected' must be non-empty strings")
        if row["chosen"] == row["rejected"]:
            raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' are identical; such a pair has a constant "
                                      f"loss of log 2 and teaches nothing: drop it")
        margin = row.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise PreferenceDataError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
        try:
            chosen, rejected = tokenize_pair(row, tokenizer)
        except TemplateError as error:
            raise PreferenceDataError(f"{where}: the chat template refuses this pair: {error}") from error
        longest = max(len(chosen), len(rejected))
        if max_length is not None and longest > max_length:
            raise PreferenceDataError(f"{where}: {longest} tokens, longer than max_length {max_length} (TRL would "
                                      f"drop the row silently); raise max_length or drop the row")
        lengths.append(longest)
    return lengths


# --- model -----------------------------------------------------------------------------------------


@torch.no_grad()
def pair_accuracy(model, dataset: Dataset, pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Share of pairs whose chosen side scores higher, over all pairs of a tokenized dataset (columns
    chosen_ids / rejected_ids, as TRL prepares them), and per value of its `kind` column if it has one."""
    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits.squeeze(-1)  # (2B,)
        chosen, rejected = logits.chunk(2)  # the collator puts all chosen rows first
        wins.extend((chosen > rejected).tolist())
    model.train(was_training)
    result = {"accuracy": sum(wins) / len(wins)}
    if "kind" in dataset.column_names:
        by_kind = defaultdict(list)
        for kind, win in zip(dataset["kind"], wins):
            by_kind[kind].append(win)
        result.update({f"accuracy/{kind}": sum(v) / len(v) for kind, v in sorted(by_kind.items())})
    return result


def format_accuracy(result: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('accuracy/') if '/' in k else k} {v:.3f}" for k, v in result.items())


# --- the run ---------------------------------------------------------------------------------------

def load_data(cfg: RewardModelConfig, tokenizer) -> tuple[Dataset, Dataset | None, str, str]:
    """(train pairs, held-out pairs or None, fingerprint, summary), every pair checked as TRL will see it."""
    rows, origins = load_pairs(cfg.sources)
    lengths = validate_pairs(rows, origins, tokenizer, cfg.max_length)
    eval_rows = []
    if cfg.eval_sources:
        eval_rows, eval_origins = load_pairs(cfg.eval_sources, "eval_sources")
        validate_pairs(eval_rows, eval_origins, tokenizer, cfg.max_length)
    fingerprint = data_fingerprint([json.dumps(r, sort_keys=True) for r in rows])
    summary = (f"{len(rows)} pairs ({pair_format(rows[0], origins[0])}), longest {max(lengths)} tokens; "
               f"{len(eval_rows)} held-out pairs")
    return Dataset.from_list(rows), Dataset.from_list(eval_rows) if eval_rows else None, fingerprint, summary


def load_reward_model(cfg: RewardModelConfig, tokenizer):
    """A sequence classifier with one output, the reward. The score head of a causal-LM checkpoint starts
    random: seeded, or two runs of one recipe differ from the first step (and a resumed run could not be
    compared with an uninterrupted one). TRL's own context: a causal LM's lm_head is unexpected and
    score.weight missing, both on purpose."""
    set_seed(cfg.seed)
    with suppress_seqcls_warning():
        model = load_policy(cfg, tokenizer, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def held_out_accuracy(trainer, batch_size: int) -> BeforeAfter:
    """Held-out pair accuracy (`eval_sources`), before and after training."""
    dataset, pad_id = trainer.eval_dataset, trainer.processing_class.pad_token_id

    def describe(before, after) -> str:
        return (f"held-out pairs ({len(dataset)}), chosen ranked above rejected: "
                + (f"before {format_accuracy(before)} -> after {format_accuracy(after)}" if before is not None
                   else f"after training: {format_accuracy(after)}"))

    return BeforeAfter(lambda model: pair_accuracy(model, dataset, pad_id, batch_size), "heldout/{}",
                       "heldout_before/{}", describe)


def run(cfg: RewardModelConfig) -> dict:
    resume_from = preflight(cfg, "reward_model")
    tokenizer, added = chat_templates.load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                                                     cfg.chat_template, fallback="smollm3")
    train_dataset, eval_dataset, fingerprint, data_summary = load_data(cfg, tokenizer)
    model = load_reward_model(cfg, tokenizer)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            processing_class=tokenizer, peft_config=lora_config(cfg, "SEQ_CLS"),
                            callbacks=stage_callbacks(cfg))
    begin(trainer, cfg, f"{launch_summary('reward_model', trainer, cfg)}; {data_summary}; template "
                        f"{cfg.chat_template or 'of the checkpoint'}"
                        + (f"; added tokens {added} (embeddings resized to {len(tokenizer)})" if added else ""),
          resume_from)
    check = held_out_accuracy(trainer, cfg.per_device_eval_batch_size) if eval_dataset is not None else None
    if check is not None:
        check.before(trainer, resume_from)

    result = trainer.train(resume_from_checkpoint=resume_from)
    # No stop tokens: a reward model scores, it does not generate.
    return finish(trainer, cfg, tokenizer, stage="reward_model", reload=lambda: load_reward_model(cfg, tokenizer),
                  stop_ids=None, fingerprint=fingerprint, metrics=train_metrics(result),
                  evaluate=check.after if check is not None else None)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(RewardModelConfig, run, argv)


if __name__ == "__main__":
    from core.infra import end_process_group

    main()
    end_process_group()  # every rank leaves the process group together (core/infra/__init__.py says why)
