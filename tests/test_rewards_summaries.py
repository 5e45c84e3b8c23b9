"""Evaluation summaries on synthetic rewards with known answers (issue 11 item 10).

The end-to-end evaluation tests use random models that score about 0, where `pass@k >= pass@1`
holds trivially; here every number of `summarize_model` is computed by hand.
"""

import math

import pytest

from rewards.evaluate import Sample, format_table, pass_at_k, summarize_model
from rewards.suites import SUITES

SUITE = SUITES["arithmetic"]  # accuracy (weight 1.0, the pass reward) + soft_overlong_punishment (0.1); its
# answer_consistency (0.5) is left out here, as a reward nobody scored is left out of the weighted total

# 4 prompts x 4 samples, prompt-major. Accuracy per prompt:
#   0: all right; 1: one right; 2: none right; 3: one right, one unscored (an unparseable gold), and a
#   0.5 that is not a pass (only 1.0 passes).
ACCURACY = [1.0, 1.0, 1.0, 1.0,
            0.0, 1.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0,
            1.0, None, 0.5, 0.0]
OVERLONG = [0.0, 0.0, -0.5, -1.0,
            0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, -1.0,
            0.0, 0.0, 0.0, 0.0]
LENGTHS = [2, 3, 6, 8,
           2, 2, 2, 2,
           4, 4, 4, 8,
           3, 3, 3, 3]


def synthetic_samples() -> list[list[Sample]]:
    flat = [Sample(token_ids=[7] * n, truncated=n == 8) for n in LENGTHS]
    return [flat[row * 4 : (row + 1) * 4] for row in range(4)]


def test_pass_at_k_and_means_on_known_rewards():
    summary = summarize_model(SUITE, synthetic_samples(), {"accuracy": ACCURACY, "soft_overlong_punishment": OVERLONG},
                              num_samples=4)
    # pass@1 = fraction right per prompt, averaged: (4/4 + 1/4 + 0/4 + 1/3) / 4 (prompt 3 has 3 scored).
    assert summary["pass@1"] == pytest.approx((1 + 0.25 + 0 + 1 / 3) / 4)
    # pass@4: prompts 0 and 1 have a right sample among 4, prompt 2 has none, prompt 3 has only 3
    # scored samples, too few to draw 4 from: left out, and counted.
    assert summary["pass@4"] == pytest.approx(2 / 3)
    assert (summary["pass@1_prompts_unscored"], summary["pass@4_prompts_unscored"]) == (0, 1)
    assert summary["pass@4"] > summary["pass@1"]

    accuracy = summary["rewards"]["accuracy"]
    assert (accuracy["mean"], accuracy["scored"], accuracy["unscored"]) == (pytest.approx(6.5 / 15), 15, 1)
    assert summary["rewards"]["soft_overlong_punishment"]["mean"] == pytest.approx(-2.5 / 16)
    # weighted total per sample: accuracy + 0.1 x overlong; the unscored accuracy leaves 0.1 x 0.0.
    total = summary["rewards"]["weighted_total"]
    assert (total["mean"], total["unscored"]) == (pytest.approx((6.5 - 0.25) / 16), 0)
    assert summary["mean_completion_tokens"] == pytest.approx(sum(LENGTHS) / 16)
    assert summary["truncation_rate"] == pytest.approx(2 / 16)


def test_pass_at_k_between_1_and_n():
    # One prompt, 4 samples, 1 right: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1.
    assert [pass_at_k(4, 1, k) for k in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # The estimator against the definition on a larger case: 1 - C(n-c, k) / C(n, k).
    assert pass_at_k(20, 3, 5) == pytest.approx(1 - math.comb(17, 5) / math.comb(20, 5))


def test_a_suite_scored_nowhere_says_so():
    samples = [[Sample([1], truncated=False)] * 2]
    summary = summarize_model(SUITE, samples, {"accuracy": [None, None], "soft_overlong_punishment": [0.0, 0.0]},
                              num_samples=2)
    assert summary["pass@1"] is None and summary["pass@2"] is None
    assert summary["pass@1_prompts_unscored"] == 1
    assert summary["rewards"]["accuracy"] == {"mean": None, "scored": 0, "unscored": 2}


def test_table_shows_the_computed_numbers():
    summary = summarize_model(SUITE, synthetic_samples(), {"accuracy": ACCURACY, "soft_overlong_punishment": OVERLONG},
                              num_samples=4)
    table = format_table({"synthetic": {"summary": summary}}, num_samples=4)
    rows = {line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in table.splitlines()[2:]}
    assert rows["pass@1"] == f"{(1 + 0.25 + 0 + 1 / 3) / 4:.4f}"
    assert rows["pass@4"] == "0.6667"
    assert rows["accuracy unscored"] == "1"
