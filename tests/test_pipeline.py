"""The pipeline runner (core/pipeline.py): stages in order, each consuming the previous output; a
complete stage is skipped, an interrupted one resumes, a changed recipe is named and refused;
the report is rebuilt from the run directory alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO


def write(path: Path, data: dict, first_line: str) -> Path:
    path.write_text(first_line + "\n" + yaml.safe_dump(data))
    return path


def pipeline_file(tmp_path: Path) -> Path:
    tok = write(tmp_path / "tokenizer.yaml", {"vocab_size": 512, "sample_documents": 200, "sources": [
        {"name": "arithmetic", "path": "builtin:arithmetic"}, {"name": "math", "path": "builtin:math"}]},
        "# python -m pretrain.tokenizer --config tokenizer.yaml")
    pre = write(tmp_path / "pretrain.yaml", {
        "model_preset": "tiny", "max_length": 64, "max_steps": 6, "per_device_train_batch_size": 8,
        "warmup_steps": 1, "lr_scheduler_kwargs": {"num_decay_steps": 2, "decay_type": "linear"}, "save_steps": 3,
        "eval_steps": 6, "logging_steps": 1, "data_cache_dir": str(tmp_path / "cache"),
        "sources": [{"name": "arithmetic", "path": "builtin:arithmetic", "max_rows": 2000}]},
        "# python -m pretrain --config pretrain.yaml")
    sft = write(tmp_path / "sft.yaml", {
        "sources": [{"path": "builtin:arithmetic_chat", "max_rows": 16}], "max_length": 1024, "max_steps": 2,
        "per_device_train_batch_size": 2, "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-3},
        "# python -m sft --config sft.yaml")
    return write(tmp_path / "pipeline.yaml", {
        "output_dir": str(tmp_path / "run"),
        "stages": [{"name": "tokenizer", "module": "pretrain.tokenizer", "config": str(tok)},
                   {"name": "pretrain", "module": "pretrain", "config": str(pre),
                    "inputs": {"tokenizer_name_or_path": "tokenizer"}},
                   {"name": "sft", "module": "sft", "config": str(sft), "inputs": {"model_name_or_path": "pretrain"}}],
        "evaluate": {"suite": "arithmetic", "temperature": 0, "num_samples": 1, "max_new_tokens": 8,
                     "max_examples": 4, "backend": "transformers"}}, "# smolforge run pipeline.yaml")


def smolforge(*args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOLFORGE_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "core.pipeline", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=900)


def test_pipeline_runs_skips_resumes_and_names_a_changed_recipe(tmp_path):
    path = pipeline_file(tmp_path)
    run = tmp_path / "run"

    # Killed in the middle of pretraining (after its checkpoint 3): the pipeline stops there.
    killed = smolforge("run", str(path), fault="kill_after_step:3")
    assert killed.returncode != 0 and "stage 'pretrain' failed" in killed.stderr
    assert (run / "tokenizer" / "stage.json").exists() and not (run / "pretrain" / "stage.json").exists()

    # Run again: the tokenizer is skipped, pretraining resumes from its checkpoint, the rest runs.
    again = smolforge("run", str(path))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "[tokenizer] skipped (complete)" in again.stdout
    assert "[pretrain] resuming" in again.stdout and "[pretrain] resumed" in again.stdout
    assert "[sft] ran" in again.stdout
    losses = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in losses if "loss" in row] == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate

    # The report: a row per stage with scores, time and tokens; rebuilt from the directory alone.
    report = (run / "report.md").read_text()
    assert "| pretrain | complete |" in report and "| sft | complete |" in report
    assert (run / "loss_curves.png").stat().st_size > 5000 and (run / "scores.png").exists()
    (run / "report.md").unlink()
    assert smolforge("report", str(run)).returncode == 0 and (run / "report.md").read_text() == report

    # Nothing changed: everything is skipped. One field changed: the runner names it and refuses.
    assert smolforge("run", str(path)).stdout.count("skipped (complete)") == 3
    changed = smolforge("run", str(path), "--set", "sft.learning_rate=0.002")
    assert changed.returncode != 0 and "stage 'sft'" in changed.stderr and "overrides.learning_rate" in changed.stderr
    rerun = smolforge("run", str(path), "--set", "sft.learning_rate=0.002", "--rerun", "sft", "--from", "sft")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert list(run.glob("sft.replaced-*")), "the old output is kept, never deleted"

    # A stage rerun makes the stages reading its output run again: they read the old one before.
    upstream = smolforge("run", str(path), "--set", "sft.learning_rate=0.002", "--rerun", "pretrain", "--from", "pretrain")
    assert upstream.returncode == 0, upstream.stderr[-3000:]
    assert "[pretrain] ran" in upstream.stdout and "[sft] ran" in upstream.stdout
    # ... and a stage whose input stage changed behind its back is refused, naming that input.
    state = json.loads((run / "pipeline.json").read_text())
    state["stages"]["sft"]["request"]["upstream"]["pretrain"] = "0" * 16
    (run / "pipeline.json").write_text(json.dumps(state))
    stale = smolforge("run", str(path), "--set", "sft.learning_rate=0.002", "--from", "sft")
    assert stale.returncode != 0 and "upstream.pretrain" in stale.stderr
    table = (run / "report.md").read_text()
    assert "| sft | complete | pretrain |" in table  # the delta column is against the stage's start
