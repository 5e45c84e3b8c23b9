"""The fields every TRL stage config (sft, preference, rl, rl.reward_model, distill) shares, declared once.

Each stage's config subclasses `StageFields` (and `LoraFields`, `DecontaminationFields`, `PromptFields` where
it has them) before its TRL config, names its default run directory and data, and calls
`StageFields.__post_init__` through `super()`:

    @dataclass
    class SFTConfig(DecontaminationFields, LoraFields, StageFields, trl.SFTConfig):
        default_output_dir: ClassVar[str] = "out/sft"
        default_sources: ClassVar[list[dict] | None] = [{"path": "builtin:arithmetic_chat"}]

A dataclass collects fields along the reversed MRO, so these declarations replace TrainingArguments' fields
of the same name (output_dir, bf16, gradient_checkpointing, resume_from_checkpoint) with ours. One name per
idea across stages (issue 29): distillation's old prompt_suite / prompt_split / prompt_data_path are rl's
suite / suite_split / suite_data_path (core/recipe.py RENAMED_FIELDS points old recipes to them).
"""

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from core.recipe import help_field


@dataclass
class StageFields:
    """The checkpoint, tokenizer, template, data and run directory of a stage, and TrainingArguments' fields
    whose TRL defaults do not suit a run here."""

    default_output_dir: ClassVar[str]  # out/<stage>: where a recipe without output_dir writes
    default_sources: ClassVar[list[dict] | None] = None  # the stage's data when the recipe names none

    model_name_or_path: str | None = help_field(
        "The checkpoint to train (required): an earlier stage's output directory, any local Hugging Face "
        "checkpoint (our core, Llama, Qwen3, SmolLM3, ...), or a hub id where the network allows.", default=None)
    tokenizer_name_or_path: str | None = help_field(
        "Tokenizer, when not the one saved with the model.", default=None)
    chat_template: str | None = help_field(
        "Chat template by name (chatml, smollm3, qwen3, llama3) or a .jinja path (chat_templates.load): its "
        "training variant is installed on the tokenizer and saved with the model. Null keeps the checkpoint's own "
        "template (an SFT output carries the one it was trained with); sft and rl.reward_model install smollm3 on a "
        "checkpoint that has none (a pretrained base model). sft, preference and rl.reward_model add the "
        "control tokens the tokenizer lacks (embeddings resized); rl and distill cannot (their vLLM engine or "
        "teacher shares the vocabulary) and refuse such a template by name.", default=None)
    attn_implementation: str = help_field("eager | sdpa | flash_attention_2 | flex_attention", default="sdpa")
    sources: list[dict] | None = help_field(
        "Data sources: {path, split, name, subset, max_rows, seed} (core/sources.py); path is a builtin: generator, a "
        "local .jsonl/.json/.parquet/.arrow file, or a Hugging Face dataset name. What rows each stage reads: "
        "README's data formats. Default: the stage's built-in data (sft builtin:arithmetic_chat, preference "
        "builtin:arithmetic_pairs, rl.reward_model builtin:arithmetic_preferences; rl and distill take `suite` "
        "instead).", default=None)
    output_dir: str | None = help_field(
        "Run directory: checkpoint-*/, metrics.jsonl, then the final model and stage.json. Default: out/<stage> "
        "(out/grpo for rl).",
        default=None)
    resume_from_checkpoint: str | None = help_field(
        "Continue an interrupted run: `true` (or `latest`) for the newest complete checkpoint-* in output_dir, or "
        "the path of one checkpoint (TrainingArguments' field, which Trainer scripts read the same way).",
        default=None)
    bf16: bool | None = help_field(
        "bf16 mixed precision; default: on with a bf16 CUDA device, off on CPU (TRL's default, on, fails on a CPU "
        "machine).", default=None)
    gradient_checkpointing: bool = help_field(
        "Recompute activations in the backward pass (TRL's default is on: it only costs time at tiny sizes; turn it "
        "on in GPU-scale recipes).", default=False)

    def __post_init__(self):
        """Before TRL's __post_init__: `use_cpu` on a machine without an accelerator, bf16 only where it runs, the
        stage's run directory and data.

        Without `use_cpu`, TrainingArguments under `accelerate launch --multi_gpu` on a CPU machine sets up world
        size 1 in every process (parallel_mode NOT_PARALLEL); with it, gloo DDP of the real world size (checked
        with 2 processes). TRL's bf16 default (on) fails on a CPU machine."""
        if vars(self).get("chat_template_path") is not None:  # TRL's SFTConfig and RewardConfig have it
            # TRL would install this file over `chat_template` without a word (issue 11).
            raise ValueError(f"chat_template_path={self.chat_template_path!r}: set chat_template instead, which takes "
                             f"a template name or a .jinja path and installs its training variant")
        if not torch.accelerator.is_available():
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.output_dir is None:
            self.output_dir = self.default_output_dir
        if self.sources is None and self.default_sources is not None:
            self.sources = copy.deepcopy(self.default_sources)
        super().__post_init__()


