"""Math grading: the golden table, math-verify's known false positives, compute bombs, code safety.

Everything goes through real math-verify in real worker processes (no mocks). The per-item limit
is 2 s here, so the bomb tests cost a few seconds each.
"""

import ast
import threading
import time
from pathlib import Path

import pytest

import rewards
from rewards.functions import accuracy
from rewards.verifier_pool import VerifierPool, configure_default_pool

ITEM_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def pool():
    pool = configure_default_pool(num_workers=2, item_timeout_s=ITEM_TIMEOUT_S)
    # Wait until both workers have imported math-verify, so that timings below measure grading.
    assert [o.status for o in pool.grade_batch([("1", "1"), ("2", "2")])] == ["ok", "ok"]
    yield pool


def grade(pool, gold: str, completion: str) -> float | None:
    (outcome,) = pool.grade_batch([(gold, completion)])
    assert outcome.status == "ok", outcome
    return outcome.value


# (gold, completion, expected): 1.0 correct, 0.0 wrong, None = the gold cannot be parsed.
GOLDEN = [
    # integers, signs, decimals
    ("12", "The answer is 12.", 1.0),
    ("12", "The answer is 13.", 0.0),
    ("-3", "So x equals -3", 1.0),
    ("3.5", "The answer is 3.5.", 1.0),
    ("12", "The answer is 12.5", 0.0),
    ("12", "12.0", 1.0),
    # fractions
    ("\\frac{1}{2}", "$\\frac{1}{2}$", 1.0),
    ("\\frac12", "0.5", 1.0),
    ("1/2", "The answer is $1/2$.", 1.0),
    ("\\frac{1}{3}", "0.333333", 1.0),  # six significant digits are enough ...
    ("\\frac{1}{3}", "0.33", 0.0),  # ... two are not
    ("\\frac{2}{3}", "$\\frac{3}{2}$", 0.0),
    # \boxed{}
    ("12", "\\boxed{12}", 1.0),
    ("12", "7 + 5 = 12, so the answer is $\\boxed{12}$.", 1.0),
    ("12", "\\boxed{13}", 0.0),
    ("x^2+1", "$\\boxed{x^2+1}$", 1.0),
    ("x^2+1", "$\\boxed{x^2-1}$", 0.0),
    # \text{}
    ("12", "$\\boxed{\\text{12}}$", 1.0),
    ("12", "\\boxed{\\text{12 apples}}", 0.0),  # a word inside the box is not a number
    # units
    ("12", "The answer is 12 cm.", 1.0),
    ("12", "It costs 12 dollars", 1.0),
    # percentages
    ("50%", "0.5", 1.0),
    ("0.5", "$50\\%$", 1.0),
    ("50%", "0.05", 0.0),
    # thousands separators
    ("1234", "1,234", 1.0),
    ("1000000", "The answer is 1,000,000.", 1.0),
    ("1234", "1,235", 0.0),
    # hedged answers (math-verify alone grades the first: FACTS.md)
    ("3", "The answer is 3. Actually no, it's 4.", 0.0),
    ("4", "The answer is 3. Actually no, it's 4.", 0.0),
    # multiple boxed answers
    ("12", "\\boxed{12} or \\boxed{13}", 0.0),
    ("12", "\\boxed{13} or \\boxed{12}", 0.0),
    ("12", "First \\boxed{12}, checked: \\boxed{ 12 }", 1.0),
    # answer tags
    ("12", "<think>\n7+5\n</think>\n<answer>\n12\n</answer>", 1.0),
    ("12", "<answer>12</answer><answer>13</answer>", 0.0),
    # malformed LaTeX
    ("12", "\\frac{12", 0.0),
    ("12", "\\boxed{12", 0.0),
    ("\\frac{1}{2}", "$\\frac{1}{2$", 0.0),
    # empty output, no answer
    ("12", "", 0.0),
    ("12", "I do not know.", 0.0),
    # unparseable gold: cannot score
    ("???", "12", None),
    ("", "12", None),
]


@pytest.mark.parametrize("gold, completion, expected", GOLDEN)
def test_golden_table(pool, gold, completion, expected):
    assert grade(pool, gold, completion) == expected


# math-verify 0.9.0's false positives (../shared/FACTS.md) and what we return instead. Each pair:
# the wrong answer is rejected, the right one in the same notation is still accepted.
@pytest.mark.parametrize("gold, wrong, right, why", [
    ("$\\frac{1}{2004!}$", "$\\frac{1}{2006!}$", "$\\frac{1}{2004!}$",
     "numbers were compared after rounding to 6 decimals: both are ~0; we compare rationals exactly"),
    ("$1/2^{99}$", "$1/2^{98}$", "$\\frac{1}{2^{99}}$",
     "same rounding: 1/2^99 and 1/2^98 both round to 0"),
    ("1+1/e", "1-1/e", "$1+\\frac{1}{e}$",
     "a plain-text gold stopped at the first letter (1+1/e became 1); we parse golds as LaTeX"),
    ("4", "$4\\sqrt(2)$", "$4$",
     "math-verify dropped the malformed \\sqrt(2) and read 4; we rewrite \\sqrt( ) to \\sqrt{ }"),
    ("3", "The answer is 3. Actually no, it's 4.", "The answer is 3.",
     "math-verify takes the first 'answer is'; we also require the last sentence with a number to agree"),
])
def test_known_math_verify_false_positives_are_rejected(pool, gold, wrong, right, why):
    from math_verify import parse, verify

    # The false positive is real in the installed math-verify (if a new version fixes it, this says so).
    assert verify(parse(gold), parse(wrong)), f"math-verify no longer accepts {wrong!r} for {gold!r}: {why}"
    assert grade(pool, gold, wrong) == 0.0, why
    assert grade(pool, gold, right) == 1.0


