"""Reward functions, selected by name from `REWARD_FUNCS`, and the contract every one of them keeps.

A reward function is a plain function, as in TRL's GRPOTrainer and open-r1
(github.com/huggingface/open-r1, src/open_r1/rewards.py):

    fn(completions, **columns) -> list[float | None]

`completions` are strings, or TRL conversational completions (lists of {"role", "content"}
messages, of which the last one is graded, any `reasoning_content` TRL's reply parser split off put
back in front of its content: `completion_text`); `columns` are the dataset's other columns, one value per
completion (e.g. `answer`), plus TRL's `completion_ids` when it passes them. `None` means "cannot
score this one" (e.g. an unparseable gold answer), never a silent 0 or 1.

    from rewards.functions import REWARD_FUNCS, compute_rewards
    scores = compute_rewards({"accuracy": REWARD_FUNCS["accuracy"]}, ["The answer is 12."], answer=["12"])
    # {"accuracy": [1.0]}

`compute_rewards` enforces the contract (one value per completion, or an error naming the
function; NaN becomes None) and `summarize` gives means that exclude `None` and count it.
Functions with knobs take them as keyword arguments with defaults; a suite binds other values
(`rewards.suites.RewardSuite.reward_kwargs`).

TRL's own rewards (`trl.rewards`) are used where they are the same thing: `soft_overlong_punishment`,
`repetition_penalty` and `think_format` call them. Ours differ on purpose where TRL's would grade
differently: `accuracy` (and `cosine_scaled`, built on it) grade in the verifier pool with
`rewards.math_grader`, because TRL's `accuracy_reward` runs math-verify in the calling process (no
time limit outside the main thread, so a `9^9^9^9` completion stalls the trainer, FACTS.md) and
inherits its false positives; `format` wants the whole `<think>` + `<answer>` template, TRL's
`think_format_reward` only the think block.
"""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment, think_format_reward

from rewards.math_grader import boxed_contents
from rewards.verifier_pool import default_pool

RewardFunction = Callable[..., list[float | None]]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RewardContractError(ValueError):
    """A reward function broke the contract: wrong number of values, or a value that is not a number."""


def completion_text(completion: str | list[dict]) -> str:
    """What the model wrote, think block included: the string itself, or a conversation's last message
    as `message_text` puts it back together."""
    if isinstance(completion, str):
        return completion
    return message_text(completion[-1]) if completion else ""


def message_text(message: dict) -> str:
    """One assistant message as the model generated it: `content`, with the think block in front of it
    when a reply parser split it off into `reasoning_content`.

    TRL 1.16's GRPOTrainer runs completions through `parse_response` when the tokenizer has a reply parser
    (every template `chat_templates.install` sets up, FACTS.md), and Qwen 3's parser, which ours reuse,
    moves `<think>...</think>` into `reasoning_content`; reading `content` alone, every think-block reward
    scored 0 or None in GRPO (issue 30). The parser strips the whitespace around the think text and after
    `</think>`, so the block is written back as DeepSeek-R1's and SmolLM3's templates write it,
    `<think>\n{reasoning}\n</think>\n{content}`; that whitespace is the one thing not as generated. A
    parser that kept the tags in `reasoning_content` gets them back once, not twice. (An unclosed think
    block, cut off by the length limit, also parses into `reasoning_content`: it comes back closed.)
    """
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if not reasoning:  # TRL's parser leaves out an empty field
        return content
    reasoning = reasoning.strip("\n")
    if not reasoning.startswith(THINK_OPEN):
        reasoning = f"{THINK_OPEN}\n{reasoning}"
    if not reasoning.endswith(THINK_CLOSE):
        reasoning = f"{reasoning}\n{THINK_CLOSE}"
    content = content.lstrip("\n")
    return f"{reasoning}\n{content}"


def accuracy(completions: Sequence, answer: Sequence, **columns) -> list[float | None]:
    """1.0 if the completion's final answer equals `answer` (math-verify, stricter: rewards.math_grader).

    Graded in the worker pool of `rewards.verifier_pool` (a compute bomb cannot stall the caller).
    A completion that cannot be graded within the per-item limit scores 0.0 rather than None: an
    answer nobody can check is not a correct one, and a policy must not learn that bombs escape
    the reward. None for an unparseable or missing gold answer, and for items a worker crashed on.
    """
    outcomes = default_pool().grade_batch(
        [("" if gold is None else str(gold), completion_text(c)) for c, gold in zip(completions, answer, strict=True)]
    )
    return [outcome.value if outcome.status == "ok" else 0.0 if outcome.status == "timeout" else None
            for outcome in outcomes]


