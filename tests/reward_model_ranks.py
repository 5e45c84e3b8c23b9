"""A process of tests/test_reward_model.py's 2-process normalisation test (a module of its own, so that
the processes torch.multiprocessing spawns import only this and rewards.reward_model_scorer)."""

import json
import os
from pathlib import Path

import torch.distributed as dist


def normalize_on_rank(rank: int, world_size: int, port: int, scores_by_rank: list[list[float]], out_dir: str) -> None:
    """Join a gloo group of `world_size`, normalise this rank's scores, write them to out_dir/<rank>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from rewards.reward_model_scorer import normalized

        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(normalized(scores_by_rank[rank])))
    finally:
        dist.destroy_process_group()
