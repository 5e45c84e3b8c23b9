"""Fault injection for the tests: how they break a real run on purpose, in every stage.

SMOLFORGE_FAULT holds "kind:arg[,kind:arg...]", e.g. "kill_after_step:3" or
"nan_at_step:3:1,poison_step:9". Stages ask `fault("kind")` at the point where that fault
acts. Nothing reads the variable unless it is set, and a training loop asks once per step
at most (never per row), so a normal run pays nothing.

Kinds understood by the stages:
  kill_after_step:N     SIGKILL right after the checkpoint of step N is complete (every stage)
  kill_in_checkpoint:N  SIGKILL in the middle of writing checkpoint N (every stage)
  nan_at_step:S[:rank]  pretraining: the loss of step S becomes NaN (on one rank)
  poison_step:S         pretraining: the rows of step S become noise, wherever they reappear
  slow_data:S:sec[:rank] pretraining: the data loader sleeps before every batch from step S on
  corrupt_checkpoint    pretraining preflight: the round-trip checkpoint is corrupted
  slow_rank:R           diagnostics and pretraining: rank R runs a busy Python thread next to its work,
                        so it computes slower (a throttling GPU / noisy neighbour, issue 21)
"""

import os
import signal
import threading

from transformers import TrainerCallback


def fault(name: str) -> str | None:
    """The argument of fault `name` in SMOLFORGE_FAULT, or None when it is not set."""
    for item in os.environ.get("SMOLFORGE_FAULT", "").split(","):
        kind, _, arg = item.partition(":")
        if kind == name:
            return arg
    return None


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
    """slow_rank:R: on rank R, start a daemon thread that spins in Python forever. It takes a CPU core
    and the GIL: every torch op of the rank's main thread then waits for the GIL (up to the 5 ms switch
    interval) before it can launch, so its figures and its steps come out measurably slower, as a
    rank sharing its node with another job would. Started once per process."""
    if fault("slow_rank") != str(rank) or _busy_threads:
        return

    def spin():
        x = 0
        while True:
            x = (x + 1) % 1_000_003

    _busy_threads.append(threading.Thread(target=spin, name="slow_rank fault", daemon=True))
    _busy_threads[0].start()


_busy_threads: list[threading.Thread] = []
