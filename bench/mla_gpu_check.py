"""MLA (core/mla.py) on a CUDA device: the paths the CPU tests cannot reach.

    python bench/mla_gpu_check.py            # CUDA; --device cpu runs the same checks here

Checks, each printed with its figure and written to $OUT/mla_gpu_check.json when OUT is set:
1. fp32 logits of the core against transformers' DeepseekV3ForCausalLM (weights copied, dense layers) under
   sdpa, and under flex attention (MLA's value width differs from its query/key width, which flex must take);
2. greedy `generate` with the latent cache against greedy decoding by full forward passes, token for token;
3. with liger-kernel importable (a pure-python wheel; carry it), Liger's RoPE / RMSNorm / SwiGLU / fused
   cross-entropy on MLA's narrow rope heads against plain torch: logits, loss and gradients.
Needs torch, transformers and this repository only; about 30 s on one GPU after imports.
"""

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from core import SmolForgeConfig, SmolForgeForCausalLM  # noqa: E402
from core.export import from_native  # noqa: E402

VOCAB = 256
SHAPE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, kv_lora_rank=48, q_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=32,
             v_head_dim=48, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
             pad_token_id=None, bos_token_id=None, eos_token_id=None,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights with non-trivial norm gains (as tests/conftest.py's perturb_)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else 0.1 * noise)
    return model


def parity(device: str, attn: str) -> float:
    native = perturbed(DeepseekV3ForCausalLM(DeepseekV3Config(
        **SHAPE, first_k_dense_replace=SHAPE["num_hidden_layers"], rope_interleave=True, num_mtp_layers=0)))
    native.config._attn_implementation = attn
    core_model = from_native(native.eval()).to(device).eval()
    assert core_model.config._attn_implementation == attn, core_model.config._attn_implementation
    native = native.to(device)
    x = torch.randint(0, VOCAB, (2, 64), device=device)
    with torch.no_grad():
        return (core_model(x).logits - native(x).logits).abs().max().item()


def generate_matches(device: str) -> dict:
    torch.manual_seed(0)
    model = perturbed(SmolForgeForCausalLM(SmolForgeConfig(**SHAPE, use_liger_kernels=False))).to(device).eval()
    prompt = torch.randint(0, VOCAB, (2, 9), device=device)
    new = 24
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                               pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return {"equal": bool(torch.equal(generated, ids)), "tokens": new * prompt.shape[0]}


def liger_against_plain(device: str) -> dict:
    out = {}
    models = {}
    for liger in (False, True):
        torch.manual_seed(0)
        models[liger] = perturbed(SmolForgeForCausalLM(SmolForgeConfig(**SHAPE, use_liger_kernels=liger))).to(device)
    assert models[True].use_liger, "use_liger_kernels=True fell back to plain torch"
    x = torch.randint(0, VOCAB, (2, 64), device=device)
    with torch.no_grad():
        out["eval_logits_max_abs_diff"] = (models[True].eval()(x).logits - models[False].eval()(x).logits).abs().max().item()
    losses = {}
    for liger, model in models.items():
        model.train()
        losses[liger] = model(x, labels=x).loss
        losses[liger].backward()
    out["train_loss_abs_diff"] = (losses[True] - losses[False]).abs().item()
    out["grad_max_abs_diff"] = max((a.grad - b.grad).abs().max().item() for a, b in
                                   zip(models[True].parameters(), models[False].parameters()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; pass --device cpu to run the checks on the CPU")
    torch.manual_seed(0)
    start = time.time()
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    for attn in ("sdpa", "flex_attention"):
        try:
            results[f"parity_{attn}_max_abs_logit_diff"] = diff = parity(device, attn)
            print(f"MLA vs DeepseekV3, fp32, {attn}: max abs logit diff {diff:.2e} (bar < 1e-5)")
        except Exception as e:  # report and go on: one backend failing says nothing of the others
            results[f"parity_{attn}_error"] = f"{type(e).__name__}: {e}"
            print(f"MLA vs DeepseekV3, {attn}: FAILED {type(e).__name__}: {e}")
    results["generate"] = generate_matches(device)
    print(f"generate with the latent cache == greedy full forwards: {results['generate']}")
    if importlib.util.find_spec("liger_kernel") and device == "cuda":
        results["liger"] = liger_against_plain(device)
        print(f"Liger vs plain torch on MLA: {results['liger']}")
    else:
        results["liger"] = "liger-kernel not installed (or not on CUDA): not checked"
        print(results["liger"])
    results["seconds"] = round(time.time() - start, 1)
    print(json.dumps(results, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "mla_gpu_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
