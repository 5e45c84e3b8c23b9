"""GRPOConfig: TRL's GRPOConfig plus the fields of a smolforge RL recipe (model, prompts, rewards by
name, prompt-length limit, LoRA, the CPU vLLM engine, rollout logging and alerts, held-out check),
each with its meaning.

Every TRL knob stays reachable under its TRL name: `loss_type` (grpo, dr_grpo, dapo, bnpo, ...),
`importance_sampling_level: sequence` (GSPO), `beta` (KL to a reference model), `epsilon` /
`epsilon_high` (DAPO's clip-higher), `scale_rewards`, `mask_truncated_completions`, `use_vllm` /
`vllm_mode` (colocate, server), `chat_template_kwargs` (e.g. `{enable_thinking: false}`),
`reward_weights`, `use_liger_kernel`.

Defaults differ from TRL's where it matters here, each said at the field: `bf16` (off on CPU),
`gradient_checkpointing` (off), `output_dir`, `logging_steps`, and on a CPU
machine `use_cpu` (so `accelerate launch` with 2 processes gives a real world size of 2 over gloo).
"""

import json
from dataclasses import dataclass
from typing import ClassVar

import trl

from core.recipe import help_field as _help
from core.trainer_defaults import DecontaminationFields, LoraFields, PromptFields, StageFields, VLLMFields


@dataclass
class GRPOConfig(PromptFields, VLLMFields, DecontaminationFields, LoraFields, StageFields, trl.GRPOConfig):
    default_output_dir: ClassVar[str] = "out/grpo"
    # `model_name_or_path` (core/trainer_defaults.py): the policy, usually an SFT output (tokenizer with chat
    # template included); the colocated / served vLLM engine loads the same directory. Prompts: `suite` or
    # `sources` (PromptFields).

    # --- prompts ---------------------------------------------------------------------------------
    max_prompt_length: int | None = _help(
        "Prompts longer than this many tokens (as rendered by the chat template) are dropped before training and "
        "counted (printed, and `data/prompts_dropped_too_long` in stage.json). Null keeps every prompt.",
        default=None)

    # --- rewards ---------------------------------------------------------------------------------
    reward_funcs: list[str] | None = _help(
        "Reward functions by name from rewards.functions.REWARD_FUNCS (accuracy, format, boxed_format, tag_count, "
        "reasoning_steps, cosine_scaled, soft_overlong_punishment, repetition_penalty). Default: the suite's rewards "
        "and weights. Weights are TRL's `reward_weights`, in the same order.", default=None)
    reward_kwargs: dict[str, dict] | str | None = _help(
        "Knobs bound onto reward functions, by reward name, e.g. {soft_overlong_punishment: {soft_punish_cache: 64}}. "
        "Over the suite's own; a JSON string on the command line. soft_overlong_punishment's max_completion_len "
        "defaults to max_completion_length.",
        default=None)

    reward_models: list[dict] | None = _help(
        "Learned reward models scored next to reward_funcs, one mapping each (rewards/reward_model_scorer.py "
        "RewardModelSpec): {path: out/tiny/reward_model, weight: 0.5, normalize: true, batch_size: 16}, or a served "
        "one {url: 'http://127.0.0.1:8011', weight: 0.5, timeout: 60}. Logged as rewards/reward_model/mean "
        "(reward_model_<i> with several). With reward_funcs: [] the learned reward is the only one.", default=None)

    # --- vLLM ------------------------------------------------------------------------------------
    vllm_sync_check: int = _help(
        "After every weight sync, compare vLLM's greedy tokens (up to 16) and their log-probs with the policy's own on "
        "this many of the batch's prompts; logged as vllm/sync_greedy_match and vllm/sync_logprob_max_diff. 0: off.",
        default=0)
    # --- rollout logging and alerts --------------------------------------------------------------
    rollout_samples: int = _help(
        "Completions (with their prompt and rewards) written per logging step to output_dir/rollouts.jsonl (and a "
        "wandb table when report_to has wandb).", default=8)
    alert_window: int = _help(
        "Logging steps an alert looks back over: truncated or zero-variance fractions above alert_fraction for this "
        "many logs in a row, or completion length rising over it while accuracy does not (length hacking).",
        default=5)
    alert_fraction: float = _help("The 'near 1' of the fraction alerts.", default=0.95)
    accuracy_reward: str = _help(
        "The reward whose mean stands for accuracy in the length-hacking alert and the held-out check.",
        default="accuracy")

    # --- run control -----------------------------------------------------------------------------
    held_out_eval: bool = _help(
        "With a suite: greedy pass@1 on its `test` split before and after training (same prompts, rendering and "
        "length limit as training), printed with the wall time and stored in stage.json.", default=True)

    # --- TRL defaults changed --------------------------------------------------------------------
    logging_steps: float = _help("Log (metrics.jsonl, rollouts, alerts) every this many steps.", default=1)

    def __post_init__(self):
        super().__post_init__()  # suite xor sources, devices, run directory (core/trainer_defaults.py)
        if isinstance(self.reward_kwargs, str):  # from the command line, as TRL does for its dict fields
            self.reward_kwargs = json.loads(self.reward_kwargs)
        if isinstance(self.reward_models, dict):  # one model, written as a single mapping
            self.reward_models = [self.reward_models]
