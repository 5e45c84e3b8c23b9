"""The report of a pipeline run, rebuilt from the run directory alone.

    smolforge report out/tiny      # writes out/tiny/report.md, loss_curves.png, scores.png

It reads what the stages and the runner left there: `pipeline.json` (stages in order, wall time
of each), each stage's `stage.json` and `metrics.jsonl` (loss curves, tokens), `alerts.jsonl`, and
`eval/results.json` (reward-suite scores of every stage's checkpoint). Nothing is recomputed, so
the report of a finished run can be regenerated anywhere the directory is copied.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.metrics import METRICS_FILE, read_metrics
from core.pipeline import input_stage


def _stage_rows(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "pipeline.json").read_text())
    rows = []
    for name in state["pipeline"]["stages"]:
        out, record = run_dir / name, state["stages"].get(name, {})
        metrics = read_metrics(out) if (out / METRICS_FILE).exists() else []
        tokens = [m["num_tokens"] for m in metrics if "num_tokens" in m]
        alerts = (out / "alerts.jsonl").read_text().splitlines() if (out / "alerts.jsonl").exists() else []
        inputs = record.get("request", {}).get("inputs", {})
        rows.append({"name": name, "status": record.get("status", "not run"),
                     # The checkpoints it started from and learned from: deltas are against these.
                     "start": input_stage(inputs["model_name_or_path"]) if "model_name_or_path" in inputs else None,
                     "teacher": (input_stage(inputs["teacher_model_name_or_path"])
                                 if "teacher_model_name_or_path" in inputs else None),
                     "wall_seconds": record.get("wall_seconds"), "tokens": int(tokens[-1]) if tokens else None,
                     "losses": {m["step"]: m["loss"] for m in metrics if m.get("loss") is not None},
                     "alerts": [json.loads(a) for a in alerts if a.strip()]})
    return rows


def _scores(run_dir: Path) -> dict[str, dict]:
    """stage name -> summary of its checkpoint in eval/results.json (when evaluated)."""
    path = run_dir / "eval" / "results.json"
    if not path.exists():
        return {}
    models = json.loads(path.read_text())["models"]
    return {Path(entry["path"]).name: entry["summary"] for entry in models.values()}


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(run_dir: Path) -> str:
    """Write report.md (+ PNGs) into `run_dir`; return the scores table as printed text."""
    run_dir = Path(run_dir)
    rows, scores = _stage_rows(run_dir), _scores(run_dir)
    lines = ["| stage | status | started from | pass@1 | Δ pass@1 | accuracy | wall time (s) | tokens |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    pass_at_1 = {name: summary["pass@1"] for name, summary in scores.items()}
    for row in rows:
        summary = scores.get(row["name"])
        passed = pass_at_1.get(row["name"])
        accuracy = summary["rewards"]["accuracy"]["mean"] if summary and "accuracy" in summary["rewards"] else None
        # The stage's own gain: against the checkpoint it started from, not the row above (a distillation
        # student starts from its own short SFT, not from the RL model listed before it).
        start = pass_at_1.get(row["start"])
        delta = passed - start if passed is not None and start is not None else None
        lines.append(f"| {row['name']} | {row['status']} | {row['start'] or 'n/a'} | {_fmt(passed)} | "
                     f"{_fmt(delta, '+.4f')} | {_fmt(accuracy)} | {_fmt(row['wall_seconds'], '.0f')} | "
                     f"{_fmt(row['tokens'], ',')} |")
        teacher = pass_at_1.get(row["teacher"])
        if passed is not None and teacher:
            notes.append(f"{row['name']} reaches {passed / teacher:.0%} of its teacher {row['teacher']}'s pass@1 "
                         f"({passed:.4f} / {teacher:.4f}).")
    table = "\n".join([*lines, *([""] + notes if notes else [])])
    alerts = [f"- {row['name']}: step {a['step']} {a['kind']} -> {a['action']}: {a['message']}"
              for row in rows for a in row["alerts"]]
    _plot(run_dir, rows, scores)
    report = ["# Pipeline report", "", f"Run directory: `{run_dir}`", "", "## Scores and cost per stage", "",
              table, "", "Scores: the reward suite's pass@1 and mean accuracy of each stage's checkpoint on held-out "
              "prompts (eval/results.json); Δ is against the checkpoint the stage started from.", "", "![loss curves](loss_curves.png)", "", "![scores](scores.png)",
              "", "## Alerts", "", *(alerts or ["none"]), ""]
    (run_dir / "report.md").write_text("\n".join(report))
    return table


def _plot(run_dir: Path, rows: list[dict], scores: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    curves = [row for row in rows if row["losses"]]
    figure, axes = plt.subplots(1, max(len(curves), 1), figsize=(4 * max(len(curves), 1), 3.5), squeeze=False)
    for axis, row in zip(axes[0], curves):
        axis.plot(list(row["losses"]), list(row["losses"].values()))
        axis.set(title=row["name"], xlabel="step", ylabel="loss")
    figure.tight_layout()
    figure.savefig(run_dir / "loss_curves.png", dpi=90)
    plt.close(figure)
    names = [row["name"] for row in rows if row["name"] in scores]
    figure, axis = plt.subplots(figsize=(1.2 * max(len(names), 2) + 2, 3.5))
    axis.bar(names, [scores[n]["pass@1"] or 0.0 for n in names])
    axis.set(title="pass@1 on held-out prompts", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(run_dir / "scores.png", dpi=90)
    plt.close(figure)
