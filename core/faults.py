"""Fault injection for the tests: how they break a real run on purpose.

SMOLFORGE_FAULT holds "kind:arg[,kind:arg...]", e.g. "kill_after_step:3" or
"nan_at_step:3:1,poison_step:9". Stages ask `fault("kind")` at the point where that fault
acts; nothing reads the variable unless it is set, so a normal run is untouched.
"""

import os


def fault(name: str) -> str | None:
    """The argument of fault `name` in SMOLFORGE_FAULT, or None when it is not set."""
    for item in os.environ.get("SMOLFORGE_FAULT", "").split(","):
        kind, _, arg = item.partition(":")
        if kind == name:
            return arg
    return None
