"""`python -m core.infra`: the diagnostics report (core/infra/diagnostics.py)."""

from core.infra.diagnostics import main

if __name__ == "__main__":
    main()
