"""A pool of worker processes that grade math answers with a hard wall-clock limit per item.

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

Workers are started through the "forkserver" method with `rewards.math_grader` preloaded, so a
replacement is a fork of a clean, single-threaded, already-imported server (tens of ms, not the
~1 s import of math-verify + sympy), and never a fork of a trainer with live threads.
"""

import atexit
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Literal

# math-verify's own default limit per parse/verify (math_verify.parse, `parsing_timeout=5`).
DEFAULT_ITEM_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Outcome:
    """What grading one (gold, completion) pair gave.

    status: "ok" (value is math_grader.grade's result: 1.0, 0.0 or None for an unparseable gold),
    "timeout" (the item ran past the per-item limit and its worker was killed), "budget" (the
    batch's time ran out before the item finished or started), "error" (the worker raised or died;
    `error` says what).
    """

    status: Literal["ok", "timeout", "budget", "error"]
    value: float | None = None
    error: str | None = None


def _worker_main(connection: multiprocessing.connection.Connection, item_timeout_s: float) -> None:
    """Loop of one worker process: receive (gold, completion), send back an Outcome."""
    from rewards.math_grader import grade

    # math-verify's signal timeouts (whole seconds) stop slow Python code politely; the parent's
    # kill is the hard limit. Rounded up so they never fire before the parent's limit would.
    signal_timeout_s = max(1, math.ceil(item_timeout_s))
    while True:
        try:
            item = connection.recv()
        except EOFError:  # the parent closed the pipe or died
            return
        if item is None:
            return
        gold, completion = item
        try:
            outcome = Outcome("ok", grade(gold, completion, timeout_s=signal_timeout_s))
        except Exception as error:  # a math-verify bug on one odd input must not end the worker
            outcome = Outcome("error", error=f"{type(error).__name__}: {error}"[:500])
        connection.send(outcome)


class _Worker:
    def __init__(self, context, item_timeout_s: float):
        self.connection, child_end = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child_end, item_timeout_s), daemon=True)
        self.process.start()
        child_end.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


class VerifierPool:
    """`num_workers` grading processes; each item gets at most `item_timeout_s` seconds of wall clock."""

    def __init__(self, num_workers: int | None = None, item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S):
        if item_timeout_s <= 0:
            raise ValueError(f"item_timeout_s must be > 0, got {item_timeout_s}")
        self.num_workers = num_workers or os.cpu_count() or 1
        self.item_timeout_s = item_timeout_s
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["rewards.math_grader"])
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._closed = False
        for _ in range(self.num_workers):
            self._idle.put(_Worker(self._context, item_timeout_s))

    def default_batch_timeout_s(self, num_items: int) -> float:
        """Time for `num_items` that all run to the per-item limit on all workers, plus one limit
        for the replacement starts: a batch that ends sooner lost nothing to the budget."""
        return self.item_timeout_s * (math.ceil(num_items / self.num_workers) + 1)

    def grade_batch(self, pairs: list[tuple[str, str]], batch_timeout_s: float | None = None) -> list[Outcome]:
        """Grade (gold, completion) pairs in parallel; returns within `batch_timeout_s` (+ kill time).

        Items still unfinished when the batch's time is up get Outcome("budget").
        """
        if self._closed:
            raise RuntimeError("this VerifierPool was closed")
        if not pairs:
            return []
        budget_s = self.default_batch_timeout_s(len(pairs)) if batch_timeout_s is None else batch_timeout_s
        batch_deadline = time.monotonic() + budget_s
        outcomes: list[Outcome | None] = [None] * len(pairs)
        pending = list(range(len(pairs)))[::-1]  # popped from the end: items start in order
        free: list[_Worker] = self._borrow(len(pairs), batch_deadline)
        running: dict[multiprocessing.connection.Connection, tuple[_Worker, int, float]] = {}
        try:
            while pending or running:
                while pending and free and time.monotonic() < batch_deadline:
                    worker, index = free.pop(), pending.pop()
                    worker.connection.send(pairs[index])
                    running[worker.connection] = (worker, index, time.monotonic() + self.item_timeout_s)
                if not running:
                    break  # the batch's time is up before the remaining items could start
                wait_until = min(batch_deadline, min(deadline for _, _, deadline in running.values()))
                ready = multiprocessing.connection.wait(list(running), timeout=max(0.0, wait_until - time.monotonic()))
                for connection in ready:
                    worker, index, _ = running.pop(connection)
                    try:
                        outcomes[index] = connection.recv()
                        free.append(worker)
                    except (EOFError, OSError) as error:  # the worker died (e.g. out of memory)
                        outcomes[index] = Outcome("error", error=f"grading worker died: {error!r}")
                        free.append(self._replace(worker))
                now = time.monotonic()
                for connection, (worker, index, deadline) in list(running.items()):
                    if now >= deadline or now >= batch_deadline:
                        del running[connection]
                        outcomes[index] = Outcome("timeout" if now >= deadline else "budget")
                        free.append(self._replace(worker))
        finally:
            for connection, (worker, _, _) in running.items():  # interrupted (e.g. KeyboardInterrupt)
                free.append(self._replace(worker))
            for worker in free:
                self._idle.put(worker)
        return [outcome or Outcome("budget") for outcome in outcomes]

    def close(self) -> None:
        """Stop every idle worker (workers borrowed by a running call stop when it returns them)."""
        self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            worker.kill()

    def _borrow(self, wanted: int, deadline: float) -> list[_Worker]:
        """Up to `wanted` idle workers; waits (until `deadline`) only while there are none at all."""
        borrowed: list[_Worker] = []
        try:
            borrowed.append(self._idle.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            return borrowed  # every worker busy for another thread for the whole budget
        while len(borrowed) < wanted:
            try:
                borrowed.append(self._idle.get_nowait())
            except queue.Empty:
                break
        return borrowed

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        return _Worker(self._context, self.item_timeout_s)


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
