"""The one local metrics file every stage writes: `output_dir/metrics.jsonl`, one JSON object per log.

    {"step": 20, "loss": 1.93, "learning_rate": 0.003, "grad_norm": 0.41, "num_tokens": 81920, ...}

Metric names are the Hugging Face Trainer / TRL ones, so a curve means the same thing in every
stage: `loss` is the mean training loss over the steps since the previous log line (not the last
step's), `learning_rate`, `grad_norm`, `num_tokens` (tokens seen so far). Stage-specific metrics
sit next to them (`val_loss/<source>`, `rewards/accuracy/mean`, ...).

Remote trackers are the libraries' own: TRL stages use `report_to` (TrainingArguments), pretraining
uses accelerate's trackers (`Accelerator(log_with=report_to)`), with the same names. This file is
written in addition, always, on the main process, so `smolforge report` and the tests read one format.

Resume: a run killed after logging step 23 but resumed from checkpoint 20 would log 21..23 twice.
`MetricsWriter(..., resume_step=20)` drops the lines after step 20 first, so the file continues
without a gap or a duplicate step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of a step-keyed JSONL log (metrics, rollouts, alerts) after `step`, atomically:
    a run resumed from checkpoint `step` logs the later steps again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsWriter:
    """Appends `{"step": ..., **metrics}` lines to `output_dir/metrics.jsonl` when `enabled` (main process)."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled and resume_step is not None:
            truncate_after(self.path, resume_step)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled or not metrics:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as stream:
            stream.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """Every line of a run's metrics.jsonl, in order."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsCallback(TrainerCallback):
    """The Trainer side: every `on_log` (TRL's names already) goes to metrics.jsonl."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = output_dir
        self.writer: MetricsWriter | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # state.global_step is the resumed step here (0 for a fresh run).
        self.writer = MetricsWriter(self.output_dir, state.is_world_process_zero,
                                    resume_step=state.global_step if state.global_step else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.writer is not None and logs:
            self.writer.write(state.global_step, logs)