def think_format(completions: Sequence, **columns) -> list[float | None]:
    """1.0 if the completion starts with one `<think>...</think>` block (TRL's `think_format_reward`;
    what follows is not checked), else 0.0."""
    return think_format_reward([[{"role": "assistant", "content": completion_text(c)}] for c in completions])


def think_answer_format(completions: Sequence, **columns) -> list[float | None]:
    """1.0 if the completion is exactly `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` (DeepSeek-R1's
    template, open-r1's `format_reward`), else 0.0."""
    return [1.0 if _is_think_answer(completion_text(c)) else 0.0 for c in completions]


def _is_think_answer(text: str) -> bool:
    # String operations instead of open-r1's regex `^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$`,
    # whose nested lazy groups backtrack quadratically on adversarial text.
    if not (text.startswith("<think>\n") and text.endswith("\n</answer>")):
        return False
    middle = text[len("<think>\n") : -len("\n</answer>")]
    return middle.count("\n</think>\n<answer>\n") == 1 and "<think>" not in middle and "</answer>" not in middle


# A number as the answer states it: optional sign, digits, optional decimals ("12", "-3", "0.5").
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_consistency(completions: Sequence, **columns) -> list[float | None]:
    """1.0 if the text after the think block states, as its last number, the number the think block ends on;
    0.0 if it states another or none; None when there is no closed think block to compare with.

    A right answer after reasoning that concluded something else is a guess, and `accuracy` pays for it
    all the same. Measured on the tiny SFT model (issue 18): its held-out errors after GRPO were answers
    that contradict their own think block (`<think>\\n4*9=36\\n</think>\\n\\n46`), and on-policy pairs
    ranked by accuracy alone took lucky guesses as `chosen`. Answer/reasoning agreement is the simplest
    faithfulness check (Lanham et al. 2023, "Measuring Faithfulness in Chain-of-Thought Reasoning")."""
    scores = []
    for completion in completions:
        text = completion_text(completion)
        if text.count("</think>") != 1:
            scores.append(None)
            continue
        thought, answer = text.split("</think>")
        concluded, stated = _NUMBER.findall(thought), _NUMBER.findall(answer)
        scores.append(1.0 if concluded and stated and float(concluded[-1]) == float(stated[-1]) else 0.0)
    return scores


def boxed_format(completions: Sequence, **columns) -> list[float | None]:
    """1.0 if the completion gives one final answer in `\\boxed{}` (boxing the same answer twice is
    fine, two different boxed answers are not), else 0.0."""
    return [1.0 if len(set(boxed_contents(completion_text(c)))) == 1 else 0.0 for c in completions]


def tag_count(completions: Sequence, **columns) -> list[float | None]:
    """0.25 for each of `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`, `\\n</answer>` present exactly once
    (open-r1's `tag_count_reward`): a denser signal than `format` early in training."""
    tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
    return [sum(0.25 for tag in tags if completion_text(c).count(tag) == 1) for c in completions]


# open-r1's `reasoning_steps_reward` pattern: "Step 1:", numbered lines, bullets, transition words.
# An alternation of literals: linear time on any input.
_STEP_MARKERS = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)", re.MULTILINE)


def reasoning_steps(completions: Sequence, *, target_steps: int = 3, **columns) -> list[float | None]:
    """min(1, steps / target_steps) with open-r1's `reasoning_steps_reward` markers (3 steps earn the
    full reward there)."""
    return [min(1.0, len(_STEP_MARKERS.findall(completion_text(c))) / target_steps) for c in completions]


def completion_lengths(completions: Sequence, completion_ids: Sequence | None = None) -> list[int]:
    """Lengths in tokens when TRL passes `completion_ids`, else in characters (as open-r1 does)."""
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


def cosine_scaled(
    completions: Sequence,
    answer: Sequence,
    *,
    max_len: int = 1000,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    completion_ids: Sequence | None = None,
    **columns,
) -> list[float | None]:
    """Accuracy scaled by length on a cosine (Yeo et al. 2025, "Demystifying Long Chain-of-Thought
    Reasoning in LLMs", eq. 1; open-r1's `get_cosine_scaled_reward`, same defaults): short correct
    answers earn most, long wrong ones lose least. None where `accuracy` is None.

    The formula is TRL's `get_cosine_scaled_reward`; not called, because that one grades with TRL's
    in-process `accuracy_reward` (see the module docstring), and it needs `completion_ids`.
    """
    correct = accuracy(completions, answer)
    rewards: list[float | None] = []
    for is_correct, length in zip(correct, completion_lengths(completions, completion_ids)):
        if is_correct is None:
            rewards.append(None)
            continue
        cosine = math.cos(min(length / max_len, 1.0) * math.pi)
        # For wrong answers the ends are swapped: the longest wrong answer gets max_value_wrong.
        low, high = (min_value_correct, max_value_correct) if is_correct == 1.0 else (max_value_wrong, min_value_wrong)
        rewards.append(low + 0.5 * (high - low) * (1.0 + cosine))
    return rewards


