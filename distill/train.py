"""The distillation stage: a student learns from a teacher's next-token distributions, on its own samples.

    python -m distill --config recipes/tiny/distill.yaml [--field value ...]

Built on TRL's `DistillationTrainer` (trl 1.16), not GKD from `trl.experimental`: it is the maintained
one (GKD warns users to move to it), it generates with vLLM (colocated or served) as well as
transformers, reads `prompt` rows (the rl / distill data format), computes the divergence chunk by
chunk without materialising the (B, T, V) logits, and normalises the loss by the completion tokens of
the whole optimizer step, so gradient accumulation and DDP are exact. GKD's two extra knobs (the
on-policy fraction λ and learning from the teacher's samples) are added here, in `DistillTrainer`.

Steps: parse the recipe (distill/config.py); load the student's and the teacher's tokenizers and refuse
a vocabulary mismatch (`check_same_vocabulary`) before any model is loaded; load the student and the
teacher; load and check the prompts (distill/data.py); train; save the student with stage.json.

Where we deviate from TRL's DistillationTrainer (all in `DistillTrainer` below):
  - the teacher is loaded here from `teacher_model_name_or_path` and passed to the trainer as a model
    (TRL reads that field only when a teacher *name* is passed to the trainer itself), or served by
    `python -m rl.serve` (`teacher_model_server_url`): its prompt log-probs of the student's samples over the
    whole vocabulary, so the divergence is the in-process one (TRL's ServerDistillationTrainer keeps only
    the teacher's top-1 when beta > 0, a sparse approximation);
  - λ (`lmbda`): each optimizer step's completions are sampled by the student with probability λ, else
    by the teacher (transformers `generate`, core/generation.py), a draw seeded by (seed, step) so a
    resumed run makes the same choices; TRL's trainer is λ = 1;
  - `off_policy_loss: sft` trains on teacher-sampled completions with cross-entropy on their tokens
    (sequence-level KD: SFT on the teacher's own samples), the off-policy baseline; `divergence`
    applies the recipe's divergence to them (supervised KD);
  - completion tokens are counted by who sampled them (`distill/student_tokens`, `distill/teacher_tokens`,
    kept across resume) and `token_budget` stops the run at a number of trained tokens, so on- and
    off-policy runs are compared at equal student tokens;
  - the colocated vLLM weight sync on CPU is `core/vllm/trl_sync.py` (vLLM's in-place reload);
  - `--resume_from_checkpoint true` picks the newest complete checkpoint (core/checkpoint.py), the final
    save is `core.checkpoint.save_checkpoint` (with stage.json), every log line goes to metrics.jsonl.

SMOLFORGE_FAULT=kill_after_step:N / kill_in_checkpoint:N (tests only, core/faults.py) kill the process
with SIGKILL right after, or in the middle of, writing the checkpoint of step N.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import ExportableState

import chat_templates
import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint, save_checkpoint, trainer_resume_point
from core.faults import FaultCallback, FaultInjectionMixin
from core.generation import GenerationSettings, generate_transformers
from core.metrics import MetricsCallback
from core.moe import MoEStepCallback
from core.recipe import parse_recipe, resolved_recipe
from core.vllm import use_vllm_for
from core.vllm.client import TimedVLLMClient
from core.vllm.trl_sync import ColocatedWeightSyncMixin

from .config import DistillConfig
from .data import check_prompt_lengths, load_prompts


class VocabularyMismatchError(ValueError):
    """The student and the teacher do not share a tokenizer: the divergence compares distributions over
    token ids, which must mean the same tokens."""


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Raise VocabularyMismatchError naming both vocabulary sizes and the first token id that differs."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    student_tokens = {i: token for token, i in student_vocab.items()}
    teacher_tokens = {i: token for token, i in teacher_vocab.items()}
    first = min(i for i in student_tokens.keys() | teacher_tokens.keys()
                if student_tokens.get(i) != teacher_tokens.get(i))
    raise VocabularyMismatchError(
        f"student and teacher must share a tokenizer: the student's ({student}) has {len(student_vocab)} tokens, "
        f"the teacher's ({teacher}) has {len(teacher_vocab)} tokens; the first token that differs is id {first}: student "
        f"{student_tokens.get(first)!r}, teacher {teacher_tokens.get(first)!r}. Distil from a teacher trained with "
        f"the student's tokenizer (e.g. both from the same pretrain.tokenizer output)")


def check_same_model_vocabulary(student, teacher, student_path: str, teacher_path: str) -> None:
    """The models' output sizes must match too (a tokenizer can be shared by models with padded heads)."""
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
    if sizes[0] != sizes[1]:
        raise VocabularyMismatchError(
            f"the student ({student_path}) predicts {sizes[0]} tokens, the teacher ({teacher_path}) {sizes[1]}: "
            f"the same tokenizer, but output layers of different sizes; resize one model's embeddings to the other's")


