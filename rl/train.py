"""The RL stage: online GRPO with TRL's GRPOTrainer, rollouts from vLLM (colocated or served) or
transformers, verifiable rewards from `rewards/`.

Steps, in order: parse the recipe (rl/config.py); load the policy's tokenizer (its chat template
comes with the SFT checkpoint) and model; load the prompts and bind the rewards, checking both
(rl/data.py: an unknown reward, a missing column, a bad row fail here, named, before any engine
starts); drop over-long prompts (counted); measure held-out greedy pass@1; train with `GRPOTrainer`;
measure again; save the final model (LoRA merged) with stage.json atomically.

Where we deviate from TRL's GRPOTrainer (all in this file and rl/vllm_backend.py):
  - vLLM on CPU: eager engine with an explicit KV cache; weights synchronised with
    `core.vllm.update_weights` after each optimizer step (colocate), or through shared memory
    (server); served-mode requests time out and fail on every rank (rl/vllm_backend.py);
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
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer import TRAINER_STATE_NAME

import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint, save_checkpoint, trainer_resume_point
from core.decontaminate import NGramIndex, decontaminate_rows, evaluation_prompts
from core.faults import FaultCallback, FaultInjectionMixin
from core.generation import GenerationSettings, generate_transformers, to_sample
from core.metrics import MetricsCallback
from core.moe import MoEStepCallback
from core.recipe import parse_recipe, resolved_recipe
from core.trainer_defaults import lora_config
from core.vllm import use_vllm_for
from rewards.functions import REWARD_FUNCS, compute_rewards
from rewards.suites import get_suite
from rewards.suites import load_rows as load_suite_rows

from .config import GRPOConfig
from .data import (as_conversations, build_reward_models, build_rewards, check_reward_columns, drop_long_prompts,
                   load_prompts, prompt_ids, reward_model_specs, reward_setup)
from .rollouts import RolloutMonitor, rollout_rows
from .vllm_backend import use_smolforge_vllm


class GRPOTrainer(FaultInjectionMixin, trl.GRPOTrainer):
    """TRL's GRPOTrainer with smolforge's vLLM backend (rl/vllm_backend.py), the sync check and rollout logging."""

    def __init__(self, *args, monitor: RolloutMonitor | None = None, **kwargs):
        cfg = kwargs["args"]
        with use_smolforge_vllm(cfg.vllm_kv_cache_memory_bytes, cfg.vllm_request_timeout, cfg.vllm_cpu_compile):
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
        training = self.model.training
        rollouts = self._rollout_rows() if self.monitor is not None and training else []
        super().log(logs, start_time)  # TRL averages its metrics into `logs`, then the callbacks write them
        if self.monitor is not None and training:
            self.monitor.record(self.state.global_step, logs, rollouts)

    def _rollout_rows(self) -> list[dict]:
        return rollout_rows(self._logs["prompt"], self._logs["completion"], self._logs["rewards"],
                            self._logs["advantages"])


def load_tokenizer(cfg: GRPOConfig):
    # Left padding: TRL pads prompts on the left for generation.
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, padding_side="left")
    if tokenizer.pad_token is None:
        raise ValueError(f"{cfg.model_name_or_path}: the tokenizer has no pad token; TRL would pad with the eos token, "
                         f"which it then cannot tell from a real end. Give the policy a pad token (the SFT stage adds "
                         f"<|pad|>)")
    return tokenizer


def load_model(cfg: GRPOConfig):
    kwargs = {"attn_implementation": cfg.attn_implementation, "dtype": torch.float32, **(cfg.model_init_kwargs or {})}
    return AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs)



def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion, as TRL takes them: the generation config's, plus the tokenizer's eos."""
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ids + [e for e in (tokenizer.eos_token_id,) if e is not None and e not in ids]


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


