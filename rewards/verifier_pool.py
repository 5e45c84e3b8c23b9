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

Workers are fresh interpreters (`python -m rewards.grading_worker`) talking JSON lines over their
stdin/stdout, not multiprocessing children: those re-import the caller's `__main__` (a training
script without an `if __name__ == "__main__"` guard would run again) and, forked, would copy a
trainer's live threads. A worker takes about a second to import math-verify; it starts in the
background and an item's clock starts only when a ready worker receives it.
"""

import atexit
import collections
import json
import math
import multiprocessing.connection
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
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


class _Worker:
    """One grading process: `python -m rewards.grading_worker`, one JSON line per message each way."""

    def __init__(self, item_timeout_s: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rewards.grading_worker", str(item_timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        self.ready = False  # True once it has imported math-verify and said so
        self._buffer = b""

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


class VerifierPool:
    """`num_workers` grading processes; each item gets at most `item_timeout_s` seconds of wall clock."""

    def __init__(self, num_workers: int | None = None, item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S):
        if item_timeout_s <= 0:
            raise ValueError(f"item_timeout_s must be > 0, got {item_timeout_s}")
        self.num_workers = num_workers or os.cpu_count() or 1
        self.item_timeout_s = item_timeout_s
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._closed = False
        for _ in range(self.num_workers):  # they import math-verify in the background from now on
            self._idle.put(_Worker(item_timeout_s))

    def default_batch_timeout_s(self, num_items: int) -> float:
        """Time for `num_items` that all run to the per-item limit on all workers, plus one limit
        for worker starts: a batch that ends sooner lost nothing to the budget."""
        return self.item_timeout_s * (math.ceil(num_items / self.num_workers) + 1)

    def grade_batch(self, pairs: Sequence[tuple[str, str]], batch_timeout_s: float | None = None) -> list[Outcome]:
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
        pending = collections.deque(range(len(pairs)))
        borrowed = self._borrow(len(pairs), batch_deadline)
        free = [worker for worker in borrowed if worker.ready]
        starting = [worker for worker in borrowed if not worker.ready]
        running: dict[_Worker, tuple[int, float]] = {}  # worker -> (item index, its deadline)
        try:
            while (pending or running) and time.monotonic() < batch_deadline:
                while pending and free:
                    worker, index = free.pop(), pending.popleft()
                    try:
                        worker.send(*pairs[index])
                    except OSError as error:  # died while idle (e.g. killed from outside)
                        outcomes[index] = Outcome("error", error=f"grading worker died: {error!r}")
                        starting.append(self._replace(worker))
                        continue
                    running[worker] = (index, time.monotonic() + self.item_timeout_s)
                if not running and not starting:
                    break  # nothing left to wait for (no worker could be borrowed in time)
                wait_until = min([batch_deadline, *(deadline for _, deadline in running.values())])
                ready = multiprocessing.connection.wait([*running, *starting],
                                                        timeout=max(0.0, wait_until - time.monotonic()))
                for worker in ready:
                    self._receive(worker, running, starting, free, outcomes)
                now = time.monotonic()
                for worker, (index, deadline) in list(running.items()):
                    if now >= deadline:
                        del running[worker]
                        outcomes[index] = Outcome("timeout")
                        starting.append(self._replace(worker))
        finally:
            # Workers still busy when the batch's time ran out (or the caller was interrupted).
            starting.extend(self._replace(worker) for worker in running)
            for worker in free + starting:
                self._idle.put(worker)
        return [outcome or Outcome("budget") for outcome in outcomes]

    def _receive(self, worker: _Worker, running: dict, starting: list, free: list, outcomes: list) -> None:
        """Handle one readable worker: a result, its ready message, or its death."""
        try:
            message = worker.read_message()
        except EOFError as error:
            if worker not in running:
                starting.remove(worker)
                raise RuntimeError(f"a grading worker failed to start ({error}); its error is printed above "
                                   "(stderr): is math-verify installed in this environment?") from error
            index, _ = running.pop(worker)  # it died on this item, e.g. out of memory
            outcomes[index] = Outcome("error", error=f"grading worker died: {error}")
            starting.append(self._replace(worker))
            return
        if message is None:
            return
        if worker in running:
            index, _ = running.pop(worker)
            outcomes[index] = Outcome(**message)
        else:
            worker.ready = True
            starting.remove(worker)
        free.append(worker)

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
            return borrowed  # every worker busy for other threads for the whole budget
        while len(borrowed) < wanted:
            try:
                borrowed.append(self._idle.get_nowait())
            except queue.Empty:
                break
        return borrowed

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        return _Worker(self.item_timeout_s)


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
