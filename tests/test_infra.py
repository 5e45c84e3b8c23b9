"""Issue 21: diagnostics and node health, the parallelism planner against measured shards, tensor
parallelism against one process, and the straggler alert. Multi-process parts run 2 CPU processes
over gloo (torchrun, or torch.multiprocessing for the in-process checks)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def torchrun(*args: str, fault: str = "", nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SMOLFORGE_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_diagnostics_name_the_rank_slowed_by_the_fault_switch(tmp_path):
    out = tmp_path / "report.json"
    run = torchrun("-m", "core.infra", "--quick", "--max_collective_bytes", "4096", "--json", str(out),
                   "--data_dir", str(REPO / "core"), fault="slow_rank:1")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    kinds = {row["kind"] for row in report["ranks"][0]}
    assert {"matmul", "copy", "data_read"} <= kinds
    assert [r["bytes"] for r in report["collectives"] if r["kind"] == "all_reduce"] == [1024, 4096]
    assert all(r["value"] > 0 for r in report["collectives"])
    # The busy thread on rank 1 is found, and nobody else is blamed.
    assert {s["rank"] for s in report["sick_ranks"]} == {1}, report["sick_ranks"]
    assert any(s["figure"].startswith("matmul") for s in report["sick_ranks"])
    assert "SICK rank 1" in run.stdout and "fraction" in run.stdout
