"""Issue 21 on one GPU: the diagnostics report, and the planner's activation estimate against a measured peak.

    python bench/infra_gpu.py            # on a CUDA machine, about 1-2 minutes; JSON to $OUT if set
    python bench/infra_gpu.py --smoke    # any machine: tiny sizes, CPU allowed (checks that it runs)

1. `python -m core.infra` (full sizes) in one process, and `torchrun --nproc_per_node 1 -m core.infra --quick`
   (the launch path a multi-GPU job uses), each writing its JSON. The bf16 matmul fraction of peak is the
   figure to hold against the Playbook's 72-77% on H100.
2. One training step of the 360M preset at sequence 2048, micro-batch 4, bf16 autocast over fp32 weights
   (pretraining's setting), with and without activation checkpointing: the peak memory allocated during
   forward + backward above what the weights and AdamW states already hold, next to
   core/infra/plan.py:activation_bytes for the same shape. The measured peak also holds the fp32
   gradients as backward produces them, and autocast's bf16 copies of the weights; both are printed so
   the comparison is like for like.

Needs torch, transformers, pyyaml only (no TRL, datasets, vLLM or Liger: plain torch kernels, the ones
the planner's formula describes).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core import SmolForgeConfig, SmolForgeForCausalLM  # noqa: E402
from core.infra.plan import activation_bytes  # noqa: E402

GiB = 1024**3


def run_report(out: Path, smoke: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    figures = {}
    for name, cmd in (("single", [sys.executable, "-m", "core.infra", *(["--quick"] if smoke else [])]),
                      ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                                    "-m", "core.infra", "--quick"])):
        path = out / f"infra_{name}.json"
        started = time.perf_counter()
        run = subprocess.run([*cmd, "--json", str(path)], env=env, cwd=REPO, capture_output=True, text=True)
        print(f"--- {' '.join(cmd[1:])} ({time.perf_counter() - started:.0f} s)\n{run.stdout}", flush=True)
        if run.returncode:
            print(run.stderr[-3000:])
            raise SystemExit(f"{name} diagnostics failed")
        report = json.loads(path.read_text())
        figures[name] = {row["name"]: {"value": row["value"], "fraction": row["value"] / row["peak"] if row["peak"]
                                       else None} for row in report["ranks"][0]}
    return figures


def step_peak(config: SmolForgeConfig, seq: int, batch: int, checkpointing: bool, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = SmolForgeForCausalLM(config).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()  # warm-up: gradients and AdamW states exist from here on, as in any later step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    result = {"checkpointing": checkpointing, "step_seconds": seconds, "parameters": params,
              "grad_bytes": 4 * params, "bf16_weight_copies_bytes": 2 * params}
    if cuda:
        result["peak_above_states_bytes"] = torch.cuda.max_memory_allocated() - base
        result["activations_measured_bytes"] = result["peak_above_states_bytes"] - result["grad_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny preset, short sequence, CPU allowed")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT") or REPO / "out" / "infra_gpu")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke to check the script on a CPU")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "torch": torch.__version__}
    result["diagnostics"] = run_report(out, args.smoke)

    preset, seq, batch = ("tiny", 64, 2) if args.smoke else ("360M", 2048, 4)
    config = SmolForgeConfig.from_preset(preset)
    config._attn_implementation = "sdpa"
    result["memory"] = []
    print(f"--- one training step, {preset} preset, seq {seq}, micro-batch {batch}, bf16 autocast, sdpa")
    print(f"{'checkpointing':<14} {'planner GiB':>12} {'measured GiB':>13} {'ratio':>6} {'peak-above-states':>18} "
          f"{'grads':>6} {'step s':>7}")
    for checkpointing in (False, True):
        measured = step_peak(config, seq, batch, checkpointing, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous step's model and optimizer are gone: start the next clean
        measured["planner_activation_bytes"] = activation_bytes(config, seq, batch, tp=1, pp=1,
                                                                recompute=checkpointing, sequence_parallel=False)
        result["memory"].append(measured)
        if "activations_measured_bytes" in measured:
            ratio = measured["activations_measured_bytes"] / measured["planner_activation_bytes"]
            print(f"{str(checkpointing):<14} {measured['planner_activation_bytes'] / GiB:12.2f} "
                  f"{measured['activations_measured_bytes'] / GiB:13.2f} {ratio:6.2f} "
                  f"{measured['peak_above_states_bytes'] / GiB:18.2f} {measured['grad_bytes'] / GiB:6.2f} "
                  f"{measured['step_seconds']:7.3f}")
        else:
            print(f"{str(checkpointing):<14} {measured['planner_activation_bytes'] / GiB:12.4f} {'(no CUDA)':>13}")
    bf16 = next((v for k, v in result["diagnostics"]["single"].items() if k.startswith("matmul bf16")), None)
    if bf16 and bf16["fraction"]:
        print(f"bf16 matmul: {bf16['fraction']:.1%} of its peak (datasheet on a known GPU; the Playbook measured 72-77% on H100)")
    (out / "infra_gpu.json").write_text(json.dumps(result, indent=1))
    print(f"written {out / 'infra_gpu.json'}")


if __name__ == "__main__":
    main()
