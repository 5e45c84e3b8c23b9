"""Reward functions, the reward contract, suites and their loaders, pass@k."""

import json
import math

import pytest

from rewards.evaluate import merge_repeated_flag, pass_at_k
from rewards.functions import (
    REWARD_FUNCS,
    RewardContractError,
    compute_rewards,
    summarize,
    weighted_total,
)
from rewards.suites import SUITES, arithmetic_rows, gsm8k_rows, load_rows, math_rows
from rewards.verifier_pool import configure_default_pool


@pytest.fixture(scope="module", autouse=True)
def short_item_limit():
    configure_default_pool(num_workers=2, item_timeout_s=2.0)


# ---- the contract ----

def test_wrong_number_of_values_raises_naming_the_function():
    def drops_one(completions, **columns):
        return [1.0] * (len(completions) - 1)

    with pytest.raises(RewardContractError, match=r"'drops_one'.*returned 1 values for 2 completions"):
        compute_rewards({"drops_one": drops_one}, ["a", "b"])


def test_non_number_value_raises_naming_the_function_and_index():
    with pytest.raises(RewardContractError, match=r"'says_yes'.*'yes'.*completion 1"):
        compute_rewards({"says_yes": lambda completions, **c: [1.0, "yes"]}, ["a", "b"])


def test_none_is_excluded_from_means_and_counted():
    rewards = compute_rewards({"partial": lambda completions, **c: [1.0, None, 0.0, None]}, list("abcd"))
    assert rewards == {"partial": [1.0, None, 0.0, None]}
    summary = summarize(rewards["partial"])
    assert (summary.mean, summary.scored, summary.unscored) == (0.5, 2, 2)


def test_nan_is_treated_as_none_and_counted():
    rewards = compute_rewards({"nan": lambda completions, **c: [float("nan"), 2.0]}, ["a", "b"])
    assert rewards == {"nan": [None, 2.0]}
    summary = summarize([float("nan"), 2.0, None])
    assert (summary.mean, summary.unscored) == (2.0, 2)
    assert summarize([None]).mean is None


def test_weighted_total_skips_unscored_functions():
    totals = weighted_total({"a": [1.0, None, None], "b": [0.5, 1.0, None]}, {"a": 2.0, "b": 1.0})
    assert totals == [2.5, 1.0, None]


# ---- the functions ----

def test_every_reward_function_keeps_the_contract_on_strings_and_conversations():
    texts = ["<think>\n7+5\n</think>\n<answer>\n12\n</answer>", "Step 1: add.\nStep 2: \\boxed{12}", ""]
    conversations = [[{"role": "assistant", "content": t}] for t in texts]
    for completions in (texts, conversations):
        rewards = compute_rewards(REWARD_FUNCS, completions, answer=["12"] * 3)
        assert set(rewards) == set(REWARD_FUNCS)
        assert rewards["accuracy"] == [1.0, 1.0, 0.0]


def test_accuracy_is_none_for_an_unparseable_gold():
    assert REWARD_FUNCS["accuracy"](["12", "12"], answer=["12", "no answer here?!"]) == [1.0, None]


def test_format_and_tag_count():
    good = "<think>\nadd them\n</think>\n<answer>\n12\n</answer>"
    assert REWARD_FUNCS["format"]([good, "12", good + "\n<think>\n"]) == [1.0, 0.0, 0.0]
    assert REWARD_FUNCS["tag_count"]([good, "<think>\nonly this", "12"]) == [1.0, 0.25, 0.0]


def test_answer_consistency_compares_the_answer_with_the_think_blocks_conclusion():
    completions = ["<think>\n4*9=36\n</think>\n\n36",           # agrees
                   "<think>\n4*9=36\n</think>\n\n46",           # contradicts it: a guess, even when right
                   "<think>\nI am not sure.\n</think>\n\n36",   # concluded nothing
                   "<think>\n4*9=36\n</think>\n\nI don't know",  # states nothing
                   "<think>\n1/2 = 0.5\n</think>\nIt is 0.50.",  # the same number, written differently
                   "36",                                           # no think block: nothing to compare
                   "<think>\n36\n</think>\n36</think>\n35"]       # two closing tags: ambiguous
    assert REWARD_FUNCS["answer_consistency"](completions) == [1.0, 0.0, 0.0, 0.0, 1.0, None, None]
    # A right answer after reasoning that concluded otherwise: accuracy pays, consistency does not.
    lucky = ["<think>\n2*1=2\n</think>\n\n3"]
    assert (REWARD_FUNCS["accuracy"](lucky, answer=["3"]), REWARD_FUNCS["answer_consistency"](lucky)) == ([1.0], [0.0])


def test_boxed_format_wants_one_answer():
    assert REWARD_FUNCS["boxed_format"](["\\boxed{12}", "\\boxed{12} \\boxed{12}", "\\boxed{1} \\boxed{2}", "12"]) \
        == [1.0, 1.0, 0.0, 0.0]


def test_reasoning_steps():
    assert REWARD_FUNCS["reasoning_steps"](["Step 1: a\nStep 2: b\nStep 3: c", "First, a. Finally, b.", "12"]) \
        == [1.0, pytest.approx(2 / 3), 0.0]


