"""Preference data: load sources, check every row before training, name the row at fault.

Sources are loaded by core/sources.py (the loader every stage shares), e.g.

    sources:
      - {path: "builtin:arithmetic_pairs", split: train}        # shipped, no network
      - {path: out/tiny/pairs/pairs.jsonl}                      # written by python -m preference.build_pairs
      - {path: "hf:trl-lib/ultrafeedback_binarized", split: train, max_rows: 5000}   # needs network

Row formats are TRL's (ARCHITECTURE.md):
  - paired (dpo, orpo, kto): `prompt`, `chosen`, `rejected`, as strings, or as message lists
    (`prompt` the conversation so far, `chosen` / `rejected` the assistant reply);
  - paired with an implicit prompt: `chosen` and `rejected` are whole conversations that share
    their first turns (the prompt; TRL's `extract_prompt` takes the longest common prefix);
  - unpaired (kto only): `prompt`, `completion`, `label` (bool: desirable or not).
  KTO takes paired rows too: `unpair` splits each into a desirable (chosen, label true) and an
  undesirable (rejected, label false) row, in the order `unpair` explains: labels alternate, so every
  batch of KTO's sequential sampling holds both, and a pair's two rows sit about half the set apart.
  TRL 1.16's KTOTrainer estimates its KL baseline from each row's prompt with the completion of the row
  before it in the batch (`add_kl_completion_ids`: completions rotated by one within each batch), so a
  pair's rows side by side would pair a prompt with its own reply (issue 30). TRL's own
  `unpair_preference_dataset` puts a block of up to 1000 chosen rows before their rejected ones, and
  sequential sampling then trains on batches of a single label.
An optional `chat_template_kwargs` mapping per row is passed to the chat template (TRL does the
same), e.g. `{enable_thinking: false}` to render a row in SmolLM3's no-think mode.

Checks (`validate_rows`), each failing with "source <path> row <i>" and the field: a missing
field (e.g. no `rejected`), an empty string or empty message content, chosen identical to
rejected (no preference to learn), chosen/rejected of different kinds (string vs messages), an
implicit-prompt pair with no shared first turn, a non-bool KTO label, a conversation the chat
template refuses, and a row longer than `max_length` while `truncation` is off (TRL would cut
it, or drop a row whose prompt alone fills it, without a word). A KTO set whose rows all carry
the same label fails too (KTO weighs desirable against undesirable; one side alone cannot train).
"""

from __future__ import annotations

import json

from core.sources import labelled_rows

ROLES = ("system", "user", "assistant", "tool")


class PreferenceDataError(ValueError):
    """A source or row is unusable; the message names the source, row and field."""


def row_format(row: dict, where: str) -> str:
    """'paired' or 'unpaired'; an error naming the row and the missing field otherwise.

    A field holding None counts as missing: `datasets` fills a column some rows lack with None."""
    present = {key for key, value in row.items() if value is not None}
    if "chosen" in present or "rejected" in present:
        for name in ("chosen", "rejected"):
            if name not in present:
                raise PreferenceDataError(f"{where}: field {name!r} is missing (fields: {sorted(present)}); a "
                                          f"preference pair needs both 'chosen' and 'rejected'")
        return "paired"
    if "completion" in present or "label" in present:
        for name in ("prompt", "completion", "label"):
            if name not in present:
                raise PreferenceDataError(f"{where}: field {name!r} is missing (fields: {sorted(present)}); an "
                                          f"unpaired (KTO) row needs 'prompt', 'completion' and 'label'")
        return "unpaired"
    raise PreferenceDataError(f"{where} has neither 'chosen'/'rejected' nor 'completion'/'label' (fields: "
                              f"{sorted(present)}); preference rows are prompt/chosen/rejected, KTO rows "
                              f"prompt/completion/label")


def load_sources(sources: list[dict]) -> tuple[list[dict], list[str]]:
    """All rows of all sources and, for each, where it came from ("source <path> row <i>")."""
    if not sources:
        raise PreferenceDataError("sources is empty: give at least one, e.g. {path: 'builtin:arithmetic_pairs'}")
    labelled = list(labelled_rows(sources))
    return [row for row, _ in labelled], [where for _, where in labelled]


