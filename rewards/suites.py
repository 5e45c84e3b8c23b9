"""Reward suites: a dataset plus the reward functions, weights and generation settings to score it.

    from rewards.suites import SUITES, load_rows
    suite = SUITES["arithmetic"]
    rows = load_rows(suite, split="test")        # [{"prompt": "What is 7+5?", "answer": "12"}, ...]

Suites:
  arithmetic  built in, nothing to download: single-digit `a+b` and `a*b` facts ("What is 7+5?"),
              the task the tiny recipes train on. A tiny model really learns these (100% exact
              after 400 steps, ../shared/FACTS.md), where 2-digit addition stays near 0%. The 200
              facts are shuffled with a fixed seed; the last 40 are the held-out `test` split.
  gsm8k       a local GSM8K-style jsonl (`--data_path`): {"question": ..., "answer": "...#### 72"}.
  math        a local MATH-style jsonl (`--data_path`): {"problem": ..., "answer": ...} or
              {"problem": ..., "solution": "...\\boxed{...}"} (the last boxed answer is the gold).

Rows have a `prompt` (a string; evaluation applies the chat template when the tokenizer has one)
and an `answer` string, the columns the reward functions read (ARCHITECTURE.md: rl / distill data).
A bad row stops loading with the file, line and field at fault.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.arithmetic import answer, question, split_facts
from core.decontaminate import prompt_text
from rewards.functions import REWARD_FUNCS
from rewards.math_grader import boxed_contents

# Asked of every model on the word-problem suites, so `accuracy` grades the boxed answer (the
# instruction DeepSeek-R1 and open-r1 use for math).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

SPLITS = ("train", "test")


@dataclass(frozen=True)
class RewardSuite:
    """What to score and how. `reward_weights` and `reward_kwargs` are keyed by reward name."""

    name: str
    description: str
    load: Callable[[str, str | None], list[dict]]  # (split, data_path) -> rows
    reward_weights: dict[str, float]
    # Knobs bound onto a reward function for this suite, e.g. the length limit of the overlong penalty.
    reward_kwargs: dict[str, dict] = field(default_factory=dict)
    # The reward whose value 1.0 counts as a pass for pass@k.
    pass_reward: str = "accuracy"
    max_new_tokens: int = 256
    # pass@k needs k different samples: sampling by default; --temperature 0 --num_samples 1 is greedy.
    temperature: float = 0.8
    num_samples: int = 4

    def __post_init__(self):
        for name in [*self.reward_weights, *self.reward_kwargs, self.pass_reward]:
            if name not in REWARD_FUNCS:
                raise ValueError(f"suite {self.name!r} names reward {name!r}; rewards: {sorted(REWARD_FUNCS)}")
        if self.pass_reward not in self.reward_weights:
            raise ValueError(f"suite {self.name!r}: pass_reward {self.pass_reward!r} must be one of its rewards")


def arithmetic_rows(split: str, data_path: str | None = None, seed: int = 0, test_size: int = 40) -> list[dict]:
    """The single-digit `a+b` / `a*b` facts of one split, in a fixed shuffled order."""
    _check_split(split)
    if data_path is not None:
        raise ValueError("the arithmetic suite is generated; it takes no data_path")
    train, test = split_facts(seed, test_size)
    return [{"prompt": question(f), "answer": str(answer(f))} for f in (test if split == "test" else train)]


def gsm8k_rows(split: str, data_path: str | None) -> list[dict]:
    """Rows of a GSM8K-style jsonl: `question`, and `answer` whose gold number follows `####`."""
    rows = []
    for where, record in _read_jsonl(data_path, "gsm8k", split):
        question, answer = _string_field(record, "question", where), _string_field(record, "answer", where)
        if "####" not in answer:
            raise ValueError(f"{where}: field 'answer' has no '#### <number>' final answer (GSM8K format)")
        # GSM8K writes thousands with commas in some gold answers ("#### 1,600").
        gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
        if not gold:
            raise ValueError(f"{where}: field 'answer' is empty after '####'")
        rows.append({"prompt": f"{question}\n{BOXED_INSTRUCTION}", "answer": gold})
    return rows


def math_rows(split: str, data_path: str | None) -> list[dict]:
    """Rows of a MATH-style jsonl: `problem`, and `answer` or else the last `\\boxed{}` of `solution`."""
    rows = []
    for where, record in _read_jsonl(data_path, "math", split):
        problem = _string_field(record, "problem", where)
        if "answer" in record:
            gold = _string_field(record, "answer", where)
        else:
            boxes = boxed_contents(_string_field(record, "solution", where))
            if not boxes:
                raise ValueError(f"{where}: field 'solution' has no \\boxed{{...}} answer and there is no 'answer' field")
            gold = boxes[-1]
        rows.append({"prompt": f"{problem}\n{BOXED_INSTRUCTION}", "answer": gold})
    return rows


def _read_jsonl(data_path: str | None, suite: str, split: str):
    """(where, record) for every non-blank line; `where` is "file:line" for error messages."""
    _check_split(split)
    if data_path is None:
        raise ValueError(f"the {suite} suite reads a local jsonl file: pass --data_path FILE")
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"data_path {str(path)!r} (suite {suite}) does not exist")
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
            yield where, record


def _string_field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r} (fields: {sorted(record)})")
    value = record[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {SPLITS}")


_WORD_PROBLEM_REWARDS = {"accuracy": 1.0, "boxed_format": 0.2, "repetition_penalty": 0.2}

# The one table of suites by name.
SUITES: dict[str, RewardSuite] = {
    "arithmetic": RewardSuite(
        name="arithmetic",
        description="single-digit a+b and a*b facts, built in (the tiny recipes' task)",
        load=arithmetic_rows,
        reward_weights={"accuracy": 1.0, "answer_consistency": 0.5, "soft_overlong_punishment": 0.1},
        # The penalty ramps over the last 4 tokens before the generation limit (`limited_reward_kwargs`).
        reward_kwargs={"soft_overlong_punishment": {"soft_punish_cache": 4}},
        # The answers are at most 2 digits: 8 tokens is room to answer and stop.
        max_new_tokens=8,
    ),
    "gsm8k": RewardSuite(
        name="gsm8k",
        description="grade-school word problems from a local GSM8K-style jsonl",
        load=gsm8k_rows,
        reward_weights=_WORD_PROBLEM_REWARDS,
        max_new_tokens=512,
    ),
    "math": RewardSuite(
        name="math",
        description="competition problems from a local MATH-style jsonl",
        load=math_rows,
        reward_weights=_WORD_PROBLEM_REWARDS,
        max_new_tokens=1024,
    ),
}


def limited_reward_kwargs(kwargs: dict[str, dict], max_completion_length: int,
                          explicit: dict[str, dict] | None = None) -> dict[str, dict]:
    """The reward knobs by name as a stage that generates at most `max_completion_length` tokens binds them.

    DAPO's L_max is the generation limit (Yu et al. 2025, eq. 13: the overlong penalty ramps up over the
    last soft_punish_cache tokens before the cut-off), so `soft_overlong_punishment`'s `max_completion_len`
    is the stage's own limit unless `explicit` (a recipe's `reward_kwargs`) sets it. GRPO (rl/data.py) and
    rewards.evaluate both bind it here: a suite's fixed 8 against evaluation's 64-token replies scored every
    12-token reply -1 there and 0 in GRPO (issue 30)."""
    bound = {name: dict(knobs) for name, knobs in kwargs.items()}
    if "soft_overlong_punishment" in bound:
        chosen = (explicit or {}).get("soft_overlong_punishment", {}).get("max_completion_len")
        bound["soft_overlong_punishment"]["max_completion_len"] = max_completion_length if chosen is None else chosen
    return bound


def get_suite(name: str) -> RewardSuite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {sorted(SUITES)}")
    return SUITES[name]


def load_rows(suite: RewardSuite, split: str = "test", data_path: str | None = None) -> list[dict]:
    """The suite's rows for `split` (local-file suites read `data_path` whatever the split)."""
    return suite.load(split, data_path)


def evaluation_prompts(targets: list[dict]) -> list[str]:
    """The prompts of each `{suite, split, data_path}` target, as plain text, e.g.
    `{suite: arithmetic, split: test}`. Only held-out splits belong here: the tiny recipes train on
    the arithmetic suite's train split on purpose. What core/decontaminate.py indexes (core imports no
    rewards: the stages hand it these prompts)."""
    prompts = []
    for i, target in enumerate(targets):
        unknown = set(target) - {"suite", "split", "data_path"}
        if unknown or "suite" not in target:
            raise ValueError(f"decontaminate_against[{i}]: needs 'suite' (and optional 'split', 'data_path'); "
                             f"unknown keys {sorted(unknown)}" if unknown else
                             f"decontaminate_against[{i}]: needs 'suite', got {target!r}")
        suite = get_suite(target["suite"])
        for row in load_rows(suite, target.get("split", "test"), target.get("data_path")):
            prompts.append(prompt_text(row["prompt"]))
    return prompts
