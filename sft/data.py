"""SFT data: load chat sources, mix reasoning modes, and reject bad rows before training.

A source is a mapping in the recipe's `sources` list:

    sources:
      - {path: "builtin:arithmetic_chat"}                           # shipped, no network
      - {path: data/chats.jsonl, max_rows: 5000}                    # .jsonl / .json / .parquet / .arrow
      - {path: "hf:HuggingFaceTB/smoltalk", subset: all, split: train}  # a Hugging Face dataset (needs network)

Sources are loaded by core/sources.py, the loader every stage shares (its keys are documented there).

Rows follow TRL's formats (ARCHITECTURE.md): `messages` (a list of {role, content}), or `prompt` +
`completion` (strings, or message lists). Every row is checked before the trainer is built
(`validate_rows`), and the first bad one stops the run with the source, row and field at fault:
no assistant turn, a role or content of the wrong kind, a conversation the chat template refuses
(roles that do not alternate where the template forbids it, control tokens inside content), an
assistant mask that covers nothing, or an example longer than `max_length` while truncation is off.

Reasoning mode: a row is `think` when one of its assistant turns carries reasoning (a non-empty
`<think>...</think>` block in its content, or `reasoning_content`), `no_think` otherwise. Each row
gets `chat_template_kwargs: {enable_thinking: ...}` to match (TRL passes that column to the
template per row), so a no-think row is rendered in the template's no-think mode instead of
training an empty think block. `mix_reasoning_modes` subsamples to a requested think fraction.

Built-in data (`builtin:arithmetic_chat`, core/arithmetic.py `conversations`): single-digit `a+b` /
`a*b` questions asked as "What is 7+5?" (the rewards suite's prompt form, `core.arithmetic.question`),
answered "12" in no-think mode or "<think>\\nThe sum of 7 and 5 is 12.\\n</think>\\n12" in think mode,
in one- and two-turn conversations. `split: test` holds the 40 held-out facts, for evaluation only.
"""

from __future__ import annotations

import json
import random
import re

from core.sources import labelled_rows

ROLES = ("system", "user", "assistant", "tool")
_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


class SFTDataError(ValueError):
    """A source or row is unusable; the message names the source, row and field."""


def row_format(row: dict, where: str) -> str:
    """'messages' or 'prompt_completion'; an error naming the row when neither is there.

    A field holding None counts as missing: `datasets` fills a column some rows lack with None."""
    if row.get("messages") is not None:
        return "messages"
    if row.get("prompt") is not None and row.get("completion") is not None:
        return "prompt_completion"
    fields = sorted(key for key, value in row.items() if value is not None)
    raise SFTDataError(f"{where} has no 'messages' field (fields: {fields}); SFT rows need 'messages' "
                       f"(a list of {{role, content}}) or 'prompt' + 'completion'")


def conversation(row: dict) -> list[dict] | None:
    """The row as one message list, or None for plain-text prompt/completion rows."""
    if row_format(row, "row") == "messages":
        return row["messages"]
    if isinstance(row["prompt"], list):
        return list(row["prompt"]) + list(row["completion"])
    return None


def has_reasoning(messages: list[dict]) -> bool:
    for message in messages:
        if message.get("role") != "assistant":
            continue
        if message.get("reasoning_content"):
            return True
        content = message.get("content")
        if isinstance(content, str) and any(block.strip() for block in _THINK_BLOCK.findall(content)):
            return True
    return False


def tag_reasoning_mode(row: dict) -> dict:
    """Add `chat_template_kwargs.enable_thinking` from the row's content (kept if the row sets it)."""
    messages = conversation(row)
    if messages is None:
        return row
    kwargs = dict(row.get("chat_template_kwargs") or {})
    kwargs.setdefault("enable_thinking", has_reasoning(messages))
    return {**row, "chat_template_kwargs": kwargs}


def mix_reasoning_modes(rows: list[dict], think_ratio: float | None, seed: int) -> list[int]:
    """Indices of the rows to keep so that `think_ratio` of them think: the larger of the think /
    no-think pools is subsampled (a seeded random choice); rows keep their relative order.

    None keeps every row."""
    if think_ratio is None:
        return list(range(len(rows)))
    if not 0.0 <= think_ratio <= 1.0:
        raise SFTDataError(f"think_ratio must be between 0 and 1, got {think_ratio}")
    think = [i for i, r in enumerate(rows) if (r.get("chat_template_kwargs") or {}).get("enable_thinking")]
    plain = sorted(set(range(len(rows))) - set(think))
    if think_ratio == 1.0:
        keep_think, keep_plain = len(think), 0
    elif think_ratio == 0.0:
        keep_think, keep_plain = 0, len(plain)
    else:
        # The largest mix with exactly the ratio that both pools can supply.
        total = min(len(think) / think_ratio, len(plain) / (1 - think_ratio))
        keep_think, keep_plain = round(total * think_ratio), round(total * (1 - think_ratio))
    if (think_ratio > 0 and keep_think == 0) or (think_ratio < 1 and keep_plain == 0):
        raise SFTDataError(f"think_ratio {think_ratio} needs both reasoning modes, but the data has {len(think)} "
                           f"think and {len(plain)} no-think rows")
    rng = random.Random(seed)
    return sorted(rng.sample(think, keep_think) + rng.sample(plain, keep_plain))