def _check_text(value, where: str, field: str) -> None:
    if not isinstance(value, str):
        raise PreferenceDataError(f"{where}: field {field!r} must be a string or a message list, got "
                                  f"{type(value).__name__}")
    if not value.strip():
        raise PreferenceDataError(f"{where}: field {field!r} is an empty string; drop the row or fill it")


def _check_messages(messages, where: str, field: str, last_role: str | None = None) -> None:
    if not isinstance(messages, list) or not messages:
        raise PreferenceDataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} "
                                  f"messages, got {messages!r}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise PreferenceDataError(f"{where}: {field}[{j}] must be a mapping with a role in {list(ROLES)} and "
                                      f"a content, got {message!r}")
        content = message.get("content")
        if isinstance(content, str) and not content.strip() and not message.get("tool_calls"):
            raise PreferenceDataError(f"{where}: {field}[{j}] ({message['role']}) has empty content")
    if last_role is not None and messages[-1]["role"] != last_role:
        raise PreferenceDataError(f"{where}: field {field!r} must end with an {last_role} turn, ends with "
                                  f"{messages[-1]['role']!r}")


def _is_conversational(value) -> bool:
    return isinstance(value, list)


def check_row(row: dict, where: str) -> str:
    """Check one row's fields (not its length); return its format."""
    kind = row_format(row, where)
    answers = ("chosen", "rejected") if kind == "paired" else ("completion",)
    prompt = row.get("prompt")
    conversational = _is_conversational(row[answers[0]])
    for name in (*answers, *(("prompt",) if prompt is not None else ())):
        if _is_conversational(row[name]) != conversational:
            raise PreferenceDataError(
                f"{where}: field {name!r} is {'a message list' if _is_conversational(row[name]) else 'a string'} "
                f"but {answers[0]!r} is {'a message list' if conversational else 'a string'}; give all of them in "
                f"one form")
    if conversational:
        if prompt is not None:
            _check_messages(prompt, where, "prompt")
        for name in answers:
            _check_messages(row[name], where, name, last_role="assistant")
    else:
        for name in (*answers, *(("prompt",) if prompt is not None else ())):
            _check_text(row[name], where, name)
    if kind == "paired":
        if row["chosen"] == row["rejected"]:
            raise PreferenceDataError(f"{where}: 'chosen' is identical to 'rejected' ({row['chosen']!r}): the pair "
                                      f"states no preference; drop it")
        if prompt is None:
            if not conversational:
                raise PreferenceDataError(f"{where}: no 'prompt' field; an implicit prompt needs chosen and rejected "
                                          f"as whole conversations (message lists)")
            shared = 0
            while (shared < min(len(row["chosen"]), len(row["rejected"]))
                   and row["chosen"][shared] == row["rejected"][shared]):
                shared += 1
            if shared == 0:
                raise PreferenceDataError(f"{where}: no 'prompt' field, and chosen and rejected share no first turn "
                                          f"to take as the prompt")
    else:
        if not isinstance(row["label"], bool):
            raise PreferenceDataError(f"{where}: field 'label' must be true or false, got {row['label']!r}")
    return kind


def unpair(rows: list[dict]) -> list[dict]:
    """Paired rows as KTO rows, in an order fit for TRL's KL baseline (see the module docstring).

    Pairs are grouped by prompt (in order of first appearance: a prompt asked in several pairs, e.g. in
    two reasoning modes, counts once), then row 2k is pair k's desirable row and row 2k+1 the undesirable
    row of pair k + ceil(n/2) (mod n). So labels alternate (every batch of even size is balanced),
    neighbours never share a prompt unless one prompt holds about half the pairs, and a pair's two rows
    are n - 1 or more rows apart: with distinct prompts, no batch of fewer than n rows holds a prompt
    twice. From 3 pairs on; 2 pairs cannot alternate labels without a pair's rows side by side."""
    from trl.data_utils import extract_prompt

    by_prompt: dict[str, list[tuple[dict, dict]]] = {}
    for row in rows:
        if "prompt" not in row or row["prompt"] is None:
            row = {**row, **extract_prompt(row)}
        rest = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
        by_prompt.setdefault(json.dumps(row["prompt"], sort_keys=True), []).append(
            ({**rest, "completion": row["chosen"], "label": True}, {**rest, "completion": row["rejected"], "label": False}))
    pairs = [pair for group in by_prompt.values() for pair in group]
    return kto_order([desirable for desirable, _ in pairs], [undesirable for _, undesirable in pairs])