class Heartbeat:
    """A thread in the caller that ticks every 10 ms; `longest_gap_s` shows whether it ever stalled."""

    def __init__(self):
        self.ticks: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.ticks.append(time.monotonic())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def longest_gap_s(self) -> float:
        return max(b - a for a, b in zip(self.ticks, self.ticks[1:]))


BOMBS = {
    "power tower": "The answer is 9^9^9^9",
    "latex tower": "$\\boxed{9^{9^{9^{9}}}}$",
    "huge factorial": "$\\boxed{(10^{10})!}$",
    "megabyte of digits": "\\boxed{" + "9" * 1_000_000 + "}",
}


# Killed at the limit, or stopped a little earlier by math-verify's own timeout inside the worker
# (it catches Python-level slowness, not C-level big-integer arithmetic) and graded wrong.
BOMB_OUTCOMES = {("timeout", None), ("ok", 0.0)}


def run_in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "worker-thread"])
def test_compute_bombs_return_within_twice_the_item_limit(pool, in_thread):
    with Heartbeat() as heartbeat:
        for name, bomb in BOMBS.items():
            start = time.monotonic()
            values = run_in_thread(lambda: accuracy([bomb], answer=["3"])) if in_thread else accuracy([bomb], answer=["3"])
            elapsed = time.monotonic() - start
            assert elapsed < 2 * ITEM_TIMEOUT_S, f"{name}: {elapsed:.2f}s"
            assert values == [0.0], name  # an answer nobody can check in time is not correct
    assert heartbeat.longest_gap_s < 0.5, f"the caller's heartbeat stalled for {heartbeat.longest_gap_s:.2f}s"


def test_batch_of_64_with_bombs_stays_within_its_budget_from_a_worker_thread(pool):
    bombs = list(BOMBS.values())
    pairs = [(str(i), f"So the answer is {i}.") for i in range(60)]
    for position, bomb in zip((5, 20, 35, 50), bombs):
        pairs.insert(position, ("3", bomb))
    budget_s = 12.0  # 2 rounds of 2 bombs on 2 workers (2 s each + a ~1 s restart) and 60 quick items
    with Heartbeat() as heartbeat:
        start = time.monotonic()
        outcomes = run_in_thread(lambda: pool.grade_batch(pairs, batch_timeout_s=budget_s))
        elapsed = time.monotonic() - start
    assert elapsed < budget_s + 1.0, elapsed
    assert heartbeat.longest_gap_s < 0.5
    statuses = [(o.status, o.value) for o in outcomes]
    for position in (5, 20, 35, 50):
        assert statuses[position] in BOMB_OUTCOMES
    assert [s for i, s in enumerate(statuses) if i not in (5, 20, 35, 50)] == [("ok", 1.0)] * 60


def test_batch_budget_cuts_a_batch_of_bombs_short(pool):
    pairs = [("3", BOMBS["power tower"])] * 64
    start = time.monotonic()
    outcomes = pool.grade_batch(pairs, batch_timeout_s=3.0)
    elapsed = time.monotonic() - start
    assert elapsed < 3.0 + 1.0, elapsed
    assert {(o.status, o.value) for o in outcomes} <= {*BOMB_OUTCOMES, ("budget", None)}
    assert sum(o.status == "budget" for o in outcomes) >= 60  # most never started
    # The killed workers were replaced: the pool still grades.
    assert grade(pool, "12", "\\boxed{12}") == 1.0


def test_concurrent_callers_from_several_threads(pool):
    results = {}

    def call(n):
        results[n] = pool.grade_batch([(str(n), f"\\boxed{{{n}}}"), (str(n), "\\boxed{-1}")])

    threads = [threading.Thread(target=call, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {n: [o.value for o in out] for n, out in results.items()} == {n: [1.0, 0.0] for n in range(6)}


def test_pool_rejects_a_non_positive_limit():
    with pytest.raises(ValueError, match="item_timeout_s"):
        VerifierPool(1, item_timeout_s=0)


# ---- evaluated code never executes model output ----

# Builtins that run strings as code, and sympy's string-to-expression entry points (sympify and
# S(...) call eval on their input; parse_expr too). `model.eval()` (torch) and `re.compile` are fine.
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_SYMPY = {"sympify", "parse_expr", "S"}


def test_rewards_source_has_no_eval_exec_or_sympify():
    """Scan every module of the package: none calls eval / exec / compile / sympify / parse_expr."""
    package = Path(rewards.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Name):
                    name, forbidden = node.func.id, FORBIDDEN_BUILTINS | FORBIDDEN_SYMPY
                else:
                    name, forbidden = getattr(node.func, "attr", None), FORBIDDEN_SYMPY
                if name in forbidden:
                    offenders.append(f"{path.name}:{node.lineno} {name}()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names]
                if any(n in {"sympify", "parse_expr"} for n in names) or "sympy.parsing" in (getattr(node, "module", "") or ""):
                    offenders.append(f"{path.name}:{node.lineno} imports {names}")
    assert len(list(package.rglob("*.py"))) >= 6  # the scan really saw the package
    assert offenders == []


def test_completions_that_are_code_are_never_run(pool, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    completions = [
        payload,
        f"The answer is {payload}",
        f"$\\boxed{{{payload}}}$",
        f"<answer>{payload}</answer>",
        f"answer: 1 + {payload}",
        f"The final answer is $({payload})$",
    ]
    assert accuracy(completions, answer=["0"] * len(completions)) == [0.0] * len(completions)
    # The same payload as a gold answer: not parseable, so unscored, and not run either.
    assert accuracy(["0"], answer=[payload]) == [None]
    assert not marker.exists()
