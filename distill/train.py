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
  - vLLM (the colocated engine and its weight sync on CPU, served-mode failures on every rank) is
    core/vllm/trl.py, GRPO's too;
  - `--resume_from_checkpoint true` picks the newest complete checkpoint (core/checkpoint.py), the final
    save is `core.checkpoint.save_checkpoint` (with stage.json), every log line goes to metrics.jsonl.

SMOLFORGE_FAULT=kill_after_step:N / kill_in_checkpoint:N (tests only, core/faults.py) kill the process
with SIGKILL right after, or in the middle of, writing the checkpoint of step N.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F
import trl
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import ExportableState

import chat_templates
import core  # noqa: F401  (registers the smolforge model type with the Auto classes)
from core.checkpoint import data_fingerprint
from core.faults import FaultInjectionMixin
from core.generation import GenerationSettings, generate_transformers
from core.lifecycle import (begin, finish, is_partitioned, launch_summary, load_policy, preflight, stage_callbacks,
                            stage_main, stop_token_ids, train_metrics)
from core.trainer_defaults import lora_config
from core.vllm import use_vllm_for
from core.vllm.client import TimedVLLMClient, VLLMServerError
from core.vllm.trl import SmolForgeVLLMMixin

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
                           timeout_field="teacher_request_timeout",
                           request_timeout=cfg.teacher_request_timeout)


def load_tokenizers(cfg: DistillConfig):
    """The student's tokenizer (its chat template, or `chat_template`'s, whose tokens it must already have: the
    teacher shares the vocabulary), after checking the teacher's is the same (before any model loads)."""
    tokenizer, _ = chat_templates.load_tokenizer(cfg.model_name_or_path, cfg.chat_template, add_missing_tokens=False,
                                                 pad=False)
    if not tokenizer.chat_template:
        raise ValueError(f"the student {cfg.model_name_or_path} has no chat template: distil a chat model (an SFT "
                         f"output) or set chat_template")
    check_same_vocabulary(tokenizer, AutoTokenizer.from_pretrained(cfg.teacher_model_name_or_path),
                          cfg.model_name_or_path, cfg.teacher_model_name_or_path)
    return tokenizer


def load_teacher_model(cfg: DistillConfig):
    """The in-process teacher, loaded as the student (fp32, the recipe's attention) with TRL's
    `teacher_model_init_kwargs` over those defaults."""
    kwargs = {"attn_implementation": cfg.attn_implementation, "dtype": torch.float32,
              **(cfg.teacher_model_init_kwargs or {})}
    return AutoModelForCausalLM.from_pretrained(cfg.teacher_model_name_or_path, **kwargs).eval()


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


class DistillTrainer(FaultInjectionMixin, SmolForgeVLLMMixin, trl.DistillationTrainer):
    """TRL's DistillationTrainer with the on-policy fraction λ and the off-policy losses (module docstring)."""

    def __init__(self, *args, teacher_client=None, **kwargs):
        cfg = kwargs["args"]
        # TRL refuses teacher_model_init_kwargs next to a loaded teacher; load_teacher_model used them already.
        teacher_init_kwargs, cfg.teacher_model_init_kwargs = cfg.teacher_model_init_kwargs, None
        try:
            super().__init__(*args, **kwargs)
        finally:
            cfg.teacher_model_init_kwargs = teacher_init_kwargs
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
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        # A sharded teacher (FSDP, ZeRO-3) gathers its parameters inside every forward, a collective: every process
        # must run the same generate calls. So each samples every process's prompts with one seed and keeps its own
        # (issue 29: a teacher sampling its own prompts alone died in the first forward under ZeRO-3).
        sharded = self.is_fsdp_enabled or is_partitioned(teacher)
        rank = 0 if sharded else self.accelerator.process_index
        settings = GenerationSettings(
            max_new_tokens=self.max_completion_length, temperature=self.temperature, top_p=self.top_p,
            # Seeded per step (and process, unless sharded): a resumed run samples what the uninterrupted one did.
            seed=hash((self.args.seed, self.state.global_step, rank)) % 2**31)
        every = gather_object([prompt_ids]) if sharded else [prompt_ids]
        samples = generate_transformers(teacher, [p for ids in every for p in ids], self.eos_token_ids, settings)
        if sharded:
            start = sum(map(len, every[:self.accelerator.process_index]))
            samples = samples[start:start + len(prompt_ids)]
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
        result = self.teacher_request(sequences, prompt_lengths, vocab_size)
        completion = inputs["completion_ids"]
        # Padding positions stay uniform (0): masked out of the loss, and finite so they cannot turn it NaN.
        dense = torch.zeros(*completion.shape, vocab_size)
        for i, (values, token_ids) in enumerate(zip(result["logprobs"], result["logprob_token_ids"])):
            if values:
                dense[i, :len(values)] = float("-inf")
                dense[i, :len(values)].scatter_(-1, torch.tensor(token_ids), torch.tensor(values, dtype=torch.float32))
        return dense.to(completion.device)

    def teacher_request(self, sequences: list[list[int]], prompt_lengths: list[int], vocab_size: int) -> dict:
        """The served teacher's answer for this process's sequences. Every process asks for its own batch; a
        failure on one is shared with all (a collective per request), so every rank raises naming the server and
        the rank that failed, where the others would wait in the next gradient all-reduce until its timeout."""
        result, error = None, None
        try:
            result = self.teacher_client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=vocab_size)
        except Exception as failure:
            error = f"{type(failure).__name__}: {failure}"
        errors = gather_object([error]) if self.accelerator.num_processes > 1 else [error]
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed:
            raise VLLMServerError(f"rank {self.accelerator.process_index}: the teacher server "
                                  f"{self.args.teacher_model_server_url} failed on rank {failed[0][0]}: {failed[0][1]}")
        return result

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


