"""A pool of worker processes that grade math answers with a hard time limit per item.

math-verify cannot bound its own time from where a trainer calls it (../shared/FACTS.md): its
timeouts use `signal.alarm`, which raises in any thread but the main one, and which cannot
interrupt C-level big-integer arithmetic anyway (`9^9^9^9` stalled the whole process, other
threads included). So grading runs in separate processes, and a worker that is still busy when
its item's time is up is killed (SIGKILL) and replaced. The caller only waits on pipes, which
releases the GIL: its other threads keep running, and `grade_batch` may be called from any
thread, by several threads at once (each call borrows idle workers; none are shared).

    from rewards.verifier_pool import default_pool
    outcomes = default_pool().grade_batch([("12", "The answer is 12."), ("3", "9^9^9^9")])
    # [Outcome(status='ok', value=1.0), Outcome(status='timeout', value=None)]

Workers are fresh interpreters (`python -m rewards.grading_worker`) talking JSON lines over their
stdin/stdout, not multiprocessing children: those re-import the caller's `__main__` (a training
script without an `if __name__ == "__main__"` guard would run again) and, forked, would copy a
trainer's live threads. A worker takes about a second to import math-verify; it starts in the
background and an item's clock starts only when a ready worker receives it.

A reward must not depend on how busy the machine is (issue 30: with other jobs running, an independent
grading table got 4 None verdicts, 0 when idle; reproduced here with 12 busy loops on 2 cores, item limit
2 s). So the limits count time on each worker's own clock (`_Worker.clock`: wall time less the time
it waited for a CPU), the limit of a worker's start-up is separate from its items', and math-verify's own
per-call timeouts inside a worker count its CPU time (rewards/math_grader.py), not wall time. A batch
without an explicit `batch_timeout_s` has no wall-clock budget: on a loaded machine it is slower, and
its verdicts are the idle machine's.

Every worker is started by ONE long-lived thread that the pool owns (its spawner), never by the
calling thread: a worker asks Linux to SIGKILL it when its parent dies (PR_SET_PDEATHSIG), and
"parent" means the *thread* that started it. A pool started, or a worker replaced, from a
short-lived thread (a TRL reward call in a worker thread, a DataLoader thread) lost its workers
when that thread ended, and every later item came back as an error (issue 12).

Failures are loud: a batch in which items got no verdict (a worker error, or the batch's time ran
out) logs how many and why, and a batch in which no item got one also raises a
`GradingFailureWarning` (an alert: a reward of None everywhere would otherwise only show up as a
NaN mean). `errors_total`, `budget_total` and `timeouts_total` count them over the pool's life.
"""

import atexit
import collections
import json
import logging
import multiprocessing.connection
import os
import queue
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

# math-verify's own default limit per parse/verify (math_verify.parse, `parsing_timeout=5`).
DEFAULT_ITEM_TIMEOUT_S = 5.0
# Upper bound on the default number of workers per process. Each worker is a Python interpreter with
# sympy and math-verify loaded, and every rank of a multi-process run starts its own pool: with
# os.cpu_count() per rank, 8 ranks on 96 cores would have started 768 interpreters (issue 12).
MAX_DEFAULT_WORKERS = 8


class GradingFailureWarning(RuntimeWarning):
    """No item of a grading batch got a verdict (errors, or the batch's time ran out): every reward is None."""


