"""Training tokens/s and MFU of the core's presets (tiny and 135M by default).

    .venv/bin/python bench/pretrain_throughput.py [--presets tiny 135M 360M] [--bf16]

MFU = tokens/s x training FLOPs per token (6N + attention, pretrain.train.flops_per_token) / peak.
Peak: --peak_flops, else 989e12 on CUDA (H100 dense bf16) and 190e9 on CPU (2 threads fp32,
measured in shared/FACTS.md). On a GPU this is the 360M MFU check (target >= 40%).
"""

import argparse
import json
import time

import torch

from core import SmolForgeConfig, SmolForgeForCausalLM
from pretrain.train import flops_per_token, parameter_groups

DEFAULT_SHAPES = {"tiny": (32, 128), "135M": (2, 512), "360M": (8, 2048), "1B": (4, 2048), "3B": (2, 2048)}


def measure(preset: str, batch: int, seq: int, steps: int, bf16: bool, device: str, peak: float) -> dict:
    torch.manual_seed(0)
    config = SmolForgeConfig.from_preset(preset)
    config._attn_implementation = "sdpa"
    model = SmolForgeForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(parameter_groups(model, 0.1, ["embeddings", "norms", "biases"]), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    tps = steps * batch * seq / (time.perf_counter() - start)
    return {"preset": preset, "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "batch": f"{batch}x{seq}", "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token(config, seq) / peak, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "135M"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--peak_flops", type=float, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = args.peak_flops or (989e12 if device == "cuda" else 190e9)
    for preset in args.presets:
        batch, seq = DEFAULT_SHAPES[preset]
        print(json.dumps({**measure(preset, batch, seq, args.steps, args.bf16, device, peak), "device": device,
                          "bf16": args.bf16, "peak_flops": peak}))


if __name__ == "__main__":
    main()
