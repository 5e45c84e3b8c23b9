"""Ablations: run variants of one recipe that differ in one knob each, and compare them.

    python -m pretrain.ablate --config recipes/tiny/pretrain.yaml --vary model_overrides.qk_norm=true,false \\
        [--vary learning_rate=1e-3,3e-3] [--output_dir out/ablations/qk_norm] [--max_steps 100 ...]

"Change one thing at a time" (Playbook): every variant is the recipe with exactly one key changed
(dotted keys reach into mappings, e.g. model_overrides.qk_norm), same seed and same data. Flags
after the known ones are passed to every run (a shorter max_steps, say). Variants run one after
another as separate `python -m pretrain` processes; a finished variant is reused on a re-run.
Writes ablation.md (a table: final validation loss per source, their mean, tokens/s, each against
the baseline), ablation.json and ablation.png (validation loss per source over steps, throughput).

Curation filters as knobs: with `--curate recipes/tiny/curate.yaml`, a key written `curate.<field>`
varies the curation recipe instead (e.g. `--vary curate.minhash_dedup=false` or
`--vary curate.filter_params.gopher_quality.min_doc_words=10,100`). Every variant, the baseline
too, first curates into its own `<variant>/curated/` (python -m pretrain.curate), and the pretraining
recipe's sources whose path lies under the curation recipe's output_dir read that variant's files:

    python -m pretrain.ablate --config recipes/tiny/pretrain_curated.yaml --curate recipes/tiny/curate.yaml \
        --vary curate.minhash_dedup=false --max_steps 60
"""

import argparse
import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from core.metrics import read_metrics
from core.recipe import load_recipe_file


def parse_vary(text: str) -> tuple[str, list]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise SystemExit(f"--vary {text!r}: write it as key=value1,value2 (e.g. model_overrides.qk_norm=true,false)")
    return key, [yaml.safe_load(v) for v in values.split(",")]


def with_value(recipe: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(recipe)
    node = out
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--vary {dotted}: {p!r} is not a mapping in the recipe")
    node[leaf] = value
    return out


def variants(recipe: dict, varies: list[tuple[str, list]]) -> dict[str, dict]:
    runs = {"baseline": recipe}
    for key, values in varies:
        for value in values:
            name = f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
            runs[name] = with_value(recipe, key, value)
    return runs


def curate_variant(variant: dict, vdir: Path) -> dict:
    """Curate with the variant's curation recipe into vdir/curated/ (once) and return the pretraining
    recipe with its curated sources pointing there."""
    curation = variant.pop("curate")
    base_out = Path(curation["output_dir"])
    curation["output_dir"] = str(vdir / "curated")
    if not (vdir / "curated" / "report.json").exists():
        (vdir / "curate.yaml").write_text(yaml.safe_dump(curation))
        subprocess.run([sys.executable, "-m", "pretrain.curate", "--config", str(vdir / "curate.yaml")], check=True)
    for source in variant.get("sources", []):
        path = Path(source["path"])
        if path.is_relative_to(base_out):
            source["path"] = str(vdir / "curated" / path.relative_to(base_out))
    return variant


def collect(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    curves: dict[str, dict[int, float]] = {}
    tps = []
    for r in rows:
        for k, v in r.items():
            if k.startswith("val_loss/"):
                curves.setdefault(k.removeprefix("val_loss/"), {})[r["step"]] = v
        if "tokens_per_s" in r:
            tps.append(r["tokens_per_s"])
    final = {src: curve[max(curve)] for src, curve in curves.items()}
    return {"curves": curves, "final_val_loss": final, "mean_val_loss": statistics.mean(final.values()),
            "tokens_per_s": statistics.median(tps) if tps else float("nan")}


def write_report(results: dict[str, dict], out: Path) -> None:
    base = results["baseline"]
    sources = sorted(base["final_val_loss"])
    lines = ["| variant | " + " | ".join(f"val {s}" for s in sources) + " | mean val | Δ mean | tokens/s | Δ tok/s |",
             "|---" * (len(sources) + 5) + "|"]
    for name, r in results.items():
        d_loss = r["mean_val_loss"] - base["mean_val_loss"]
        d_tps = r["tokens_per_s"] / base["tokens_per_s"] - 1
        lines.append(f"| {name} | " + " | ".join(f"{r['final_val_loss'][s]:.4f}" for s in sources)
                     + f" | {r['mean_val_loss']:.4f} | {d_loss:+.4f} | {r['tokens_per_s']:,.0f} | {d_tps:+.1%} |")
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sources) + 1, figsize=(4.5 * (len(sources) + 1), 4))
    for ax, src in zip(axes, sources):
        for name, r in results.items():
            curve = r["curves"][src]
            ax.plot(list(curve), list(curve.values()), marker="o", label=name)
        ax.set(title=f"validation loss: {src}", xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
    axes[-1].bar(range(len(results)), [r["tokens_per_s"] for r in results.values()])
    axes[-1].set_xticks(range(len(results)), list(results), rotation=30, ha="right", fontsize=7)
    axes[-1].set(title="throughput", ylabel="tokens/s")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe to vary")
    parser.add_argument("--vary", action="append", required=True, help="key=value1,value2 (repeatable)")
    parser.add_argument("--output_dir", default=None, help="default: out/ablations/<recipe name>")
    parser.add_argument("--curate", default=None, help="a pretrain.curate recipe run before every variant; "
                                                        "--vary curate.<field> varies it")
    args, passthrough = parser.parse_known_args(argv)
    recipe = load_recipe_file(args.config)
    if args.curate is not None:  # one dict holds both recipes, so `variants` changes either the same way
        recipe = {**recipe, "curate": load_recipe_file(args.curate)}
    elif any(v.startswith("curate.") for v in args.vary):
        raise SystemExit("--vary curate.<field> needs --curate <curation recipe>")
    out = Path(args.output_dir or f"out/ablations/{Path(args.config).stem}")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, variant in variants(recipe, [parse_vary(v) for v in args.vary]).items():
        vdir = out / name.replace("/", "_")
        vdir.mkdir(exist_ok=True)
        if args.curate is not None:
            variant = curate_variant(variant, vdir)
        (vdir / "recipe.yaml").write_text(yaml.safe_dump(variant))
        if not (vdir / "run" / "stage.json").exists():
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, "-m", "pretrain", "--config", str(vdir / "recipe.yaml"),
                            "--output_dir", str(vdir / "run"), *passthrough], check=True)
        results[name] = collect(vdir / "run")
    write_report(results, out)
    return results


if __name__ == "__main__":
    main()
