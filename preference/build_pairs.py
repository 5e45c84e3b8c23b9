"""Build preference pairs on-policy, as the SmolLM3 team built its APO data.

    python -m preference.build_pairs --model_name_or_path out/tiny/sft --suite arithmetic --output_dir out/tiny/pairs
    python -m preference.build_pairs --model_name_or_path out/tiny/sft --strong_model_name_or_path out/big/sft \
        --suite arithmetic --output_dir out/tiny/pairs-strong           # "strong vs weak"
    python -m preference.build_pairs --config recipes/tiny/build_pairs.yaml

Self mode: sample `num_samples` (k) completions per prompt of the suite's `split` from the policy
(vLLM when installed, colocated in this process; else transformers' generate: core/generation.py),
score each with the suite's reward functions (the weighted total, exactly as `rewards.evaluate`
scores: `score_samples`; or the weighted total of some of them, `pair_reward`), and pair the best completion (chosen) with the worst (rejected). A prompt
whose scored completions all tie (all right, or all wrong and alike), or with fewer than two
scored, gives no pair.

Strong-vs-weak mode (`strong_model_name_or_path`): chosen is the best of the stronger checkpoint's
k samples, rejected the worst of the policy's (SmolLM3 paired Qwen3-32B against Qwen3-0.6B). The
suite still judges: a prompt where the strong model's best does not score above the policy's worst
gives no pair, rather than teaching a preference the reward contradicts.

Output, in `output_dir`:
  - `pairs.jsonl` (`output_format: pairs`): TRL preference rows, conversational when the policy's
    tokenizer has a chat template: {"prompt": [user msg], "chosen": [assistant msg], "rejected":
    [assistant msg], "score_chosen": ..., "score_rejected": ...}; strings otherwise;
  - `kto.jsonl` (`output_format: kto`): the same pairs as KTO rows, chosen with label true and
    rejected with label false, in the order of `preference.data.unpair` (TRL's KL baseline pairs each
    row's prompt with the previous row's reply: a pair's rows are never neighbours), each row with its
    pair's two scores;
  - `summary.json`: counts (prompts, pairs, prompts without a pair and why, samples dropped for a
    control token) and the settings;
  - `stage.json`, last (core.checkpoint.save_data_stage): the manifest every stage writes, so the
    pipeline skips a complete `pairs` stage and reruns an incomplete one.
Both jsonl files are `core.sources` sources: `{path: out/tiny/pairs/pairs.jsonl}` in a recipe.

What is written is what the preference stage accepts (issue 30: a sampled "42<|im_start|>6" made the
APO stage refuse the file, on the machines whose sampling produced it):
  - sampling stops at every control token of the chat template (role markers, end of turn; not the
    reasoning tags) and at the tokenizer's special tokens, not only at EOS;
  - a sample whose text still holds one (spelled out in ordinary tokens) takes no part in the ranking,
    and is counted (`samples_with_control_token`);
  - the rows go through the preference stage's own check (`preference.data.validate_rows`, with the
    tokenizer and `chat_template` the preference stage trains with) before anything is written.

A complete `output_dir` (with stage.json) is never written over. One without stage.json is a run that
did not finish (killed, or an earlier version that wrote no stage.json): its files are replaced by this
run's, each by an atomic rename, so "a stage failed, fix it, run the pipeline again" finishes.

The completion text written is the sampled tokens decoded with their special tokens kept (the
chat template re-renders them when training), scored as evaluation scores them (special tokens
skipped). Completions are sampled in the template's default mode (SmolLM3: /think).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import chat_templates
from core.checkpoint import MANIFEST_NAME, data_fingerprint, save_data_stage
from core.generation import GenerationSettings
from core.lifecycle import stage_main
from core.recipe import help_field as _help, resolved_recipe
from rewards.evaluate import prompt_token_ids, resolve_backend, sample_checkpoint, score_samples
from rewards.functions import weighted_total
from rewards.suites import get_suite, load_rows
from rewards.verifier_pool import configure_default_pool

from .data import unpair, validate_rows


@dataclass
class BuildPairsConfig:
    model_name_or_path: str = _help("The policy: the checkpoint that samples (its worst completion is rejected).")
    output_dir: str = _help("Where pairs.jsonl / kto.jsonl and summary.json are written.")
    suite: str = _help("Reward suite that scores the completions and supplies the prompts (rewards/suites.py).",
                       default="arithmetic")
    split: Literal["train", "test"] = _help("The suite's split to take prompts from; keep `test` for evaluation.",
                                            default="train")
    data_path: str | None = _help("Local jsonl file for the gsm8k / math suites.", default=None)
    max_prompts: int | None = _help("Use only the first N prompts.", default=None)
    strong_model_name_or_path: str | None = _help(
        "Strong-vs-weak mode: chosen comes from this (stronger) checkpoint, rejected from the policy.", default=None)
    pair_reward: list[str] | None = _help(
        "The rewards that rank completions: some of the suite's rewards (e.g. [accuracy, answer_consistency]), "
        "summed with the suite's weights; null for the suite's whole weighted total, as evaluation ranks them.",
        default=None)
    chat_template: str | None = _help(
        "The chat template the preference stage trains with (its `chat_template`): the rows are checked against "
        "it before they are written. Null: the policy checkpoint's own, as in the preference stage.", default=None)
    output_format: Literal["pairs", "kto"] = _help(
        "pairs: prompt/chosen/rejected rows (dpo, orpo); kto: prompt/completion/label rows.", default="pairs")
    num_samples: int = _help("Completions sampled per prompt and per model (k).", default=8)
    temperature: float = _help("Sampling temperature (> 0: the k samples must differ).", default=1.0)
    top_p: float = _help("Nucleus sampling threshold (1.0: off).", default=1.0)
    max_new_tokens: int | None = _help("Completion length limit. Default: the suite's.", default=None)
    backend: Literal["auto", "vllm", "transformers"] = _help(
        "Generation backend: auto = vLLM when installed (colocated, in this process), else transformers.",
        default="auto")
    dtype: str = _help("Weights dtype for both backends: auto (as saved), float32, bfloat16 or float16.",
                       default="auto")
    seed: int = _help("Sampling seed (both backends).", default=0)
    batch_size: int = _help("Prompts per transformers generate call.", default=32)
    vllm_kv_cache_memory_bytes: int = _help(
        "KV-cache size for vLLM (explicit: on CPU vLLM's default reserves a fraction of host RAM).",
        default=256 << 20)
    item_timeout_s: float = _help("Hard wall-clock limit per graded answer (math-verify in worker processes).",
                                  default=5.0)

    def __post_init__(self):
        if isinstance(self.pair_reward, str):  # `pair_reward: accuracy`, one reward
            self.pair_reward = [self.pair_reward]
        if self.num_samples < 1 or (self.strong_model_name_or_path is None and self.num_samples < 2):
            raise ValueError(f"num_samples={self.num_samples}: self mode pairs the best of k samples with the worst, "
                             f"so k must be >= 2 (>= 1 in strong-vs-weak mode)")
        if self.temperature <= 0 and self.num_samples > 1:
            raise ValueError(f"temperature={self.temperature} with num_samples={self.num_samples}: greedy samples "
                             f"are all the same completion; sample with temperature > 0")


@dataclass
class Scored:
    """One model's completions of one prompt: text to train on, and the suite's weighted total (None: unscored)."""

    texts: list[str]
    scores: list[float | None]


def control_tokens(*tokenizers) -> list[str]:
    """What no reply may hold: the control tokens of each tokenizer's chat template (role markers, end of turn,
    BOS; not the reasoning tags, which a reply writes) and each tokenizer's special tokens (EOS, pad, ...)."""
    tokens = []
    for tokenizer in tokenizers:
        if tokenizer.chat_template:
            tokens += chat_templates.from_tokenizer(tokenizer).control_tokens
        tokens += tokenizer.all_special_tokens
    # Reasoning tags are replies' own text, even where a tokenizer registers them as special tokens.
    return [token for token in dict.fromkeys(tokens) if token not in chat_templates.REASONING_TOKENS]


