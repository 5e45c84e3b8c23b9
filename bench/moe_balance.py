"""Does DeepSeek-V3's bias balancing keep the tiny MoE's experts evenly loaded, where no balancing collapses?

    python bench/moe_balance.py [--steps 300] [--rate 1e-2] [--output_dir out/bench/moe_balance]

Two pretraining runs of recipes/tiny/pretrain_moe.yaml (the tiny-moe preset on the tiny recipe's data, same
seed, same rows), one with `moe_bias_update_rate` at --rate and one at 0 (no balancing at all: no aux loss
either). Each run logs, per logging step, the max/mean expert load of its worst MoE layer over the step's
global batch and its dead experts (core/moe.py: expert_load). Prints both curves and, for each run, the first
logged step from which the load stays below 1.3 to the end; writes moe_balance.json. About 2 x 2 minutes
on 2 CPU cores at the defaults. Not a test: too slow for the test budget (tests/test_moe.py tests the
update rule itself).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from core.metrics import read_metrics  # noqa: E402
from core.recipe import load_recipe_file  # noqa: E402

TARGET = 1.3


def run(name: str, rate: float, args) -> list[dict]:
    out = Path(args.output_dir) / name
    recipe = load_recipe_file(REPO / "recipes/tiny/pretrain_moe.yaml")
    recipe["model_overrides"] = {**recipe.get("model_overrides", {}), "moe_bias_update_rate": rate}
    recipe.update(max_steps=args.steps, logging_steps=10, eval_steps=args.steps, save_steps=args.steps,
                  per_device_train_batch_size=args.batch_size, output_dir=str(out / "run"), skip_preflight=True,
                  expert_collapse_ratio=args.collapse_ratio)
    if args.tokenizer:
        recipe["tokenizer_name_or_path"] = args.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if not (out / "run" / "stage.json").exists():
        subprocess.run([sys.executable, "-m", "pretrain", "--config", str(out / "recipe.yaml")], check=True, cwd=REPO)
    return [{"step": r["step"], "max_mean_load": r["moe/max_mean_load"], "layer_mean": r["moe/mean_max_mean_load"],
             "dead_experts": r["moe/dead_experts"], "loss": r["loss"]}
            for r in read_metrics(out / "run") if "moe/max_mean_load" in r]


def settled_below(curve: list[dict], key: str) -> int | None:
    """First logged step from which max/mean stays below the target to the end of the run."""
    for i, row in enumerate(curve):
        if all(r[key] < TARGET for r in curve[i:]):
            return row["step"]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rate", type=float, default=1e-2, help="moe_bias_update_rate of the balanced run")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--collapse_ratio", type=float, default=3.0, help="expert_collapse alert threshold")
    parser.add_argument("--tokenizer", default=None, help="default: the recipe's out/tiny/tokenizer")
    parser.add_argument("--output_dir", default="out/bench/moe_balance")
    args = parser.parse_args()
    curves = {f"bias {args.rate:g}": run("bias", args.rate, args), "no balancing": run("none", 0.0, args)}
    steps = [r["step"] for r in next(iter(curves.values()))]
    print("\nmax/mean expert load of the step: worst MoE layer / mean over MoE layers [dead experts]")
    print("step  " + "  ".join(f"{name:>22s}" for name in curves))
    for i, step in enumerate(steps):
        print(f"{step:4d}  " + "  ".join(f"{c[i]['max_mean_load']:10.2f} / {c[i]['layer_mean']:4.2f} [{c[i]['dead_experts']}]"
                                         for c in curves.values()))
    summary = {name: {"worst_layer_below_1.3_from": settled_below(c, "max_mean_load"),
                      "layer_mean_below_1.3_from": settled_below(c, "layer_mean"),
                      "final_max_mean_load": c[-1]["max_mean_load"], "final_layer_mean": c[-1]["layer_mean"],
                      "final_loss": c[-1]["loss"], "curve": c} for name, c in curves.items()}
    for name, s in summary.items():
        print(f"{name}: final max/mean {s['final_max_mean_load']:.2f} (worst layer) / {s['final_layer_mean']:.2f} "
              f"(layer mean); below {TARGET} to the end from step {s['worst_layer_below_1.3_from']} (worst layer) / "
              f"{s['layer_mean_below_1.3_from']} (layer mean); final train loss {s['final_loss']:.3f}")
    Path(args.output_dir, "moe_balance.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
