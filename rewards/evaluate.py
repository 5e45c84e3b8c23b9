"""Evaluate checkpoints on a reward suite, side by side.

    python -m rewards.evaluate --model_name_or_path runs/sft runs/grpo --suite arithmetic --output_dir runs/eval
    python -m rewards.evaluate --model_name_or_path runs/grpo --suite gsm8k --data_path gsm8k_test.jsonl \
        --num_samples 8 --output_dir runs/eval-gsm8k
    python -m rewards.evaluate --config recipes/tiny/evaluate.yaml --backend transformers

For each checkpoint: generate `num_samples` completions per prompt of the suite (vLLM when
installed, colocated in this process; otherwise transformers' `generate`), score them with the
suite's reward functions, and summarise: the mean of each reward (None left out and counted), the
weighted total, pass@1 and pass@k (k = num_samples, the unbiased estimator of Chen et al. 2021,
"Evaluating Large Language Models Trained on Code", eq. 1) with their standard error over prompts,
mean completion length in tokens and the truncation rate (completions that hit max_new_tokens
without EOS). Prints one table with a
column per checkpoint and writes `results.json` (summaries + every sample) and `results.png`.

Both backends (core/generation.py, the generation helper every stage shares) get the same prompt
token ids, stop at the same EOS ids and are decoded by the same tokenizer call, so greedy decoding
(`--temperature 0 --num_samples 1`) gives identical completions and scores
(tests/test_rewards_evaluate.py). Options: rewards/config.py (`--help`).
"""

