"""RL prompts and rewards: load the prompts, bind the reward functions, and check both before the
first rollout.

Prompts come from a reward suite or from data sources:

    suite: arithmetic                 # rewards/suites.py: rows {prompt: "What is 7+5?", answer: "12"}
    sources:                          # core/sources.py: rows with `prompt` + the columns the rewards read
      - {path: data/prompts.jsonl}

A string prompt becomes one user message when the tokenizer has a chat template, so TRL renders it
with the template (`add_generation_prompt`, plus the recipe's `chat_template_kwargs`, e.g.
`enable_thinking`); this is how rewards.evaluate asks the same questions. A prompt longer than
`max_prompt_length` tokens once rendered is dropped, and counted.

Rewards are picked by name from `rewards.functions.REWARD_FUNCS`. Each is wrapped (`NamedReward`)
so that TRL logs it under its recipe name, its knobs are bound, and a function that raises, returns
another number of values than completions, or a value that is not a number is reported with the
reward's name (`rewards.functions.compute_rewards` checks the contract).

Checked before the trainer is built (`check_reward_columns`): every reward name exists, and every
column a reward function requires (a parameter without default besides `completions`, e.g.
`accuracy`'s `answer`) is a column of every prompt row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from core.sources import labelled_rows
from rewards.functions import REWARD_FUNCS, RewardFunction, compute_rewards
from rewards.reward_model_scorer import RewardModelSpec
from rewards.suites import get_suite, limited_reward_kwargs
from rewards.suites import load_rows as load_suite_rows

# Columns TRL passes to every reward function itself (not from the data).
TRL_REWARD_ARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


class RLDataError(ValueError):
    """A prompt row, source or reward setting is unusable; the message names it."""


class RewardFunctionError(RuntimeError):
    """A reward function raised during training; the message names the reward."""


@dataclass
class NamedReward:
    """A reward function under its recipe name, with its knobs bound and its contract enforced.

    TRL calls `fn(prompts=..., completions=..., completion_ids=..., **columns)` and names the reward
    by `__name__` in its metrics (`rewards/<name>/mean`)."""

    name: str
    fn: RewardFunction
    kwargs: dict
    # A learned reward model scores the prompt with the completion; the rule-based rewards read columns only.
    takes_prompts: bool = False

    @property
    def __name__(self) -> str:  # TRL's get_callable_name reads it
        return self.name

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        # TRL's extra arguments that our reward functions do not take.
        for key in ("trainer_state", "log_extra", "log_metric"):
            columns.pop(key, None)
        try:
            if self.takes_prompts:
                columns["prompts"] = prompts
            return compute_rewards({self.name: _bound(self.fn, self.kwargs)}, completions, **columns)[self.name]
        except Exception as error:
            raise RewardFunctionError(
                f"reward function {self.name!r} ({self.fn.__module__}.{self.fn.__qualname__}) failed on a batch of "
                f"{len(completions)} completions: {type(error).__name__}: {error}") from error


def _bound(fn, kwargs):
    if not kwargs:
        return fn

    def bound(completions, **columns):
        return fn(completions, **{**columns, **kwargs})

    bound.__module__, bound.__qualname__ = fn.__module__, fn.__qualname__
    return bound


def reward_setup(cfg) -> tuple[list[str], list[float], dict[str, dict]]:
    """(names, weights, kwargs by name): the recipe's, else the suite's; unknown names are an error."""
    suite = get_suite(cfg.suite) if cfg.suite else None
    if cfg.reward_funcs is None:
        if suite is None:
            raise RLDataError("reward_funcs is required with `sources`: name the rewards, e.g. [accuracy] "
                              f"(rewards: {sorted(REWARD_FUNCS)})")
        names, weights = list(suite.reward_weights), list(suite.reward_weights.values())
        if cfg.reward_weights is not None:
            raise RLDataError("reward_weights without reward_funcs: name the rewards the weights belong to")
    else:
        names = list(cfg.reward_funcs)
        weights = list(cfg.reward_weights) if cfg.reward_weights is not None else [1.0] * len(names)
    unknown = [n for n in [*names, *(cfg.reward_kwargs or {})] if n not in REWARD_FUNCS]
    if unknown:
        raise RLDataError(f"unknown reward function(s) {unknown} in reward_funcs / reward_kwargs; rewards: "
                          f"{sorted(REWARD_FUNCS)}")
    if len(weights) != len(names):
        raise RLDataError(f"reward_weights has {len(weights)} values for {len(names)} reward_funcs {names}")
    kwargs = {name: dict((suite.reward_kwargs.get(name, {}) if suite else {})) for name in names}
    for name, extra in (cfg.reward_kwargs or {}).items():
        if name not in names:
            raise RLDataError(f"reward_kwargs names {name!r}, which is not among reward_funcs {names}")
        kwargs[name].update(extra)
    # DAPO's L_max is this run's max_completion_length unless the recipe sets it (as rewards.evaluate binds it).
    kwargs = limited_reward_kwargs(kwargs, cfg.max_completion_length, cfg.reward_kwargs)
    for name, extra in kwargs.items():
        params = inspect.signature(REWARD_FUNCS[name]).parameters
        bad = [k for k in extra if k not in params or params[k].kind is not inspect.Parameter.KEYWORD_ONLY]
        if bad:
            knobs = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
            raise RLDataError(f"reward_kwargs for {name!r}: unknown knob(s) {bad}; its knobs: {knobs}")
    return names, weights, kwargs


def build_rewards(names: list[str], kwargs: dict[str, dict]) -> list[NamedReward]:
    return [NamedReward(name, REWARD_FUNCS[name], kwargs.get(name, {})) for name in names]


def reward_model_specs(cfg, names: list[str]) -> list[RewardModelSpec]:
    """The recipe's `reward_models`, checked before anything is loaded (`RewardModelSpec.from_dict`: keys, path
    or url, a local path that exists); and at least one reward in all."""
    specs = [RewardModelSpec.from_dict(raw, index) for index, raw in enumerate(cfg.reward_models or [])]
    if not names and not specs:
        raise RLDataError("no rewards: reward_funcs is empty and there are no reward_models")
    return specs


def build_reward_models(specs: list[RewardModelSpec]) -> list[NamedReward]:
    """Each reward model as a reward function named `reward_model` (`reward_model_<i>` with several), as TRL logs it."""
    return [NamedReward("reward_model" if len(specs) == 1 else f"reward_model_{i}", spec.build(), {},
                        takes_prompts=True) for i, spec in enumerate(specs)]


def required_columns(fn: RewardFunction) -> list[str]:
    """The data columns a reward function cannot do without: its parameters without a default."""
    return [name for name, p in inspect.signature(fn).parameters.items()
            if name not in TRL_REWARD_ARGS and p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def check_reward_columns(rows: list[dict], origins: list[str], names: list[str], where: str) -> None:
    """Every column a reward reads is present (not None) in every row: else an error naming the reward,
    the column, the prompts' origin and the first row without it."""
    for name in names:
        for column in required_columns(REWARD_FUNCS[name]):
            for row, origin in zip(rows, origins):
                if row.get(column) is None:
                    raise RLDataError(
                        f"reward {name!r} reads column {column!r}, but {origin} has none (fields: "
                        f"{sorted(k for k, v in row.items() if v is not None)}); {where}: add the column, or drop "
                        f"{name!r} from reward_funcs")