def test_cosine_scaled_prefers_short_correct_and_long_wrong():
    completions = ["\\boxed{12}", "\\boxed{12}" + " " * 900, "\\boxed{13}", "\\boxed{13}" + " " * 900]
    short_right, long_right, short_wrong, long_wrong = REWARD_FUNCS["cosine_scaled"](completions, answer=["12"] * 4)
    assert 1.0 >= short_right > long_right >= 0.5
    assert -0.5 >= long_wrong > short_wrong >= -1.0
    # Lengths in tokens when TRL passes completion_ids: 10 of 1000 tokens is short.
    assert REWARD_FUNCS["cosine_scaled"](["\\boxed{12}"], answer=["12"], completion_ids=[[0] * 10]) \
        == [pytest.approx(0.5 + 0.25 * (1 + math.cos(0.01 * math.pi)))]


def test_soft_overlong_punishment_follows_dapo():
    ids = [[0] * n for n in (4, 6, 7, 8, 9)]
    values = REWARD_FUNCS["soft_overlong_punishment"](["x"] * 5, completion_ids=ids, max_completion_len=8,
                                                      soft_punish_cache=4)
    assert values == [0.0, -0.5, -0.75, -1.0, -1.0]


def test_repetition_penalty():
    values = REWARD_FUNCS["repetition_penalty"](["one two three four", "a a a a a", "short"], ngram_size=3)
    assert values == [0.0, pytest.approx(-2 / 3), 0.0]
    with pytest.raises(ValueError, match="max_penalty"):
        REWARD_FUNCS["repetition_penalty"](["x"], max_penalty=1.0)


# ---- suites ----

def test_arithmetic_suite_is_fixed_and_holds_out_a_test_split():
    train, test = arithmetic_rows("train"), arithmetic_rows("test")
    assert (len(train), len(test)) == (160, 40)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert arithmetic_rows("test") == test  # same seed, same rows
    for row in train + test:
        a, op, b = row["prompt"][len("What is "):-1]
        assert row["answer"] == str(int(a) + int(b) if op == "+" else int(a) * int(b))
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        arithmetic_rows("validation")


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_gsm8k_loader(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "How many cents?", "answer": "#### 1,600"},
    ])
    rows = load_rows(SUITES["gsm8k"], "test", path)
    assert [r["answer"] for r in rows] == ["7", "1600"]
    assert rows[0]["prompt"].startswith("Tom has 3 apples") and "\\boxed{}" in rows[0]["prompt"]


@pytest.mark.parametrize("records, message", [
    ([{"question": "q", "answer": "#### 1"}, {"question": "q"}], r"gsm8k.jsonl:2: missing field 'answer'"),
    ([{"question": "q", "answer": "no final answer"}], r"gsm8k.jsonl:1: field 'answer' has no '#### <number>'"),
    (["{not json"], r"gsm8k.jsonl:1: not valid JSON"),
    ([{"question": "", "answer": "#### 1"}], r"gsm8k.jsonl:1: field 'question' must be a non-empty string"),
])
def test_gsm8k_loader_errors_name_file_line_and_field(tmp_path, records, message):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", records)
    with pytest.raises(ValueError, match=message):
        gsm8k_rows("test", path)


def test_math_loader(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Compute 1/2 + 1/4.", "solution": "We get $\\boxed{\\frac{3}{4}}$."},
        {"problem": "What is 2+2?", "solution": "...", "answer": "4"},
    ])
    assert [r["answer"] for r in math_rows("test", path)] == ["\\frac{3}{4}", "4"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'solution' has no \\boxed"):
        math_rows("test", bad)
    with pytest.raises(ValueError, match="pass --data_path"):
        math_rows("test", None)


def test_suites_only_name_existing_rewards():
    for suite in SUITES.values():
        assert set(suite.reward_weights) <= set(REWARD_FUNCS)
        assert suite.pass_reward in suite.reward_weights


# ---- pass@k and the command line ----

@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),          # pass@1 is the fraction correct
    (4, 1, 2, 0.5),          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
    (4, 0, 4, 0.0),
    (4, 1, 4, 1.0),          # every draw of all 4 includes the correct one
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=5, n=4"):
        pass_at_k(4, 1, 5)


def test_repeated_model_flags_are_merged():
    assert merge_repeated_flag(["--model", "a", "--suite", "x", "--model", "b", "c"], "--model") \
        == ["--suite", "x", "--model", "a", "b", "c"]


# ---- TRL's rewards, used where they are the same thing (issue 12 item 7) ----

def test_think_format_is_trls():
    from trl.rewards import think_format_reward

    texts = ["<think>\nplan\n</think>\n12", "<think>a</think><think>b</think>", "12 <think>late</think>", "no think"]
    assert REWARD_FUNCS["think_format"](texts) == [1.0, 0.0, 0.0, 0.0]
    assert REWARD_FUNCS["think_format"](texts) == think_format_reward([[{"content": t}] for t in texts])


def test_length_and_repetition_rewards_count_tokens_when_trl_passes_them():
    from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5], list(range(10))]
    texts = ["x"] * 3  # the text is ignored when token ids are given
    assert REWARD_FUNCS["soft_overlong_punishment"](texts, completion_ids=ids, max_completion_len=8, soft_punish_cache=4) \
        == get_soft_overlong_punishment(8, 4)(ids) == [0.0, -0.25, -1.0]
    assert REWARD_FUNCS["repetition_penalty"](texts, completion_ids=ids, ngram_size=2) \
        == get_repetition_penalty_reward(2, -1.0)(ids) == [0.0, -0.75, 0.0]
    # Without ids: characters for the length, lower-cased words for the n-grams.
    assert REWARD_FUNCS["soft_overlong_punishment"](["abcdef"], max_completion_len=8, soft_punish_cache=4) == [-0.5]
    assert REWARD_FUNCS["repetition_penalty"](["Go go GO go"], ngram_size=2) == [pytest.approx(-2 / 3)]