def load_sources(sources: list[dict], think_ratio: float | None, seed: int) -> tuple[list[dict], list[str]]:
    """All rows of all sources (tagged with their reasoning mode and mixed to `think_ratio`) and,
    for each row, where it came from ("source <path> row <i>") for error messages."""
    if not sources:
        raise SFTDataError("sources is empty: give at least one data source, e.g. {path: 'builtin:arithmetic_chat'}")
    rows, origins = [], []
    for row, where in labelled_rows(sources):
        row_format(row, where)
        rows.append(tag_reasoning_mode(row))
        origins.append(where)
    kept = mix_reasoning_modes(rows, think_ratio, seed)
    return [rows[i] for i in kept], [origins[i] for i in kept]


# --- validation -----------------------------------------------------------------------------------

def check_messages(messages, where: str, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} messages, "
                           f"got {type(messages).__name__}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise SFTDataError(f"{where}: {field}[{j}] must be a mapping with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise SFTDataError(f"{where}: {field}[{j}] has role {message['role']!r}; roles are {list(ROLES)}")
        content = message.get("content")
        if not (isinstance(content, (str, list)) or (content is None and message.get("tool_calls"))):
            raise SFTDataError(f"{where}: {field}[{j}] ({message['role']}) has content of type "
                               f"{type(content).__name__}; give a string or a list of content parts")


def validate_rows(rows: list[dict], origins: list[str], tokenizer, max_length: int | None,
                  truncation: bool, assistant_only_loss: bool) -> list[int]:
    """Check every row as the trainer will see it; return each row's token count.

    Renders each conversation with the tokenizer's chat template (the one TRL will use), so a row
    the template refuses fails here, before any training, with the template's own message."""
    kinds = {row_format(row, where) for row, where in zip(rows, origins)}
    if len(kinds) > 1:
        raise SFTDataError(f"sources mix 'messages' rows and 'prompt'/'completion' rows ({origins[0]} ...); "
                           f"TRL trains on one format at a time: convert one of them")
    from jinja2 import TemplateError

    lengths = []
    for row, where in zip(rows, origins):
        kind = row_format(row, where)
        messages = conversation(row)
        if messages is None:  # plain-text prompt + completion
            for field in ("prompt", "completion"):
                if not isinstance(row[field], str) or not row[field]:
                    raise SFTDataError(f"{where}: field {field!r} must be a non-empty string or a message list")
            ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
            mask = [1]  # TRL's completion mask: never empty for a non-empty completion
        else:
            fields = ("messages",) if kind == "messages" else ("prompt", "completion")
            for field in fields:
                check_messages(row[field], where, field)
            if not any(m["role"] == "assistant" for m in row[fields[-1]]):
                field = fields[-1]
                raise SFTDataError(f"{where}: field {field!r} has no assistant turn (roles: "
                                   f"{[m['role'] for m in messages]}); SFT learns from assistant turns")
            try:
                out = tokenizer.apply_chat_template(
                    messages, tools=_tools(row, where), return_dict=True,
                    return_assistant_tokens_mask=assistant_only_loss, **(row.get("chat_template_kwargs") or {}))
            except TemplateError as error:
                raise SFTDataError(f"{where}: the chat template refuses this conversation (roles "
                                   f"{[m['role'] for m in messages]}): {error}") from error
            ids = out["input_ids"]
            mask = out["assistant_masks"] if assistant_only_loss else [1]
            if truncation and max_length is not None:
                mask = mask[:max_length]
            if 1 not in mask:
                raise SFTDataError(
                    f"{where}: its assistant mask is empty{' within max_length' if truncation else ''}: no token "
                    f"would be trained. Check that the chat template's training variant wraps assistant turns in "
                    f"{{% generation %}} (chat_templates.check) and that the assistant content is not empty")
        if max_length is not None and len(ids) > max_length and not truncation:
            raise SFTDataError(f"{where}: {len(ids)} tokens, longer than max_length {max_length}, and truncation is "
                               f"off; raise max_length, drop the row, or set truncation: true")
        lengths.append(len(ids))
    return lengths


def _tools(row: dict, where: str):
    tools = row.get("tools")
    if isinstance(tools, str):  # TRL accepts tools as a JSON string too
        try:
            return json.loads(tools)
        except json.JSONDecodeError as error:
            raise SFTDataError(f"{where}: field 'tools' is not valid JSON: {error}") from error
    return tools
