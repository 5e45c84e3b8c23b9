"""Issue 21: diagnostics and node health, the parallelism planner against measured shards, tensor
parallelism against one process, and the straggler alert. Multi-process parts run 2 CPU processes
over gloo, each started by torchrun as a subprocess; every rank ends with core.infra.end_process_group,
as the stages do (a rank that left its group to the interpreter's finalization sometimes died with
SIGABRT, "terminate called without an active exception": core/infra/__init__.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def torchrun(*args: str, fault: str = "", nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SMOLFORGE_FAULT": fault}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


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
    # The GIL-hogging thread on rank 1 gets it named sick on a matmul figure, and rank 1 is the slower rank on
    # most compute / memory figures. Not "rank 0 is never named": on this shared 2-core machine other jobs
    # land on either rank, and in about 1 run of 10 one figure of rank 0 also falls >10% below the median
    # (measured while building this test).
    assert any(s["rank"] == 1 and s["figure"].startswith("matmul") for s in report["sick_ranks"]), report["sick_ranks"]
    rank0, rank1 = report["ranks"]
    compute = [i for i, row in enumerate(rank0) if row["kind"] in ("matmul", "copy")]
    assert sum(rank1[i]["value"] < rank0[i]["value"] for i in compute) > len(compute) / 2, report["sick_ranks"]
    assert "SICK rank 1" in run.stdout and "fraction" in run.stdout


# --- workers on 2 gloo ranks: TP parity, and the planner against measured shards ------------------------

def tiny_config(**overrides):
    from core import SmolForgeConfig

    return SmolForgeConfig.from_preset("tiny", **{**dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, head_dim=16), **overrides})


def tiny_model(seed: int = 0):
    import torch

    from core import SmolForgeForCausalLM

    torch.manual_seed(seed)
    config = tiny_config()
    config._attn_implementation = "sdpa"
    return SmolForgeForCausalLM(config)


def train_losses(model, batches, clip) -> tuple[list[float], torch.Tensor]:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, first_logits = [], None
    for ids, pos in batches:
        out = model(input_ids=ids, position_ids=pos, labels=ids)
        if first_logits is None:
            first_logits = out.logits.detach().clone()
        out.loss.backward()
        clip(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses, first_logits


def local_bytes(model, optimizer) -> dict[str, int]:
    from torch.distributed.tensor import DTensor

    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params),
            "optim": sum(size(s[k]) for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))}


def worker(out_dir: str) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from pretrain.parallel import _squared_norm, apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (2, 32), generator=g), torch.arange(32).repeat(2, 1)) for _ in range(2)]
    batches[1][1][:, 16:] -= 16  # a packed row: two documents, so the block-diagonal mask is exercised
    batches = batches * 2  # steps 3 and 4 see steps 1 and 2's rows again: their loss must have fallen

    def clip(model):
        grads = [p.grad for p in model.parameters()]
        norm = float(_squared_norm(grads).sqrt())
        for grad in grads:
            grad.mul_(min(1.0, 0.5 / (norm + 1e-6)))

    result = {}
    reference = tiny_model()
    result["single"] = train_losses(copy.deepcopy(reference), batches, clip)
    for sp in (False, True):
        model = copy.deepcopy(reference)
        apply_tensor_parallel(model, mesh, sequence_parallel=sp)
        result[f"tp_sp{int(sp)}"] = train_losses(model, batches, clip)
    # The planner's check: local parameter / gradient / AdamW-state bytes after one step under each layout.
    shards = {}
    for layout in ("ddp", "fsdp2", "tp"):
        model = copy.deepcopy(reference)
        if layout == "tp":
            apply_tensor_parallel(model, mesh, sequence_parallel=False)
        elif layout == "fsdp2":
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        wrapped = DistributedDataParallel(model) if layout == "ddp" else model
        ids, pos = batches[0]
        wrapped(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
        shards[layout] = {"norm": float(_squared_norm([p.detach() for p in model.parameters()]).sqrt())}
        optimizer.step()
        shards[layout].update(local_bytes(model, optimizer))
    shards["reference_norm"] = float(torch.cat([p.detach().flatten() for p in reference.parameters()]).norm())
    gathered = [None] * world
    dist.all_gather_object(gathered, shards)
    if rank == 0:
        torch.save({**result, "shards": gathered}, f"{out_dir}/results.pt")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("tp")
    run = torchrun(__file__, str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out / "results.pt", weights_only=True)


@pytest.mark.parametrize("sp", [0, 1], ids=["tp", "tp+sequence_parallel"])
def test_tensor_parallel_matches_one_process(two_rank_results, sp):
    import torch

    single_losses, single_logits = two_rank_results["single"]
    tp_losses, tp_logits = two_rank_results[f"tp_sp{sp}"]
    torch.testing.assert_close(tp_logits, single_logits, rtol=0, atol=1e-5)
    assert tp_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
    assert single_losses[2] < single_losses[0] and single_losses[3] < single_losses[1]  # the steps really trained


def test_planner_bytes_equal_the_measured_local_shards(two_rank_results):
    from core.infra.plan import GRAD_BYTES, OPTIM_BYTES, PARAM_BYTES, model_tensors, state_bytes

    tensors = model_tensors(tiny_config())
    expected = {"ddp": state_bytes(tensors, dp=2, tp=1, pp=1, zero=0),
                "fsdp2": state_bytes(tensors, dp=2, tp=1, pp=1, zero=3),
                "tp": state_bytes(tensors, dp=1, tp=2, pp=1, zero=0)}
    assert (PARAM_BYTES, GRAD_BYTES, OPTIM_BYTES) == (4, 4, 8)
    for layout, (params, grads, optim) in expected.items():
        largest = {k: max(rank[layout][k] for rank in two_rank_results["shards"]) for k in ("params", "grads", "optim")}
        assert largest == {"params": params, "grads": grads, "optim": optim}, layout
    # The norm of sharded parameters (clipping, param_norm) sums every shard once: FSDP2 and TP alike.
    for rank in two_rank_results["shards"]:
        for layout in ("ddp", "fsdp2", "tp"):
            assert rank[layout]["norm"] == pytest.approx(rank["reference_norm"], rel=1e-6), layout
    # Sharding really happened: FSDP2 and TP hold less than DDP's full copy.
    assert expected["fsdp2"][0] < expected["tp"][0] < expected["ddp"][0]


# --- pretraining: a straggler alert on 2 processes, and tensor parallelism through the real loop -------------

def pretrain_recipe(tmp_path, tokenizer_dir, **overrides):
    from conftest import write_recipe

    cfg = {"tokenizer_name_or_path": str(tokenizer_dir), "model_preset": "tiny", "max_length": 64,
           "model_overrides": {"num_attention_heads": 2, "num_key_value_heads": 2},
           "sources": [{"name": "arithmetic", "path": "builtin:arithmetic", "max_rows": 600}],
           "max_steps": 6, "per_device_train_batch_size": 4, "warmup_steps": 1, "save_steps": 100, "eval_steps": 100,
           "logging_steps": 1, "straggler_windows": 3, "skip_preflight": True,
           "lr_scheduler_kwargs": {"num_decay_steps": 2, "decay_type": "linear"},
           "data_cache_dir": str(tmp_path.parent / "data_cache")}
    return write_recipe(tmp_path, {**cfg, **overrides})


def test_straggler_alert_names_the_slow_rank_of_a_two_process_run(tmp_path, tokenizer_dir):
    from conftest import launch_stage, ok

    out = tmp_path / "run"
    # 10 steps and 2 windows in a row: a tiny model's forward is ~15 ms, so one window's ratio is noisy (a full
    # `make test` run measured 6x, 2.5x, 1.0x, 1.4x, 2.1x, 1.0x over 6 steps: never 3 windows in a row).
    recipe = pretrain_recipe(tmp_path, tokenizer_dir, max_steps=10, straggler_windows=2)
    ok(launch_stage("pretrain", recipe, out, processes=2, fault="slow_rank:1"))
    alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    # Rank 1 is named, on its own slow windows. Not "rank 0 never is": on the shared 2-core machine other jobs
    # can slow either rank for a few windows (what the fault switch's busy thread does on purpose).
    stragglers = [a for a in alerts if a["kind"] == "straggler" and a["message"].startswith("rank 1 ")]
    assert stragglers, alerts
    slow, fast = stragglers[0]["forward_s_per_rank"][1], stragglers[0]["forward_s_per_rank"][0]
    assert slow > 1.2 * fast
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["rank_forward_s/max"] >= m["rank_forward_s/min"] > 0 for m in metrics if "loss" in m)


def test_straggler_rule_needs_consecutive_slow_windows():
    from pretrain.monitor import Monitor

    m = Monitor(spike_sigma=6, spike_warmup=20, ema_beta=0.95, grad_factor=10, throughput_fraction=0.5,
                throughput_windows=10, data_stall_seconds=30, straggler_fraction=0.2, straggler_windows=3)
    assert not m.check_stragglers(1, [1.0, 1.5]) and not m.check_stragglers(2, [1.0, 1.0])  # a blip resets
    assert not m.check_stragglers(3, [1.0, 1.5]) and not m.check_stragglers(4, [1.0, 1.5])
    (alert,) = m.check_stragglers(5, [1.0, 1.5])
    assert alert.kind == "straggler" and alert.message.startswith("rank 1 ") and alert.threshold == pytest.approx(1.2)
    assert not m.check_stragglers(6, [1.0, 1.5])  # once per episode
    assert not m.check_stragglers(7, [1.0, 1.1, 0.9, 1.0])  # within 20% of the others
    # A process's first window (its ranks' first forwards) is not judged, even with 1 window to alert on.
    m = Monitor(spike_sigma=6, spike_warmup=20, ema_beta=0.95, grad_factor=10, throughput_fraction=0.5,
                throughput_windows=10, data_stall_seconds=30, straggler_fraction=0.2, straggler_windows=1)
    assert not m.check_stragglers(1, [1.0, 5.0])
    assert [a.message[:7] for a in m.check_stragglers(2, [1.0, 5.0])] == ["rank 1 "]


def test_planner_on_smollm3_at_384_gpus(capsys):
    from core.infra.plan import main

    fitting = main(["--config", str(REPO / "recipes/smollm3/pretrain.yaml"), "--gpus", "384", "--gpu_memory", "80",
                    "--global_batch_rows", "576"])
    assert "recommended: " in capsys.readouterr().out
    assert all(lay.dp * lay.tp * lay.pp == 384 and 576 % lay.dp == 0 for lay in fitting)
    # SmolLM3's own layout (DP 192 x TP 2) fits; plain DDP over 384 GPUs cannot (576 rows do not split 384 ways).
    assert any((lay.dp, lay.tp, lay.pp) == (192, 2, 1) for lay in fitting)
    assert not any(lay.dp == 384 for lay in fitting)


def test_preflight_hardware_check_reports_fractions_of_peak():
    from pretrain.preflight import hardware

    finding = hardware(None)  # the check reads nothing from the run's context
    assert "matmul fp32" in finding and "of peak" in finding and "copy" in finding


if __name__ == "__main__":  # a rank of the two_rank_results fixture, started by torchrun
    from core.infra import end_process_group

    worker(sys.argv[1])
    end_process_group()  # after worker() has dropped its models and mesh: core/infra/__init__.py says why