import functools
import importlib.util
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from core.generation import GenerationSettings, Sample, generate_transformers, generate_vllm
from core.recipe import parse_recipe, resolved_recipe
from core.vllm import use_vllm_for
from rewards.config import EvaluateConfig
from rewards.functions import REWARD_FUNCS, compute_rewards, summarize, weighted_total
from rewards.suites import RewardSuite, get_suite, limited_reward_kwargs, load_rows
from rewards.verifier_pool import configure_default_pool


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct.

    The unbiased, numerically stable estimator of Chen et al. 2021 (1 - C(n-c, k) / C(n, k) as a product).
    """
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def prompt_token_ids(tokenizer, prompts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt: the chat template around a user message when the tokenizer has one
    (and it is wanted), else the raw prompt with the tokenizer's usual special tokens."""
    if use_chat_template and tokenizer.chat_template:
        # Rendered to text, then tokenized without extra special tokens: the template writes its own
        # (TRL does the same).
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def eos_token_ids(model_path: str, tokenizer) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids and the tokenizer's.

    Both backends get this same list, so they stop at the same token (vLLM stops at the tokenizer's
    EOS on its own, transformers only at the generation config's).
    """
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids.update([eos] if isinstance(eos, int) else eos or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def trl_completions(tokenizer, prompts: list[list[int]], samples: list[list[Sample]],
                    conversational: bool) -> tuple[list, list[list[int]]]:
    """(completions, completion_ids), flattened prompt-major, as TRL 1.16's GRPOTrainer hands them to reward
    functions (`GRPOTrainer._generate`), so a completion gets the same reward here as in GRPO (issue 30):
    completion_ids end with the EOS token that stopped them (TRL keeps it; our samples cut it off), and
    conversational completions go through TRL's reply parser when the tokenizer has one (every template
    `chat_templates.install` sets up), else are decoded without special tokens, as TRL decodes them."""
    ids = [s.token_ids + ([] if s.eos_token_id is None else [s.eos_token_id]) for ss in samples for s in ss]
    prefixes = [prompt for prompt, ss in zip(prompts, samples, strict=True) for _ in ss]
    if conversational and tokenizer.response_template is not None:
        from trl.chat_template_utils import parse_response

        # No ids at all (a sample cut at 0 tokens): transformers reads an empty list as an empty batch and TRL's
        # parse_response then fails on the [] it returns; TRL itself always passes at least the EOS.
        return [[parse_response(tokenizer, i, prefix=prefix) if i else {"role": "assistant", "content": ""}]
                for i, prefix in zip(ids, prefixes)], ids
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return ([[{"role": "assistant", "content": t}] for t in texts] if conversational else texts), ids


def score_samples(suite: RewardSuite, rows: list[dict], samples: list[list[Sample]], tokenizer,
                  prompts: list[list[int]], conversational: bool, max_new_tokens: int) -> dict[str, list[float | None]]:
    """Every reward of the suite for every sample, flattened prompt-major (row 0's samples first), called as
    GRPO calls it: TRL's completion format and completion_ids (`trl_completions`), and the knobs bound to
    this evaluation's generation limit as GRPO binds them to its own (`rewards.suites.limited_reward_kwargs`)."""
    completions, completion_ids = trl_completions(tokenizer, prompts, samples, conversational)
    columns = {name: [row[name] for row, ss in zip(rows, samples) for _ in ss]
               for name in rows[0] if name != "prompt"}
    columns["completion_ids"] = completion_ids
    kwargs = limited_reward_kwargs(suite.reward_kwargs, max_new_tokens)
    funcs = {name: functools.partial(REWARD_FUNCS[name], **kwargs.get(name, {})) for name in suite.reward_weights}
    return compute_rewards(funcs, completions, **columns)


def summarize_model(suite: RewardSuite, samples: list[list[Sample]], rewards: dict[str, list[float | None]],
                    num_samples: int) -> dict:
    """The metrics of one checkpoint: reward means (with counts of unscored), pass@1/pass@k, length, truncation."""
    flat = [s for ss in samples for s in ss]
    summary: dict = {"rewards": {name: asdict(summarize(values)) for name, values in rewards.items()}}
    summary["rewards"]["weighted_total"] = asdict(summarize(weighted_total(rewards, suite.reward_weights)))
    passes = rewards[suite.pass_reward]
    for k in sorted({1, num_samples}):
        estimates = []
        for row in range(len(samples)):
            values = [v for v in passes[row * num_samples : (row + 1) * num_samples] if v is not None]
            # A prompt with unscorable samples (e.g. an unparseable gold) has fewer than k to draw from.
            if len(values) >= k:
                estimates.append(pass_at_k(len(values), sum(v == 1.0 for v in values), k))
        summary[f"pass@{k}"] = sum(estimates) / len(estimates) if estimates else None
        # Its standard error over prompts (sample std of the per-prompt estimates / sqrt(prompts)): how far
        # another draw of as many prompts could move the score. Greedy answers to 40 prompts at pass@1 0.5 have
        # an SE of 0.08, so checkpoints a few answers apart are not told apart (issue 30).
        summary[f"pass@{k}_se"] = (statistics.stdev(estimates) / math.sqrt(len(estimates))
                                   if len(estimates) > 1 else None)
        summary[f"pass@{k}_prompts_unscored"] = len(samples) - len(estimates)
    summary["mean_completion_tokens"] = sum(len(s.token_ids) for s in flat) / len(flat)
    summary["truncation_rate"] = sum(s.truncated for s in flat) / len(flat)
    return summary


def sample_checkpoint(model_path: str, rows: list[dict], settings: GenerationSettings, backend: str,
                      use_chat_template: bool, batch_size: int, vllm_kv_cache_memory_bytes: int):
    """Completions of one checkpoint for the rows' prompts, with vLLM or transformers; returns
    (tokenizer, samples, conversational, backend used). Also how preference.build_pairs samples its candidates.

    With backend vllm, a checkpoint vLLM cannot serve (core.vllm.use_vllm_for: e.g. MLA on vLLM's CPU
    backend) is sampled with transformers instead, with one printed line."""
    from transformers import AutoTokenizer

    if backend == "vllm" and not use_vllm_for(model_path, served=False):
        backend = "transformers"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    conversational = bool(use_chat_template and tokenizer.chat_template)
    prompts = prompt_token_ids(tokenizer, [row["prompt"] for row in rows], use_chat_template)
    eos_ids = eos_token_ids(model_path, tokenizer)
    if backend == "vllm":
        samples = generate_vllm(model_path, prompts, eos_ids, settings, vllm_kv_cache_memory_bytes)
    else:
        import core  # noqa: F401  (registers the core with the Auto classes)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=settings.dtype)
        samples = generate_transformers(model, prompts, eos_ids, settings, batch_size)
        del model
    return tokenizer, samples, conversational, backend


def evaluate_model(model_path: str, config: EvaluateConfig, suite: RewardSuite, rows: list[dict],
                   settings: GenerationSettings, backend: str) -> dict:
    """Generate, score and summarise one checkpoint; returns {"summary": ..., "samples": [...]}."""
    tokenizer, samples, conversational, backend = sample_checkpoint(
        model_path, rows, settings, backend, config.use_chat_template, config.batch_size,
        config.vllm_kv_cache_memory_bytes)
    # One decode for both backends (vLLM's incremental detokenizer may differ in whitespace).
    texts = [[tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in ss] for ss in samples]
    prompts = prompt_token_ids(tokenizer, [row["prompt"] for row in rows], config.use_chat_template)
    rewards = score_samples(suite, rows, samples, tokenizer, prompts, conversational, settings.max_new_tokens)
    records = []
    for row_index, (row, row_texts) in enumerate(zip(rows, texts)):
        for sample_index, text in enumerate(row_texts):
            flat = row_index * settings.num_samples + sample_index
            records.append({**row, "sample": sample_index, "completion": text,
                            "completion_tokens": len(samples[row_index][sample_index].token_ids),
                            "truncated": samples[row_index][sample_index].truncated,
                            "rewards": {name: values[flat] for name, values in rewards.items()}})
    return {"backend": backend, "chat_template": conversational,
            "summary": summarize_model(suite, samples, rewards, settings.num_samples), "samples": records}


def format_table(results: dict[str, dict], num_samples: int) -> str:
    """Metrics as rows, one column per checkpoint."""
    names = list(results)
    first = results[names[0]]["summary"]
    metrics: list[tuple[str, Callable[[dict], str]]] = []
    for reward in first["rewards"]:
        metrics.append((f"{reward} (mean)", lambda s, r=reward: _number(s["rewards"][r]["mean"])))
        metrics.append((f"{reward} unscored", lambda s, r=reward: str(s["rewards"][r]["unscored"])))
    for k in sorted({1, num_samples}):
        # The standard error on a row of its own: the table stays one number per cell, as scripts read it.
        metrics.append((f"pass@{k}", lambda s, k=k: _number(s[f"pass@{k}"])))
        metrics.append((f"pass@{k} SE", lambda s, k=k: _number(s[f"pass@{k}_se"])))
    metrics.append(("mean completion tokens", lambda s: f"{s['mean_completion_tokens']:.1f}"))
    metrics.append(("truncation rate", lambda s: _number(s["truncation_rate"])))
    headers = ["metric", *names]
    body = [[label, *(fmt(results[n]["summary"]) for n in names)] for label, fmt in metrics]
    widths = [max(len(line[col]) for line in [headers, *body]) for col in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) if col == 0 else cell.rjust(w) for col, (cell, w) in enumerate(zip(line, widths)))
             for line in [headers, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def plot_results(results: dict[str, dict], num_samples: int, path: Path) -> None:
    """Grouped bars: reward means and pass rates (left), mean completion length (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    names = list(results)
    summaries = [results[n]["summary"] for n in names]
    labels = [*summaries[0]["rewards"], *(f"pass@{k}" for k in sorted({1, num_samples})), "truncation rate"]

    def value(summary: dict, label: str) -> float:
        if label in summary["rewards"]:
            mean = summary["rewards"][label]["mean"]
        else:
            mean = summary["truncation_rate" if label == "truncation rate" else label]
        return math.nan if mean is None else mean

    figure, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(labels), 4.5),
                                         gridspec_kw={"width_ratios": [len(labels), 1.5]})
    width = 0.8 / len(names)
    for position, (name, summary) in enumerate(zip(names, summaries)):
        offsets = [i + position * width for i in range(len(labels))]
        left.bar(offsets, [value(summary, label) for label in labels], width, label=name)
        right.bar(position, summary["mean_completion_tokens"], label=name)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right")
    left.axhline(0.0, color="black", linewidth=0.5)
    left.set_title("rewards (mean) and pass rates")
    left.legend(fontsize="small")
    right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set_title("mean completion tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def resolve_backend(requested: str) -> str:
    if requested == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if requested == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--backend vllm, but vLLM is not installed (pip install smolforge[cpu] or [gpu]); "
                         "use --backend transformers")
    return requested


def generation_settings(config: EvaluateConfig, suite: RewardSuite) -> GenerationSettings:
    settings = GenerationSettings(
        num_samples=suite.num_samples if config.num_samples is None else config.num_samples,
        temperature=suite.temperature if config.temperature is None else config.temperature,
        top_p=config.top_p,
        max_new_tokens=suite.max_new_tokens if config.max_new_tokens is None else config.max_new_tokens,
        seed=config.seed,
        dtype=config.dtype,
    )
    if settings.num_samples < 1 or settings.max_new_tokens < 1:
        raise ValueError(f"num_samples ({settings.num_samples}) and max_new_tokens ({settings.max_new_tokens}) must be >= 1")
    if settings.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {settings.temperature}")
    if settings.temperature == 0 and settings.num_samples > 1:
        raise ValueError(f"num_samples={settings.num_samples} with temperature 0: greedy decoding gives the same "
                         "completion every time; set --temperature > 0 for pass@k, or --num_samples 1")
    return settings


def evaluate(config: EvaluateConfig) -> dict:
    """Evaluate every `config.model_name_or_path` on the suite; print the table; write results.json and results.png."""
    suite = get_suite(config.suite)
    rows = load_rows(suite, config.split, config.data_path)[: config.max_examples]
    if not rows:
        raise ValueError(f"suite {suite.name!r} (split {config.split!r}, data_path {config.data_path!r}) has no rows")
    settings = generation_settings(config, suite)
    backend = resolve_backend(config.backend)
    configure_default_pool(item_timeout_s=config.item_timeout_s)
    names = _column_names(config.model_name_or_path)
    results = {name: evaluate_model(path, config, suite, rows, settings, backend)
               for name, path in zip(names, config.model_name_or_path)}
    print(f"suite {suite.name} ({suite.description}), split {config.split}, {len(rows)} prompts x "
          f"{settings.num_samples} samples, temperature {settings.temperature}, backend {backend}")
    print(format_table(results, settings.num_samples))

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {"suite": suite.name, "split": config.split, "generation": asdict(settings),
              "config": resolved_recipe(config), "models": {n: {"path": p, **results[n]}
                                                          for n, p in zip(names, config.model_name_or_path)}}
    _write_atomically(output_dir / "results.json", json.dumps(report, indent=2))
    plot_results(results, settings.num_samples, output_dir / "results.png")
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'results.png'}")
    return report


def _column_names(paths: list[str]) -> list[str]:
    """Short unique labels: the last path component, or more of the path where those clash."""
    for depth in range(1, max(len(Path(p).parts) for p in paths) + 1):
        names = ["/".join(Path(p).parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"model_name_or_path lists the same checkpoint twice: {paths}")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def merge_repeated_flag(args: list[str], flag: str) -> list[str]:
    """`--model A --model B` -> `--model A B` (argparse would keep only the last repetition)."""
    values, rest, index = [], [], 0
    while index < len(args):
        if args[index] == flag:
            index += 1
            while index < len(args) and not args[index].startswith("--"):
                values.append(args[index])
                index += 1
        else:
            rest.append(args[index])
            index += 1
    return rest + ([flag, *values] if values else [])


def main(args: list[str] | None = None) -> dict:
    (config,) = parse_recipe(EvaluateConfig, args=merge_repeated_flag(list(sys.argv[1:] if args is None else args),
                                                                      "--model_name_or_path"))
    return evaluate(config)


if __name__ == "__main__":
    main()
