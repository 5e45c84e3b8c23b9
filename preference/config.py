"""PreferenceConfig: one recipe for DPO (any of TRL's loss types, or a weighted mix), KTO and ORPO.

Design (issue 14): the stage has one config class, a subclass of TRL's `DPOConfig`, with a `method`
field. It declares the fields of all three TRL configs (DPO's are inherited; KTO's
`desirable_weight`/`undesirable_weight` and ORPO's `max_completion_length`, `padding_value`,
`generate_during_eval`, `is_encoder_decoder` are added with TRL's help and defaults), plus the
smolforge fields (model, template, data, LoRA, resume). `trainer_args(cfg)` then builds the TRL
config of the chosen method (`trl.DPOConfig`, `trl.KTOConfig`, `trl.experimental.orpo.ORPOConfig`)
from the resolved fields. A field that the chosen method does not read, set away from its default,
is an error naming it (e.g. `loss_weights` with `method: orpo`), instead of being silently ignored.

Where the TRL configs' defaults differ, a field left at this config's default takes the chosen
method's TRL default: `loss_type` (null here) becomes DPO's `[sigmoid]` or KTO's `kto`, and KTO's
`train_sampling_strategy` is `sequential` (its KL estimate pairs each row with its batch neighbours).

Other defaults differ from TRL's as in the SFT stage: `bf16` off on CPU, `gradient_checkpointing`
off (it only costs time at tiny sizes), `use_cpu` on a machine without an accelerator (so a
2-process `accelerate launch` gets a real world size of 2 over gloo).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import trl
from trl.experimental.orpo import ORPOConfig

from core.recipe import help_field as _help
from core.trainer_defaults import LoraFields, StageFields

METHODS = ("dpo", "kto", "orpo")

# TRL 1.16's DPO loss types (DPOConfig.loss_type's help; tests/test_preference_stage.py checks the two
# agree). TRL itself checks a name only inside the first loss computation, after tokenisation and the
# reference pass: checked here so a typo stops the run at parse time.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _trl_field(config: type, name: str):
    """The field `name` of a TRL config, with TRL's default and help (declared here for the other methods)."""
    source = config.__dataclass_fields__[name]
    if source.default_factory is not dataclasses.MISSING:
        return field(default_factory=source.default_factory, metadata=dict(source.metadata))
    return field(default=source.default, metadata=dict(source.metadata))


@dataclass
class PreferenceConfig(LoraFields, StageFields, trl.DPOConfig):
    method: Literal["dpo", "kto", "orpo"] = _help(
        "dpo: TRL's DPOTrainer with `loss_type` (sigmoid = DPO, apo_zero / apo_down = APO, ipo, hinge, ...; a list "
        "mixes them with `loss_weights`). kto: TRL's KTOTrainer (prompt/completion/label rows, or pairs it unpairs). "
        "orpo: TRL's experimental ORPOTrainer (no reference model; `beta` is the odds-ratio weight lambda).",
        default="dpo")

    default_output_dir: ClassVar[str] = "out/preference"
    default_sources: ClassVar[list[dict]] = [{"path": "builtin:arithmetic_pairs"}]
    # `model_name_or_path` is also the frozen reference (dpo, kto): usually the SFT stage's output. `sources`:
    # builtin:arithmetic_pairs, builtin:arithmetic_kto, a local file (e.g. preference.build_pairs' output) or a
    # Hugging Face dataset; row formats in preference/data.py (core/trainer_defaults.py declares them).

    # --- data ------------------------------------------------------------------------------------
    truncation: bool = _help(
        "Let TRL truncate rows longer than max_length (keep_start; DPO drops a row whose prompt alone fills it). "
        "Off: such a row is an error naming it.", default=False)

    # --- fields of the other methods' TRL configs -------------------------------------------------
    desirable_weight: float = _trl_field(trl.KTOConfig, "desirable_weight")
    undesirable_weight: float = _trl_field(trl.KTOConfig, "undesirable_weight")
    max_completion_length: int | None = _trl_field(ORPOConfig, "max_completion_length")
    padding_value: int | None = _trl_field(ORPOConfig, "padding_value")
    generate_during_eval: bool = _trl_field(ORPOConfig, "generate_during_eval")
    is_encoder_decoder: bool | None = _trl_field(ORPOConfig, "is_encoder_decoder")

    # --- TRL defaults changed --------------------------------------------------------------------
    loss_type: list[str] | None = _help(
        f"dpo: one or more of {list(DPO_LOSS_TYPES)} (default [sigmoid]); several are mixed with loss_weights "
        f"(e.g. MPO). kto: one of {list(KTO_LOSS_TYPES)} (default kto). orpo: not used.", default=None)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; methods: {list(METHODS)}")
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.loss_type is None and self.method != "orpo":
            self.loss_type = ["sigmoid"] if self.method == "dpo" else ["kto"]
        if self.method == "kto" and self.train_sampling_strategy == "random":
            self.train_sampling_strategy = trl.KTOConfig.__dataclass_fields__["train_sampling_strategy"].default
        # Before TRL's __post_init__, which resolves some values (pad_to_multiple_of "auto" -> None).
        self._check_method_fields()
        super().__post_init__()  # StageFields: devices, run directory, data (core/trainer_defaults.py)
        if self.method == "dpo":
            unknown = [name for name in self.loss_type if name not in DPO_LOSS_TYPES]
            if unknown:
                raise ValueError(f"loss_type {unknown} unknown to DPO; loss types: {list(DPO_LOSS_TYPES)}")
        if self.method == "kto" and (len(self.loss_type) != 1 or self.loss_type[0] not in KTO_LOSS_TYPES):
            raise ValueError(f"loss_type={self.loss_type}: KTO takes one loss type, one of {list(KTO_LOSS_TYPES)}")
        if self.use_liger_kernel and not torch.cuda.is_available():
            raise ValueError("use_liger_kernel: Liger's kernels are Triton kernels and need a CUDA device; "
                             "set use_liger_kernel: false on this machine")

    def _check_method_fields(self) -> None:
        """A field only another method reads, set away from its default, is a mistake: name it."""
        own = _trl_fields(TRL_CONFIGS[self.method])
        defaults = {f.name: f for f in dataclasses.fields(PreferenceConfig)}
        for name in sorted(set().union(*map(_trl_fields, TRL_CONFIGS.values())) - own):
            value = getattr(self, name)
            default = defaults[name]
            default_value = (default.default_factory() if default.default_factory is not dataclasses.MISSING
                             else default.default)
            if value != default_value:
                users = [m for m, c in TRL_CONFIGS.items() if name in _trl_fields(c)]
                raise ValueError(f"{name}={value!r} is a field of method {' / '.join(users)}; method {self.method} "
                                 f"does not use it: remove it from the recipe or change `method`")


TRL_CONFIGS: dict[str, type] = {"dpo": trl.DPOConfig, "kto": trl.KTOConfig, "orpo": ORPOConfig}


def _trl_fields(config: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config) if f.init}


def trainer_args(cfg: PreferenceConfig) -> Any:
    """The TRL config of `cfg.method`, from the resolved fields of `cfg` (the fields it declares)."""
    config = TRL_CONFIGS[cfg.method]
    values = {name: getattr(cfg, name) for name in _trl_fields(config)}
    if cfg.method == "kto":
        values["loss_type"] = cfg.loss_type[0]
    # `logging_dir` and friends were resolved by cfg's __post_init__; passing them back is a no-op.
    return config(**values)
