"""The report of a pipeline run, rebuilt from the run directory alone.

    smolforge report out/tiny      # writes out/tiny/report.md, loss_curves.png, scores.png

It reads what the stages and the runner left there: `pipeline.json` (stages in order, wall time
of each, the stages each one started from), each stage's `stage.json` and `metrics.jsonl` (loss
curves, tokens), `alerts.jsonl`, and `eval/<evaluation>/results.json` (reward-suite scores of every
stage's checkpoint, one directory per evaluation of the pipeline file: greedy, sampled). Nothing is
recomputed, so the report of a finished run can be regenerated anywhere the directory is copied.
The pipeline runner (core/pipeline.py) imports this module, not the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.metrics import METRICS_FILE, read_metrics

EVAL_DIR = "eval"  # <run dir>/eval/<evaluation name>/results.json, written by rewards.evaluate


def _stage_rows(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "pipeline.json").read_text())
    rows = []
    for name in state["pipeline"]["stages"]:
        out, record = run_dir / name, state["stages"].get(name, {})
        metrics = read_metrics(out) if (out / METRICS_FILE).exists() else []
        tokens = [m["num_tokens"] for m in metrics if "num_tokens" in m]
        alerts = (out / "alerts.jsonl").read_text().splitlines() if (out / "alerts.jsonl").exists() else []
        inputs = record.get("input_stages", {})
        rows.append({"name": name, "status": record.get("status", "not run"),
                     # The checkpoints it started from and learned from: deltas are against these.
                     "start": inputs.get("model_name_or_path"), "teacher": inputs.get("teacher_model_name_or_path"),
                     "wall_seconds": record.get("wall_seconds"), "tokens": int(tokens[-1]) if tokens else None,
                     "losses": {m["step"]: m["loss"] for m in metrics if m.get("loss") is not None},
                     "alerts": [json.loads(a) for a in alerts if a.strip()]})
    return rows


def _evaluations(run_dir: Path) -> dict[str, dict]:
    """evaluation name -> {"settings": ..., "prompts": ..., "scores": {stage name -> summary}}, in the pipeline
    file's order, for the evaluations that wrote eval/<name>/results.json."""
    state = json.loads((run_dir / "pipeline.json").read_text())
    found = {}
    for name in state["pipeline"].get("evaluate", []):
        path = run_dir / EVAL_DIR / name / "results.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        models = list(results["models"].values())
        settings = results["generation"]
        found[name] = {"settings": settings, "suite": results["suite"],
                       "prompts": len(models[0]["samples"]) // settings["num_samples"] if models else 0,
                       "scores": {Path(entry["path"]).name: entry["summary"] for entry in models},
                       "wall_seconds": state["stages"].get("evaluate", {}).get("wall_seconds", {}).get(name)}
    return found


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _pass_at_1(summary: dict | None) -> tuple[float | None, float | None]:
    """pass@1 and its standard error over prompts (None where not evaluated)."""
    return (None, None) if summary is None else (summary["pass@1"], summary.get("pass@1_se"))


def write_report(run_dir: Path) -> str:
    """Write report.md (+ PNGs) into `run_dir`; return the scores table as printed text."""
    run_dir = Path(run_dir)
    rows, evaluations = _stage_rows(run_dir), _evaluations(run_dir)
    header = ["stage", "status", "started from", *(f"pass@1 {name} ± SE" for name in evaluations),
              *(f"Δ {name}" for name in evaluations), "wall time (s)", "tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in rows:
        scores, deltas, of_teacher = [], [], []
        for name, evaluation in evaluations.items():
            passed, error = _pass_at_1(evaluation["scores"].get(row["name"]))
            scores.append("n/a" if passed is None else _fmt(passed) + (f" ± {error:.4f}" if error is not None else ""))
            # The stage's own gain: against the checkpoint it started from, not the row above (a distillation
            # student starts from its own short SFT, not from the RL model listed before it).
            start, _ = _pass_at_1(evaluation["scores"].get(row["start"]))
            deltas.append(_fmt(passed - start if passed is not None and start is not None else None, "+.4f"))
            teacher, _ = _pass_at_1(evaluation["scores"].get(row["teacher"]))
            if passed is not None and teacher:
                of_teacher.append(f"{passed / teacher:.0%} {name} ({passed:.4f} / {teacher:.4f})")
        lines.append(f"| {row['name']} | {row['status']} | {row['start'] or 'n/a'} | " + " | ".join(scores + deltas)
                     + f" | {_fmt(row['wall_seconds'], '.0f')} | {_fmt(row['tokens'], ',')} |")
        if of_teacher:
            notes.append(f"{row['name']} reaches {', '.join(of_teacher)} of its teacher {row['teacher']}'s pass@1.")
    table = "\n".join([*lines, *([""] + notes if notes else [])])
    alerts = [f"- {row['name']}: step {a['step']} {a['kind']} -> {a['action']}: {a['message']}"
              for row in rows for a in row["alerts"]]
    _plot(run_dir, rows, evaluations)
    report = ["# Pipeline report", "", f"Run directory: `{run_dir}`", "", "## Scores and cost per stage", "",
              table, "", *_how_scored(evaluations), "", "![loss curves](loss_curves.png)", "",
              "![scores](scores.png)", "", "## Alerts", "", *(alerts or ["none"]), ""]
    (run_dir / "report.md").write_text("\n".join(report))
    return table


def _how_scored(evaluations: dict[str, dict]) -> list[str]:
    if not evaluations:
        return ["No evaluation of the checkpoints (the pipeline file has no `evaluate:`, or it has not run yet)."]
    lines = ["Scores: pass@1 of each stage's checkpoint (the mean over prompts of the fraction of its samples that "
             "are right) ± its standard error over prompts (another draw of as many prompts moves it about that "
             "much); Δ is against the checkpoint the stage started from.", ""]
    for name, evaluation in evaluations.items():
        settings = evaluation["settings"]
        decoding = ("greedy" if settings["temperature"] == 0 else
                    f"temperature {settings['temperature']}, top_p {settings['top_p']}")
        lines.append(f"- {name}: {evaluation['prompts']} held-out prompts of the {evaluation['suite']} suite, "
                     f"{settings['num_samples']} sample(s) per prompt, {decoding}; "
                     f"{_fmt(evaluation['wall_seconds'], '.0f')} s ({EVAL_DIR}/{name}/results.json)")
    return lines


def _plot(run_dir: Path, rows: list[dict], evaluations: dict[str, dict]) -> None:
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
    names = [row["name"] for row in rows if any(row["name"] in e["scores"] for e in evaluations.values())]
    figure, axis = plt.subplots(figsize=(1.2 * max(len(names), 2) + 2, 3.5))
    width = 0.8 / max(len(evaluations), 1)
    for position, (name, evaluation) in enumerate(evaluations.items()):
        scores = [_pass_at_1(evaluation["scores"].get(stage)) for stage in names]
        axis.bar([i + position * width for i in range(len(names))], [p or 0.0 for p, _ in scores], width,
                 yerr=[e or 0.0 for _, e in scores], capsize=3, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    axis.set(title="pass@1 on held-out prompts (± SE)", ylim=(0, 1))
    if evaluations:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(run_dir / "scores.png", dpi=90)
    plt.close(figure)
