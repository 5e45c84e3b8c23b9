"""Preflight: the checklist run before every launch ("do your preflight checklist or die", Playbook).

    python -m pretrain --config recipes/tiny/pretrain.yaml --preflight true   # checks only, then exit

Also run, briefly, at the start of every training run unless `--skip_preflight true`. Each check
either passes with a short finding or fails naming what failed and what to do; all checks run (a
failed one only skips those that need its result) so one launch reports every problem at once.
It runs on the main process, before the model is wrapped for data parallelism.
"""

import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.checkpoint import save_checkpoint
from core.faults import fault
from core.recipe import resolved_recipe
from core.sources import SourceSpec, iter_documents
from .config import PretrainConfig
from .data import PackedSource, make_batch, pack_source


class PreflightError(ValueError):
    """At least one preflight check failed; the message lists every failure and what to do."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Context:
    """What the checks find and later checks use (each check fills in its part)."""

    cfg: PretrainConfig
    build_model: object
    specs: list[SourceSpec] = field(default_factory=list)
    tokenizer: object = None
    model: object = None
    sources: list[PackedSource] = field(default_factory=list)
    batch: dict | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


def output_dir_writable(ctx: Context) -> str:
    ctx.out.mkdir(parents=True, exist_ok=True)
    probe = ctx.out / ".preflight-write-probe"
    probe.write_text("ok")
    probe.unlink()
    return f"{ctx.out} is writable"


def sources_readable(ctx: Context) -> str:
    if not ctx.cfg.sources:
        raise ValueError("the recipe lists no source")
    found = []
    for i, raw in enumerate(ctx.cfg.sources):
        spec = SourceSpec.from_dict(raw, i)
        first = next(islice(iter_documents(spec), 1))
        ctx.specs.append(spec)
        found.append(f"{spec.name}: {len(first)} chars in its first document")
    return "; ".join(found)


def tokenizer_loads(ctx: Context) -> str:
    path = ctx.cfg.tokenizer_name_or_path
    if path is None:
        raise ValueError("tokenizer_name_or_path is not set")
    # A path that is not there is the usual first mistake (the tokenizer is trained first), not a
    # malformed Hub id, which is what transformers would say about it (issue 11).
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise FileNotFoundError(f"tokenizer_name_or_path {path} does not exist")
    ctx.tokenizer = AutoTokenizer.from_pretrained(path)
    if ctx.tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {path} has no eos_token (packing needs it)")
    return f"{path}: {len(ctx.tokenizer)} tokens"


def vocab_consistent(ctx: Context) -> str:
    ctx.model = ctx.build_model(ctx.cfg, ctx.tokenizer)  # raises on a vocabulary that does not fit
    return f"{len(ctx.tokenizer)} tokens fit the model's vocab_size {ctx.model.config.vocab_size}"


def forward_backward(ctx: Context) -> str:
    cfg, model, tok = ctx.cfg, ctx.model, ctx.tokenizer
    dirs = [pack_source(s, tok, cfg.max_length, cfg.data_cache_dir) for s in ctx.specs]
    ctx.sources = [PackedSource(s.name, d, cfg.validation_rows) for s, d in zip(ctx.specs, dirs)]
    rows = [(i % len(ctx.sources), r) for i, r in enumerate(range(cfg.per_device_train_batch_size))]
    ctx.batch = batch = make_batch(rows, ctx.sources, tok.eos_token_id)
    model.train()
    for attempt in range(2):  # the first pass pays one-off costs; time the second
        start = time.perf_counter()
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    tps = batch["input_ids"].numel() / seconds
    total = cfg.max_steps * cfg.gradient_accumulation_steps * cfg.per_device_train_batch_size * cfg.max_length
    return (f"forward+backward ok; about {tps:,.0f} tokens/s per process, so about "
            f"{total / tps / 60:.1f} min for {cfg.max_steps} steps (optimizer and evaluation not counted)")


def checkpoint_round_trip(ctx: Context) -> str:
    tmp = ctx.out / ".preflight-checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(tmp, ctx.model, ctx.tokenizer, stage="preflight", recipe=resolved_recipe(ctx.cfg), parent=None)
        if fault("corrupt_checkpoint") is not None:  # tests: a save that does not round-trip
            from safetensors.torch import load_file, save_file

            weights = load_file(tmp / "model.safetensors")
            name = sorted(weights)[0]
            weights[name] = torch.zeros_like(weights[name])
            save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        mine, theirs = ctx.model.state_dict(), loaded.state_dict()
        differ = [k for k in mine if k not in theirs or not torch.equal(mine[k].cpu(), theirs[k])]
        if differ:
            raise ValueError(f"weights differ after save and load: {differ[:5]}")
        return f"saved, reloaded and compared {len(mine)} tensors"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def evaluation(ctx: Context) -> str:
    ctx.model.eval()
    found = []
    with torch.no_grad():
        for i, src in enumerate(ctx.sources):
            b = make_batch([(i, r) for r in list(src.validation)[:2]], ctx.sources, ctx.tokenizer.eos_token_id)
            o = ctx.model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"])
            found.append(f"{src.name} {o.loss.item():.3f}")
    ctx.model.train()
    return "validation loss " + ", ".join(found)


def disk_space(ctx: Context) -> str:
    params = sum(p.numel() for p in ctx.model.parameters())
    # Per checkpoint: HF weights + accelerate's model copy + two AdamW moments, fp32.
    kept = ctx.cfg.save_total_limit or max(1, ctx.cfg.max_steps // ctx.cfg.save_steps)
    need = 4 * params * 4 * (kept + 1) + 4 * params
    free = shutil.disk_usage(ctx.out if ctx.out.exists() else ctx.out.parent).free
    if free < need:
        raise ValueError(f"{need / 2**30:.2f} GiB needed for {kept} checkpoints + the final model, "
                         f"{free / 2**30:.2f} GiB free")
    return f"{need / 2**30:.3f} GiB needed, {free / 2**30:.1f} GiB free"


def hardware(ctx: Context) -> str:
    """The quick diagnostics of this rank (python -m core.infra --quick, without the collectives: preflight
    runs on the main process only). A matmul below half its peak is a throttling or misconfigured device:
    the Playbook measured 72-77% of the H100 bf16 peak on healthy ones."""
    from core.infra.diagnostics import measure_rank

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = measure_rank(device, quick=True, data_dir=None, in_step=False)
    found = [f"{r['name']} {r['value'] / r['peak']:.0%} of peak" if r["peak"] else f"{r['name']} {r['value'] / 1e9:.1f} G{r['unit']}"
             for r in rows]
    slow = [r["name"] for r in rows if r["kind"] == "matmul" and r["peak"] and r["value"] < 0.5 * r["peak"]]
    if slow:
        raise ValueError(f"{', '.join(slow)} below 50% of peak: " + "; ".join(found))
    return "; ".join(found)


# (name, check, names of the checks it needs, what to do when it fails), in order. A check whose
# prerequisites failed is not run: their own failure is already reported.
CHECKS = [
    ("output_dir", output_dir_writable, (), "choose an output_dir you can write to (and that has room)"),
    ("sources", sources_readable, (), "fix the source's path, format or text_field"),
    ("tokenizer", tokenizer_loads, (), "train the tokenizer first (python -m pretrain.tokenizer --config "
     "recipes/tiny/tokenizer.yaml writes out/tiny/tokenizer; its output_dir is what tokenizer_name_or_path names), "
     "or point tokenizer_name_or_path at an existing tokenizer"),
    ("tokenizer/model vocab", vocab_consistent, ("tokenizer",),
     "train the tokenizer with a vocab_size <= the model's, or set model_overrides.vocab_size"),
    ("forward/backward", forward_backward, ("sources", "tokenizer/model vocab"),
     "fix the model config or the data (see the error)"),
    ("checkpoint round trip", checkpoint_round_trip, ("output_dir", "sources", "tokenizer/model vocab"),
     "do not train until checkpoints reload identically (model code vs config mismatch, or storage)"),
    ("evaluation", evaluation, ("forward/backward",), "fix the validation data (validation_rows) or the model"),
    ("disk space", disk_space, ("sources", "tokenizer/model vocab"),
     "free disk space, lower save_total_limit, or choose another output_dir"),
]


HARDWARE_CHECK = ("hardware", hardware, (), "find the slow device with python -m core.infra across the ranks, and "
                  "leave that node out")


def run_preflight(cfg: PretrainConfig, build_model) -> list[Check]:
    """Run every check (a failure only skips the checks that need its result); return the findings."""
    print(json.dumps(resolved_recipe(cfg), indent=1, default=str))  # credentials redacted (core.recipe)
    ctx, checks, passed = Context(cfg, build_model), [], set()
    for name, check, needs, what_to_do in CHECKS + ([HARDWARE_CHECK] if cfg.preflight_hardware else []):
        if not set(needs) <= passed:
            continue
        try:
            checks.append(Check(name, True, check(ctx)))
            passed.add(name)
        except Exception as e:  # every failure is reported, the remaining checks still run
            reason = f"{type(e).__name__}: {e}" if str(e) else traceback.format_exc(limit=1)
            checks.append(Check(name, False, f"{reason} -> {what_to_do}"))
    return checks


def report(checks: list[Check], printer=print) -> None:
    for c in checks:
        printer(f"preflight {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PreflightError("preflight failed:\n" + "\n".join(f"  {c.name}: {c.detail}" for c in failed))
