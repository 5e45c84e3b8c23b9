"""SFT tokens/s of the core against transformers' Llama of the same shape, both through TRL's SFTTrainer.

    .venv/bin/python bench/sft_throughput.py [--recipe recipes/tiny/sft.yaml] [--steps 30] [--warmup 5]
                                             [--rounds 2] [--bf16]

The SFT recipe (default recipes/tiny/sft.yaml: packed bfd rows, assistant-only loss, the qwen3 template)
is parsed by the stage's own parser, and each model is built the way the stage builds it
(chat_templates.load_tokenizer, core.lifecycle.load_policy: the template's tokens added, embeddings resized),
from a random checkpoint of the recipe's shape: our core (the `tiny` preset) or LlamaForCausalLM with the same widths,
heads, GQA, tied embeddings, RoPE theta and norm epsilon. The stage's SFTTrainer then trains each on the
same rows for `--warmup` + `--steps` steps; tokens/s counts the tokens TRL feeds the model (its
`num_tokens`) over the timed steps only. Runs alternate between the two models, the order flipped every
round. Not part of the test run.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.recipe import parse_recipe
import chat_templates
from core.lifecycle import load_policy
from pretrain.tokenizer import sample_sources, train_tokenizer
from sft.config import SFTConfig
from sft.data import load_sources
from sft.train import SFTTrainer

PRESET = "tiny"


def checkpoints(work: Path) -> dict[str, Path]:
    """A random core and a random Llama of the same shape, each saved with the same tokenizer."""
    tokenizer = train_tokenizer(sample_sources([{"name": "arithmetic", "path": "builtin:arithmetic"},
                                                {"name": "prose", "path": "builtin:prose"}], 600), 512)
    shape = SmolForgeConfig.from_preset(PRESET, vocab_size=1024)
    llama = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                        head_dim=shape.head_dim, max_position_embeddings=shape.max_position_embeddings,
                        rms_norm_eps=shape.rms_norm_eps, tie_word_embeddings=shape.tie_word_embeddings,
                        rope_parameters=dict(shape.rope_parameters))
    paths = {}
    for kind, model in (("core", lambda: SmolForgeForCausalLM(shape)), ("llama", lambda: LlamaForCausalLM(llama))):
        torch.manual_seed(0)
        paths[kind] = work / kind
        model().save_pretrained(paths[kind])
        tokenizer.save_pretrained(paths[kind])
    return paths


class StepClock(TrainerCallback):
    """Wall time and TRL's token count at the end of every step."""

    def __init__(self):
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.tokens.append(int(state.num_input_tokens_seen))


def tokens_per_second(recipe: str, path: Path, out: Path, steps: int, warmup: int, bf16: bool) -> tuple[float, int]:
    (cfg,) = parse_recipe(SFTConfig, args=[
        "--config", recipe, "--model_name_or_path", str(path), "--output_dir", str(out),
        "--max_steps", str(warmup + steps), "--save_strategy", "no", "--report_to", "none",
        "--logging_steps", str(warmup), "--bf16", str(bf16).lower(), "--include_num_input_tokens_seen", "true",
        "--disable_tqdm", "true"])
    tokenizer, _ = chat_templates.load_tokenizer(cfg.model_name_or_path, cfg.chat_template)
    model = load_policy(cfg, tokenizer)
    rows, _ = load_sources(cfg.sources, cfg.think_ratio, cfg.seed)
    clock = StepClock()
    SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
               callbacks=[clock]).train()
    tokens = clock.tokens[-1] - clock.tokens[warmup - 1]
    return tokens / (clock.ends[-1] - clock.ends[warmup - 1]), sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/tiny/sft.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the recipe's bf16 otherwise off)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sft_throughput_"))
    paths = checkpoints(work)
    runs: dict[str, list[float]] = {"core": [], "llama": []}
    params = {}
    for r in range(args.rounds):
        for kind in (("core", "llama") if r % 2 == 0 else ("llama", "core")):
            tps, params[kind] = tokens_per_second(args.recipe, paths[kind], work / f"out-{kind}-{r}", args.steps,
                                                  args.warmup, args.bf16)
            runs[kind].append(tps)
            print(f"  round {r} {kind}: {tps:,.0f} tokens/s", flush=True)
    assert params["core"] == params["llama"], f"shapes differ: {params}"
    result = {"recipe": args.recipe, "params_millions": round(params["core"] / 1e6, 2), "bf16": args.bf16,
              "threads": torch.get_num_threads(),
              "core_tokens_per_s": round(statistics.median(runs["core"]), 1),
              "llama_tokens_per_s": round(statistics.median(runs["llama"]), 1),
              "all_rounds": {k: [round(v, 1) for v in vs] for k, vs in runs.items()}}
    result["ratio_core_over_llama"] = round(result["core_tokens_per_s"] / result["llama_tokens_per_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
