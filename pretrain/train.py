"""The pretraining loop: from random weights (or a checkpoint) to a base model.

    python -m pretrain --config recipes/tiny/pretrain.yaml [--max_steps 100 ...]
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m pretrain --config ...

A straight line in sections — setup, data, model, optimizer, loop — on accelerate, so the same
code runs on one CPU process, DDP or FSDP2 (gloo on CPU, NCCL on GPU). Deviations from a plain
loop, each on purpose:
- Loss normalisation: every micro-batch's summed token loss is divided by the number of target
  tokens of the whole optimizer step over all ranks (`num_items_in_batch`), so gradient
  accumulation and uneven ranks give the gradient of one big batch (transformers' GA fix).
- The data stream (pretrain/data.py) decides every row of every step up front from a few
  counters, so a resumed run reads exactly the rows an uninterrupted one would have.
- A checkpoint is written to a hidden temporary directory and renamed to `checkpoint-<step>` only
  when complete; a run killed mid-write leaves a temporary directory that resume ignores.
"""

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.checkpoint import data_fingerprint, resume_point, save_checkpoint
from core.faults import fault
from core.kernels import RMSNorm
from core.recipe import parse_recipe, resolved_recipe
from .config import PretrainConfig
from .data import MixtureSchedule, MixtureStream, PackedSource, adapt_factors, make_batch, pack_source
from .monitor import AlertLog, Monitor, resolve_policies
from .parallel import DataParallel
from .preflight import PreflightError, report, run_preflight
from .sources import DataSourceError, SourceSpec

CHECKPOINT_PREFIX = "checkpoint-"


class TrainingStopped(RuntimeError):
    """An alert whose policy is `stop` ended the run; the offending update was not applied."""


STATE_FILE = "trainer_state.json"


# --- setup: everything that can be wrong is checked here, before the first step ------------------

def complete_checkpoints(out: Path) -> list[Path]:
    """checkpoint-<step> directories, oldest first. Only complete ones carry that name (renamed last)."""
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def build_model(cfg: PretrainConfig, tokenizer) -> SmolForgeForCausalLM:
    if cfg.model_name_or_path:
        # Mid-training: the overrides (a new RoPE theta or YaRN scaling, a longer
        # max_position_embeddings) are written into the config the model is built with, and so
        # into every checkpoint it saves.
        config = AutoConfig.from_pretrained(cfg.model_name_or_path)
        unknown = [k for k in cfg.model_overrides if not hasattr(config, k)]
        if unknown:
            raise ValueError(f"model_overrides {unknown} are not fields of {cfg.model_name_or_path}'s "
                             f"{type(config).__name__}")
        config = type(config).from_dict({**config.to_dict(), **cfg.model_overrides})
        model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, config=config, dtype=torch.float32,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        # Rounded up to a multiple of 64: padded rows cost nothing and matmuls like the alignment.
        vocab = cfg.model_overrides.get("vocab_size", 64 * math.ceil(len(tokenizer) / 64))
        overrides = {**cfg.model_overrides, "vocab_size": vocab}
        config = SmolForgeConfig.from_preset(cfg.model_preset, **overrides)
        config._attn_implementation = cfg.attn_implementation
        set_seed(cfg.seed)  # the same init on every rank
        model = SmolForgeForCausalLM(config)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer_name_or_path} has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}; ids past it would index out of the embedding")
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def parameter_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """AdamW groups: no decay on embeddings, norm gains and biases (configurable), decay elsewhere.

    Decaying an embedding pulls rare tokens toward zero, and decaying a norm gain fights the scale
    it exists to learn (the usual GPT/Llama practice; nanoGPT decays only >=2-D weights)."""
    unknown = set(no_decay) - {"embeddings", "norms", "biases"}
    if unknown:
        raise ValueError(f"no_decay has unknown kinds {sorted(unknown)}; use embeddings, norms, biases")
    exempt: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if (("embeddings" in no_decay and isinstance(module, nn.Embedding))
                    or ("norms" in no_decay and isinstance(module, RMSNorm))
                    or ("biases" in no_decay and pname == "bias")):
                exempt.add(id(p))
    params = list(model.parameters())  # tied weights appear once
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]


