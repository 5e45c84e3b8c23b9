"""The pretraining loop: from random weights (or a checkpoint) to a base model.

    python -m pretrain --config recipes/tiny/pretrain.yaml [--max_steps 100 ...]
    accelerate launch --multi_gpu --num_processes 2 -m pretrain --config ...   (DDP; gloo on CPU)
    accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml -m pretrain --config ...

`run` reads top to bottom — setup, data, model, optimizer, loop — and the loop is named steps:
`train_step`, `apply_alert_policy`, `log_step`, `evaluate`, `save`. Built on accelerate, so the same
code runs on one CPU process, DDP or FSDP2 (gloo on CPU, NCCL on GPU). Deviations from a plain
loop, each on purpose:
- Loss normalisation: every micro-batch's summed token loss is divided by the number of target
  tokens of the whole optimizer step over all ranks (`num_items_in_batch`), so gradient
  accumulation and uneven ranks give the gradient of one big batch (transformers' GA fix).
- The data stream (pretrain/data.py) decides every row of every step up front from a few
  counters, so a resumed run reads exactly the rows an uninterrupted one would have.
- A checkpoint is written to a hidden temporary directory and renamed to `checkpoint-<step>` only
  when complete (`pretrain_state.json` inside marks it); a run killed mid-write leaves a
  temporary directory that resume ignores.
- A skipped step (alert policy `skip`) drops the update but still advances the learning-rate
  schedule, so the schedule stays a function of the step and WSD's decay still ends at max_steps.
"""

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.checkpoint import CHECKPOINT_PREFIX, complete_checkpoints, data_fingerprint, resume_point, save_checkpoint
from core.faults import active_faults, kill_if, start_slow_rank_fault
from core.infra import devices
from core.infra.flops import flops_per_token
from core.kernels import compile_blocks
from core.metrics import MetricsWriter
from core.moe import end_moe_step, expert_load, set_load_reduction
from core.optim import parameter_groups
from core.recipe import parse_recipe, resolved_recipe
from core.sources import DataSourceError, SourceSpec, data_identity
from .config import PretrainConfig
from .data import MixtureSchedule, MixtureStream, PackedSource, adapt_factors, make_batch, pack_source
from .monitor import AlertLog, Monitor, RankTimer, cuda_health, resolve_policies
from .parallel import DataParallel, data_parallel_rank, refuse_deepspeed
from .preflight import PreflightError, report, run_preflight

# Not HF's trainer_state.json: our schema differs, and HF tools would misread it (issue 10).
STATE_FILE = "pretrain_state.json"
SEVERITY = {"apply": -1, "warn": 0, "skip": 1, "rollback": 2, "stop": 3}


class TrainingStopped(RuntimeError):
    """An alert whose policy is `stop` ended the run; the offending update was not applied."""


# --- setup: everything that can be wrong is checked here, before the first step ------------------

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
    for target in (model.config, model.generation_config):
        target.eos_token_id, target.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return model


def build_scheduler(cfg: PretrainConfig, optimizer):
    """transformers' scheduler of that name, as SFT's Trainer builds it (get_scheduler)."""
    try:
        return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.max_steps, scheduler_specific_kwargs=cfg.lr_scheduler_kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"lr_scheduler_type={cfg.lr_scheduler_type!r} with lr_scheduler_kwargs="
                         f"{cfg.lr_scheduler_kwargs}: {e}") from e


def peak_flops(cfg: PretrainConfig, device: torch.device) -> tuple[float, str]:
    """The MFU denominator per process, and where it comes from (printed in the log, so the MFU can be
    judged): the recipe's peak_flops, else core/infra/devices.py's figure for this device and the dtype the
    matmuls run in (bf16 under autocast): the datasheet for a known GPU, a measured matmul on a CPU."""
    if cfg.peak_flops:
        return cfg.peak_flops, f"{cfg.peak_flops:.3g} FLOP/s, peak_flops from the recipe"
    return devices.peak_flops(device, "bf16" if cfg.bf16 else "fp32")