def kto_order(desirable: list[dict], undesirable: list[dict]) -> list[dict]:
    """KTO rows in an order fit for TRL's KL baseline (module docstring): labels alternate, and the undesirable
    rows are rotated by 0 or ceil(n/2), whichever puts rows of one prompt further apart. Rows that come paired
    side by side (core/arithmetic.py `kto_rows`, a file written that way) are rotated by half; rows already in
    such an order (`unpair`'s, build_pairs' KTO output) keep it. Rows past the shorter label's count go last."""
    n = min(len(desirable), len(undesirable))

    def interleaved(shift: int) -> list[dict]:
        rotated = undesirable[:n][shift:] + undesirable[:n][:shift]
        return [row for pair in zip(desirable[:n], rotated) for row in pair]

    def closest_same_prompt(rows: list[dict]) -> int:
        last, closest = {}, len(rows)
        for i, row in enumerate(rows):
            key = json.dumps(row["prompt"], sort_keys=True)
            if key in last:
                closest = min(closest, i - last[key])
            last[key] = i
        return closest

    ordered = max((interleaved(0), interleaved((n + 1) // 2)), key=closest_same_prompt)
    return ordered + desirable[n:] + undesirable[n:]


def validate_rows(rows: list[dict], origins: list[str], method: str, tokenizer, max_length: int | None,
                  truncation: bool) -> list[int]:
    """Check every row as the trainer will see it; return each row's longest token count (prompt + answer)."""
    from jinja2 import TemplateError

    kinds = {}
    for row, where in zip(rows, origins):
        kinds.setdefault(check_row(row, where), where)
    if len(kinds) > 1:
        raise PreferenceDataError(f"sources mix paired rows ({kinds['paired']}) and unpaired KTO rows "
                                  f"({kinds['unpaired']}); use one format")
    if "unpaired" in kinds and method != "kto":
        raise PreferenceDataError(f"{kinds['unpaired']} is an unpaired (prompt/completion/label) row; method "
                                  f"{method} needs prompt/chosen/rejected pairs (only kto takes unpaired rows)")
    forms = {_is_conversational(row.get("chosen", row.get("completion"))) for row in rows}
    if len(forms) > 1:
        raise PreferenceDataError("sources mix conversational rows (message lists) and plain-text rows; TRL tokenises "
                                  "one form per dataset: convert one of them")
    if method == "kto":
        labels = [row["label"] for row in rows if "label" in row and row.get("label") is not None]
        if labels and len(set(labels)) == 1:
            raise PreferenceDataError(
                f"every one of the {len(labels)} KTO rows has label {labels[0]} ({origins[0]} ... {origins[-1]}); KTO "
                f"needs desirable (true) and undesirable (false) completions")

    lengths = []
    for row, where in zip(rows, origins):
        answers = [row[k] for k in ("chosen", "rejected", "completion") if row.get(k) is not None]
        longest = 0
        for answer in answers:
            prompt = row.get("prompt")
            try:
                if _is_conversational(answer):
                    messages = (prompt or []) + answer
                    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                        **(row.get("chat_template_kwargs") or {}))["input_ids"]
                else:
                    ids = tokenizer((prompt or "") + answer, add_special_tokens=False)["input_ids"]
            except TemplateError as error:
                raise PreferenceDataError(f"{where}: the chat template refuses this conversation: {error}") from error
            longest = max(longest, len(ids))
        if max_length is not None and longest > max_length and not truncation:
            raise PreferenceDataError(f"{where}: {longest} tokens (prompt + answer), longer than max_length "
                                      f"{max_length}, and truncation is off; raise max_length, drop the row, or "
                                      f"set truncation: true")
        lengths.append(longest)
    return lengths