def load_prompts(cfg) -> tuple[list[dict], list[str], str]:
    """(rows, origin of each row, description of where they come from). Rows have `prompt` and the
    source's other columns."""
    if cfg.suite is not None:
        suite = get_suite(cfg.suite)
        rows = load_suite_rows(suite, cfg.suite_split, cfg.suite_data_path)
        origins = [f"suite {suite.name} ({cfg.suite_split}) row {i}" for i in range(len(rows))]
        return rows, origins, f"suite {suite.name!r}"
    if not cfg.sources:
        raise RLDataError("sources is empty: give at least one source with a `prompt` column")
    rows, origins = [], []
    for row, where in labelled_rows(cfg.sources):
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()) and not _is_messages(prompt):
            raise RLDataError(f"{where}: field 'prompt' must be a non-empty string or a list of {{role, content}} "
                              f"messages, got {prompt!r} (fields: {sorted(row)})")
        rows.append(row)
        origins.append(where)
    return rows, origins, "sources " + ", ".join(str(s.get("path")) for s in cfg.sources)


def _is_messages(prompt) -> bool:
    return (isinstance(prompt, list) and bool(prompt)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt))


def as_conversations(rows: list[dict], tokenizer) -> list[dict]:
    """String prompts become one user message when the tokenizer has a chat template."""
    if not tokenizer.chat_template:
        return rows
    return [{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} if isinstance(row["prompt"], str) else row
            for row in rows]


def prompt_ids(prompt, tokenizer, chat_template_kwargs: dict) -> list[int]:
    """The token ids TRL will generate from: the chat template with the generation prompt, or the text."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             **chat_template_kwargs)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def drop_long_prompts(rows: list[dict], tokenizer, max_prompt_length: int | None,
                      chat_template_kwargs: dict) -> tuple[list[dict], list[int], int]:
    """(kept rows, their prompt lengths, how many were dropped as longer than max_prompt_length)."""
    kept, lengths = [], []
    for row in rows:
        length = len(prompt_ids(row["prompt"], tokenizer, chat_template_kwargs))
        if max_prompt_length is None or length <= max_prompt_length:
            kept.append(row)
            lengths.append(length)
    if not kept:
        raise RLDataError(f"every prompt ({len(rows)}) is longer than max_prompt_length={max_prompt_length} tokens; "
                          f"raise max_prompt_length")
    return kept, lengths, len(rows) - len(kept)