def load_teacher(cfg: DistillConfig, student):
    """(teacher model or None, teacher client or None): the teacher in-process (its vocabulary checked against
    the student's), or a client of its server (core/vllm/client.py), whose model's vocabulary is checked."""
    if cfg.teacher_model_server_url is not None:
        return None, served_teacher(cfg, student)
    teacher = load_teacher_model(cfg)
    check_same_model_vocabulary(student, teacher, cfg.model_name_or_path, cfg.teacher_model_name_or_path)
    return teacher, None


def load_data(cfg: DistillConfig, tokenizer, max_positions: int) -> tuple[Dataset, str, str]:
    """(prompts, fingerprint, summary): the prompts, each with room for a whole completion (distill/data.py)."""
    prompts, origins = load_prompts(cfg)
    lengths = check_prompt_lengths(prompts, origins, tokenizer, cfg.max_completion_length, max_positions,
                                   cfg.chat_template_kwargs or {})
    fingerprint = data_fingerprint([repr(p) for p in prompts])
    return (Dataset.from_list([{"prompt": p} for p in prompts]), fingerprint,
            f"{len(prompts)} prompts ({min(lengths)}-{max(lengths)} tokens)")


def run(cfg: DistillConfig) -> dict:
    resume_from = preflight(cfg, "distill")
    if cfg.teacher_model_name_or_path is None:
        raise ValueError("distill: teacher_model_name_or_path is required: the teacher checkpoint (e.g. an RL or a "
                         "larger SFT output directory)")
    # A student vLLM cannot serve samples with transformers generate when colocated; a served student or teacher
    # cannot fall back, so that is an error naming the field, before anything starts.
    if cfg.use_vllm and not use_vllm_for(cfg.model_name_or_path, served=cfg.vllm_mode == "server"):
        cfg.use_vllm = False
    if cfg.teacher_model_server_url is not None:
        use_vllm_for(cfg.teacher_model_name_or_path, served=True)
    tokenizer = load_tokenizers(cfg)  # a vocabulary mismatch fails before any model loads
    student = load_policy(cfg, tokenizer)
    stop_ids = stop_token_ids(student, tokenizer, chat_templates.end_of_turn(tokenizer))  # before the Trainer's
    teacher, teacher_client = load_teacher(cfg, student)
    dataset, fingerprint, data_summary = load_data(cfg, tokenizer, student.config.max_position_embeddings)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=dataset,
                             processing_class=tokenizer, teacher_client=teacher_client,
                             peft_config=lora_config(cfg), callbacks=stage_callbacks(cfg))
    begin(trainer, cfg, f"{launch_summary('distill', trainer, cfg)}; student {cfg.model_name_or_path}, teacher "
                        f"{cfg.teacher_model_server_url or cfg.teacher_model_name_or_path}; {data_summary}; divergence "
                        f"{cfg.divergence} (beta {cfg.beta}), on-policy fraction {cfg.lmbda}, off-policy loss "
                        f"{cfg.off_policy_loss}; student samples with "
                        + (f"vLLM ({cfg.vllm_mode})" if cfg.use_vllm else "transformers"), resume_from)

    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    counter = trainer.completion_tokens
    metrics = {**train_metrics(result), "distill/student_tokens": counter.student,
               "distill/teacher_tokens": counter.teacher, "distill/wall_s": time.perf_counter() - start,
               "distill/steps": trainer.state.global_step}
    trainer.accelerator.print(f"distilled {trainer.state.global_step} steps in {metrics['distill/wall_s']:.0f} s: "
                              f"trained on {counter.student} student-sampled and {counter.teacher} teacher-sampled "
                              f"completion tokens")
    return finish(trainer, cfg, tokenizer, stage="distill", reload=lambda: load_policy(cfg, tokenizer),
                  stop_ids=stop_ids, fingerprint=fingerprint, metrics=metrics)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(DistillConfig, run, argv)
