"""SFTConfig: TRL's SFTConfig plus the fields of a smolforge SFT recipe (model, template, data,
reasoning mix, LoRA, resume, generation check), each with its meaning.

The model, tokenizer, template, data and run-directory fields are every stage's (core/trainer_defaults.py).
Defaults differ from TRL's where the issue asks for it: assistant-only loss on, packing on with
TRL's `bfd` strategy (padding-free rows with per-document position ids), and
`truncation: false` (TRL always truncates to `max_length`; here an over-long row is an error unless
truncation is asked for).
"""

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import trl

from core.recipe import help_field as _help
from core.trainer_defaults import DecontaminationFields, LoraFields, StageFields


@dataclass
class SFTConfig(DecontaminationFields, LoraFields, StageFields, trl.SFTConfig):
    default_output_dir: ClassVar[str] = "out/sft"
    default_sources: ClassVar[list[dict]] = [{"path": "builtin:arithmetic_chat"}]

    # --- data ------------------------------------------------------------------------------------
    # `sources` (core/trainer_defaults.py): rows with `messages`, or `prompt` + `completion` (sft/data.py).
    think_ratio: float | None = _help(
        "Fraction of training conversations in think mode (rows with reasoning); the larger pool is subsampled. "
        "Null keeps the data as it is.", default=None)
    truncation: bool = _help(
        "Truncate rows longer than max_length (TRL's behaviour). Off: such a row is an error naming it.", default=False)

    # --- run control -----------------------------------------------------------------------------
    generation_eval: dict[str, Any] | str | None = _help(
        "Held-out prompts to generate from before and after SFT, printing how often a generation ends with the "
        "end-of-turn token and follows the requested reasoning mode: {path, split, max_rows, max_new_tokens} "
        "(a JSON string on the command line).", default=None)

    # --- TRL defaults changed --------------------------------------------------------------------
    assistant_only_loss: bool = _help("Train on assistant turns only ({% generation %} spans).", default=True)
    packing: bool = _help("Pack rows into max_length sequences (padding-free, per-document position ids).",
                          default=True)

    def __post_init__(self):
        super().__post_init__()  # StageFields: devices, run directory, data (core/trainer_defaults.py)
        if isinstance(self.generation_eval, str):  # from the command line, as TRL does for its dict fields
            self.generation_eval = json.loads(self.generation_eval)