def sample_and_score(model_path: str, cfg: BuildPairsConfig, rows: list[dict],
                     trainer_tokenizer) -> tuple[list[Scored], bool, int]:
    """k completions per row from `model_path`, scored; whether its tokenizer renders chats; and how many samples
    held a control token of its own or of `trainer_tokenizer` (the preference stage's), left unscored."""
    from transformers import AutoTokenizer

    suite = get_suite(cfg.suite)
    own = AutoTokenizer.from_pretrained(model_path)
    tokens, vocab = control_tokens(own, trainer_tokenizer), own.get_vocab()
    settings = GenerationSettings(
        max_new_tokens=suite.max_new_tokens if cfg.max_new_tokens is None else cfg.max_new_tokens,
        num_samples=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, dtype=cfg.dtype,
        stop_token_ids=tuple(vocab[token] for token in tokens if token in vocab))
    backend = resolve_backend(cfg.backend)
    tokenizer, samples, conversational, backend = sample_checkpoint(
        model_path, rows, settings, backend, True, cfg.batch_size, cfg.vllm_kv_cache_memory_bytes)
    # Scored as rewards.evaluate (and GRPO) score a completion; kept with special tokens for training.
    kept = [[tokenizer.decode(s.token_ids, skip_special_tokens=False) for s in ss] for ss in samples]
    prompts = prompt_token_ids(tokenizer, [row["prompt"] for row in rows], True)
    rewards = score_samples(suite, rows, samples, tokenizer, prompts, conversational, settings.max_new_tokens)
    for name in cfg.pair_reward or []:
        if name not in rewards:
            raise ValueError(f"pair_reward={name!r} is not a reward of suite {suite.name!r}: {sorted(rewards)}")
    ranking = rewards if cfg.pair_reward is None else {name: rewards[name] for name in cfg.pair_reward}
    totals = weighted_total(ranking, suite.reward_weights)
    # An empty completion (the policy ended its turn at once) cannot be a reply to train on: the preference
    # loader refuses empty content by row, so it takes no part in the ranking (it was the worst-scored
    # sample of a prompt, and so `rejected`, once answer_consistency joined the arithmetic suite).
    totals = [None if not text.strip() else total
              for text, total in zip((t for texts in kept for t in texts), totals, strict=True)]
    # Sampling stopped at every control token, so one left in a reply was spelled out in ordinary tokens
    # ("<", "|", "im", ...): the tokenizer would read it back as the control token, and the chat template
    # refuses it. Such a sample takes no part in the ranking, as an empty one.
    held = [any(token in text for token in tokens) for texts in kept for text in texts]
    totals = [None if holds else total for holds, total in zip(held, totals, strict=True)]
    k = cfg.num_samples
    print(f"{model_path}: {len(rows)} prompts x {k} samples ({backend}), mean score "
          f"{_mean(totals):.4f}, truncated {sum(s.truncated for ss in samples for s in ss)}, "
          f"dropped for holding a control token {sum(held)}")
    return [Scored(kept[i], totals[i * k:(i + 1) * k]) for i in range(len(rows))], conversational, sum(held)


