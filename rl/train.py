"""The RL stage: online GRPO with TRL's GRPOTrainer, rollouts from vLLM (colocated or served) or
transformers, verifiable rewards from `rewards/`.

Steps, in order: parse the recipe (rl/config.py); load the policy's tokenizer (its chat template
comes with the SFT checkpoint) and model; load the prompts and bind the rewards, checking both
(rl/data.py: an unknown reward, a missing column, a bad row fail here, named, before any engine
starts); drop over-long prompts (counted); measure held-out greedy pass@1; train with `GRPOTrainer`;
measure again; save the final model (LoRA merged) with stage.json atomically.

Where we deviate from TRL's GRPOTrainer (all in this file and core/vllm/trl.py):
  - vLLM on CPU: eager engine with an explicit KV cache; weights synchronised with
    `core.vllm.update_weights` after each optimizer step (colocate), or through shared memory
    (server); served-mode requests time out and fail on every rank (core/vllm/trl.py);
  - `vllm_sync_check`: after each weight sync, vLLM's greedy tokens and their log-probs on a few
    training prompts are compared with the policy's own (`vllm/sync_greedy_match`,
    `vllm/sync_logprob_max_diff` in metrics.jsonl);
  - rewards are named functions from `rewards.functions.REWARD_FUNCS` whose failures name the
    reward (rl/data.py), not arbitrary callables;
  - prompts longer than `max_prompt_length` are dropped and counted up front (TRL 1.16 has no
    prompt limit);
  - TRL's completion logging (rich console + parquet) is replaced by rollouts.jsonl / a wandb table
    and RL alerts (rl/rollouts.py);
  - the generation config's stop tokens (end of turn first) are restored before saving: the Trainer
    rewrites them to the tokenizer's eos when training starts;
  - `--resume_from_checkpoint true` picks the newest *complete* checkpoint (core/checkpoint.py); the
    first rollout after a resume synchronises vLLM with the restored policy (TRL re-syncs whenever
    the step differs from the last synchronised one, and a fresh engine has never synced);
  - every logged step goes to output_dir/metrics.jsonl (core/metrics.py), truncated on resume.

SMOLFORGE_FAULT=kill_after_step:N / kill_in_checkpoint:N (tests only, core/faults.py) kill the process
with SIGKILL right after, or in the middle of, writing the checkpoint of step N.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers.trainer import TRAINER_STATE_NAME

import chat_templates
import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint
from core.decontaminate import NGramIndex, decontaminate_rows
from core.faults import FaultInjectionMixin
from core.generation import GenerationSettings, generate_transformers, to_sample
from core.lifecycle import (BeforeAfter, begin, finish, launch_summary, load_policy, preflight, stage_callbacks,
                            stage_main, stop_token_ids, train_metrics)
from core.trainer_defaults import lora_config
from core.vllm import use_vllm_for
from core.vllm.trl import SmolForgeVLLMMixin
from rewards.functions import REWARD_FUNCS, compute_rewards
from rewards.suites import evaluation_prompts, get_suite
from rewards.suites import load_rows as load_suite_rows

from .config import GRPOConfig
from .data import (as_conversations, build_reward_models, build_rewards, check_reward_columns, drop_long_prompts,
                   load_prompts, prompt_ids, reward_model_specs, reward_setup)
from .rollouts import RolloutMonitor, rollout_rows


class GRPOTrainer(FaultInjectionMixin, SmolForgeVLLMMixin, trl.GRPOTrainer):
    """TRL's GRPOTrainer with smolforge's vLLM backend (core/vllm/trl.py), the sync check and rollout logging."""

    def __init__(self, *args, monitor: RolloutMonitor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.monitor = monitor

    # --- weight-sync check ----------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # TRL synchronises vLLM inside the call below when the step changed since the last sync.
        syncs = self.use_vllm and self.state.global_step != self._last_loaded_step
        result = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                               has_tool_images)
        if syncs:
            self._metrics["train"]["vllm/sync_seconds"].append(self.vllm_generation.last_sync_seconds)
            if self.args.vllm_sync_check:
                self._check_vllm_sync(prompt_ids[::num_generations][: self.args.vllm_sync_check])
        return result

    @torch.no_grad()
    def _check_vllm_sync(self, prompts: list[list[int]]) -> None:
        """Greedy tokens and their log-probs from vLLM vs from the policy being trained."""
        max_tokens = min(self.max_completion_length, 16)
        tokens, vllm_logprobs = self.vllm_generation.greedy(prompts, max_tokens, self.eos_token_ids)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        own = generate_transformers(model, prompts, self.eos_token_ids, GenerationSettings(max_new_tokens=max_tokens))
        matches = [s[0].token_ids == to_sample(list(t), self.eos_token_ids, max_tokens).token_ids
                   for s, t in zip(own, tokens)]
        diffs = []
        for prompt, completion, logprobs in zip(prompts, tokens, vllm_logprobs):
            ids = torch.tensor([prompt + list(completion)], device=self.accelerator.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # (completion, vocab)
            own_logprobs = torch.log_softmax(logits, dim=-1).gather(
                -1, torch.tensor(completion, device=ids.device)[:, None])[:, 0]
            diffs.append((own_logprobs.cpu() - torch.tensor(logprobs)).abs().max().item())
        model.train()
        self._metrics["train"]["vllm/sync_greedy_match"].append(sum(matches) / len(matches))
        self._metrics["train"]["vllm/sync_logprob_max_diff"].append(max(diffs))

    # --- rollout logging ------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A training step's log: not the end-of-training summary (train_runtime, ...), which Trainer logs at the
        # last step again; recording it too wrote the last step's rollouts twice (found by the resume test).
        training = self.model.training and "loss" in logs
        rollouts = self._rollout_rows() if self.monitor is not None and training else []
        super().log(logs, start_time)  # TRL averages its metrics into `logs`, then the callbacks write them
        if self.monitor is not None and training:
            self.monitor.record(self.state.global_step, logs, rollouts)

    def _rollout_rows(self) -> list[dict]:
        return rollout_rows(self._logs["prompt"], self._logs["completion"], self._logs["rewards"],
                            self._logs["advantages"])


def load_tokenizer(cfg: GRPOConfig):
    """The policy's tokenizer, left-padded as TRL pads prompts for generation. It cannot grow (the vLLM engine loads
    the checkpoint's vocabulary), and it must have a pad token of its own: TRL would pad with the eos token, which
    it then cannot tell from a real end."""
    tokenizer, _ = chat_templates.load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                                                 cfg.chat_template, add_missing_tokens=False, pad=False,
                                                 padding_side="left")
    if tokenizer.pad_token is None:
        raise ValueError(f"{cfg.model_name_or_path}: the tokenizer has no pad token; TRL would pad with the eos token, "
                         f"which it then cannot tell from a real end. Give the policy a pad token (the SFT stage adds "
                         f"<|pad|>)")
    return tokenizer


def held_out_pass_at_1(model, tokenizer, rows: list[dict], cfg: GRPOConfig, eos_ids: list[int]) -> float:
    """Greedy pass@1 of `rows` (prompt, answer): the accuracy reward is 1.0 on the single greedy completion.

    Prompts are rendered as in training; completions are decoded as TRL decodes them for the rewards."""
    prompts = [prompt_ids(row["prompt"], tokenizer, cfg.chat_template_kwargs or {}) for row in rows]
    samples = generate_transformers(model, prompts, eos_ids, GenerationSettings(max_new_tokens=cfg.max_completion_length))
    texts = tokenizer.batch_decode([s[0].token_ids for s in samples], skip_special_tokens=True)
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
    scores = compute_rewards({cfg.accuracy_reward: REWARD_FUNCS[cfg.accuracy_reward]}, texts, **columns)
    return sum(score == 1.0 for score in scores[cfg.accuracy_reward]) / len(rows)


def resumed_step(checkpoint: str | None) -> int | None:
    if checkpoint is None:
        return None
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())["global_step"]


def load_prompt_rows(cfg: GRPOConfig, rewards: dict[str, float]) -> tuple[list[dict], str, dict]:
    """(rows, where they come from, metrics): prompts decontaminated, the columns the `rewards` (name: weight) read
    checked. A bad recipe fails here, before a model or an engine loads."""
    rows, origins, where = load_prompts(cfg)
    rows, origins, n_contaminated = decontaminate_rows(
        rows, NGramIndex(evaluation_prompts(cfg.decontaminate_against)), f"rl ({where})", origins)
    check_reward_columns(rows, origins, list(rewards), where)
    return rows, where, {"data/prompts_dropped_contaminated": n_contaminated}


def prompt_dataset(cfg: GRPOConfig, rows: list[dict], tokenizer, metrics: dict) -> tuple[Dataset, str, str]:
    """(dataset, fingerprint, summary): prompts as conversations where the tokenizer has a template, over-long ones
    dropped and counted (in `metrics`)."""
    rows = as_conversations(rows, tokenizer)
    rows, lengths, dropped = drop_long_prompts(rows, tokenizer, cfg.max_prompt_length, cfg.chat_template_kwargs or {})
    metrics.update({"data/prompts": len(rows), "data/prompts_dropped_too_long": dropped})
    fingerprint = data_fingerprint([json.dumps(r, sort_keys=True) for r in rows])
    return (Dataset.from_list(rows), fingerprint,
            f"prompt tokens {min(lengths)}-{max(lengths)}, {dropped} dropped as longer than max_prompt_length")


def build_reward_funcs(cfg: GRPOConfig) -> tuple[list, dict[str, float]]:
    """The recipe's rewards by name, then its learned reward models, with `reward_weights` in the same order; and
    the named rewards' weights. Unknown names and bad reward-model specs fail here, before anything loads."""
    names, weights, reward_kwargs = reward_setup(cfg)
    reward_models = reward_model_specs(cfg, names)
    cfg.reward_weights = weights + [spec.weight for spec in reward_models]
    return build_rewards(names, reward_kwargs) + build_reward_models(reward_models), dict(zip(names, weights))


