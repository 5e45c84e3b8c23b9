"""Fault injection for the tests: how they break a real run on purpose, in every stage.

SMOLFORGE_FAULT holds "kind:arg[,kind:arg...]", e.g. "kill_after_step:3" or
"nan_at_step:3:1,poison_step:9". Stages ask `fault("kind")` at the point where that fault
acts. Pretraining reads them all once at start (`active_faults`) and skips every fault check
when none is set; the Trainer stages ask only at checkpoints. A normal run pays nothing.

Kinds understood by the stages:
  kill_after_step:N     SIGKILL right after the checkpoint of step N is complete (every stage)
  kill_in_checkpoint:N  SIGKILL in the middle of writing checkpoint N (every stage)
  nan_at_step:S[:rank]  pretraining: the loss of step S becomes NaN (on one rank)
  poison_step:S         pretraining: the rows of step S become noise, wherever they reappear
  slow_data:S:sec[:rank] pretraining: the data loader sleeps before every batch from step S on
  corrupt_checkpoint    pretraining preflight: the round-trip checkpoint is corrupted
  slow_rank:R           diagnostics and pretraining: a thread on rank R holds the GIL 4/5 of the time,
                        so it computes several times slower (a throttling GPU / noisy neighbour, issue 21)
"""

import os
import signal
import threading
import time

from transformers import TrainerCallback


def fault(name: str) -> str | None:
    """The argument of fault `name` in SMOLFORGE_FAULT, or None when it is not set."""
    for item in os.environ.get("SMOLFORGE_FAULT", "").split(","):
        kind, _, arg = item.partition(":")
        if kind == name:
            return arg
    return None


def active_faults() -> dict[str, str]:
    """Every fault set in SMOLFORGE_FAULT, kind -> argument; empty in a normal run. A loop reads this once at
    start and skips its fault checks entirely when it is empty (issue 22: no fault work in the hot loop)."""
    items = (item.partition(":") for item in os.environ.get("SMOLFORGE_FAULT", "").split(",") if item)
    return {kind: arg for kind, _, arg in items}


def kill_if(name: str, step: int) -> None:
    """SIGKILL this process when fault `name` is set to `step` (no cleanup, as a real crash)."""
    if fault(name) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


class FaultCallback(TrainerCallback):
    """Trainer stages: kill_after_step:N, after checkpoint N is complete (on_save runs after the save)."""

    def on_save(self, args, state, control, **kwargs):
        kill_if("kill_after_step", state.global_step)


class FaultInjectionMixin:
    """Trainer stages: kill_in_checkpoint:N, after checkpoint N's weights, optimizer and RNG are
    written but before trainer_state.json, the file that marks it complete (Trainer._save_checkpoint
    writes it last)."""

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        kill_if("kill_in_checkpoint", self.state.global_step)


def start_slow_rank_fault(rank: int) -> None:
    """slow_rank:R: on rank R, start a daemon thread that takes the GIL about 4/5 of the time: it runs
    `sum(range(...))`, one C call that holds the GIL for its whole length (the interpreter's 5 ms switch
    interval only acts between bytecodes), then sleeps a quarter as long. The rank's main thread cannot launch a
    torch op while the GIL is held, so its figures and steps come out several times slower, like a throttled
    GPU or a rank sharing its node with another job. Tied to the rank's own progress rather than to the
    machine's load (a busy loop of bytecodes only competed for CPU time, which other jobs on a shared
    machine also take at random). Started once per process."""
    if fault("slow_rank") != str(rank) or _busy_threads:
        return

    def hog_the_gil():
        while True:
            started = time.perf_counter()
            sum(range(300_000))  # holds the GIL throughout (a few ms)
            time.sleep((time.perf_counter() - started) / 4)

    _busy_threads.append(threading.Thread(target=hog_the_gil, name="slow_rank fault", daemon=True))
    _busy_threads[0].start()


_busy_threads: list[threading.Thread] = []