def _mean(values: list[float | None]) -> float:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else float("nan")


def _extreme(scored: Scored, best: bool) -> tuple[str, float] | None:
    """The first completion with the highest (best) or lowest score; None when nothing was scored."""
    candidates = [(score, i) for i, score in enumerate(scored.scores) if score is not None]
    if not candidates:
        return None
    score = max(candidates)[0] if best else min(candidates)[0]
    index = next(i for s, i in candidates if s == score)
    return scored.texts[index], score


def choose_pair(chosen_from: Scored, rejected_from: Scored) -> tuple[tuple[str, float, str, float] | None, str]:
    """(chosen text, score, rejected text, score) or None, and why there is no pair."""
    best, worst = _extreme(chosen_from, best=True), _extreme(rejected_from, best=False)
    if best is None or worst is None:
        return None, "unscored"
    if best[1] <= worst[1]:
        return None, "tied"
    if best[0] == worst[0]:
        return None, "same_text"
    return (best[0], best[1], worst[0], worst[1]), ""


def pair_row(prompt: str, pair: tuple[str, float, str, float], conversational: bool) -> dict:
    chosen, chosen_score, rejected, rejected_score = pair
    if conversational:
        prompt_field = [{"role": "user", "content": prompt}]
        chosen_field = [{"role": "assistant", "content": chosen}]
        rejected_field = [{"role": "assistant", "content": rejected}]
    else:
        prompt_field, chosen_field, rejected_field = prompt, chosen, rejected
    return {"prompt": prompt_field, "chosen": chosen_field, "rejected": rejected_field,
            "score_chosen": chosen_score, "score_rejected": rejected_score}