def held_out_pass_at_1_check(cfg: GRPOConfig, tokenizer, stop_ids: list[int]) -> BeforeAfter:
    """Greedy pass@1 on the suite's `test` split, before and after training (`held_out_eval`), with GRPO's wall
    time."""
    rows = as_conversations(load_suite_rows(get_suite(cfg.suite), "test", cfg.suite_data_path), tokenizer)
    start = time.perf_counter()

    def describe(before, after) -> str:
        backend = f"vLLM {cfg.vllm_mode}" if cfg.use_vllm else "transformers generate"
        start_score = "n/a (resumed)" if before is None else f"{before['pass@1']:.3f}"
        return (f"held-out pass@1 ({len(rows)} prompts of suite {cfg.suite}, greedy): "
                f"{start_score} -> {after['pass@1']:.3f}; "
                f"GRPO wall time {time.perf_counter() - start:.1f} s ({backend})")

    return BeforeAfter(lambda model: {"pass@1": held_out_pass_at_1(model, tokenizer, rows, cfg, stop_ids)},
                       "held_out/{}_after", "held_out/{}_before", describe)


def run(cfg: GRPOConfig) -> dict:
    resume_from = preflight(cfg, "rl")
    # A policy vLLM cannot serve (e.g. MLA on vLLM's CPU backend) rolls out with transformers generate when
    # colocated; a served vLLM cannot fall back, so that is an error naming the field.
    if cfg.use_vllm and not use_vllm_for(cfg.model_name_or_path, served=cfg.vllm_mode == "server"):
        cfg.use_vllm = False
    reward_funcs, rewards = build_reward_funcs(cfg)
    rows, where, metrics = load_prompt_rows(cfg, rewards)
    tokenizer = load_tokenizer(cfg)
    dataset, fingerprint, lengths = prompt_dataset(cfg, rows, tokenizer, metrics)
    model = load_policy(cfg, tokenizer)
    stop_ids = stop_token_ids(model, tokenizer, chat_templates.end_of_turn(tokenizer))  # before the Trainer's
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=cfg, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=stage_callbacks(cfg))
    if trainer.accelerator.is_main_process:
        trainer.monitor = RolloutMonitor(Path(cfg.output_dir), cfg.rollout_samples, cfg.alert_window,
                                         cfg.alert_fraction, cfg.accuracy_reward, printer=trainer.accelerator.print,
                                         wandb_run=_wandb_run(cfg), resume_step=resumed_step(resume_from),
                                         seed=cfg.seed)
    begin(trainer, cfg, f"{launch_summary('rl', trainer, cfg)}; {len(dataset)} prompts from {where}, {lengths}; "
                        f"rewards {rewards}; loss {cfg.loss_type}, importance sampling "
                        f"{cfg.importance_sampling_level}, "
                        f"beta {cfg.beta}; rollouts from "
                        + (f"vLLM {cfg.vllm_mode}" if cfg.use_vllm else "transformers generate"), resume_from)
    check = held_out_pass_at_1_check(cfg, tokenizer, stop_ids) if cfg.suite is not None and cfg.held_out_eval else None
    if check is not None:
        check.before(trainer, resume_from)

    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics.update({"train_wall_seconds": time.perf_counter() - start, **train_metrics(result)})
    return finish(trainer, cfg, tokenizer, stage="rl", reload=lambda: load_policy(cfg, tokenizer), stop_ids=stop_ids,
                  fingerprint=fingerprint, metrics=metrics, evaluate=check.after if check is not None else None)


def _wandb_run(cfg: GRPOConfig):
    if "wandb" not in (cfg.report_to or []):
        return None
    import wandb

    return wandb.run


def main(argv: list[str] | None = None) -> dict:
    return stage_main(GRPOConfig, run, argv)
