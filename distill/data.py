"""Distillation prompts: from a reward suite, or from data sources with a `prompt` column.

    suite: arithmetic                 # rewards/suites.py, split `suite_split` (train by default)
    sources:                          # or: any core/sources.py source whose rows have `prompt`
      - {path: data/prompts.jsonl, max_rows: 5000}

A prompt is a string (asked as one user message) or a list of {role, content} messages (the
conversation so far); the student answers it through the chat template with a generation prompt, as
TRL's trainers render a conversational `prompt`. Other columns (`answer`, ...) are not used here: the
teacher is the only signal. A bad row stops the run before training with the source, row and field.
"""

from __future__ import annotations

from core.sources import labelled_rows

ROLES = ("system", "user", "assistant", "tool")


class PromptDataError(ValueError):
    """A prompt row is unusable; the message names the source, row and field."""


def as_messages(prompt, where: str) -> list[dict]:
    """The prompt as a message list ending with a user turn; an error naming the row otherwise."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PromptDataError(f"{where}: field 'prompt' is an empty string")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise PromptDataError(f"{where}: field 'prompt' must be a string or a non-empty list of {{role, content}} "
                              f"messages, got {type(prompt).__name__}")
    for j, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                message.get("content"), str):
            raise PromptDataError(f"{where}: prompt[{j}] must be {{role: one of {list(ROLES)}, content: string}}, "
                                  f"got {message!r}")
    if prompt[-1]["role"] != "user":
        raise PromptDataError(f"{where}: the prompt's last message is {prompt[-1]['role']!r}; it must be a user "
                              f"turn for the student to answer")
    return prompt


def load_prompts(cfg) -> tuple[list[list[dict]], list[str]]:
    """Every prompt (as messages) and, for each, where it came from ("suite arithmetic (train) row 3")."""
    raw: list[tuple[object, str]] = []
    if cfg.suite is not None:
        from rewards.suites import get_suite, load_rows as suite_rows

        suite = get_suite(cfg.suite)
        for i, row in enumerate(suite_rows(suite, cfg.suite_split, cfg.suite_data_path)):
            raw.append((row["prompt"], f"suite {suite.name} ({cfg.suite_split}) row {i}"))
    else:
        if not cfg.sources:
            raise PromptDataError("sources is empty: give at least one source with a `prompt` column, or suite")
        for row, where in labelled_rows(cfg.sources):
            if row.get("prompt") is None:
                raise PromptDataError(f"{where} has no 'prompt' field (fields: {sorted(row)}); distillation "
                                      f"rows need a prompt (a string or a list of messages)")
            raw.append((row["prompt"], where))
    if cfg.max_prompts is not None:
        raw = raw[:cfg.max_prompts]
    return [as_messages(prompt, where) for prompt, where in raw], [where for _, where in raw]


def check_prompt_lengths(prompts: list[list[dict]], origins: list[str], tokenizer, max_completion_length: int,
                         max_positions: int, chat_template_kwargs: dict) -> list[int]:
    """Token count of each rendered prompt; a prompt with no room for a full completion is an error."""
    lengths = []
    for messages, where in zip(prompts, origins):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            **chat_template_kwargs)["input_ids"]
        if len(ids) + max_completion_length > max_positions:
            raise PromptDataError(f"{where}: {len(ids)} prompt tokens + max_completion_length {max_completion_length} "
                                  f"exceed the student's {max_positions} positions; shorten the prompt or lower "
                                  f"max_completion_length")
        lengths.append(len(ids))
    return lengths
