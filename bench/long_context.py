"""Time and memory per token against sequence length for the dense, MLA and hybrid cores (issue 19).

    OMP_NUM_THREADS=1 .venv/bin/python bench/long_context.py [--lengths 256 512 ... 8192] [--decode_tokens 32]

For each preset (`tiny` = dense GQA, `tiny-mla`, `tiny-hybrid` = 3 gated delta-net layers per attention
layer; equal parameter counts by construction) and each context length T:
- prefill: one no-grad forward over T tokens that fills the cache (logits of the last token only, as a
  server computes them), reported as ms per prompt token;
- decode: `--decode_tokens` one-token steps on top of that cache, reported as ms per generated token
  at context T;
- cache: bytes of the cache after the prefill (keys/values of the attention layers, latent of MLA,
  conv + recurrent state of the delta-net layers), per token of context. That is the memory that
  grows with the context; on CUDA the peak allocated memory of the prefill is reported as well.
The crossover is the shortest length from which on a variant is at most as dear per token as the dense
core at every longer length measured.
A variant whose config fields do not exist in this checkout is skipped with a note (MLA lands from
its own branch). Prints a table and the crossovers; writes JSON to `--output` or to $OUT if set.
Not part of the test run.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from core import PRESETS, SmolForgeConfig, SmolForgeForCausalLM

# The config fields each variant needs: a checkout without them (another branch's knobs) skips it.
VARIANTS = {
    "dense": ("tiny", ()),
    "mla": ("tiny-mla", ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")),
    "hybrid": ("tiny-hybrid", ("layer_types", "linear_num_key_heads", "linear_value_head_dim")),
}


def missing_fields(preset: str, fields: tuple[str, ...]) -> list[str]:
    known = {f.name for f in dataclasses.fields(SmolForgeConfig)}
    missing = [name for name in fields if name not in known]
    return missing + ([f"preset {preset!r}"] if preset not in PRESETS else [])


def cache_bytes(cache) -> int:
    """Bytes held by every tensor of every cache layer (keys/values, latents, conv and recurrent states)."""
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            tensors = value.values() if isinstance(value, dict) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


@torch.no_grad()
def measure(model: SmolForgeForCausalLM, length: int, decode_tokens: int, repeats: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(length)
    prompt = torch.randint(0, model.config.vocab_size, (1, length), generator=gen).to(device)
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1)
        if device == "cuda":
            torch.cuda.synchronize()
        best_prefill = min(best_prefill, time.perf_counter() - start)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        held = cache_bytes(cache)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        best_decode = min(best_decode, time.perf_counter() - start)
    row = {"length": length, "prefill_ms_per_token": 1e3 * best_prefill / length,
           "decode_ms_per_token": 1e3 * best_decode / decode_tokens, "cache_bytes": held,
           "cache_bytes_per_token": held / length}
    if device == "cuda":
        row["prefill_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def crossover(rows: list[dict], dense: list[dict], key: str) -> int | None:
    """Shortest length from which on `rows` costs no more per token than `dense` at every measured length
    (None: not by the longest). "From which on", not "first", so one noisy short length does not count."""
    found = None
    for row, base in reversed(list(zip(rows, dense))):
        if row[key] > base[key]:
            break
        found = row["length"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of N (machine noise)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="JSON file for the results (default: $OUT/long_context.json if $OUT is set)")
    args = parser.parse_args()

    results = {"device": args.device, "threads": torch.get_num_threads(), "variants": {}, "skipped": {}}
    models = {}
    for name in args.variants:
        preset, fields = VARIANTS[name]
        missing = missing_fields(preset, fields)
        if missing:
            note = f"not in this checkout: {', '.join(missing)}"
            print(f"[skip] {name}: {note}")
            results["skipped"][name] = note
            continue
        torch.manual_seed(0)
        config = SmolForgeConfig.from_preset(preset, max_position_embeddings=max(args.lengths) + args.decode_tokens)
        models[name] = SmolForgeForCausalLM(config).to(args.device).eval()
        results["variants"][name] = {"preset": preset, "params": sum(p.numel() for p in models[name].parameters()),
                                     "rows": []}
    # Variants interleaved at each length, so a burst of load on a shared machine hits them alike.
    for length in args.lengths:
        for name, model in models.items():
            r = measure(model, length, args.decode_tokens, args.repeats, args.device)
            results["variants"][name]["rows"].append(r)
            print(f"{name:7s} T={length:5d}  prefill {r['prefill_ms_per_token']:.4f} ms/tok  "
                  f"decode {r['decode_ms_per_token']:.3f} ms/tok  cache {r['cache_bytes_per_token']:.0f} B/tok", flush=True)

    measured = results["variants"]
    for name, res in measured.items():
        print(f"{name}: preset {res['preset']}, {res['params']:,} parameters")
    print(f"\n{'variant':8s} {'T':>5s} {'prefill ms/tok':>15s} {'decode ms/tok':>14s} {'cache B/tok':>12s} {'cache MiB':>10s}")
    for name, res in measured.items():
        for r in res["rows"]:
            print(f"{name:8s} {r['length']:5d} {r['prefill_ms_per_token']:15.4f} {r['decode_ms_per_token']:14.3f} "
                  f"{r['cache_bytes_per_token']:12.0f} {r['cache_bytes'] / 2**20:10.2f}")
    if "dense" in measured:
        results["crossover_vs_dense"] = {}
        for name, res in measured.items():
            if name == "dense":
                continue
            found = {key: crossover(res["rows"], measured["dense"]["rows"], key)
                     for key in ("prefill_ms_per_token", "decode_ms_per_token", "cache_bytes_per_token")}
            results["crossover_vs_dense"][name] = found
            print(f"crossover {name} vs dense (shortest T from which on {name} is no dearer per token): "
                  + ", ".join(f"{k}: {v if v is not None else 'none up to ' + str(args.lengths[-1])}"
                              for k, v in found.items()))
    output = args.output or (os.path.join(os.environ["OUT"], "long_context.json") if os.environ.get("OUT") else None)
    if output:
        Path(output).write_text(json.dumps(results, indent=1))
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
