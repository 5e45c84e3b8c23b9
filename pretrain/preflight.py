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
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.checkpoint import save_checkpoint
from core.faults import fault
from core.recipe import resolved_recipe
from .config import PretrainConfig
from .data import PackedSource, make_batch, pack_source
from .sources import SourceSpec, iter_documents

SECRET_MARKERS = ("token", "key", "secret", "password")


class PreflightError(ValueError):
    """At least one preflight check failed; the message lists every failure and what to do."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def redacted(recipe: dict) -> dict:
    """The resolved recipe with anything that looks like a credential hidden."""
    def hide(key: str, value):
        if isinstance(value, dict):
            return {k: hide(k, v) for k, v in value.items()}
        secret = any(m in key.lower() for m in SECRET_MARKERS) and "tokenizer" not in key.lower()
        return "<redacted>" if secret and value not in (None, "", []) else value
    return {k: hide(k, v) for k, v in recipe.items()}


def run_preflight(cfg: PretrainConfig, build_model, world_size: int = 1) -> list[Check]:
    checks: list[Check] = []

    def check(name: str, fn, what_to_do: str):
        try:
            detail = fn()
            checks.append(Check(name, True, detail))
            return True
        except Exception as e:  # every failure is reported, the remaining checks still run
            reason = f"{type(e).__name__}: {e}" if str(e) else traceback.format_exc(limit=1)
            checks.append(Check(name, False, f"{reason} -> {what_to_do}"))
            return False

    print(json.dumps(redacted(resolved_recipe(cfg)), indent=1, default=str))
    out = Path(cfg.output_dir)

    def writable():
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".preflight-write-probe"
        probe.write_text("ok")
        probe.unlink()
        return f"{out} is writable"
    out_ok = check("output_dir", writable, "choose an output_dir you can write to (and that has room)")

    specs: list[SourceSpec] = []

    def sources_readable():
        if not cfg.sources:
            raise ValueError("the recipe lists no source")
        found = []
        for i, raw in enumerate(cfg.sources):
            spec = SourceSpec.from_dict(raw, i)
            first = next(islice(iter_documents(spec), 1))
            specs.append(spec)
            found.append(f"{spec.name}: {len(first)} chars in its first document")
        return "; ".join(found)
    sources_ok = check("sources", sources_readable, "fix the source's path, format or text_field")

    state: dict = {}

    def vocab_consistent():
        if cfg.tokenizer_name_or_path is None:
            raise ValueError("tokenizer_name_or_path is not set")
        state["tokenizer"] = tok = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {cfg.tokenizer_name_or_path} has no eos_token (packing needs it)")
        state["model"] = model = build_model(cfg, tok)  # raises on a vocabulary that does not fit
        return f"{len(tok)} tokens fit the model's vocab_size {model.config.vocab_size}"
    vocab_ok = check("tokenizer/model vocab", vocab_consistent,
                     "train the tokenizer with a vocab_size <= the model's, or set model_overrides.vocab_size")

    if sources_ok and vocab_ok:
        model, tok = state["model"], state["tokenizer"]

        def forward_backward():
            dirs = [pack_source(s, tok, cfg.seq_len, cfg.data_cache_dir) for s in specs]
            sources = [PackedSource(s.name, d, cfg.validation_rows) for s, d in zip(specs, dirs)]
            state["sources"] = sources
            rows = [(i % len(sources), r) for i, r in enumerate(range(cfg.per_device_batch_size))]
            state["batch"] = batch = make_batch(rows, sources, tok.eos_token_id)
            model.train()
            start = time.perf_counter()
            for _ in range(2):  # the first pass pays one-off costs; time the second
                if _ == 1:
                    start = time.perf_counter()
                model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss.backward()
            seconds = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            tps = batch["input_ids"].numel() / seconds
            total = cfg.max_steps * cfg.gradient_accumulation_steps * cfg.per_device_batch_size * cfg.seq_len
            return (f"forward+backward ok; about {tps:,.0f} tokens/s per process, so about "
                    f"{total / tps / 60:.1f} min for {cfg.max_steps} steps (optimizer and evaluation not counted)")
        fb_ok = check("forward/backward", forward_backward, "fix the model config or the data (see the error)")

        def checkpoint_round_trip():
            tmp = out / ".preflight-checkpoint"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                save_checkpoint(tmp, model, tok, stage="preflight", recipe=resolved_recipe(cfg), parent=None)
                if fault("corrupt_checkpoint") is not None:  # tests: a save that does not round-trip
                    from safetensors.torch import load_file, save_file

                    weights = load_file(tmp / "model.safetensors")
                    name = sorted(weights)[0]
                    weights[name] = torch.zeros_like(weights[name])
                    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
                loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
                mine, theirs = model.state_dict(), loaded.state_dict()
                differ = [k for k in mine if k not in theirs or not torch.equal(mine[k].cpu(), theirs[k])]
                if differ:
                    raise ValueError(f"weights differ after save and load: {differ[:5]}")
                return f"saved, reloaded and compared {len(mine)} tensors"
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if out_ok:  # it writes into output_dir, whose own failure is already reported
            check("checkpoint round trip", checkpoint_round_trip,
                  "do not train until checkpoints reload identically (model code vs config mismatch, or storage)")

        if fb_ok:
            def evaluation():
                sources = state["sources"]
                model.eval()
                with torch.no_grad():
                    found = []
                    for i, src in enumerate(sources):
                        b = make_batch([(i, r) for r in list(src.validation)[:2]], sources, tok.eos_token_id)
                        o = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"])
                        found.append(f"{src.name} {o.loss.item():.3f}")
                model.train()
                return "validation loss " + ", ".join(found)
            check("evaluation", evaluation, "fix the validation data (validation_rows) or the model")

        def disk():
            params = sum(p.numel() for p in model.parameters())
            # Per checkpoint: HF weights + accelerate's model copy + two AdamW moments, fp32.
            per_checkpoint = 4 * params * 4
            need = per_checkpoint * (cfg.save_total_limit + 1) + 4 * params
            free = shutil.disk_usage(out if out.exists() else out.parent).free
            if free < need:
                raise ValueError(f"{need / 2**30:.2f} GiB needed for {cfg.save_total_limit} checkpoints + the final "
                                 f"model, {free / 2**30:.2f} GiB free")
            return f"{need / 2**30:.3f} GiB needed, {free / 2**30:.1f} GiB free"
        check("disk space", disk, "free disk space, lower save_total_limit, or choose another output_dir")
    return checks


def report(checks: list[Check], printer=print) -> None:
    for c in checks:
        printer(f"preflight {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PreflightError("preflight failed:\n" + "\n".join(f"  {c.name}: {c.detail}" for c in failed))