@dataclass
class LoraFields:
    """LoRA through PEFT (`lora_config` builds the adapter config from these)."""

    use_peft: bool = help_field(
        "Train a LoRA adapter instead of every weight; it is merged into the saved model (and, in rl, into vLLM's "
        "weights at every sync). Preference: the reference is the model with the adapter disabled (TRL). Reward "
        "models: the score head is trained in full. Single process, DDP and ZeRO-1/2 only: under FSDP2 and ZeRO-3 "
        "every stage refuses it before anything loads (core/lifecycle.py LORA_REFUSED).", default=False)
    lora_r: int = help_field("LoRA rank.", default=16)
    lora_alpha: int = help_field("LoRA alpha (scale = alpha / r).", default=32)
    lora_dropout: float = help_field("LoRA dropout.", default=0.0)
    lora_target_modules: list[str] = help_field("Modules that get adapters ('all-linear' or names).",
                                                default_factory=lambda: ["all-linear"])


@dataclass
class DecontaminationFields:
    """The training rows' check against evaluation prompts (stages whose rows carry prompts: sft, rl)."""

    decontaminate_against: list[dict] = help_field(
        "Evaluation sets whose prompts no training row may contain ([{suite, split, data_path}] of "
        "rewards/suites.py): a row whose prompt shares a word 8-gram with one (open-r1's test, "
        "core/decontaminate.py) is dropped and counted before training. Held-out splits only: the tiny "
        "recipes train on the arithmetic train split. [] turns it off.",
        default_factory=lambda: [{"suite": "arithmetic", "split": "test"}])


@dataclass
class PromptFields:
    """Prompts from a reward suite or from data sources (the stages that sample: rl, distill)."""

    suite: str | None = help_field(
        "Prompts from a reward suite (rewards/suites.py: arithmetic, gsm8k, math), with the suite's `answer` "
        "column. Exactly one of suite and sources (rows with a `prompt` column: a string or a list of chat "
        "messages, plus the columns the rewards read, e.g. `answer`).", default=None)
    suite_split: str = help_field("The suite split to train on (the `test` split stays held out).", default="train")
    suite_data_path: str | None = help_field("The local jsonl the gsm8k / math suites read.", default=None)

    def __post_init__(self):
        if (self.suite is None) == (self.sources is None):
            raise ValueError(f"give exactly one of `suite` (e.g. arithmetic) and `sources` (rows with a `prompt` "
                             f"column); got suite={self.suite!r}, sources={self.sources!r}")
        super().__post_init__()


@dataclass
class VLLMFields:
    """The vLLM engine of the stages that sample with TRL's vLLM backend (rl, distill; core/vllm/trl.py)."""

    vllm_kv_cache_memory_bytes: int = help_field(
        "KV-cache size of the colocated vLLM engine on a CPU machine (vLLM's CPU default reserves a fraction of "
        "host RAM, which fails beside a training process). On GPUs TRL's vllm_gpu_memory_utilization applies.",
        default=256 << 20)
    vllm_cpu_compile: bool = help_field(
        "On a CPU machine, let the colocated engine compile the model with inductor (vLLM's CPU default) instead of "
        "running eager. Every engine start then compiles first (tens of seconds on 2 cores), and rollouts run faster: "
        "bench/rl_rollout.py measures both. On GPUs TRL's engine settings apply (compiled, with CUDA graphs).",
        default=False)
    vllm_request_timeout: float = help_field(
        "Served mode: seconds one HTTP request to the vLLM server may take (generation or weight sync) before every "
        "trainer rank fails naming the server. TRL's requests have no timeout: a stalled server hangs the run.",
        default=300.0)


def lora_config(cfg, task_type: str = "CAUSAL_LM"):
    """PEFT's LoraConfig from a stage config's use_peft / lora_* fields, or None without `use_peft`.

    task_type SEQ_CLS (reward models): PEFT trains the score head in full (modules_to_save), as TRL's
    docs advise."""
    if not cfg.use_peft:
        return None
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type=task_type,
                      target_modules=targets[0] if targets == ["all-linear"] else targets)