def served_teacher(cfg: DistillConfig, student) -> TimedVLLMClient:
    """A client of the teacher server, after checking that it serves a model of the student's vocabulary
    (the checkpoint named by teacher_model_name_or_path, whose tokenizer was checked already)."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(cfg.teacher_model_name_or_path).get_text_config().vocab_size
    size = student.get_output_embeddings().weight.shape[0]
    if vocab != size:
        raise VocabularyMismatchError(
            f"the student ({cfg.model_name_or_path}) predicts {size} tokens, the served teacher "
            f"({cfg.teacher_model_name_or_path}) {vocab}: resize one model's embeddings to the other's")
    return TimedVLLMClient(base_url=cfg.teacher_model_server_url, connection_timeout=cfg.teacher_request_timeout,
                           request_timeout=cfg.teacher_request_timeout)


def load_tokenizer(cfg: DistillConfig):
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    if cfg.chat_template is not None:
        missing = chat_templates.install(tokenizer, cfg.chat_template, variant="training")
        if missing:
            raise ValueError(f"chat_template {cfg.chat_template!r} needs tokens the student's tokenizer lacks: "
                             f"{missing}. The student and teacher share this tokenizer, so tokens cannot be added "
                             f"here: use the template they were fine-tuned with (chat_template: null)")
    if not tokenizer.chat_template:
        raise ValueError(f"the student {cfg.model_name_or_path} has no chat template: distil a chat model (an SFT "
                         f"output) or set chat_template")
    return tokenizer


def load_model(path: str, cfg: DistillConfig, init_kwargs: dict | None):
    kwargs = {"attn_implementation": cfg.attn_implementation, "dtype": torch.float32, **(init_kwargs or {})}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


class CompletionTokens(TrainerCallback, ExportableState):
    """Completion tokens trained on, by who sampled them; saved in every checkpoint (trainer_state.json's
    stateful_callbacks) so a resumed run keeps counting, and the stop at `budget`."""

    def __init__(self, budget: int | None = None, student: int = 0, teacher: int = 0):
        self.budget, self.student, self.teacher = budget, student, teacher

    def state(self) -> dict:
        return {"args": {"budget": self.budget}, "attributes": {"student": self.student, "teacher": self.teacher}}

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget is not None and self.student + self.teacher >= self.budget:
            control.should_training_stop = True
        return control


class DistillTrainer(FaultInjectionMixin, ColocatedWeightSyncMixin, trl.DistillationTrainer):
    """TRL's DistillationTrainer with the on-policy fraction λ and the off-policy losses (module docstring)."""

    def __init__(self, *args, teacher_client=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_client = teacher_client  # a served teacher (core.vllm.client), or None: in-process
        self.sampled_by = "student"  # who sampled the current generation batch
        self.add_callback(CompletionTokens(self.args.token_budget))

    @property
    def completion_tokens(self) -> CompletionTokens:
        # Trainer replaces a stateful callback by a restored copy when it resumes: read the live one.
        return next(c for c in self.callback_handler.callbacks if isinstance(c, CompletionTokens))

    def sampler_for_step(self, step: int) -> str:
        """'student' with probability λ, else 'teacher': the same draw for a step on every process and
        in every run (a resumed run makes the choices of an uninterrupted one)."""
        return "student" if random.Random(f"{self.args.seed}:{step}").random() < self.args.lmbda else "teacher"

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        self.sampled_by = self.sampler_for_step(self.state.global_step) if self.model.training else "student"
        if self.sampled_by == "student":
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        return self.teacher_completions(prompt_ids)

    @torch.no_grad()
    def teacher_completions(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """The teacher's samples for these prompts, each ending with the EOS it stopped on (as TRL's
        student completions do), at the trainer's temperature and top-p."""
        settings = GenerationSettings(
            max_new_tokens=self.max_completion_length, temperature=self.temperature, top_p=self.top_p,
            # Seeded per step and process: a resumed run samples what the uninterrupted one did.
            seed=hash((self.args.seed, self.state.global_step, self.accelerator.process_index)) % 2**31)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        samples = generate_transformers(teacher, prompt_ids, self.eos_token_ids, settings)
        return [s.token_ids + ([] if s.eos_token_id is None else [s.eos_token_id]) for (s,) in samples]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            counter = self.completion_tokens
            tokens = int(self.accelerator.gather(output["completion_mask"].sum()).sum())
            setattr(counter, self.sampled_by, getattr(counter, self.sampled_by) + tokens)
            metrics = self._metrics["train"]
            metrics["distill/on_policy"].append(float(self.sampled_by == "student"))
            # Totals so far, as TRL logs num_tokens: one value, not a mean over the logging window.
            metrics["distill/student_tokens"] = [counter.student]
            metrics["distill/teacher_tokens"] = [counter.teacher]
        return output

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.sampled_by == "teacher" and self.args.off_policy_loss == "sft":
            return self.sft_loss(unwrapped_student, inputs, num_items_in_batch)
        if self.teacher_client is not None:
            return self.served_teacher_loss(unwrapped_student, inputs, num_items_in_batch)
        return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def completion_log_probs(self, unwrapped_student, inputs):
        """The student's next-token log-probs over the completion positions, (B, K, V), and the mask (B, K)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, mask.size(1))  # (B, K, H)
        logits = unwrapped_student.get_output_embeddings()(hidden).float()  # (B, K, V)
        return F.log_softmax(logits, dim=-1), mask

    @torch.no_grad()
    def served_teacher_log_probs(self, inputs, vocab_size: int) -> torch.Tensor:
        """The served teacher's log-probs at every completion position, (B, K, V), over the whole vocabulary:
        vLLM's prompt log-probs of prompt + completion (TRL's VLLMClient.get_sequence_logprobs), at
        temperature 1 (the loss applies the trainer's temperature to both sides, as in-process)."""
        sequences, prompt_lengths = [], []
        for prompt, prompt_mask, completion, completion_mask in zip(
                inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"]):
            prompt = prompt[prompt_mask.bool()].tolist()
            sequences.append(prompt + completion[completion_mask.bool()].tolist())
            prompt_lengths.append(len(prompt))
        result = self.teacher_client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=vocab_size)
        completion = inputs["completion_ids"]
        # Padding positions stay uniform (0): masked out of the loss, and finite so they cannot turn it NaN.
        dense = torch.zeros(*completion.shape, vocab_size)
        for i, (values, token_ids) in enumerate(zip(result["logprobs"], result["logprob_token_ids"])):
            if values:
                dense[i, :len(values)] = float("-inf")
                dense[i, :len(values)].scatter_(-1, torch.tensor(token_ids), torch.tensor(values, dtype=torch.float32))
        return dense.to(completion.device)

    def served_teacher_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """The recipe's divergence against the served teacher, normalised as TRL's in-process loss (by the
        completion tokens of the whole optimizer step); returns (loss, entropy sum, token count)."""
        from trl.experimental.gkd import GKDTrainer

        log_probs, mask = self.completion_log_probs(unwrapped_student, inputs)
        teacher = self.served_teacher_log_probs(inputs, log_probs.size(-1))
        labels = torch.where(mask.bool(), inputs["completion_ids"], torch.full_like(inputs["completion_ids"], -100))
        # GKD's generalised JSD (beta 0: forward KL, 1: reverse KL, as DistillationTrainer's beta), on
        # log-probs: log_softmax(log p / T) = log_softmax(logits / T), so they stand in for logits.
        total = GKDTrainer.generalized_jsd_loss(log_probs, teacher, labels=labels, beta=self.beta,
                                                temperature=self.temperature, reduction="sum")
        loss = total / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return loss, (entropy * mask).sum().detach(), mask.sum()

    def sft_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """Cross-entropy of the student on the sampled completion tokens, normalised as TRL's divergence
        (by the completion tokens of the whole optimizer step); returns (loss, entropy sum, token count)."""
        log_probs, mask = self.completion_log_probs(unwrapped_student, inputs)
        token_log_probs = log_probs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)  # (B, K)
        loss = -(token_log_probs * mask).sum()
        loss = loss / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, K)
        return loss, (entropy * mask).sum().detach(), mask.sum()


