"""One grading worker process of `rewards.verifier_pool` (started by the pool, not by hand).

    python -m rewards.grading_worker ITEM_TIMEOUT_S

Protocol, one JSON line per message: the worker writes {"status": "ready"} once math-verify is
imported; then for each `[gold, completion]` line on stdin it writes one outcome line,
{"status": "ok", "value": 1.0 | 0.0 | null} or {"status": "error", "error": "..."}. It exits at
end of input. The pool enforces the time limit by killing this process.

Test fault (core/faults.py): SMOLFORGE_FAULT="grading_hang:MARKER" makes the worker ignore every
signal it can and hang on any completion that contains MARKER, so that only the pool's SIGKILL
can end the item (tests/test_rewards_pool.py).
"""

import ctypes
import importlib.util
import json
import math
import os
import signal
import sys
import time
from pathlib import Path


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the pool's process dies, even mid-bomb (a thread
    watching the parent could not run: a big-integer computation holds the GIL)."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _fault_switch():
    """`core.faults.fault`, loaded from its file: importing the `core` package imports transformers
    and torch (7.7 s measured, on every worker start) for a function that reads one variable."""
    spec = importlib.util.spec_from_file_location("smolforge_core_faults",
                                                  Path(__file__).resolve().parents[1] / "core" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fault


def _hang_ignoring_signals() -> None:
    """The `grading_hang` fault: what a C-level computation that no signal interrupts looks like."""
    for catchable in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(catchable, signal.SIG_IGN)
    while True:
        time.sleep(3600)


def main() -> None:
    item_timeout_s = float(sys.argv[1])
    _die_with_parent()
    # The protocol gets a private copy of stdout; fd 1 then points at stderr, so whatever
    # math-verify, sympy or a warning prints can never corrupt a message.
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)

    from rewards.math_grader import grade

    # The per-call limits of math_grader (CPU time) stop slow Python code politely, a second before
    # the pool's kill (the hard limit, which also stops C-level arithmetic) would cost a restart.
    signal_timeout_s = max(1, math.ceil(item_timeout_s) - 1)
    hang_marker = _fault_switch()("grading_hang")
    protocol.write(b'{"status": "ready"}\n')
    for line in sys.stdin.buffer:
        gold, completion = json.loads(line)
        if hang_marker and hang_marker in completion:
            _hang_ignoring_signals()
        try:
            message = {"status": "ok", "value": grade(gold, completion, timeout_s=signal_timeout_s)}
        except Exception as error:  # a math-verify bug on one odd input must not end the worker
            message = {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
        protocol.write(json.dumps(message).encode() + b"\n")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the pool closed this worker's pipes (shutdown, or killed mid-start)
        os._exit(0)