def soft_overlong_punishment(
    completions: Sequence,
    *,
    max_completion_len: int = 512,
    soft_punish_cache: int = 128,
    completion_ids: Sequence | None = None,
    **columns,
) -> list[float | None]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), TRL's `get_soft_overlong_punishment`:
    0 up to max_completion_len - soft_punish_cache, then falling linearly to -1 at max_completion_len,
    and -1 beyond. Lengths in tokens when TRL passes `completion_ids`, else in characters."""
    # TRL's function only takes len() of each item: the texts stand in for token ids when there are none.
    lengths_of = completion_ids if completion_ids is not None else [completion_text(c) for c in completions]
    return get_soft_overlong_punishment(max_completion_len, soft_punish_cache)(lengths_of)


def repetition_penalty(
    completions: Sequence, *, ngram_size: int = 3, max_penalty: float = -1.0,
    completion_ids: Sequence | None = None, **columns
) -> list[float | None]:
    """max_penalty x the fraction of repeated n-grams (Yeo et al. 2025, appendix C.2), TRL's
    `get_repetition_penalty_reward`: 0 for text without repeats, max_penalty for one n-gram repeated
    throughout, 0 for completions shorter than one n-gram. N-grams of tokens when TRL passes
    `completion_ids` (as TRL and the paper do), else of lower-cased words (as open-r1 does)."""
    items = completion_ids if completion_ids is not None else [completion_text(c).lower().split() for c in completions]
    return get_repetition_penalty_reward(ngram_size, max_penalty)(items)


# The one table of reward functions by name (open-r1's REWARD_FUNCS_REGISTRY, as a plain dict).
REWARD_FUNCS: dict[str, RewardFunction] = {
    "accuracy": accuracy,
    "format": think_answer_format,
    "answer_consistency": answer_consistency,
    "think_format": think_format,
    "boxed_format": boxed_format,
    "tag_count": tag_count,
    "reasoning_steps": reasoning_steps,
    "cosine_scaled": cosine_scaled,
    "soft_overlong_punishment": soft_overlong_punishment,
    "repetition_penalty": repetition_penalty,
}


def compute_rewards(funcs: dict[str, RewardFunction], completions: Sequence, **columns) -> dict[str, list[float | None]]:
    """Run every reward function on the completions and check what it returned.

    Raises RewardContractError naming the function when it returns another number of values than
    there are completions, or a value that is neither a real number nor None. NaN becomes None
    (TRL's GRPOTrainer also reads None as NaN), so a mean never silently turns into NaN.
    """
    results: dict[str, list[float | None]] = {}
    for name, fn in funcs.items():
        where = f"reward function {name!r} ({fn.__module__}.{getattr(fn, '__qualname__', type(fn).__name__)})"
        values = fn(completions, **columns)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise RewardContractError(f"{where} returned {got} for {len(completions)} completions; "
                                      "it must return one float or None per completion")
        checked: list[float | None] = []
        for index, value in enumerate(values):
            if value is None:
                checked.append(None)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                checked.append(None if math.isnan(value) else float(value))
            else:
                raise RewardContractError(f"{where} returned {value!r} (a {type(value).__name__}) for completion "
                                          f"{index}; it must return a float or None")
        results[name] = checked
    return results


@dataclass(frozen=True)
class RewardSummary:
    """mean over the scored values (None when nothing was scored); unscored = how many were None or NaN."""

    mean: float | None
    scored: int
    unscored: int


def summarize(values: Sequence[float | None]) -> RewardSummary:
    """Mean of the values that are numbers; None and NaN are left out of the mean and counted."""
    scored = [v for v in values if v is not None and not math.isnan(v)]
    return RewardSummary(mean=sum(scored) / len(scored) if scored else None,
                         scored=len(scored), unscored=len(values) - len(scored))


def weighted_total(rewards: dict[str, list[float | None]], weights: dict[str, float]) -> list[float | None]:
    """Per completion, sum of weight x reward over the functions that scored it (TRL's nansum);
    None where no function scored it."""
    count = len(next(iter(rewards.values()))) if rewards else 0
    totals: list[float | None] = []
    for index in range(count):
        scored = [(weights[name], values[index]) for name, values in rewards.items() if values[index] is not None]
        totals.append(sum(w * v for w, v in scored) if scored else None)
    return totals