def build_pairs(cfg: BuildPairsConfig) -> dict:
    """Sample, score, pair; check the rows as the preference stage will; write the jsonl, summary.json and
    stage.json; return the summary."""
    out = Path(cfg.output_dir)
    data_name = "kto.jsonl" if cfg.output_format == "kto" else "pairs.jsonl"
    if (out / MANIFEST_NAME).exists():  # checked before the sampling, which takes minutes
        raise FileExistsError(f"{out} holds a complete build_pairs output ({MANIFEST_NAME}); choose a new "
                              f"output_dir, or delete that one yourself")
    leftovers = [name for name in (data_name, "summary.json") if (out / name).exists()]
    if leftovers:
        print(f"{out} holds {leftovers} without {MANIFEST_NAME}: a run that did not finish; this run replaces them")
    suite = get_suite(cfg.suite)
    rows = load_rows(suite, cfg.split, cfg.data_path)[: cfg.max_prompts]
    if not rows:
        raise ValueError(f"suite {cfg.suite!r} (split {cfg.split!r}) has no rows")
    configure_default_pool(item_timeout_s=cfg.item_timeout_s)
    # The tokenizer and template the preference stage will train with (its loader): the rows are checked
    # against them, and a control token of theirs ends a sample too.
    trainer_tokenizer, _ = chat_templates.load_tokenizer(cfg.model_name_or_path, cfg.chat_template, pad=False)

    policy, conversational, dropped = sample_and_score(cfg.model_name_or_path, cfg, rows, trainer_tokenizer)
    strong, strong_dropped = policy, 0
    if cfg.strong_model_name_or_path is not None:
        strong, _, strong_dropped = sample_and_score(cfg.strong_model_name_or_path, cfg, rows, trainer_tokenizer)

    paired, no_pair = [], {"tied": 0, "unscored": 0, "same_text": 0}
    for row, chosen_from, rejected_from in zip(rows, strong, policy):
        pair, reason = choose_pair(chosen_from, rejected_from)
        if pair is None:
            no_pair[reason] += 1
            continue
        paired.append(pair_row(row["prompt"], pair, conversational))
    written = unpair(paired) if cfg.output_format == "kto" else paired
    pairs = len(rows) - sum(no_pair.values())
    summary = {"prompts": len(rows), "pairs": pairs, "prompts_without_pair": sum(no_pair.values()),
               "without_pair_because": no_pair, "rows_written": len(written),
               "samples_with_control_token": dropped + strong_dropped, "file": str(out / data_name),
               "mode": "strong_vs_weak" if cfg.strong_model_name_or_path else "self",
               "policy_mean_score": _mean([s for p in policy for s in p.scores]),
               "strong_mean_score": _mean([s for p in strong for s in p.scores]) if strong is not policy else None,
               "config": resolved_recipe(cfg)}
    print(f"{pairs} pairs from {len(rows)} prompts; {summary['prompts_without_pair']} prompts gave no pair "
          f"({', '.join(f'{n} {why}' for why, n in no_pair.items())}); {summary['samples_with_control_token']} "
          f"samples dropped for holding a control token; {len(written)} rows for {out / data_name}")
    if not written:
        raise ValueError(f"no prompt gave a pair ({no_pair}); sample more (num_samples), at a higher temperature, "
                         f"or from a checkpoint whose completions differ in score")
    # The reader's own check, before anything is written: a file the preference stage refuses is never written.
    validate_rows(written, [f"{out / data_name} row {i}" for i in range(len(written))],
                  "kto" if cfg.output_format == "kto" else "dpo", trainer_tokenizer, None, False)
    text = "".join(json.dumps(r) + "\n" for r in written)
    counts = {**{name: summary[name] for name in ("prompts", "pairs", "rows_written", "samples_with_control_token",
                                                  "policy_mean_score")},
              **{f"without_pair/{why}": n for why, n in no_pair.items()}}
    save_data_stage(out, {data_name: text, "summary.json": json.dumps(summary, indent=2)},
                    stage="preference/build_pairs", recipe=summary["config"],
                    parent=[cfg.strong_model_name_or_path, cfg.model_name_or_path] if cfg.strong_model_name_or_path
                    else cfg.model_name_or_path,
                    # of the data file's text: data_fingerprint([Path(file).read_text()]) gives it back
                    data_fingerprint=data_fingerprint([text]), metrics=counts)
    print(f"wrote {out / data_name}, summary.json and {MANIFEST_NAME}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return stage_main(BuildPairsConfig, build_pairs, argv)


if __name__ == "__main__":
    main()