def run(cfg: GRPOConfig) -> dict:
    if cfg.model_name_or_path is None:
        raise ValueError("model_name_or_path is required: the policy to train (e.g. out/tiny/sft)")
    # Before anything starts: a policy vLLM cannot serve (e.g. MLA on vLLM's CPU backend) rolls out with
    # transformers generate when colocated; a served vLLM cannot fall back, so that is an error naming the field.
    if cfg.use_vllm and not use_vllm_for(cfg.model_name_or_path, served=cfg.vllm_mode == "server"):
        cfg.use_vllm = False
    out = Path(cfg.output_dir)
    resume_from = trainer_resume_point(cfg)

    # Prompts and rewards first: a bad recipe fails before a model or an engine is loaded.
    names, weights, reward_kwargs = reward_setup(cfg)
    reward_models = reward_model_specs(cfg, names)
    rows, origins, where = load_prompts(cfg)
    rows, origins, n_contaminated = decontaminate_rows(
        rows, NGramIndex(evaluation_prompts(cfg.decontaminate_against)), f"rl ({where})", origins)
    check_reward_columns(rows, origins, names, where)
    cfg.reward_weights = weights + [spec.weight for spec in reward_models]
    tokenizer = load_tokenizer(cfg)
    template_kwargs = cfg.chat_template_kwargs or {}
    rows = as_conversations(rows, tokenizer)
    rows, lengths, dropped = drop_long_prompts(rows, tokenizer, cfg.max_prompt_length, template_kwargs)
    fingerprint = data_fingerprint([json.dumps(r, sort_keys=True) for r in rows])

    model = load_model(cfg)
    stop_ids = stop_token_ids(model, tokenizer)
    saved_eos = model.generation_config.eos_token_id
    held_out = None
    if cfg.suite is not None and cfg.held_out_eval:
        suite = get_suite(cfg.suite)
        held_out = as_conversations(load_suite_rows(suite, "test", cfg.suite_data_path), tokenizer)

    reward_funcs = build_rewards(names, reward_kwargs) + build_reward_models(reward_models)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=cfg,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=lora_config(cfg), callbacks=[MetricsCallback(cfg.output_dir), FaultCallback(), MoEStepCallback()])
    accelerator = trainer.accelerator
    if trainer.is_fsdp_enabled and cfg.use_peft:
        raise ValueError("use_peft with FSDP: the gathered weights would be the adapter model's; train LoRA with DDP")
    if accelerator.is_main_process:
        trainer.monitor = RolloutMonitor(out, cfg.rollout_samples, cfg.alert_window, cfg.alert_fraction,
                                         cfg.accuracy_reward, printer=accelerator.print,
                                         wandb_run=_wandb_run(cfg), resume_step=resumed_step(resume_from), seed=cfg.seed)
    backend = f"vLLM {cfg.vllm_mode}" if cfg.use_vllm else "transformers generate"
    accelerator.print(
        f"rl: {accelerator.num_processes} process(es) (world size {cfg.world_size}, {accelerator.distributed_type}); {len(rows)} prompts from "
        f"{where}, prompt tokens {min(lengths)}-{max(lengths)}, {dropped} dropped as longer than max_prompt_length; "
        f"rewards {dict(zip(names, weights))}; loss {cfg.loss_type}, importance sampling {cfg.importance_sampling_level}, "
        f"beta {cfg.beta}; rollouts from {backend}")
    if resume_from is not None:
        accelerator.print(f"resuming from {resume_from}")

    metrics = {"data/prompts": len(rows), "data/prompts_dropped_too_long": dropped,
               "data/prompts_dropped_contaminated": n_contaminated}
    if held_out is not None and accelerator.is_main_process and resume_from is None:
        metrics["held_out/pass@1_before"] = held_out_pass_at_1(trainer.model, tokenizer, held_out, cfg, stop_ids)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics["train_wall_seconds"] = time.perf_counter() - start
    metrics.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})

    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    final = trainer.model.merge_and_unload() if cfg.use_peft else trainer.model
    if accelerator.is_main_process:
        final.generation_config.eos_token_id = saved_eos
        final.generation_config.pad_token_id = tokenizer.pad_token_id
        if held_out is not None:
            metrics["held_out/pass@1_after"] = held_out_pass_at_1(final, tokenizer, held_out, cfg, stop_ids)
            before = metrics.get("held_out/pass@1_before")
            print(f"held-out pass@1 ({len(held_out)} prompts of suite {cfg.suite}, greedy): "
                  f"{'n/a (resumed)' if before is None else f'{before:.3f}'} -> {metrics['held_out/pass@1_after']:.3f}; "
                  f"GRPO wall time {metrics['train_wall_seconds']:.1f} s ({backend})")
        save_checkpoint(cfg.output_dir, final, tokenizer, stage="rl", recipe=resolved_recipe(cfg),
                        parent=cfg.model_name_or_path, data_fingerprint=fingerprint, metrics=metrics,
                        state_dict=state_dict)
        print(f"model written to {cfg.output_dir}")
    accelerator.wait_for_everyone()
    return metrics


def _wandb_run(cfg: GRPOConfig):
    if "wandb" not in (cfg.report_to or []):
        return None
    import wandb

    return wandb.run


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_recipe(GRPOConfig, args=argv)
    return run(cfg)