def build_scheduler(cfg: PretrainConfig, optimizer):
    if cfg.lr_scheduler == "wsd":
        return get_wsd_schedule(optimizer, num_warmup_steps=cfg.warmup_steps, num_decay_steps=cfg.decay_steps,
                                num_training_steps=cfg.max_steps, decay_type=cfg.decay_type,
                                min_lr_ratio=cfg.min_lr_ratio)
    if cfg.lr_scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps,
                                                           min_lr_rate=cfg.min_lr_ratio)
    raise ValueError(f"lr_scheduler must be wsd or cosine, got {cfg.lr_scheduler!r}")


def flops_per_token(config: SmolForgeConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (N = parameters in matmuls, output head included even when tied)
    plus attention's 12 L H T (PaLM, Chowdhery et al. 2022, appendix B)."""
    d, L = config.hidden_size, config.num_hidden_layers
    attn = d * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * d * config.intermediate_size
    n = L * (attn + mlp) + d * config.vocab_size
    return 6 * n + 12 * L * config.num_attention_heads * config.head_dim * seq_len


def unigram_entropy(sources: list[PackedSource], weights: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the mixture's unigram distribution: the loss of a model that ignores context."""
    p = sum(w * s.unigram_counts(vocab_size) / s.n_train / s.tokens.shape[1] for w, s in zip(weights, sources))
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# --- logging ---------------------------------------------------------------------------------------

class MetricsLog:
    """jsonl / tensorboard / wandb, chosen by report_to; main process only."""

    def __init__(self, cfg: PretrainConfig, accelerator: Accelerator):
        self.enabled = accelerator.is_main_process
        unknown = set(cfg.report_to) - {"jsonl", "tensorboard", "wandb", "none"}
        if unknown:
            raise ValueError(f"report_to has unknown backends {sorted(unknown)}; use jsonl, tensorboard, wandb or none")
        self.jsonl = Path(cfg.output_dir) / "metrics.jsonl" if "jsonl" in cfg.report_to else None
        self.tb = self.wandb = None
        if not self.enabled:
            return
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"))
        if "wandb" in cfg.report_to:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user configured it
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "smolforge"), dir=cfg.output_dir,
                                    config=resolved_recipe(cfg))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# --- the run ---------------------------------------------------------------------------------------