def set_stop_tokens(model, eos_ids: list[int], pad_id: int) -> None:
    """The saved student stops where the input student did (Trainer rewrites generation_config's eos to
    the tokenizer's when training starts: transformers' `align_special_tokens`)."""
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = pad_id


def run(cfg: DistillConfig) -> dict:
    for key in ("model_name_or_path", "teacher_model_name_or_path"):
        if getattr(cfg, key) is None:
            raise ValueError(f"{key} is required: the {'student' if key == 'model_name_or_path' else 'teacher'} "
                             f"checkpoint (e.g. an SFT output directory)")
    # Before anything starts: a student vLLM cannot serve samples with transformers generate when colocated;
    # a served student or teacher cannot fall back, so that is an error naming the field.
    if cfg.use_vllm and not use_vllm_for(cfg.model_name_or_path, served=cfg.vllm_mode == "server"):
        cfg.use_vllm = False
    if cfg.teacher_model_server_url is not None:
        use_vllm_for(cfg.teacher_model_name_or_path, served=True)
    out = Path(cfg.output_dir)
    resume_from = trainer_resume_point(cfg)

    # Tokenizers first: a mismatch fails before any model is loaded.
    tokenizer = load_tokenizer(cfg)
    teacher_tokenizer = AutoTokenizer.from_pretrained(cfg.teacher_model_name_or_path)
    check_same_vocabulary(tokenizer, teacher_tokenizer, cfg.model_name_or_path, cfg.teacher_model_name_or_path)

    student = load_model(cfg.model_name_or_path, cfg, cfg.model_init_kwargs)
    teacher, teacher_client = None, None
    if cfg.teacher_model_server_url is None:
        teacher = load_model(cfg.teacher_model_name_or_path, cfg, cfg.teacher_model_init_kwargs).eval()
        check_same_model_vocabulary(student, teacher, cfg.model_name_or_path, cfg.teacher_model_name_or_path)
    else:
        teacher_client = served_teacher(cfg, student)
    eos_ids = student.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])

    prompts, origins = load_prompts(cfg)
    lengths = check_prompt_lengths(prompts, origins, tokenizer, cfg.max_completion_length,
                                   student.config.max_position_embeddings, cfg.chat_template_kwargs or {})
    fingerprint = data_fingerprint([repr(p) for p in prompts])
    train_dataset = Dataset.from_list([{"prompt": p} for p in prompts])

    # TRL refuses teacher_model_init_kwargs next to a loaded teacher; they were used above (load_model).
    teacher_init_kwargs, cfg.teacher_model_init_kwargs = cfg.teacher_model_init_kwargs, None
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=train_dataset,
                             processing_class=tokenizer, teacher_client=teacher_client,
                             callbacks=[MetricsCallback(cfg.output_dir), FaultCallback(), MoEStepCallback()])
    cfg.teacher_model_init_kwargs = teacher_init_kwargs
    accelerator = trainer.accelerator
    out.mkdir(parents=True, exist_ok=True)
    generator = f"vLLM ({cfg.vllm_mode})" if cfg.use_vllm else "transformers"
    accelerator.print(
        f"distill: {accelerator.num_processes} process(es) (world size {cfg.world_size}, "
        f"{accelerator.distributed_type}); student {cfg.model_name_or_path}, teacher {cfg.teacher_model_name_or_path}"
        f"{'' if teacher_client is None else ' served at ' + cfg.teacher_model_server_url}; "
        f"{len(prompts)} prompts ({min(lengths)}-{max(lengths)} tokens); divergence {cfg.divergence} (beta {cfg.beta}), "
        f"on-policy fraction {cfg.lmbda}, off-policy loss {cfg.off_policy_loss}; student samples with {generator}")
    if resume_from is not None:
        accelerator.print(f"resuming from {resume_from}")

    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    counter = trainer.completion_tokens
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update({"distill/student_tokens": counter.student, "distill/teacher_tokens": counter.teacher,
                    "distill/wall_s": wall, "distill/steps": trainer.state.global_step})

    if accelerator.is_main_process:
        final = trainer.model
        set_stop_tokens(final, eos_ids, tokenizer.pad_token_id)
        save_checkpoint(cfg.output_dir, final, tokenizer, stage="distill", recipe=resolved_recipe(cfg),
                        parent=cfg.model_name_or_path, data_fingerprint=fingerprint, metrics=metrics)
        print(f"distilled {trainer.state.global_step} steps in {wall:.0f} s: trained on {counter.student} "
              f"student-sampled and {counter.teacher} teacher-sampled completion tokens; final train loss "
              f"{metrics.get('train_loss', float('nan')):.4f}; model written to {cfg.output_dir}")
    accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_recipe(DistillConfig, args=argv)
    return run(cfg)
