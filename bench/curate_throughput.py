"""Curation throughput: documents/s of pretrain.curate with 1 and 2 worker processes.

    .venv/bin/python bench/curate_throughput.py [--math_rows 8000] [--tasks 2]

The recipe is recipes/tiny/curate.yaml (quality filters, decontamination, exact + MinHash dedup, PII)
with `builtin:math` enlarged to `--math_rows` documents, so the measurement is not only start-up.
Each configuration curates into a fresh directory; the time is the whole run (every datatrove stage,
the merge and the report), divided into the documents read. datatrove's local executor starts a
process pool per stage when workers > 1 (forkserver), so 2 workers pay that start-up once per stage.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from core.recipe import load_recipe_file
from pretrain.curate import CurateConfig, curate


def run(recipe: dict, workers: int, tasks: int, output_dir: Path) -> tuple[int, float]:
    cfg = CurateConfig(**{**recipe, "output_dir": str(output_dir), "workers": workers, "tasks": tasks})
    start = time.perf_counter()
    report = curate(cfg)
    seconds = time.perf_counter() - start
    return sum(src["funnel"][0]["documents"] for src in report["sources"].values()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--math_rows", type=int, default=8000)
    parser.add_argument("--tasks", type=int, default=2)
    args = parser.parse_args()
    recipe = load_recipe_file(str(Path(__file__).resolve().parent.parent / "recipes/tiny/curate.yaml"))
    for source in recipe["sources"]:
        if source["name"] == "math":
            source["max_rows"] = args.math_rows
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            docs, seconds = run(recipe, workers, args.tasks, Path(tmp) / f"w{workers}")
            results[workers] = {"documents": docs, "seconds": round(seconds, 1), "documents_per_s": round(docs / seconds)}
    for workers, r in results.items():
        print(f"workers={workers} tasks={args.tasks}: {r['documents']} documents in {r['seconds']} s = "
              f"{r['documents_per_s']} documents/s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
