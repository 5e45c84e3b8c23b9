"""RewardModelConfig: TRL's RewardConfig plus the fields of a smolforge reward-model recipe (model,
template, preference data, held-out pairs, LoRA, resume), each with its meaning.

TRL's own fields keep their meaning: `center_rewards_coefficient` (mean-zero rewards, Eisenstein et
al. 2023, Eq. 2), `max_length`, `eos_token`, `disable_dropout`, `model_init_kwargs`. Defaults differ
from TRL's where a CPU run needs it (`bf16`, `gradient_checkpointing`, `use_cpu`, as in sft/config.py),
and a row longer than `max_length` is an error naming it (TRL drops such rows without a word).
"""

from dataclasses import dataclass

import trl

from core.recipe import help_field as _help
from core.trainer_defaults import LoraFields, StageFields, device_defaults


@dataclass
class RewardModelConfig(LoraFields, StageFields, trl.RewardConfig):
    # --- model and tokenizer ---------------------------------------------------------------------
    model_name_or_path: str | None = _help(
        "The checkpoint to start from: our core (a score head is added: AutoModelForSequenceClassification, "
        "num_labels=1), any local HF checkpoint (causal LM or reward model), or a hub id. The SFT model is the "
        "usual start (InstructGPT, Ouyang et al. 2022).", default=None)
    tokenizer_name_or_path: str | None = _help("Tokenizer, when not the one saved with the model.", default=None)
    chat_template: str = _help(
        "Chat template by name (chatml, smollm3, qwen3, llama3) or a .jinja path (chat_templates.load), used to "
        "render conversational pairs; missing control tokens are added (embeddings resized). It is saved with the "
        "reward model, and rewards/reward_model.py renders GRPO completions with it.", default="smollm3")
    attn_implementation: str = _help("eager | sdpa | flash_attention_2 | flex_attention", default="sdpa")

    # --- data ------------------------------------------------------------------------------------
    sources: list[dict] = _help(
        "Preference sources: {path, split, name, max_rows, seed} (core/sources.py); rows hold `chosen` and "
        "`rejected` (+ optional `prompt`, `margin`, `chat_template_kwargs`, `tools`), all strings or all message "
        "lists. builtin:arithmetic_preferences is the arithmetic assistant's pairs.",
        default_factory=lambda: [{"path": "builtin:arithmetic_preferences"}])
    eval_sources: list[dict] | None = _help(
        "Held-out pairs, same format: the share of pairs whose chosen side scores higher is printed before and "
        "after training (per `kind` column too, where the rows have one) and written to stage.json. Null skips it.",
        default_factory=lambda: [{"path": "builtin:arithmetic_preferences", "split": "test"}])

    # --- TRL defaults changed --------------------------------------------------------------------
    output_dir: str = _help("Run directory: checkpoint-*/, metrics.jsonl, then the final model and stage.json.",
                            default="out/reward_model")

    def __post_init__(self):
        device_defaults(self)  # use_cpu on CPU machines, bf16 where it runs (core/trainer_defaults.py)
        if self.chat_template_path is not None:
            # TRL would install this file over `chat_template` without a word (issue 11).
            raise ValueError(f"chat_template_path={self.chat_template_path!r}: set chat_template instead, which takes "
                             f"a template name or a .jinja path")
        super().__post_init__()