def run(cfg: PretrainConfig) -> dict:
    # cpu=True where there is no GPU: only then does accelerate set up gloo for a multi-process CPU launch
    # (without it each process of `accelerate launch --multi_gpu` sees world size 1: measured).
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    out = Path(cfg.output_dir)
    checkpoints = complete_checkpoints(out)
    resume_from = resume_point(out, checkpoints[-1] if checkpoints else None, cfg.resume)
    if cfg.preflight or not cfg.skip_preflight:
        failure = None
        if accelerator.is_main_process:
            try:
                report(run_preflight(cfg, build_model), accelerator.print)
            except PreflightError as e:
                failure = e
        # Every rank learns the verdict, so none is left waiting for a main process that stopped.
        if accelerator.reduce(torch.tensor(float(failure is not None), device=accelerator.device), "sum").item():
            raise failure or PreflightError("preflight failed on the main process (see its output)")
        if cfg.preflight:
            return {"preflight": "passed"}

    # data
    if cfg.tokenizer_name_or_path is None:
        raise ValueError("tokenizer_name_or_path is required (train one with python -m pretrain.tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)
    if not cfg.sources:
        raise DataSourceError("sources: the recipe lists no data source")
    specs = [SourceSpec.from_dict(s, i) for i, s in enumerate(cfg.sources)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataSourceError(f"source names must be unique, got {names}")
    with accelerator.main_process_first():  # rank 0 tokenises, the others then read its cache
        dirs = [pack_source(s, tokenizer, cfg.seq_len, cfg.data_cache_dir) for s in specs]
    sources = [PackedSource(s.name, d, cfg.validation_rows) for s, d in zip(specs, dirs)]
    tokens_per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world * cfg.seq_len
    schedule = MixtureSchedule(names, {s.name: s.weight for s in specs}, cfg.stages, tokens_per_step)
    stream = MixtureStream(sources, schedule, seed=cfg.seed, micro_batch_size=cfg.per_device_batch_size,
                           accumulation_steps=cfg.gradient_accumulation_steps, rank=rank, world_size=world,
                           eos_id=tokenizer.eos_token_id)
    loader = StatefulDataLoader(stream, batch_size=None, num_workers=0)

    # model and optimizer
    model = build_model(cfg, tokenizer)
    config = model.config
    entropy = unigram_entropy(sources, schedule.stages[0][1], config.vocab_size)
    if cfg.torch_compile:
        model.compile()  # in place, so parameter names and FSDP wrapping are unaffected
    parallel = DataParallel(accelerator, model, lambda m: torch.optim.AdamW(
        parameter_groups(m, cfg.weight_decay, cfg.no_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon))
    model, optimizer = parallel.model, parallel.optimizer
    scheduler = build_scheduler(cfg, optimizer)
    # Stepped by us once per optimizer step (accelerate's prepared scheduler would step once per process).
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(loader)

    policies = resolve_policies(cfg.alert_policies)
    monitor = Monitor(spike_sigma=cfg.spike_sigma, spike_warmup=cfg.spike_warmup, ema_beta=cfg.ema_beta,
                      grad_factor=cfg.grad_explosion_factor, throughput_fraction=cfg.throughput_fraction,
                      throughput_windows=cfg.throughput_windows, data_stall_seconds=cfg.data_stall_seconds,
                      spike_window=cfg.spike_window)
    start_step = 0
    if resume_from is not None:
        parallel.load(resume_from / "state")
        state = json.loads((resume_from / STATE_FILE).read_text())
        start_step = state["step"]
        monitor.load_state_dict(state["monitor"])
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # a checkpoint killed half-written
            shutil.rmtree(stale, ignore_errors=True)
        if cfg.log_sequence_ids and start_step == 0:
            (out / "sequence_ids.jsonl").unlink(missing_ok=True)
    metrics_log = MetricsLog(cfg, accelerator)
    alert_log = AlertLog(out / "alerts.jsonl", accelerator.is_main_process, accelerator.print, metrics_log.wandb)
    recipe = resolved_recipe(cfg)
    fingerprint = data_fingerprint([json.dumps([s.__dict__ for s in specs], sort_keys=True, default=str),
                                    str(cfg.seq_len), str(dirs)])
    peak = cfg.peak_flops or (989e12 if torch.cuda.is_available() else 190e9)
    fpt = flops_per_token(config, cfg.seq_len)
    accelerator.print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world} process(es), {parallel.kind}; "
                      f"unigram entropy of the data: {entropy:.4f} nats/token")

    def save(step: int) -> None:
        final = out / f"{CHECKPOINT_PREFIX}{step}"
        tmp = out / f".{CHECKPOINT_PREFIX}{step}.tmp"
        accelerator.wait_for_everyone()
        parallel.save(tmp / "state")  # model, optimizer, RNG, scheduler, data position
        state_dict = parallel.full_state_dict()
        if accelerator.is_main_process:
            save_checkpoint(tmp / "model", parallel.base_model(), tokenizer, stage="pretrain-checkpoint",
                            recipe=recipe, parent=cfg.model_name_or_path, data_fingerprint=fingerprint,
                            state_dict=state_dict)
            if fault("kill_in_checkpoint") == str(step):  # tests: die mid-write
                os.kill(os.getpid(), signal.SIGKILL)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "monitor": monitor.state_dict()}))
            tmp.rename(final)  # the checkpoint exists only from here on
            for old in complete_checkpoints(out)[:-cfg.save_total_limit]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def evaluate() -> dict[str, float]:
        """Mean token loss of each source's held-out rows (every rank computes all: they are few)."""
        model.eval()
        losses = {}
        with torch.no_grad():
            for s_idx, src in enumerate(sources):
                total, count = 0.0, 0
                rows = list(src.validation)
                for i in range(0, len(rows), cfg.per_device_batch_size):
                    batch = make_batch([(s_idx, r) for r in rows[i:i + cfg.per_device_batch_size]], sources,
                                       tokenizer.eos_token_id)
                    with accelerator.autocast():
                        o = model(input_ids=batch["input_ids"].to(accelerator.device),
                                  position_ids=batch["position_ids"].to(accelerator.device),
                                  labels=batch["labels"].to(accelerator.device))
                    n = batch["labels"][:, 1:].numel()
                    total += (o.loss - o.z_loss).item() * n
                    count += n
                losses[src.name] = total / count
        model.train()
        return losses

    # the loop
    data_iter = iter(loader)
    model.train()
    progress = tqdm(total=cfg.max_steps, initial=start_step, desc="pretrain", unit="step",
                    disable=not accelerator.is_main_process)
    window_start, window_tokens = time.perf_counter(), 0
    previous_val = None
    last: dict = {}
    poison_step = fault("poison_step")
    poisoned: set[tuple[int, int]] = set()  # tests: rows whose tokens a fault replaced with noise
    rollbacks = 0
    step = start_step
    while step < cfg.max_steps:
        t_data = time.perf_counter()
        micro_batches = [next(data_iter) for _ in range(cfg.gradient_accumulation_steps)]
        data_wait = time.perf_counter() - t_data
        t_step = time.perf_counter()
        ids = torch.cat([torch.stack([mb["source"], mb["row"]], 1) for mb in micro_batches])
        step_rows = [tuple(r) for r in accelerator.gather(ids.to(accelerator.device)).cpu().tolist()]
        if poison_step is not None and step == int(poison_step) and not poisoned:
            poisoned.update(step_rows)
        for mb in micro_batches:
            for i, (s_idx, r) in enumerate(zip(mb["source"].tolist(), mb["row"].tolist())):
                if (s_idx, r) in poisoned:  # a corrupted shard: uniform noise tokens
                    mb["input_ids"][i] = mb["labels"][i] = torch.randint(0, config.vocab_size, (cfg.seq_len,),
                                                                         generator=torch.Generator().manual_seed(r))
        if cfg.log_sequence_ids and accelerator.is_main_process:
            with open(out / "sequence_ids.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "rows": step_rows}) + "\n")
        n_local = sum(mb["labels"][:, 1:].numel() for mb in micro_batches)
        n_global = accelerator.reduce(torch.tensor(n_local, device=accelerator.device), "sum").item()
        items = n_global / world  # per-rank share: DDP/FSDP average gradients over ranks
        loss_sum = torch.zeros((), device=accelerator.device)
        z_sum = torch.zeros((), device=accelerator.device)
        per_source = torch.zeros(2, len(sources), device=accelerator.device)  # loss sum, rows
        nan_fault = fault("nan_at_step")  # tests: "S" or "S:rank"
        for i, mb in enumerate(micro_batches):
            last_micro = i == len(micro_batches) - 1
            with parallel.no_sync(last_micro), accelerator.autocast():
                o = model(input_ids=mb["input_ids"].to(accelerator.device),
                          position_ids=mb["position_ids"].to(accelerator.device),
                          labels=mb["labels"].to(accelerator.device), num_items_in_batch=items)
            loss = o.loss
            if nan_fault is not None and nan_fault.split(":")[0] == str(step + 1) and (
                    ":" not in nan_fault or nan_fault.split(":")[1] == str(rank)):
                loss = loss * float("nan")
            accelerator.backward(loss)
            loss_sum += loss.detach()
            z_sum += o.z_loss.detach()
            if o.logits is not None:  # per-source training loss, from logits already computed
                with torch.no_grad():
                    row_loss = F.cross_entropy(o.logits[:, :-1].float().transpose(1, 2),
                                               mb["labels"][:, 1:].to(accelerator.device), reduction="none").mean(1)
                    src = mb["source"].to(accelerator.device)
                    per_source[0].index_add_(0, src, row_loss)
                    per_source[1].index_add_(0, src, torch.ones_like(row_loss))
        grad_norm = parallel.clip_grad_norm(cfg.max_grad_norm or float("inf"))
        # Every rank reads the same global loss and norm, and a non-finite value anywhere is made
        # non-finite everywhere, so all ranks take the same action and none is left waiting.
        step_loss = accelerator.reduce(loss_sum, "mean").item()
        bad = accelerator.reduce(torch.tensor(float(not math.isfinite(step_loss + grad_norm)),
                                              device=accelerator.device), "sum").item()
        done = step + 1
        alerts = monitor.check_step(done, float("nan") if bad else step_loss, grad_norm)
        severity = {"warn": 0, "skip": 1, "rollback": 2, "stop": 3}
        action = max((policies[a.kind] for a in alerts), key=severity.__getitem__, default="apply")
        if action == "rollback" and not complete_checkpoints(out):
            action = "skip"  # nothing to roll back to yet
        if action == "rollback" and rollbacks >= cfg.max_rollbacks:
            action = "stop"
        for a in alerts:
            a.action = action if action != "apply" else "warn"
            alert_log.emit(a, rows=step_rows if action in ("skip", "rollback") else None)
        if action == "stop":
            raise TrainingStopped(f"stopped at step {done} by alert(s) {[a.kind for a in alerts]} (see alerts.jsonl)")
        if action in ("skip", "rollback"):
            optimizer.zero_grad(set_to_none=True)  # the update is dropped; optimizer and scheduler untouched
        if action == "rollback":
            rollbacks += 1
            checkpoint = complete_checkpoints(out)[-1]
            parallel.load(checkpoint / "state")
            state = json.loads((checkpoint / STATE_FILE).read_text())
            monitor.load_state_dict(state["monitor"])
            stream.excluded.update(step_rows)
            data_iter = iter(loader)
            accelerator.print(f"rolled back to {checkpoint.name}; {len(step_rows)} rows of step {done} excluded")
            progress.n = step = state["step"]
            continue
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        if action != "skip":
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            monitor.accept_step(step_loss, grad_norm)
        step_tps = n_global / (time.perf_counter() - t_step + data_wait)
        for a in monitor.check_throughput(done, step_tps) + monitor.check_data_wait(done, data_wait):
            a.action = policies[a.kind]
            alert_log.emit(a)
            if a.action == "stop":
                raise TrainingStopped(f"stopped at step {done} by alert {a.kind} (see alerts.jsonl)")
        window_tokens += n_global
        step = done
        progress.update(1)
        if done % cfg.logging_steps == 0 or done == cfg.max_steps:
            z = accelerator.reduce(z_sum, "mean").item()
            per_source = accelerator.reduce(per_source, "sum")
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed
            last = {"loss": step_loss - z, "z_loss": z, "grad_norm": grad_norm, "lr": lr,
                    "param_norm": parallel.parameter_norm(), "skipped": action == "skip",
                    "tokens_per_s": tps, "mfu": tps / world * fpt / peak, "tokens": done * tokens_per_step,
                    **{f"weight/{n}": float(w) for n, w in zip(names, stream.weights())}}
            last.update({f"loss/{n}": (per_source[0, j] / per_source[1, j]).item()
                         for j, n in enumerate(names) if per_source[1, j] > 0})
            metrics_log.log(done, last)
            progress.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            accelerator.print(f"step {done}/{cfg.max_steps} loss {last['loss']:.4f} z {z:.2e} "
                              f"|g| {grad_norm:.3f} lr {last['lr']:.2e} {tps:,.0f} tok/s mfu {last['mfu']:.1%}")
            window_start, window_tokens = time.perf_counter(), 0
        if done % cfg.eval_steps == 0 or done == cfg.max_steps:
            val = evaluate()
            metrics_log.log(done, {f"val_loss/{n}": v for n, v in val.items()})
            accelerator.print("  validation: " + ", ".join(f"{n} {v:.4f}" for n, v in val.items()))
            if cfg.adaptive_mixture and previous_val is not None:
                stream.adaptive_factors = adapt_factors(stream.adaptive_factors,
                                                        np.array([previous_val[n] for n in names]),
                                                        np.array([val[n] for n in names]), cfg.adaptive_rate)
            previous_val = val
            last.update({f"val_loss/{n}": v for n, v in val.items()})
        if done % cfg.save_steps == 0 or done == cfg.max_steps:
            save(done)
        if fault("kill_after_step") == str(done):  # tests: kill -9 between steps
            os.kill(os.getpid(), signal.SIGKILL)

    progress.close()
    final_metrics = {**last, "unigram_entropy": entropy, "steps": cfg.max_steps}
    accelerator.wait_for_everyone()
    state_dict = parallel.full_state_dict()
    if accelerator.is_main_process:
        save_checkpoint(out, parallel.base_model(), tokenizer, stage="pretrain", recipe=recipe,
                        parent=cfg.model_name_or_path, data_fingerprint=fingerprint, metrics=final_metrics,
                        state_dict=state_dict)
        accelerator.print(f"final loss {final_metrics.get('loss', float('nan')):.4f} vs unigram entropy "
                          f"{entropy:.4f} nats/token; model written to {out}")
    metrics_log.close()
    accelerator.end_training()
    return final_metrics


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_recipe(PretrainConfig, args=argv)
    return run(cfg)
