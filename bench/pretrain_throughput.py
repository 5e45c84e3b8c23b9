"""Training tokens/s and MFU of the core's presets (tiny and 135M by default), on CPU or one GPU.

    .venv/bin/python bench/pretrain_throughput.py [--presets tiny 135M 360M] [--bf16] [--compile] [--liger]
    bash bench/throughput_gpu.sh          # the 360M MFU check on one H100 (bf16 + compile + Liger)

The loop is pretraining's step on random tokens: the core, AdamW with pretraining's parameter groups
(core/optim.py), bf16 autocast when asked (weights, loss and norms stay fp32), clipping at 1.0. It
imports only core, so it runs where the pretraining stage's data stack (torchdata, datasets) is absent.
MFU = tokens/s x training FLOPs per token (core/infra/flops.py, PaLM appendix B) / the peak of this
device and dtype (core/infra/devices.py: the datasheet for a known GPU, a measured matmul on a CPU),
named in the output. Writes results.json to --out (default $OUT when set). Not part of the test run.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.infra.devices import peak_flops
from core.infra.flops import flops_per_token
from core.kernels import compile_blocks, liger_installed
from core.optim import parameter_groups

# batch x sequence per preset: the CPU shapes of `make bench`; 360M and up are sized for one 80 GB GPU.
DEFAULT_SHAPES = {"tiny": (32, 128), "135M": (2, 512), "360M": (8, 2048), "1B": (4, 2048), "3B": (2, 2048)}


def measure(preset: str, batch: int, seq: int, steps: int, warmup: int, bf16: bool, compile: bool, liger: bool,
            device: str) -> dict:
    torch.manual_seed(0)
    config = SmolForgeConfig.from_preset(preset, use_liger_kernels=liger)
    config._attn_implementation = "sdpa"
    model = SmolForgeForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(parameter_groups(model, 0.1, ["embeddings", "norms", "biases"]), lr=1e-4,
                            betas=(0.9, 0.95))
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    if compile:
        compile_blocks(model, dynamic=False)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    started = time.perf_counter()
    for _ in range(warmup):  # compilation (if any), allocator, autotuning
        step()
    sync()
    warmup_s = time.perf_counter() - started
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    tps = steps * batch * seq / (time.perf_counter() - start)
    peak, peak_source = peak_flops(device, "bf16" if bf16 else "fp32")
    return {"preset": preset, "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "batch": f"{batch}x{seq}", "bf16": bf16, "compile": compile, "liger": model.use_liger,
            "warmup_s": round(warmup_s, 1), "tokens_per_s": round(tps, 1),
            "mfu": round(tps * flops_per_token(config, seq) / peak, 4), "peak_flops": peak, "peak": peak_source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "135M"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (3 with --compile)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: the preset's shape)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: the preset's shape)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder block (inductor)")
    parser.add_argument("--liger", action="store_true",
                        help="Liger kernels (CUDA + liger-kernel only; elsewhere a warning and plain torch)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for results.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.liger and not (device == "cuda" and liger_installed()):
        print(f"note: --liger asked, but liger-kernel is {'installed' if liger_installed() else 'missing'} and the "
              f"device is {device}: running plain torch kernels")
    warmup = max(args.warmup, 3) if args.compile else args.warmup
    results = []
    for preset in args.presets:
        batch, seq = DEFAULT_SHAPES[preset]
        row = measure(preset, args.batch or batch, args.seq or seq, args.steps, warmup, args.bf16, args.compile,
                      args.liger, device)
        row["device"] = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        print(json.dumps(row))
        print(f"==> {preset}: {row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%} of {row['peak']}")
        results.append(row)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
