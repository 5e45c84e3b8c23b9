"""The MoE experts on a GPU: torch's grouped GEMM path against the per-expert loop (core/moe.py).

    python bench/moe_grouped_gemm.py            (a CUDA machine; about a minute; writes $OUT/moe_grouped_gemm.json)

Checks that SmolForgeExperts.grouped_forward (two torch._grouped_mm over the (token, expert) pairs sorted by
expert, what the model uses on CUDA) computes what loop_forward (the CPU path) computes, forward and backward,
in fp32 (torch's slow fallback: the model uses the loop there) and under bf16 autocast (the model's path), and times both, on a Qwen3-MoE-like layer shape and on the tiny-moe preset.
Needs only torch and transformers (no liger-kernel, trl or vllm).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import SmolForgeConfig, SmolForgeForCausalLM  # noqa: E402
from core.moe import SmolForgeExperts  # noqa: E402

SHAPES = {  # name: (hidden, expert width, experts, k, tokens)
    "qwen3-moe-like": (2048, 768, 128, 8, 8192),
    "tiny-moe": (128, 192, 8, 2, 4096),
}


def run(fn, x, idx, w, experts):
    out = fn(x, idx, w)
    grads = torch.autograd.grad(out.float().square().mean(), [x, w, experts.gate_up_proj, experts.down_proj])
    return out, grads


def timed(fn, *args, repeats=10):
    run(fn, *args)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run(fn, *args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def compare(name, hidden, width, num_experts, k, tokens, autocast):
    config = SmolForgeConfig.from_preset("tiny", hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=k,
                                         moe_intermediate_size=width)
    torch.manual_seed(0)
    experts = SmolForgeExperts(config, use_liger=False).cuda()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    x = torch.randn(tokens, hidden, device="cuda", requires_grad=True)
    logits = torch.randn(tokens, num_experts, device="cuda")
    top = logits.softmax(-1).topk(k, dim=-1)
    w = (top.values / top.values.sum(-1, keepdim=True)).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loop_out, loop_grads = run(experts.loop_forward, x, top.indices, w, experts)
        grouped_out, grouped_grads = run(experts.grouped_forward, x, top.indices, w, experts)
        ms_loop = timed(experts.loop_forward, x, top.indices, w, experts)
        ms_grouped = timed(experts.grouped_forward, x, top.indices, w, experts)

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()

    row = {"shape": name, "dtype": "bf16 autocast" if autocast else "fp32", "tokens": tokens, "experts": num_experts,
           "k": k, "out_rel_diff": rel(grouped_out, loop_out),
           "grad_rel_diff": max(rel(a, b) for a, b in zip(grouped_grads, loop_grads)),
           "loop_ms": ms_loop, "grouped_ms": ms_grouped, "speedup": ms_loop / ms_grouped}
    print(f"{name:15s} {row['dtype']:13s} out rel diff {row['out_rel_diff']:.2e} grad rel diff "
          f"{row['grad_rel_diff']:.2e}  loop {ms_loop:8.2f} ms  grouped {ms_grouped:8.2f} ms  "
          f"x{row['speedup']:.2f} (fwd+bwd)", flush=True)
    return row


def model_grouped_matches_loop():
    """The whole tiny-moe model on CUDA under bf16 autocast (the grouped path) against the same model with its
    experts forced through the loop: the routing and everything around the experts are shared."""
    torch.manual_seed(0)
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny-moe", vocab_size=512)).cuda().eval()
    x = torch.randint(0, 512, (4, 64), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        grouped = model(x).logits.float()
        SmolForgeExperts.forward, original = SmolForgeExperts.loop_forward, SmolForgeExperts.forward
        try:
            loop = model(x).logits.float()
        finally:
            SmolForgeExperts.forward = original
    diff = (grouped - loop).abs().max().item()
    same_tokens = bool((grouped.argmax(-1) == loop.argmax(-1)).float().mean() > 0.99)
    print(f"tiny-moe model logits under bf16 autocast, grouped vs loop: max abs diff {diff:.2e} "
          f"(logit scale {loop.abs().max().item():.2f}); greedy tokens agree on >99%: {same_tokens}")
    return diff


def main():
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if not hasattr(torch, "_grouped_mm"):
        raise SystemExit(f"torch {torch.__version__} has no torch._grouped_mm: the model uses the loop here")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    rows = [compare(name, *shape, autocast=autocast) for name, shape in SHAPES.items() for autocast in (False, True)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "model_logits_max_abs_diff": model_grouped_matches_loop()}
    ok = all(r["out_rel_diff"] < (2e-2 if r["dtype"] != "fp32" else 1e-4) for r in rows)
    print("grouped GEMM path", "MATCHES" if ok else "DIFFERS FROM", "the loop")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "moe_grouped_gemm.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
