"""Infrastructure: what the hardware can do (`devices`), diagnostics and node health
(`python -m core.infra`), and the parallelism planner (`python -m core.infra.plan`).

Issue 21 ("the boss fight" chapter of the Smol Training Playbook): measure the hardware before
trusting it, watch node health, pick the parallelism that fits.
"""


def end_process_group() -> None:
    """The last call of a multi-process stage on every rank: wait for the other ranks, destroy the process group.

    A rank that leaves its gloo process group to the interpreter's finalization can die with SIGABRT
    ("terminate called without an active exception") after its work is done: gloo's worker threads still
    hold work objects whose tensors need the GIL during teardown (pytorch/pytorch#190489, and the closed
    pytorch/pytorch#179291 that would have made torch do this itself). A full `make test` hit it in 2 of
    about 25 two-process stage runs, after the model was written: SFT under DeepSpeed ZeRO-2 (TRL never
    destroys the group) and pretraining under FSDP2 (rank 1 destroyed it while rank 0 was still writing).
    The barrier first keeps every rank in the group until the slowest has finished. Destroying the group
    is not enough by itself: the 2-rank TP test's workers destroyed theirs and still aborted in about 2 of
    7 runs of tests/test_infra.py, with no Python frame left (faulthandler), i.e. in finalization, most likely
    because the run's device mesh and DTensors still held the group's C++ object. Called after the stage's
    `main()` has returned, and followed by `gc.collect()`, it let those go first: 0 aborts in 10 runs.

    The stages' entry points (`python -m <stage>`, `accelerate launch -m <stage>`) call it after `main()`;
    `main()` itself does not: a Python caller may hold process groups of its own, such as an in-process vLLM
    engine's, and the first version, called from `main()`, destroyed those under a test session's engine
    ("Invalid process group specified" when the engine shut down). One process has no peers to wait for.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()  # the run's models and work objects go while the interpreter is whole