def unigram_entropy(sources: list[PackedSource], weights: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the mixture's unigram distribution: the loss of a model that ignores context."""
    p = sum(w * s.unigram_counts(vocab_size) / s.n_train / s.tokens.shape[1] for w, s in zip(weights, sources))
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def trackers(cfg: PretrainConfig) -> list[str]:
    """report_to as accelerate's `log_with` (HF's words: a name, a list, "all" or "none")."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to)
    if names in (["none"], []):
        return []
    unknown = sorted(set(names) - set(LOGGER_TYPE_TO_CLASS) - {"all"})
    if unknown:
        raise ValueError(f"report_to has unknown trackers {unknown}; use any of {sorted(LOGGER_TYPE_TO_CLASS)}, "
                         f"all or none (output_dir/metrics.jsonl is always written)")
    if "wandb" in names or "all" in names:
        os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user configured it
    return names


def check_recipe(cfg: PretrainConfig) -> None:
    if cfg.tokenizer_name_or_path is None:
        raise ValueError("tokenizer_name_or_path is required (train one with python -m pretrain.tokenizer)")
    if not cfg.sources:
        raise DataSourceError("sources: the recipe lists no data source")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ValueError(f"save_total_limit={cfg.save_total_limit}: keep at least 1 checkpoint (resume needs one), "
                         "or null to keep all")


def preflight(cfg: PretrainConfig, accelerator: Accelerator) -> None:
    """The checklist on the main process; every rank learns the verdict, so none is left waiting."""
    failure = None
    if accelerator.is_main_process:
        try:
            report(run_preflight(cfg, build_model), accelerator.print)
        except PreflightError as e:
            failure = e
    if accelerator.reduce(torch.tensor(float(failure is not None), device=accelerator.device), "sum").item():
        raise failure or PreflightError("preflight failed on the main process (see its output)")


# --- the run's state -------------------------------------------------------------------------------

@dataclass
class Window:
    """What a log line averages over: the steps since the previous one (HF's `loss` is a window mean)."""

    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """Everything the loop's steps share (built once by `run`)."""

    cfg: PretrainConfig
    accelerator: Accelerator
    out: Path
    tokenizer: object
    names: list[str]
    sources: list[PackedSource]
    stream: MixtureStream
    loader: StatefulDataLoader
    parallel: DataParallel
    scheduler: object
    monitor: Monitor
    policies: dict
    metrics: MetricsWriter | None
    alerts: AlertLog | None
    recipe: dict
    fingerprint: str
    tokens_per_step: int
    flops_per_token: float
    peak: float
    peak_source: str  # which peak the MFU divides by, named in every log line
    step: int = 0
    rollbacks: int = 0
    previous_val: dict | None = None
    window: Window = field(default_factory=Window)
    last: dict = field(default_factory=dict)
    poisoned: set = field(default_factory=set)  # tests: rows whose tokens a fault replaced with noise
    faults: dict = field(default_factory=active_faults)  # tests' SMOLFORGE_FAULT, read once; empty in a real run
    # This rank's forward seconds since the last log line (stragglers; attached to the model in `run`).
    rank_timer: RankTimer = field(default_factory=lambda: RankTimer(torch.cuda.is_available()))

    @property
    def model(self):
        return self.parallel.model

    def state(self) -> dict:
        """What pretrain_state.json keeps beside accelerate's state: the step, the monitor's counters,
        the adaptive mixture's last validation losses and the open log window (exact resume)."""
        return {"step": self.step, "monitor": self.monitor.state_dict(), "previous_val": self.previous_val,
                "window": {"loss_sum": self.window.loss_sum, "steps": self.window.steps, "tokens": self.window.tokens}}

    def restore(self, checkpoint: Path) -> None:
        self.parallel.load(checkpoint / "state")
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self.step, self.previous_val = state["step"], state["previous_val"]
        self.monitor.load_state_dict(state["monitor"])
        self.window = Window(**state["window"])


def build_data(cfg: PretrainConfig, accelerator: Accelerator,
               tokenizer) -> tuple[list[SourceSpec], list[PackedSource], MixtureStream]:
    specs = [SourceSpec.from_dict(s, i) for i, s in enumerate(cfg.sources)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataSourceError(f"source names must be unique, got {names}")
    with accelerator.main_process_first():  # rank 0 tokenises, the others then read its cache
        dirs = [pack_source(s, tokenizer, cfg.max_length, cfg.data_cache_dir) for s in specs]
    sources = [PackedSource(s.name, d, cfg.validation_rows) for s, d in zip(specs, dirs)]
    rank, world = data_parallel_rank(accelerator, cfg.tp_size)  # a TP group reads the same rows
    tokens_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world * cfg.max_length
    schedule = MixtureSchedule(names, {s.name: s.weight for s in specs}, cfg.stages, tokens_per_step)
    stream = MixtureStream(sources, schedule, seed=cfg.seed, micro_batch_size=cfg.per_device_train_batch_size,
                           accumulation_steps=cfg.gradient_accumulation_steps, rank=rank,
                           world_size=world, eos_id=tokenizer.eos_token_id)
    return specs, sources, stream


def build_monitor(cfg: PretrainConfig) -> Monitor:
    return Monitor(spike_sigma=cfg.spike_sigma, spike_warmup=cfg.spike_warmup, ema_beta=cfg.ema_beta,
                   grad_factor=cfg.grad_explosion_factor, throughput_fraction=cfg.throughput_fraction,
                   throughput_windows=cfg.throughput_windows, data_stall_seconds=cfg.data_stall_seconds,
                   spike_window=cfg.spike_window, expert_collapse_ratio=cfg.expert_collapse_ratio,
                   straggler_fraction=cfg.straggler_fraction, straggler_windows=cfg.straggler_windows)


# --- the steps of the loop ----------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float  # mean loss of the step over all ranks (z-loss included), NaN anywhere -> NaN
    z_loss: float
    grad_norm: float
    tokens: int  # target tokens of the step, all ranks
    seconds: float  # the slowest rank's compute time
    data_wait: float  # the slowest rank's wait for data
    rows: list[tuple[int, int]]  # (source, row) of every sample of the step, all ranks
    aux_loss: float = 0.0  # MoE router losses (load balancing + router z-loss), included in `loss`
    expert_load: dict = field(default_factory=dict)  # core.moe.expert_load over the global batch
    source_losses: torch.Tensor | None = None  # (2, sources): this rank's row-loss sums and rows; logging steps only


def poison_rows(r: Run, micro_batches: list[dict], step_rows: list) -> None:
    """Tests (fault poison_step): the rows of one step become uniform noise, wherever they reappear."""
    poison_step = r.faults.get("poison_step")
    if poison_step is not None and r.step == int(poison_step) and not r.poisoned:
        r.poisoned.update(step_rows)
    if not r.poisoned:
        return
    for mb in micro_batches:
        for i, (s_idx, row) in enumerate(zip(mb["source"].tolist(), mb["row"].tolist())):
            if (s_idx, row) in r.poisoned:
                mb["input_ids"][i] = mb["labels"][i] = torch.randint(
                    0, r.model.config.vocab_size, (r.cfg.max_length,), generator=torch.Generator().manual_seed(row))


def train_step(r: Run, micro_batches: list[dict], data_wait: float) -> StepResult:
    """Forward and backward over the step's micro-batches; gradients clipped, not yet applied."""
    acc, device = r.accelerator, r.accelerator.device
    started = time.perf_counter()
    ids = torch.cat([torch.stack([mb["source"], mb["row"]], 1) for mb in micro_batches])
    # dict.fromkeys: the ranks of a TP group hold the same rows; each row counts once.
    step_rows = list(dict.fromkeys(tuple(x) for x in acc.gather(ids.to(device)).cpu().tolist()))
    if r.faults:  # tests only: a real run does no per-row work here
        poison_rows(r, micro_batches, step_rows)
    if r.cfg.log_sequence_ids and acc.is_main_process:
        with open(r.out / "sequence_ids.jsonl", "a") as f:
            f.write(json.dumps({"step": r.step, "rows": step_rows}) + "\n")
    n_local = sum(mb["labels"][:, 1:].numel() for mb in micro_batches)
    n_global = int(acc.reduce(torch.tensor(n_local, device=device), "sum").item())
    items = n_global / acc.num_processes  # per-rank share: DDP/FSDP average gradients over ranks
    loss_sum = torch.zeros((), device=device)
    z_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    nan_fault = r.faults.get("nan_at_step")  # tests: "S" or "S:rank"
    # Per-source training losses come from the per-token losses the loss itself is summed from (no second
    # cross-entropy over the logits), and are only collected on a step that logs.
    source_losses = torch.zeros(2, len(r.sources), device=device) if is_logging_step(r, r.step + 1) else None
    for i, mb in enumerate(micro_batches):
        with r.parallel.no_sync(i == len(micro_batches) - 1), acc.autocast():
            o = r.model(input_ids=mb["input_ids"].to(device), position_ids=mb["position_ids"].to(device),
                        labels=mb["labels"].to(device), num_items_in_batch=items, return_token_loss=True)
        if source_losses is not None and o.token_loss is not None:
            source = mb["source"].to(device)
            source_losses[0].index_add_(0, source, o.token_loss.sum(1) / (o.token_loss.shape[1] - 1))  # row means
            source_losses[1].index_add_(0, source, torch.ones_like(source, dtype=source_losses.dtype))
        loss = o.loss
        if nan_fault is not None and nan_fault.split(":")[0] == str(r.step + 1) and (
                ":" not in nan_fault or nan_fault.split(":")[1] == str(acc.process_index)):
            loss = loss * float("nan")
        acc.backward(loss)
        loss_sum += loss.detach()
        z_sum += o.z_loss.detach()
        if o.aux_loss is not None:
            aux_sum += o.aux_loss.detach()
    grad_norm = r.parallel.clip_grad_norm(r.cfg.max_grad_norm or float("inf"))
    # One reduction for every value an alert decision reads, so all ranks decide alike: the global
    # loss, a non-finite flag from any rank, and the slowest rank's timings (issue 11).
    local = torch.tensor([loss_sum.item(), z_sum.item(), aux_sum.item(),
                          float(not math.isfinite(loss_sum.item() + grad_norm))], device=device, dtype=torch.float64)
    world = acc.num_processes
    loss, z, aux, bad = (acc.reduce(local, "sum") / torch.tensor([world, world, world, 1.0], device=device,
                                                                  dtype=torch.float64)).tolist()
    timing = torch.tensor([time.perf_counter() - started, data_wait], device=device, dtype=torch.float64)
    if acc.num_processes > 1:
        torch.distributed.all_reduce(timing, torch.distributed.ReduceOp.MAX)
    seconds, data_wait = timing.tolist()
    return StepResult(float("nan") if bad else loss, z, grad_norm, n_global // r.parallel.tp, seconds, data_wait,
                      step_rows, aux_loss=aux, expert_load=expert_load(r.model), source_losses=source_losses)


def apply_alert_policy(r: Run, result: StepResult) -> str:
    """Check the step, emit its alerts and return the action: apply, warn, skip, rollback (or raise on stop)."""
    done = r.step + 1
    alerts = r.monitor.check_step(done, result.loss, result.grad_norm)
    action = max((r.policies[a.kind] for a in alerts), key=SEVERITY.__getitem__, default="apply")
    if action == "rollback" and not complete_checkpoints(r.out, STATE_FILE):
        action = "skip"  # nothing to roll back to yet
    if action == "rollback" and r.rollbacks >= r.cfg.max_rollbacks:
        action = "stop"
    for a in alerts:
        a.action = action if action != "apply" else "warn"
        r.alerts.emit(a, rows=result.rows if action in ("skip", "rollback") else None)
    if action == "stop":
        raise TrainingStopped(f"stopped at step {done} by alert(s) {[a.kind for a in alerts]} (see alerts.jsonl)")
    return action


def rollback(r: Run, result: StepResult) -> None:
    """Reload the newest checkpoint and replay from it without this step's rows (deterministic)."""
    r.rollbacks += 1
    checkpoint = complete_checkpoints(r.out, STATE_FILE)[-1]
    r.restore(checkpoint)
    r.stream.excluded.update(result.rows)
    r.accelerator.print(f"rolled back to {checkpoint.name}; {len(result.rows)} rows of step "
                        f"{r.step + 1} excluded")


def check_speed(r: Run, result: StepResult) -> None:
    """Throughput and data-stall alerts (after the update: they can only warn or stop)."""
    done = r.step
    tokens_per_s = result.tokens / (result.seconds + result.data_wait)
    for a in r.monitor.check_throughput(done, tokens_per_s) + r.monitor.check_data_wait(done, result.data_wait):
        a.action = r.policies[a.kind]
        r.alerts.emit(a)
        if a.action == "stop":
            raise TrainingStopped(f"stopped at step {done} by alert {a.kind} (see alerts.jsonl)")


def check_expert_load(r: Run, result: StepResult) -> None:
    """MoE routing collapse (after the update: it can only warn or stop)."""
    for a in r.monitor.check_expert_load(r.step, result.expert_load):
        a.action = r.policies[a.kind]
        r.alerts.emit(a)
        if a.action == "stop":
            raise TrainingStopped(f"stopped at step {r.step} by alert {a.kind} (see alerts.jsonl)")


def is_logging_step(r: Run, step: int) -> bool:
    return step % r.cfg.logging_steps == 0 or step == r.cfg.max_steps


def per_source_losses(r: Run, source_losses: torch.Tensor | None) -> dict[str, float]:
    """Mean training loss of each source's rows in this step, over all ranks. Absent under Liger's fused
    loss (CUDA), which never materialises per-token losses; the per-source validation losses remain."""
    if source_losses is None or not source_losses[1].any():  # the fused loss: the same on every rank
        return {}
    totals = r.accelerator.reduce(source_losses, "sum")
    return {f"loss/{n}": (totals[0, j] / totals[1, j]).item() for j, n in enumerate(r.names) if totals[1, j] > 0}


def check_node_health(r: Run) -> dict[str, float]:
    """At a logging step: every rank's forward seconds of the window (one small all-gather), the straggler
    alert on them, and on CUDA each GPU's temperature, utilisation and memory (issue 21)."""
    acc = r.accelerator
    local = {"forward_s": r.rank_timer.take(), **(cuda_health(acc.device) if acc.device.type == "cuda" else {})}
    keys = sorted(local)
    values = acc.gather(torch.tensor([[local[k] for k in keys]], device=acc.device, dtype=torch.float64)).cpu()
    per_rank = {k: values[:, j].tolist() for j, k in enumerate(keys)}
    if acc.num_processes > 1:
        for a in r.monitor.check_stragglers(r.step, per_rank["forward_s"]):
            a.action = r.policies[a.kind]
            r.alerts.emit(a, forward_s_per_rank=per_rank["forward_s"])
            if a.action == "stop":
                raise TrainingStopped(f"stopped at step {r.step} by alert straggler (see alerts.jsonl)")
    health = {"rank_forward_s/max": max(per_rank["forward_s"]), "rank_forward_s/min": min(per_rank["forward_s"])}
    for k in keys:
        if k != "forward_s":
            health[f"gpu/{k}/max"] = max(per_rank[k])
            health[f"gpu/{k}/min"] = min(per_rank[k])
    return health


def log_step(r: Run, result: StepResult, lr: float, skipped: bool) -> None:
    """A log line every logging_steps: HF's names (loss = window mean, learning_rate, grad_norm,
    num_tokens) and ours, to metrics.jsonl, the trackers and the console."""
    done, w = r.step, r.window
    w.loss_sum = w.loss_sum + result.loss - result.z_loss - result.aux_loss
    w.steps, w.tokens = w.steps + 1, w.tokens + result.tokens
    if not is_logging_step(r, done):
        return
    tokens_per_s = w.tokens / (time.perf_counter() - w.started)
    r.last = {"loss": w.loss_sum / w.steps, "z_loss": result.z_loss, **({"aux_loss": result.aux_loss,
              **result.expert_load} if result.expert_load else {}), "grad_norm": result.grad_norm,
              "learning_rate": lr, "num_tokens": done * r.tokens_per_step,
              "param_norm": r.parallel.parameter_norm(), "skipped": skipped, "tokens_per_s": tokens_per_s,
              "mfu": tokens_per_s / r.accelerator.num_processes * r.flops_per_token / r.peak,
              **{f"weight/{n}": float(x) for n, x in zip(r.names, r.stream.weights())},
              **per_source_losses(r, result.source_losses), **check_node_health(r)}
    r.metrics.write(done, r.last)
    r.accelerator.log(r.last, step=done)
    r.accelerator.print(f"step {done}/{r.cfg.max_steps} loss {r.last['loss']:.4f} z {result.z_loss:.2e} "
                        f"|g| {result.grad_norm:.3f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s mfu {r.last['mfu']:.1%} "
                        f"of {r.peak_source.split(',')[0]} {'bf16' if r.cfg.bf16 else 'fp32'}")
    r.window = Window()


def evaluate(r: Run) -> dict[str, float]:
    """Mean token loss of each source's held-out rows, averaged over ranks so every rank holds the
    same numbers (the adaptive mixture decides from them: ranks must not diverge, issue 11)."""
    model, device, batch_size = r.model, r.accelerator.device, r.cfg.per_device_train_batch_size
    model.eval()
    losses = torch.zeros(len(r.sources), device=device, dtype=torch.float64)
    with torch.no_grad():
        for s_idx, src in enumerate(r.sources):
            total, count = 0.0, 0
            rows = list(src.validation)
            for i in range(0, len(rows), batch_size):
                batch = make_batch([(s_idx, row) for row in rows[i:i + batch_size]], r.sources,
                                   r.tokenizer.eos_token_id)
                with r.accelerator.autocast():
                    o = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                              labels=batch["labels"].to(device))
                n = batch["labels"][:, 1:].numel()
                total += (o.loss - o.z_loss).item() * n
                count += n
            losses[s_idx] = total / count
    model.train()
    losses = r.accelerator.reduce(losses, "mean")
    return dict(zip(r.names, losses.tolist()))


def evaluate_and_adapt(r: Run) -> None:
    val = evaluate(r)
    r.metrics.write(r.step, {f"val_loss/{n}": v for n, v in val.items()})
    r.accelerator.log({f"val_loss/{n}": v for n, v in val.items()}, step=r.step)
    r.accelerator.print("  validation: " + ", ".join(f"{n} {v:.4f}" for n, v in val.items()))
    if r.cfg.adaptive_mixture and r.previous_val is not None:
        r.stream.set_adaptive_factors(adapt_factors(r.stream.adaptive_factors,
                                                    np.array([r.previous_val[n] for n in r.names]),
                                                    np.array([val[n] for n in r.names]), r.cfg.adaptive_rate))
    r.previous_val = val
    r.last.update({f"val_loss/{n}": v for n, v in val.items()})


def save(r: Run) -> None:
    """checkpoint-<step>: accelerate's state (model, optimizer, RNG, scheduler, data position) plus
    the HF model, written under a temporary name and renamed once every rank has finished."""
    acc = r.accelerator
    final, tmp = r.out / f"{CHECKPOINT_PREFIX}{r.step}", r.out / f".{CHECKPOINT_PREFIX}{r.step}.tmp"
    acc.wait_for_everyone()
    r.parallel.save(tmp / "state")
    state_dict = r.parallel.full_state_dict()
    acc.wait_for_everyone()  # every rank's files (its RNG state) are written before the rename
    if acc.is_main_process:
        save_checkpoint(tmp / "model", r.parallel.base_model(), r.tokenizer, stage="pretrain-checkpoint",
                        recipe=r.recipe, parent=r.cfg.model_name_or_path, data_fingerprint=r.fingerprint,
                        state_dict=state_dict)
        kill_if("kill_in_checkpoint", r.step)  # tests: die mid-write
        (tmp / STATE_FILE).write_text(json.dumps(r.state()))
        tmp.rename(final)  # the checkpoint exists only from here on
        limit = r.cfg.save_total_limit
        for old in complete_checkpoints(r.out, STATE_FILE)[:-limit] if limit else []:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def save_final(r: Run, entropy: float) -> dict:
    metrics = {**r.last, "unigram_entropy": entropy, "steps": r.cfg.max_steps}
    r.accelerator.wait_for_everyone()
    state_dict = r.parallel.full_state_dict()
    if r.accelerator.is_main_process:
        save_checkpoint(r.out, r.parallel.base_model(), r.tokenizer, stage="pretrain", recipe=r.recipe,
                        parent=r.cfg.model_name_or_path, data_fingerprint=r.fingerprint, metrics=metrics,
                        state_dict=state_dict)
        r.accelerator.print(f"final loss {metrics.get('loss', float('nan')):.4f} vs unigram entropy "
                            f"{entropy:.4f} nats/token; model written to {r.out}")
    r.accelerator.wait_for_everyone()  # no rank leaves the group while the main one writes (end_process_group)
    r.accelerator.end_training()
    return metrics


# --- the run ---------------------------------------------------------------------------------------

def build_parallel(cfg: PretrainConfig, accelerator: Accelerator, model: SmolForgeForCausalLM) -> DataParallel:
    """Compile (per decoder block, in place: core/kernels.py says why), wrap for DDP / FSDP2 / TP, and build
    AdamW over the wrapped parameters. An MoE counts its experts over the global batch (core/moe.py)."""
    if cfg.torch_compile:
        compile_blocks(model)
    parallel = DataParallel(accelerator, model, lambda m: torch.optim.AdamW(
        parameter_groups(m, cfg.weight_decay, cfg.no_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon), tp_size=cfg.tp_size,
        sequence_parallel=cfg.sequence_parallel)
    if accelerator.num_processes > 1:
        set_load_reduction(parallel.model, lambda t: accelerator.reduce(t, "sum"))
    return parallel


def finish_step(r: Run, result: StepResult, action: str) -> None:
    """Apply the step's update unless the alert policy skips it; the schedule advances either way, and an
    MoE's routing bias follows applied steps only (DeepSeek-V3)."""
    if action != "skip":
        r.parallel.optimizer.step()
        r.monitor.accept_step(result.loss, result.grad_norm)
    r.scheduler.step()
    r.parallel.optimizer.zero_grad(set_to_none=True)
    end_moe_step(r.parallel.model, update_bias=action != "skip")
    r.step += 1


def run(cfg: PretrainConfig) -> dict:
    # setup. cpu=True where there is no GPU: only then does accelerate set up gloo for a multi-process
    # CPU launch (without it each process of `accelerate launch --multi_gpu` sees world size 1: measured).
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=not torch.cuda.is_available(),
                              log_with=trackers(cfg) or None, project_dir=cfg.output_dir)
    out = Path(cfg.output_dir)
    resume_from = resume_point(out, STATE_FILE, cfg.resume_from_checkpoint)
    start_slow_rank_fault(accelerator.process_index)  # tests: a busy thread slows one rank (core/faults.py)
    if cfg.preflight or not cfg.skip_preflight:
        preflight(cfg, accelerator)
        if cfg.preflight:
            return {"preflight": "passed"}
    check_recipe(cfg)

    # data
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)
    specs, sources, stream = build_data(cfg, accelerator, tokenizer)
    loader = StatefulDataLoader(stream, batch_size=None, num_workers=0)

    # model and optimizer
    model = build_model(cfg, tokenizer)
    entropy = unigram_entropy(sources, stream.schedule.stages[0][1], model.config.vocab_size)
    parallel = build_parallel(cfg, accelerator, model)
    scheduler = build_scheduler(cfg, parallel.optimizer)
    # Stepped by us once per optimizer step (accelerate's prepared scheduler would step once per process).
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(loader)
    peak, peak_source = peak_flops(cfg, accelerator.device)
    recipe = resolved_recipe(cfg)
    r = Run(cfg=cfg, accelerator=accelerator, out=out, tokenizer=tokenizer, names=[s.name for s in specs],
            sources=sources, stream=stream, loader=loader, parallel=parallel, scheduler=scheduler,
            monitor=build_monitor(cfg), policies=resolve_policies(cfg.alert_policies),
            metrics=None, alerts=None, recipe=recipe,  # both opened by prepare_output_dir
            fingerprint=data_fingerprint([json.dumps([data_identity(s) for s in specs], sort_keys=True),
                                          str(cfg.max_length)]),
            tokens_per_step=stream.global_batch * cfg.max_length,
            flops_per_token=flops_per_token(model.config, cfg.max_length), peak=peak,
            peak_source=peak_source)
    r.rank_timer.attach(parallel.base_model())  # per-rank forward seconds, for the straggler alert
    if resume_from is not None:
        r.restore(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {r.step}")
    prepare_output_dir(r)
    accelerator.print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {accelerator.num_processes}"
                      f" process(es), {parallel.kind}; unigram entropy {entropy:.4f} nats/token; MFU vs {peak_source}")

    # the loop
    data_iter = iter(loader)
    parallel.model.train()
    progress = tqdm(total=cfg.max_steps, initial=r.step, desc="pretrain", unit="step",
                    disable=not accelerator.is_main_process)
    while r.step < cfg.max_steps:
        t_data = time.perf_counter()
        micro_batches = [next(data_iter) for _ in range(cfg.gradient_accumulation_steps)]
        result = train_step(r, micro_batches, time.perf_counter() - t_data)
        action = apply_alert_policy(r, result)
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        if action == "rollback":
            parallel.optimizer.zero_grad(set_to_none=True)
            end_moe_step(parallel.model, update_bias=False)
            rollback(r, result)
            data_iter, progress.n = iter(loader), r.step
            continue
        finish_step(r, result, action)
        progress.update(1)
        check_speed(r, result)
        log_step(r, result, lr, action == "skip")
        check_expert_load(r, result)  # after the log line, so a run it stops has the collapsed load logged
        if r.step % cfg.eval_steps == 0 or r.step == cfg.max_steps:
            evaluate_and_adapt(r)
        if r.step % cfg.save_steps == 0 or r.step == cfg.max_steps:
            save(r)
        if r.faults:
            kill_if("kill_after_step", r.step)  # tests: kill -9 between steps
    progress.close()
    return save_final(r, entropy)


def prepare_output_dir(r: Run) -> None:
    """Clear what a killed run left half-written, start the trackers, and open the alert log."""
    acc = r.accelerator
    if acc.is_main_process:
        r.out.mkdir(parents=True, exist_ok=True)
        for stale in r.out.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # a checkpoint killed half-written
            shutil.rmtree(stale, ignore_errors=True)
        if r.cfg.log_sequence_ids and r.step == 0:
            (r.out / "sequence_ids.jsonl").unlink(missing_ok=True)
    # Lines a killed run logged after its last checkpoint would repeat: metrics continue from it.
    r.metrics = MetricsWriter(r.out, acc.is_main_process, resume_step=r.step if r.step else None)
    acc.init_trackers("smolforge", config={k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                                           for k, v in r.recipe.items()})
    wandb_run = acc.get_tracker("wandb", unwrap=True) if any(t.name == "wandb" for t in acc.trackers) else None
    r.alerts = AlertLog(r.out / "alerts.jsonl", acc.is_main_process, acc.print, wandb_run)


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_recipe(PretrainConfig, args=argv)
    refuse_deepspeed()  # before run() builds the Accelerator, which fails on a DeepSpeed config first
    return run(cfg)
