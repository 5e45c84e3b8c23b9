"""DistillConfig: TRL's DistillationConfig plus the fields of a smolforge distillation recipe (student,
teacher, prompts, divergence, on-policy fraction, off-policy loss, token budget), each
with its meaning.

Defaults differ from TRL's where a smolforge run needs it: `use_cpu` on a CPU machine (2-process gloo
DDP), bf16 only on CUDA, no gradient checkpointing, `max_completion_length` 64, callback states restored
on resume (the token counters), and `beta` chosen by `divergence` (TRL's `beta` alone: 0 forward KL,
1 reverse KL, between: generalised JSD).
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import trl

from core.recipe import help_field as _help
from core.trainer_defaults import LoraFields, PromptFields, StageFields, VLLMFields


DIVERGENCE_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


@dataclass
class DistillConfig(PromptFields, VLLMFields, LoraFields, StageFields, trl.DistillationConfig):
    default_output_dir: ClassVar[str] = "out/distill"
    # `model_name_or_path` (core/trainer_defaults.py) is the student: a chat checkpoint (an SFT output, or any
    # local HF causal LM with a chat template). `teacher_model_name_or_path` is TRL's field; TRL reads it only
    # when the teacher is passed to its trainer as a string, so distill/train.py loads it and passes the model
    # (issue 17). `chat_template`'s control tokens must already be in the tokenizer (student and teacher share
    # it). Prompts: `suite` or `sources` (PromptFields); `attn_implementation` is the student's and teacher's.

    # --- prompts ---------------------------------------------------------------------------------
    max_prompts: int | None = _help("Use only the first N prompts.", default=None)

    # --- objective -------------------------------------------------------------------------------
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = _help(
        "Per-token divergence between the student's and the teacher's next-token distributions: reverse_kl "
        "(KL(student||teacher), mode-seeking; the usual on-policy distillation loss), forward_kl "
        "(KL(teacher||student)), or jsd (generalised Jensen-Shannon with `beta`).", default="reverse_kl")
    beta: float | None = _help(
        "Generalised JSD interpolation (divergence: jsd only; default 0.5). TRL's convention: 0 is forward KL, "
        "1 reverse KL; reverse_kl / forward_kl set it.", default=None)
    lmbda: float = _help(
        "On-policy fraction λ (GKD, Agarwal et al. 2024): each optimizer step's completions are sampled by the "
        "student with probability λ, else by the teacher (a seeded draw per step, the same on every process). "
        "1: fully on-policy (TRL's DistillationTrainer).", default=1.0)
    off_policy_loss: Literal["divergence", "sft"] = _help(
        "Loss on teacher-sampled completions: divergence (supervised KD: the same divergence on the teacher's "
        "samples), or sft (cross-entropy on the teacher's tokens: sequence-level KD, Kim & Rush 2016, i.e. SFT on "
        "the teacher's own samples). lmbda: 0 with sft is the off-policy baseline.", default="divergence")
    teacher_model_server_url: str | None = _help(
        "A vLLM server serving the teacher (`python -m rl.serve --model_name_or_path <teacher>`), e.g. "
        "http://127.0.0.1:8000 (TRL's ServerDistillationConfig field): the teacher's log-probs of the student's "
        "tokens come from it, over the whole vocabulary (vLLM prompt log-probs), so the teacher is not held in the "
        "trainer's memory and the divergence is the same as in-process. teacher_model_name_or_path still names the "
        "checkpoint it serves (its tokenizer and vocabulary are checked). Needs lmbda 1: the teacher does not "
        "sample. Null: the teacher runs in-process.", default=None)
    teacher_request_timeout: float = _help(
        "Seconds one request to the teacher server may take; past it the run fails naming the server.", default=120.0)
    token_budget: int | None = _help(
        "Stop once this many completion tokens have been trained on (all processes together), so on- and "
        "off-policy runs compare at an equal number of student tokens. Null: max_steps / epochs decide.",
        default=None)

    # --- TRL defaults changed --------------------------------------------------------------------
    max_completion_length: int | None = _help(
        "Tokens sampled per completion (TRL's default 512 is for chat models; the tiny task answers in a few).",
        default=64)
    restore_callback_states_from_checkpoint: bool = _help(
        "Restore stateful callbacks on resume (transformers' default: off). On here: the completion-token "
        "counters and the token_budget stop live in one (distill/train.py CompletionTokens).", default=True)

    def __post_init__(self):
        if self.divergence == "jsd":
            self.beta = 0.5 if self.beta is None else self.beta
            if not 0.0 < self.beta < 1.0:
                raise ValueError(f"beta={self.beta}: divergence jsd needs 0 < beta < 1 (beta 0 is forward_kl, "
                                 f"1 is reverse_kl: name those instead)")
        else:
            if self.beta is not None and self.beta != DIVERGENCE_BETA[self.divergence]:
                raise ValueError(f"beta={self.beta} contradicts divergence {self.divergence!r} (beta "
                                 f"{DIVERGENCE_BETA[self.divergence]}); set divergence: jsd to interpolate")
            self.beta = DIVERGENCE_BETA[self.divergence]
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda={self.lmbda}: the on-policy fraction must be between 0 and 1")
        if self.teacher_model_server_url is not None and self.lmbda != 1.0:
            raise ValueError(f"teacher_model_server_url with lmbda={self.lmbda}: a served teacher scores the student's "
                             f"samples but does not sample itself; set lmbda 1 or run the teacher in-process")
        super().__post_init__()  # suite xor sources, devices, run directory (core/trainer_defaults.py)
