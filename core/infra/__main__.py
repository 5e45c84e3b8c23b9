"""`python -m core.infra`: the diagnostics report (core/infra/diagnostics.py)."""

from core.infra import end_process_group
from core.infra.diagnostics import main

if __name__ == "__main__":
    main()
    end_process_group()  # every rank leaves the process group together (core/infra/__init__.py says why)
