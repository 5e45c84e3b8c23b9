"""The verifier pool's own guarantees: the hard kill, workers that outlive the threads that use the
pool, loud failures, and budgets sized on the workers a call really has (issue 11 item 10, issue 12).

Real worker processes throughout; the hang is the `grading_hang` fault of rewards/grading_worker.py
(switched on through core/faults.py's SMOLFORGE_FAULT), a worker that ignores signals, so only the
pool's SIGKILL can end its item.
"""

import logging
import threading
import time
import warnings

import psutil
import pytest

from rewards.verifier_pool import (
    MAX_DEFAULT_WORKERS,
    GradingFailureWarning,
    Outcome,
    VerifierPool,
    default_num_workers,
)

ITEM_TIMEOUT_S = 1.5
HANG = "HANG-ON-THIS"


def worker_pids(excluding: set[int] = frozenset()) -> set[int]:
    """The pids of this process's live grading workers, less `excluding` (other pools of this process,
    e.g. the default one that other test files configure, run the same command)."""
    return {child.pid for child in psutil.Process().children()
            if "rewards.grading_worker" in " ".join(child.cmdline()) and child.pid not in excluding}


@pytest.fixture
def hanging_pool(monkeypatch):
    """One worker that hangs, ignoring signals, on any completion containing HANG."""
    monkeypatch.setenv("SMOLFORGE_FAULT", f"grading_hang:{HANG}")
    others = worker_pids()
    pool = VerifierPool(num_workers=1, item_timeout_s=ITEM_TIMEOUT_S)
    assert pool.grade_batch([("1", "1")]) == [Outcome("ok", 1.0)]  # started and ready: clocks measure grading
    yield pool, others
    pool.close()


def test_a_worker_that_ignores_signals_is_killed_at_the_item_limit_and_replaced(hanging_pool):
    pool, others = hanging_pool
    (before,) = worker_pids(others)
    start = time.monotonic()
    outcomes = pool.grade_batch([("1", f"{HANG} 1")])
    elapsed = time.monotonic() - start
    # The pool's deadline ends the item, not math-verify's signal timeout (the worker ignores signals)
    # and not the batch budget (2 x the item limit here): made infinite, this would take 3 s and say "budget".
    assert outcomes == [Outcome("timeout")]
    assert ITEM_TIMEOUT_S <= elapsed < ITEM_TIMEOUT_S + 1.0, elapsed  # kill + a Popen, with room for a busy CI
    assert not psutil.pid_exists(before) or psutil.Process(before).status() == psutil.STATUS_ZOMBIE
    (after,) = worker_pids(others)
    assert after != before
    assert pool.timeouts_total == 1
    # The replacement grades.
    assert pool.grade_batch([("2", "\\boxed{2}"), ("2", "\\boxed{3}")]) == [Outcome("ok", 1.0), Outcome("ok", 0.0)]


def in_a_thread_that_ends(fn):
    """Run fn in a new thread and wait until that thread has ended; its result."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


def test_a_pool_started_from_a_thread_that_exits_still_grades(monkeypatch):
    # Workers die with their parent *thread* (PR_SET_PDEATHSIG, armed by each worker as it starts):
    # started by the thread that made or used the pool, they were killed when it ended, and every
    # later item came back as an error.
    monkeypatch.setenv("SMOLFORGE_FAULT", f"grading_hang:{HANG}")

    def start_and_use():
        pool = VerifierPool(num_workers=2, item_timeout_s=ITEM_TIMEOUT_S)
        # Graded here, so both workers are running (and armed) before this thread ends.
        assert pool.grade_batch([("1", "1"), ("2", "2")]) == [Outcome("ok", 1.0)] * 2
        return pool

    pool = in_a_thread_that_ends(start_and_use)
    try:
        assert pool.grade_batch([("12", "The answer is 12."), ("12", "\\boxed{13}")]) \
            == [Outcome("ok", 1.0), Outcome("ok", 0.0)]

        def replace_a_worker():
            # A timeout replaces a worker from this thread; the next batch waits for the replacement.
            return pool.grade_batch([("1", HANG)]) + pool.grade_batch([("1", "1"), ("2", "2")])

        assert in_a_thread_that_ends(replace_a_worker) == [Outcome("timeout"), Outcome("ok", 1.0), Outcome("ok", 1.0)]
        assert pool.grade_batch([("3", "\\boxed{3}"), ("4", "$4$"), ("5", "5")]) == [Outcome("ok", 1.0)] * 3
        assert pool.errors_total == 0
    finally:
        pool.close()


def test_a_batch_of_errors_is_loud(caplog):
    others = worker_pids()
    pool = VerifierPool(num_workers=1, item_timeout_s=ITEM_TIMEOUT_S)
    try:
        assert pool.grade_batch([("1", "1")]) == [Outcome("ok", 1.0)]
        (pid,) = worker_pids(others)
        psutil.Process(pid).kill()  # dies while idle: its next item is an error
        psutil.Process(pid).wait()
        with caplog.at_level(logging.WARNING, logger="rewards.verifier_pool"), \
                pytest.warns(GradingFailureWarning, match="1 of 1 items got no verdict"):
            (outcome,) = pool.grade_batch([("1", "1")])
        assert outcome.status == "error" and "grading worker died" in outcome.error
        assert "1 errored" in caplog.text
        assert pool.errors_total == 1
        # The replacement grades, and a batch with verdicts raises no alert.
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradingFailureWarning)
            assert pool.grade_batch([("1", "1")]) == [Outcome("ok", 1.0)]
    finally:
        pool.close()


def test_a_caller_that_waits_for_a_busy_worker_gets_a_budget_for_it(monkeypatch):
    # Caller A holds the only worker for about 6 s (4 hanging items, each killed at 1 s and replaced).
    # Caller B's 3 quick items must not come back as "budget" because B's time was counted while it
    # waited, for a budget sized on workers it did not have (1 s x (3 + 1) = 4 s): B waits its turn.
    monkeypatch.setenv("SMOLFORGE_FAULT", f"grading_hang:{HANG}")
    pool = VerifierPool(num_workers=1, item_timeout_s=1.0)
    try:
        assert pool.grade_batch([("1", "1")]) == [Outcome("ok", 1.0)]
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("a", pool.grade_batch([("1", HANG)] * 4)))
        first.start()
        deadline = time.monotonic() + 10
        while not pool._idle.empty() and time.monotonic() < deadline:  # until A has borrowed the worker
            time.sleep(0.01)
        results["b"] = pool.grade_batch([(str(n), f"\\boxed{{{n}}}") for n in range(3)])
        first.join()
        # A's worker restarts (one per kill) count against no budget of A's (issue 30): every item ends at its limit.
        assert results["a"] == [Outcome("timeout")] * 4
        assert results["b"] == [Outcome("ok", 1.0)] * 3
    finally:
        pool.close()


def test_default_number_of_workers_is_bounded_and_shared_among_local_ranks(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(96)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers() == MAX_DEFAULT_WORKERS  # 96 / 8 = 12 per rank, capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert default_num_workers() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_num_workers() == 2
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        VerifierPool(num_workers=0)
