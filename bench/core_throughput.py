"""Training throughput of the core vs transformers' LlamaForCausalLM of the same shape, same run.

    .venv/bin/python bench/core_throughput.py [--steps 6] [--rounds 3] [--bf16]

Both models get the same config (GQA, RoPE, SwiGLU, tied embeddings), the same batches, AdamW and
attention implementation (sdpa). Rounds alternate between the two models so machine noise hits
both alike; the median tokens/s of each is reported with their ratio (target: core / llama >= 1.0
on CPU). Not part of the test run.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import core  # noqa: F401
from core import SmolForgeConfig, SmolForgeForCausalLM

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True,
             rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "core":
        return SmolForgeForCausalLM(SmolForgeConfig(**SHAPE, attn_implementation="sdpa"))
    return LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa"))


def tokens_per_second(model: torch.nn.Module, batches: list[torch.Tensor], bf16: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up: allocator, autograd graph caches
    start = time.perf_counter()
    for x in batches:
        step(x)
    return sum(x.numel() for x in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--bf16", action="store_true", help="torch.autocast bf16 (about 2x faster on these CPUs)")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), generator=gen) for _ in range(args.steps)]
    models = {kind: build(kind) for kind in ("core", "llama")}
    n_params = sum(p.numel() for p in models["core"].parameters())
    assert n_params == sum(p.numel() for p in models["llama"].parameters()), "shapes differ"
    runs: dict[str, list[float]] = {"core": [], "llama": []}
    for r in range(args.rounds):
        order = ("core", "llama") if r % 2 == 0 else ("llama", "core")
        for kind in order:
            runs[kind].append(tokens_per_second(models[kind], batches, args.bf16))
    result = {
        "params_millions": round(n_params / 1e6, 1), "threads": torch.get_num_threads(), "bf16": args.bf16,
        "batch": f"{args.batch}x{args.seq}",
        "core_tokens_per_s": round(statistics.median(runs["core"]), 1),
        "llama_tokens_per_s": round(statistics.median(runs["llama"]), 1),
    }
    result["ratio_core_over_llama"] = round(result["core_tokens_per_s"] / result["llama_tokens_per_s"], 3)
    result["all_rounds"] = {k: [round(v, 1) for v in vs] for k, vs in runs.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
