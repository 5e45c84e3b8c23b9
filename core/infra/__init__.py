"""Infrastructure: what the hardware can do (`devices`), diagnostics and node health
(`python -m core.infra`), and the parallelism planner (`python -m core.infra.plan`).

Issue 21 ("the boss fight" chapter of the Smol Training Playbook): measure the hardware before
trusting it, watch node health, pick the parallelism that fits.
"""
