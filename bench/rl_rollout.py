"""RL rollout speed: vLLM vs transformers `generate`, alone and inside GRPO steps, in one run.

    .venv/bin/python bench/rl_rollout.py [--prompts 64] [--new_tokens 128] [--grpo_steps 3]

On a ~32M-parameter core model (8 layers, d=512, MLP 2048; FACTS.md measured 25M with MLP 1536) with a
1024-token BPE and the ChatML template:
  1. rollout tokens/s: `--prompts` arithmetic prompts x `--new_tokens` sampled tokens (EOS ignored, so
     both backends generate exactly the same number of tokens), from an in-process vLLM engine (fp32
     compiled, which is vLLM's default and `vllm_cpu_compile: true` in an RL recipe; fp32 eager, which is
     core.generation's setting on CPU; bf16 compiled, vLLM's own dtype choice on CPU) and from
     `generate_transformers` (fp32 and bf16); target >= 3x;
  2. GRPO seconds per step: `python -m rl` with the same recipe, once with colocated vLLM (compiled) and
     once with transformers generate (16 prompts x 8 generations x `--new_tokens` tokens), the median of
     TRL's `step_time` over the steps after the first (which includes the engine's warm-up).
Prints one JSON line with every number and the two ratios. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)


def build_policy(out: Path) -> int:
    """A random ~25M core model + tokenizer + ChatML template saved as a checkpoint; its parameter count."""
    import chat_templates
    from core import SmolForgeConfig, SmolForgeForCausalLM
    from pretrain.tokenizer import sample_sources, train_tokenizer

    tokenizer = train_tokenizer(sample_sources([{"name": "arithmetic", "path": "builtin:arithmetic", "max_rows": 3000},
                                                {"name": "prose", "path": "builtin:prose"}], 600), 1024)
    template = chat_templates.load("chatml")
    chat_templates.install(tokenizer, template, variant="training", add_missing_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    torch.manual_seed(0)
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), **SHAPE))
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(template.end_of_turn),
                                            tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def rollout_tokens_per_second(policy: Path, prompts: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.generation import GenerationSettings, generate_transformers
    from rewards.suites import get_suite, load_rows

    tokenizer = AutoTokenizer.from_pretrained(policy)
    rows = (load_rows(get_suite("arithmetic"), "train") * 4)[:prompts]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"] for r in rows]
    result = {}
    # In-process, as the colocated engine on CPU; the engine start (with its compilation) is timed apart
    # from the generation after it. fp32 is the trainer's dtype on CPU (the ratio that compares like with
    # like); bfloat16 is what vLLM picks on CPU by itself (dtype "auto"), and it halves the matmul time of
    # both backends here (shared/FACTS.md: ~190 GFLOP/s fp32, ~400 bf16 on 2 threads).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0)
    for name, dtype, eager in (("vllm", "float32", False), ("vllm_eager", "float32", True),
                               ("vllm_bf16", "bfloat16", False)):
        start = time.perf_counter()
        llm = LLM(model=str(policy), dtype=dtype, enforce_eager=eager, kv_cache_memory_bytes=1 << 30,
                  max_model_len=max(map(len, ids)) + new_tokens, seed=0)
        # One untimed batch first for each backend: the first call pays one-off costs (vLLM's CPU attention
        # and sampler set-up, torch's first-use allocations) that a training run pays once, not per rollout.
        llm.generate([{"prompt_token_ids": p} for p in ids[:8]], params, use_tqdm=False)
        result[f"{name}_start_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        result[f"{name}_tokens_per_second"] = sum(len(o.outputs[0].token_ids) for o in outputs) / seconds
        del llm

    for name, dtype in (("transformers", "float32"), ("transformers_bf16", "bfloat16")):
        settings = GenerationSettings(max_new_tokens=new_tokens, temperature=1.0, dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=getattr(torch, dtype))
        generate_transformers(model, ids[:8], [], settings, batch_size=8)
        start = time.perf_counter()
        # No EOS ids: transformers generates max_new_tokens for every prompt, as vLLM with ignore_eos.
        samples = generate_transformers(model, ids, [], settings, batch_size=prompts)
        seconds = time.perf_counter() - start
        result[f"{name}_tokens_per_second"] = sum(len(s[0].token_ids) for s in samples) / seconds
    fp32 = result["transformers_tokens_per_second"]
    result["rollout_ratio"] = result["vllm_tokens_per_second"] / fp32  # compiled, fp32 both
    result["rollout_ratio_eager"] = result["vllm_eager_tokens_per_second"] / fp32
    result["rollout_ratio_bf16"] = result["vllm_bf16_tokens_per_second"] / result["transformers_bf16_tokens_per_second"]
    result["rollout_ratio_vllm_bf16_vs_trainer_fp32"] = result["vllm_bf16_tokens_per_second"] / fp32
    return result


def grpo_seconds_per_step(policy: Path, work: Path, new_tokens: int, steps: int, use_vllm: bool) -> float:
    recipe = {"model_name_or_path": str(policy), "suite": "arithmetic", "held_out_eval": False,
              "max_completion_length": new_tokens, "num_generations": 8, "per_device_train_batch_size": 128,
              "learning_rate": 1e-5, "max_steps": steps, "logging_steps": 1, "save_strategy": "no",
              "use_vllm": use_vllm, "vllm_mode": "colocate", "vllm_max_model_length": 64 + new_tokens,
              "vllm_kv_cache_memory_bytes": 1 << 30, "vllm_cpu_compile": True, "seed": 0}
    name = "vllm" if use_vllm else "transformers"
    path = work / f"grpo-{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / f"grpo-{name}"
    subprocess.run([sys.executable, "-m", "rl", "--config", str(path), "--output_dir", str(out)], cwd=REPO,
                   check=True)
    times = [json.loads(line)["step_time"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "step_time" in json.loads(line)]
    return statistics.median(times[1:] or times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--grpo_steps", type=int, default=3, help="0: the rollout figures only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rl-rollout-bench-") as tmp:
        work = Path(tmp)
        policy = work / "policy"
        params = build_policy(policy)
        result = {"parameters": params, "prompts": args.prompts, "new_tokens": args.new_tokens,
                  "torch_threads": torch.get_num_threads()}
        result.update(rollout_tokens_per_second(policy, args.prompts, args.new_tokens))
        if not args.grpo_steps:
            print(json.dumps(result))
            return
        result["grpo_seconds_per_step_vllm"] = grpo_seconds_per_step(policy, work, args.new_tokens, args.grpo_steps,
                                                                      use_vllm=True)
        result["grpo_seconds_per_step_transformers"] = grpo_seconds_per_step(policy, work, args.new_tokens,
                                                                              args.grpo_steps, use_vllm=False)
        result["grpo_step_ratio"] = result["grpo_seconds_per_step_transformers"] / result["grpo_seconds_per_step_vllm"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