def default_num_workers() -> int:
    """The CPUs this process may use, shared among the ranks on this machine, at most MAX_DEFAULT_WORKERS.

    LOCAL_WORLD_SIZE is set by torchrun and accelerate; each local rank gets its own share.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // max(1, local_ranks)))


@dataclass(frozen=True)
class Outcome:
    """What grading one (gold, completion) pair gave.

    status: "ok" (value is math_grader.grade's result: 1.0, 0.0 or None for an unparseable gold),
    "timeout" (the item ran past the per-item limit and its worker was killed), "budget" (the
    batch's `batch_timeout_s` ran out before the item finished or started, or no worker could start),
    "error" (the worker raised or died; `error` says what).
    """

    status: Literal["ok", "timeout", "budget", "error"]
    value: float | None = None
    error: str | None = None


class _Worker:
    """One grading process: `python -m rewards.grading_worker`, one JSON line per message each way."""

    def __init__(self, item_timeout_s: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rewards.grading_worker", str(item_timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        self.ready = False  # True once it has imported math-verify and said so
        self._buffer = b""
        self.start_clock()  # its start-up, until it receives an item

    def start_clock(self) -> None:
        self._clock_start = (time.monotonic(), self._queued_seconds())

    def clock(self) -> float:
        """Seconds since `start_clock` that this worker ran or slept, less the time it waited for a CPU
        (Linux's /proc/<pid>/schedstat; plain wall time elsewhere). Its limits count on this clock: on a busy
        machine a worker waits for a CPU, and counted in wall time, the same item timed out under load that
        graded fine when idle (issue 30: 4 None verdicts of an independent grading table with other jobs
        running, 0 idle). A compute bomb runs, and a hang sleeps: both still count."""
        started, queued = self._clock_start
        return time.monotonic() - started - (self._queued_seconds() - queued)

    def _queued_seconds(self) -> float:
        """Seconds this worker's (single) thread has waited on a run queue so far; 0.0 where unknown."""
        try:
            with open(f"/proc/{self.process.pid}/schedstat", "rb") as stats:
                return int(stats.read().split()[1]) / 1e9  # on-CPU ns, run-queue wait ns, time slices
        except (OSError, IndexError, ValueError):
            return 0.0

    def fileno(self) -> int:  # for multiprocessing.connection.wait
        return self.process.stdout.fileno()

    def send(self, gold: str, completion: str) -> None:
        """Hand over one item (the worker is idle, reading its stdin; OSError if it died)."""
        data = memoryview(json.dumps([gold, completion]).encode() + b"\n")
        while data:  # a raw pipe write may take only part of a large completion
            data = data[self.process.stdin.write(data) :]

    def read_message(self) -> dict | None:
        """Call when the pipe is readable: the worker's message, or None if only part of it has arrived
        (a worker sends one message at a time, so at most one is ever waiting); EOFError if it died."""
        if b"\n" not in self._buffer:
            chunk = os.read(self.fileno(), 1 << 16)
            if not chunk:
                raise EOFError(f"grading worker {self.process.pid} exited with code {self.process.wait()}")
            self._buffer += chunk
            if b"\n" not in self._buffer:
                return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


# How long a worker may take to start (import math-verify and sympy: about a second idle), on its clock
# (`_Worker.clock`), before a call gives up on it.
WORKER_START_TIMEOUT_S = 120.0


class VerifierPool:
    """`num_workers` grading processes; each item gets at most `item_timeout_s` seconds on its worker's clock.

    num_workers: default `default_num_workers()` (this process's share of the CPUs, at most
    MAX_DEFAULT_WORKERS).
    """

    def __init__(self, num_workers: int | None = None, item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S):
        if item_timeout_s <= 0:
            raise ValueError(f"item_timeout_s must be > 0, got {item_timeout_s}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (or None for default_num_workers()), got {num_workers}")
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.item_timeout_s = item_timeout_s
        # Items without a verdict, over the pool's life (for a trainer's logs).
        self.errors_total = 0
        self.budget_total = 0
        self.timeouts_total = 0
        self._counts_lock = threading.Lock()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._closed = False
        # The one thread that starts every worker (see the module docstring). It lives until close();
        # then it ends, and Linux kills whatever worker a running call still holds.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier-pool-spawner")
        for _ in range(self.num_workers):  # they import math-verify in the background from now on
            self._idle.put(self._spawn())

    def grade_batch(self, pairs: Sequence[tuple[str, str]], batch_timeout_s: float | None = None) -> list[Outcome]:
        """Grade (gold, completion) pairs in parallel.

        Each item gets `item_timeout_s` on its worker's clock (`_Worker.clock`: waiting for a CPU does not
        count), and a worker's start-up WORKER_START_TIMEOUT_S on its own, so a verdict does not depend on
        how busy the machine is. With `batch_timeout_s`, the call returns within it (+ kill time), in wall
        time, waiting for idle workers included, and items unfinished by then get Outcome("budget").
        Without, it waits as long as its items need: each is bounded by its own limit, so callers that
        share the pool wait their turn, and a busy machine makes a batch slower, never its verdicts None.
        """
        if self._closed:
            raise RuntimeError("this VerifierPool was closed")
        if not pairs:
            return []
        batch_deadline = None if batch_timeout_s is None else time.monotonic() + batch_timeout_s
        # Without a budget, wait for a first idle worker as long as it takes: every call returns its workers
        # once its items are done (or the pool is closed).
        borrowed = self._borrow(len(pairs), batch_deadline)
        outcomes: list[Outcome | None] = [None] * len(pairs)
        pending = collections.deque(range(len(pairs)))
        free = [worker for worker in borrowed if worker.ready]
        starting = [worker for worker in borrowed if not worker.ready]
        running: dict[_Worker, int] = {}  # worker -> the index of its item
        free_later: list[_Worker] = []  # replacements this call does not wait for
        try:
            while (pending or running) and (batch_deadline is None or time.monotonic() < batch_deadline):
                while pending and free:
                    worker, index = free.pop(), pending.popleft()
                    try:
                        worker.send(*pairs[index])
                    except OSError as error:  # died while idle (e.g. killed from outside)
                        outcomes[index] = Outcome("error", error=f"grading worker died: {error!r}")
                        self._replace(worker, starting)
                        continue
                    worker.start_clock()
                    running[worker] = index
                for worker in [w for w in starting if w.clock() >= WORKER_START_TIMEOUT_S]:
                    # Never became ready: this call gives up on it; the pool gets a fresh one for later calls.
                    starting.remove(worker)
                    logger.warning("grading worker %d did not start within %.0f s; replaced", worker.process.pid,
                                   WORKER_START_TIMEOUT_S)
                    self._replace(worker, free_later)
                if not running and not starting:
                    break  # nothing left to wait for (no worker could be borrowed or started in time)
                # Until the first limit could be reached: clocks run no faster than wall time.
                limits = [self.item_timeout_s - worker.clock() for worker in running]
                limits += [WORKER_START_TIMEOUT_S - worker.clock() for worker in starting]
                if batch_deadline is not None:
                    limits.append(batch_deadline - time.monotonic())
                ready = multiprocessing.connection.wait([*running, *starting], timeout=max(0.0, min(limits)))
                for worker in ready:
                    self._receive(worker, running, starting, free, outcomes)
                for worker, index in list(running.items()):
                    if worker.clock() >= self.item_timeout_s:
                        del running[worker]
                        outcomes[index] = Outcome("timeout")
                        self._replace(worker, starting)
        finally:
            # Workers still busy when the batch's time ran out (or the caller was interrupted).
            for worker in running:
                self._replace(worker, starting)
            for worker in free + starting + free_later:
                if self._closed:  # closed while this call held them
                    worker.kill()
                else:
                    self._idle.put(worker)
        final = [outcome or Outcome("budget") for outcome in outcomes]
        self._report_failures(final)
        return final

    def _report_failures(self, outcomes: list[Outcome]) -> None:
        """Count the items that got no verdict; log them, and alert when no item of the batch got one."""
        errors = [outcome.error for outcome in outcomes if outcome.status == "error"]
        budget = sum(outcome.status == "budget" for outcome in outcomes)
        with self._counts_lock:
            self.errors_total += len(errors)
            self.budget_total += budget
            self.timeouts_total += sum(outcome.status == "timeout" for outcome in outcomes)
            errors_total = self.errors_total
        if not errors and not budget:
            return
        message = (f"grading: {len(errors) + budget} of {len(outcomes)} items got no verdict (reward None): "
                   f"{len(errors)} errored, {budget} ran out of the batch's time; {errors_total} errors so far "
                   f"in this pool" + (f"; first error: {errors[0]}" if errors else ""))
        logger.warning(message)
        if len(errors) + budget == len(outcomes):
            warnings.warn(message, GradingFailureWarning, stacklevel=3)

    def _receive(self, worker: _Worker, running: dict, starting: list, free: list, outcomes: list) -> None:
        """Handle one readable worker: a result, its ready message, or its death."""
        try:
            message = worker.read_message()
        except EOFError as error:
            if worker not in running:
                starting.remove(worker)
                raise RuntimeError(f"a grading worker failed to start ({error}); its error is printed above "
                                   "(stderr): is math-verify installed in this environment?") from error
            index = running.pop(worker)  # it died on this item, e.g. out of memory
            outcomes[index] = Outcome("error", error=f"grading worker died: {error}")
            self._replace(worker, starting)
            return
        if message is None:
            return
        if worker in running:
            outcomes[running.pop(worker)] = Outcome(**message)
        else:
            worker.ready = True
            starting.remove(worker)
        free.append(worker)

    def close(self) -> None:
        """Stop every idle worker (workers borrowed by a running call stop when it returns them) and the spawner."""
        self._closed = True
        self._spawner.shutdown(wait=False)
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            worker.kill()

    def _borrow(self, wanted: int, deadline: float | None) -> list[_Worker]:
        """Up to `wanted` idle workers; waits (until `deadline`, or the pool's close when None) only while
        there are none at all."""
        borrowed: list[_Worker] = []
        while not borrowed:
            wait_s = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait_s < 0 or self._closed:
                return borrowed  # every worker busy for other threads for the whole budget
            try:
                borrowed.append(self._idle.get(timeout=max(0.0, wait_s)))
            except queue.Empty:
                continue
        while len(borrowed) < wanted:
            try:
                borrowed.append(self._idle.get_nowait())
            except queue.Empty:
                break
        return borrowed

    def _spawn(self) -> _Worker:
        """A new worker, started by the pool's spawner thread (never by the calling thread)."""
        return self._spawner.submit(_Worker, self.item_timeout_s).result()

    def _replace(self, worker: _Worker, starting: list[_Worker]) -> None:
        """Kill `worker` and add a fresh one to `starting` (none once the pool is closed)."""
        worker.kill()
        if self._closed:
            return
        try:
            starting.append(self._spawn())
        except RuntimeError:  # close() shut the spawner down between the check and the spawn
            return


_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool the reward functions use, started on first use (`configure_default_pool`)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = VerifierPool()
            atexit.register(_default_pool.close)
        return _default_pool


def configure_default_pool(num_workers: int | None = None, item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S) -> VerifierPool:
    """Replace the process-wide pool (e.g. a shorter per-item limit for tests or fast RL steps)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is not None:
            _default_pool.close()
        _default_pool = VerifierPool(num_workers, item_timeout_s)
        atexit.register(_default_pool.close)
        return _default_pool
