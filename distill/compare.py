"""What distillation bought: the students' and the teacher's scores side by side, with the compute of
each distillation run.

    python -m distill.compare --results out/tiny/eval_distill/results.json --student out/tiny/sft_student \
        --teacher out/tiny/sft --distilled out/tiny/distill out/tiny/distill_off_policy

Reads pass@1 of every checkpoint from a `python -m rewards.evaluate` results.json (run on all of them
with the same settings) and, for each distilled checkpoint, its stage.json: the on-policy fraction and
divergence of its recipe, the completion tokens it trained on (sampled by the student, by the
teacher), its steps and training wall time. Prints one row per checkpoint with the fraction of the
teacher's score it reaches, and returns the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.checkpoint import read_manifest


def scores_by_path(results: Path) -> dict[str, float]:
    """pass@1 of each evaluated checkpoint, keyed by its resolved path."""
    models = json.loads(results.read_text())["models"]
    return {str(Path(m["path"]).resolve()): m["summary"]["pass@1"] for m in models.values()}


def compare(results: Path, student: str, teacher: str, distilled: list[str]) -> list[dict]:
    scores = scores_by_path(results)

    def score(path: str) -> float:
        key = str(Path(path).resolve())
        if key not in scores:
            raise ValueError(f"{path} is not in {results} (evaluated: {sorted(scores)}); evaluate every checkpoint "
                             f"in one `python -m rewards.evaluate` run")
        return scores[key]

    teacher_score = score(teacher)
    rows = [{"model": f"student after SFT ({student})", "pass@1": score(student)}]
    for path in distilled:
        manifest = read_manifest(path)
        recipe, metrics = manifest["recipe"], manifest["metrics"]
        rows.append({"model": f"distilled ({path}): lmbda {recipe['lmbda']}, {recipe['divergence']}"
                              + (f", off-policy loss {recipe['off_policy_loss']}" if recipe["lmbda"] < 1 else ""),
                     "pass@1": score(path), "student tokens": metrics["distill/student_tokens"],
                     "teacher tokens": metrics["distill/teacher_tokens"], "steps": metrics["distill/steps"],
                     "wall s": round(metrics["distill/wall_s"])})
    rows.append({"model": f"teacher ({teacher})", "pass@1": teacher_score})
    for row in rows:
        row["of teacher"] = row["pass@1"] / teacher_score if teacher_score else float("nan")
    return rows


def print_rows(rows: list[dict], split: str) -> None:
    columns = ["pass@1", "of teacher", "student tokens", "teacher tokens", "steps", "wall s"]
    width = max(len(r["model"]) for r in rows)
    print(f"greedy pass@1 on the {split} split; 'of teacher': the fraction of the teacher's score reached")
    print(f"{'model':<{width}}  " + "  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        print(f"{row['model']:<{width}}  " + "  ".join(
            f"{c:>14.3f}" if isinstance(c, float) else f"{c!s:>14}" for c in cells))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, type=Path, help="results.json of python -m rewards.evaluate")
    parser.add_argument("--student", required=True, help="the student checkpoint before distillation")
    parser.add_argument("--teacher", required=True, help="the teacher checkpoint")
    parser.add_argument("--distilled", required=True, nargs="+", help="distilled checkpoints (python -m distill)")
    args = parser.parse_args(argv)
    rows = compare(args.results, args.student, args.teacher, args.distilled)
    print_rows(rows, json.loads(args.results.read_text())["split"])
    return rows


if __name__ == "__main__":
    main()
