"""RewardModelConfig: TRL's RewardConfig plus the fields of a smolforge reward-model recipe (model,
template, preference data, held-out pairs, LoRA, resume), each with its meaning.

TRL's own fields keep their meaning: `center_rewards_coefficient` (mean-zero rewards, Eisenstein et
al. 2023, Eq. 2), `max_length`, `eos_token`, `disable_dropout`, `model_init_kwargs`. Defaults differ
from TRL's where a CPU run needs it (`bf16`, `gradient_checkpointing`, `use_cpu`, as in sft/config.py),
and a row longer than `max_length` is an error naming it (TRL drops such rows without a word).
"""

from dataclasses import dataclass
from typing import ClassVar

import trl

from core.recipe import help_field as _help
from core.trainer_defaults import LoraFields, StageFields


@dataclass
class RewardModelConfig(LoraFields, StageFields, trl.RewardConfig):
    default_output_dir: ClassVar[str] = "out/reward_model"
    default_sources: ClassVar[list[dict]] = [{"path": "builtin:arithmetic_preferences"}]
    # `model_name_or_path`: our core gets a score head (AutoModelForSequenceClassification, num_labels=1), any
    # other HF checkpoint its own; the SFT model is the usual start (InstructGPT, Ouyang et al. 2022).
    # `chat_template` renders conversational pairs, is saved with the reward model, and rewards/reward_model_scorer.py
    # renders GRPO completions with it. `sources`: rows with `chosen` and `rejected` (+ optional `prompt`,
    # `margin`, `chat_template_kwargs`, `tools`), all strings or all message lists (core/trainer_defaults.py).

    # --- data ------------------------------------------------------------------------------------
    eval_sources: list[dict] | None = _help(
        "Held-out pairs, same format: the share of pairs whose chosen side scores higher is printed before and "
        "after training (per `kind` column too, where the rows have one) and written to stage.json. Null skips it.",
        default_factory=lambda: [{"path": "builtin:arithmetic_preferences", "split": "test"}])

    def __post_init__(self):
        super().__post_init__()  # StageFields: devices, run directory, data (core/trainer_defaults.py)
