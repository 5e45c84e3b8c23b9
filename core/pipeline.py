"""The pipeline runner: one command from random weights to an evaluated assistant.

    smolforge run recipes/tiny/pipeline.yaml [--from sft] [--until rl] [--rerun sft] [--set sft.learning_rate=1e-3]
    smolforge run recipes/tiny/pipeline.yaml --set seed=1 --set output_dir=out/tiny-seed1   # another seed, run
    smolforge report out/tiny                   # report.md + PNGs, from the run directory alone
    python -m core.pipeline run ...             # the same without the console script

A pipeline file lists stages in order; each runs as its own process (`accelerate launch -m
<module>`), writes `<output_dir>/<name>/`, and consumes earlier stages' outputs:

    output_dir: out/tiny
    stages:
      - {name: tokenizer, module: pretrain.tokenizer, config: recipes/tiny/tokenizer.yaml}
      - {name: pretrain, module: pretrain, config: recipes/tiny/pretrain.yaml,
         inputs: {tokenizer_name_or_path: tokenizer}}
      - {name: sft, module: sft, config: recipes/tiny/sft.yaml, inputs: {model_name_or_path: pretrain},
         processes: 2, overrides: {learning_rate: 1.0e-3}}
    evaluate:
      greedy: {suite: arithmetic, split: test, temperature: 0, num_samples: 1, max_new_tokens: 64}
      sampled: {suite: arithmetic, split: test, num_samples: 8, max_new_tokens: 64}

`seed` (optional) is given to every stage whose recipe sets `seed`, and to every evaluation; `--set seed=N`
and `--set output_dir=DIR` change it and the run directory from the command line.

`inputs` maps a field of the stage's recipe to an earlier stage's output directory (`sft`), a file in
it (`pairs/pairs.jsonl`), or a data source reading that file (`{path: pairs/pairs.jsonl}`); `overrides`
are `--field value` flags; `processes` > 1 launches with recipes/accelerate_configs/ddp.yaml (or
`accelerate_config`). A stage reads the stages its `inputs` name, and those whose output directory a
value of its recipe or overrides names (`model_name_or_path: [out/smollm3/apo, ...]` in a merge recipe).
After the stages, every stage that wrote a model is evaluated on the reward suite by each named
evaluation (`python -m rewards.evaluate` with its flags, into `<output_dir>/eval/<name>/`), and the
report is written.

What happens to a stage, decided from the run directory (`pipeline.json` keeps what each stage was
asked to do: module, recipe file contents, inputs, overrides, credentials redacted):
- complete (its stage.json) with the same request: skipped. The request includes a fingerprint of the
  output of each stage it reads and of the content of each local file its recipe names (data, chat
  templates), and a stage reading a stage that ran in this invocation is rerun;
- complete with a changed request: refused, naming the stage and the changed fields;
- started, not complete, with a changed request (a recipe fixed after the stage failed): the partial output is
  moved aside (never deleted) and the stage runs again;
- an output that `pipeline.json` has no record of (made by hand, or the record lost): refused, as the
  pipeline cannot tell what made it;
- `--rerun NAME`, changed or not: the old output is moved aside (never deleted) and the stage runs again;
- started but not complete: resumed (`--resume_from_checkpoint true`);
- otherwise: run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.checkpoint import MANIFEST_NAME
from core.recipe import RecipeError, load_recipe_file, redacted
from core.report import EVAL_DIR, write_report
from core.sources import SourceSpec, content_fingerprint

STATE_FILE = "pipeline.json"
REPO = Path(__file__).resolve().parents[1]
DDP_CONFIG = REPO / "recipes" / "accelerate_configs" / "ddp.yaml"
STAGE_KEYS = {"name", "module", "config", "inputs", "overrides", "processes", "accelerate_config"}


class PipelineError(ValueError):
    """A pipeline file or run directory is inconsistent; the message names the stage and the field."""


@dataclass
class Stage:
    name: str
    module: str
    config: str
    inputs: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    processes: int = 1
    accelerate_config: str | None = None
    # The earlier stages whose output this one reads: those `inputs` name and those its recipe names by path
    # (set by load_pipeline; not a pipeline-file key).
    upstream: list[str] = field(default_factory=list)

    def recipe(self) -> dict:
        """The recipe as the stage runs it, credentials redacted: the file's fields with `overrides` on top,
        without the fields the runner sets (`inputs`, output_dir)."""
        recipe = {**load_recipe_file(self.config), **self.overrides}
        for key in [*self.inputs, "output_dir"]:
            recipe.pop(key, None)
        return redacted(recipe)

    def request(self, run_dir: Path) -> dict:
        """What the stage is asked to do; a change of any of it means a different stage output.

        `upstream` fingerprints the outputs it reads (their stage.json, rewritten by every run), so a stage
        whose input stage was run again is not skipped as complete: it read the old input. `files`
        fingerprints the content of the local files its recipe names: an edited data file or chat template
        changes the stage's output as much as an edited recipe (issue 30)."""
        upstream = {}
        for name in self.upstream:
            manifest = run_dir / name / MANIFEST_NAME
            upstream[name] = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.exists() else None
        request = {"module": self.module, "recipe": redacted(load_recipe_file(self.config)), "inputs": self.inputs,
                   "overrides": redacted(self.overrides), "processes": self.processes, "upstream": upstream}
        files = local_file_fingerprints(self.recipe(), run_dir)
        # Only when there are any: the records of run directories made before files were fingerprinted stay
        # valid for the recipes that name no local file (all of recipes/tiny/).
        return {**request, "files": files} if files else request


def recipe_strings(value) -> Iterator[str]:
    """Every string in a recipe value, in lists and mappings too."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from recipe_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from recipe_strings(item)


def output_named(text: str, run_dir: Path) -> str | None:
    """The first directory under the run directory that a recipe string names as a path
    (`out/smollm3/apo`, `out/tiny/pairs/pairs.jsonl`: apo, pairs), else None."""
    if "/" not in text:  # a bare word (a preset, a module name) is not a path into the run
        return None
    try:
        relative = Path(text).expanduser().resolve().relative_to(run_dir.resolve())
    except (ValueError, OSError, RuntimeError):  # not under the run directory, or no file name at all
        return None
    return relative.parts[0] if relative.parts else None


def is_local_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except (ValueError, OSError, RuntimeError):  # inline text (a chat template) is too long a name, `~nobody`
        return False


def local_file_fingerprints(recipe: dict, run_dir: Path) -> dict[str, str]:
    """path -> content fingerprint (core.sources.content_fingerprint: size + sha256) of every local file the
    recipe names outside the stage outputs, which `upstream` covers. A directory outside the run (a local
    checkpoint) is taken as named: hashing a model's weights on every run would cost minutes."""
    return {text: content_fingerprint(SourceSpec(path=text)) for text in recipe_strings(recipe)
            if is_local_file(text) and output_named(text, run_dir) is None}


@dataclass
class Pipeline:
    output_dir: Path
    stages: list[Stage]
    evaluate: dict[str, dict]  # evaluation name -> rewards.evaluate flags


PIPELINE_KEYS = {"output_dir", "seed", "stages", "evaluate"}
# What `--set KEY=VALUE` (no stage) changes for the whole run: the run directory, and the seed of every stage whose
# recipe sets one and of every evaluation (issue 30: the demo must pass for seeds 0, 1 and 2, each in its own
# run directory: `smolforge run recipes/tiny/pipeline.yaml --set seed=1 --set output_dir=out/tiny-seed1`).
PIPELINE_SETS = ("output_dir", "seed")


def apply_pipeline_sets(raw: dict, sets: list[str]) -> list[str]:
    """Apply the `--set output_dir=...` / `--set seed=N` assignments to the pipeline file's fields; return the
    per-stage ones (`<stage>.<field>=<value>`)."""
    per_stage = []
    for assignment in sets:
        key, sep, value = assignment.partition("=")
        if sep and key in PIPELINE_SETS:
            raw[key] = yaml.safe_load(value)
        else:
            per_stage.append(assignment)
    return per_stage


def seeded(stages: list[Stage], seed: int) -> None:
    """The pipeline's seed for every stage whose recipe sets `seed` (a stage's own override wins)."""
    for stage in stages:
        if "seed" in load_recipe_file(stage.config):
            stage.overrides.setdefault("seed", seed)


def load_pipeline(path: str, sets: list[str]) -> Pipeline:
    raw = load_recipe_file(path)
    unknown = set(raw) - PIPELINE_KEYS
    if unknown:
        raise PipelineError(f"{path}: unknown keys {sorted(unknown)}; a pipeline has {sorted(PIPELINE_KEYS)}")
    sets = apply_pipeline_sets(raw, sets)
    if "output_dir" not in raw or not raw.get("stages"):
        raise PipelineError(f"{path}: needs output_dir and a non-empty stages list")
    stages = []
    for index, entry in enumerate(raw["stages"]):
        where = f"{path}: stages[{index}]"
        if not isinstance(entry, dict) or not {"name", "module", "config"} <= set(entry):
            raise PipelineError(f"{where} needs name, module and config, got {entry!r}")
        if set(entry) - STAGE_KEYS:
            raise PipelineError(f"{where} ({entry['name']}): unknown keys {sorted(set(entry) - STAGE_KEYS)}; "
                                f"keys: {sorted(STAGE_KEYS)}")
        stage = Stage(**entry)
        if not Path(stage.config).is_file():
            raise PipelineError(f"{where} ({stage.name}): config {stage.config} does not exist")
        missing = [input_stage(v) for v in stage.inputs.values() if input_stage(v) not in [s.name for s in stages]]
        if missing:
            raise PipelineError(f"{where} ({stage.name}): inputs name {missing}, which are not earlier stages")
        stages.append(stage)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: stage names must be unique, got {names}")
    for assignment in sets:  # --set stage.field=value
        target, sep, value = assignment.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or name not in names:
            raise PipelineError(f"--set {assignment!r}: write it as <stage>.<field>=<value>, stage one of {names}, "
                                f"or {' / '.join(f'{k}=<value>' for k in PIPELINE_SETS)} for the whole run")
        stages[names.index(name)].overrides[key] = yaml.safe_load(value)
    evaluate = evaluations(raw.get("evaluate"), path)
    if raw.get("seed") is not None:
        seeded(stages, raw["seed"])
        evaluate = {name: {**flags, "seed": flags.get("seed", raw["seed"])} for name, flags in evaluate.items()}
    run_dir = Path(raw["output_dir"])
    for index, stage in enumerate(stages):
        stage.upstream = upstream_stages(stage, run_dir, names[:index], names[index + 1:], path)
    return Pipeline(run_dir, stages, evaluate)


def upstream_stages(stage: Stage, run_dir: Path, earlier: list[str], later: list[str], path: str) -> list[str]:
    """The earlier stages whose output `stage` reads: named by its `inputs`, or by a path in its recipe or
    overrides (a merge recipe lists its checkpoints itself). Without the second kind, `--rerun apo` left
    the merge of the old APO model standing as complete (issue 30)."""
    named = {output_named(text, run_dir) for text in recipe_strings(stage.recipe())}
    too_late = sorted(named & set(later))
    if too_late:
        raise PipelineError(f"{path}: stage {stage.name!r} ({stage.config}) names the output of {too_late} in its "
                            f"recipe, but runs before them; move it after them")
    return sorted({input_stage(v) for v in stage.inputs.values()} | (named & set(earlier)))


def evaluations(raw, path: str) -> dict[str, dict]:
    """`evaluate:`, a mapping of evaluation name -> rewards.evaluate flags (e.g. greedy and sampled)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(flags, dict) for flags in raw.values()):
        raise PipelineError(f"{path}: evaluate must map a name to rewards.evaluate flags, e.g. evaluate: "
                            f"{{greedy: {{suite: arithmetic, temperature: 0, num_samples: 1}}, sampled: "
                            f"{{suite: arithmetic, num_samples: 8}}}}; got {raw!r}")
    for name, flags in raw.items():
        if "/" in str(name) or "output_dir" in flags or "model_name_or_path" in flags:
            raise PipelineError(f"{path}: evaluate.{name}: the runner sets the checkpoints and writes "
                                f"{EVAL_DIR}/<name>/; give a plain name and the other flags only")
    return raw


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two requests."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def input_stage(value: str | dict) -> str:
    """The stage an input names: `sft` (its output directory), `pairs/pairs.jsonl` (a file in it), or a
    data source mapping whose `path` is such a file (`{path: pairs/pairs.jsonl}`, for `sources`)."""
    path = value.get("path", "") if isinstance(value, dict) else value
    return str(path).split("/", 1)[0]


def input_value(value: str | dict, run_dir: Path) -> str:
    """An input as its command-line value, the stage name replaced by the stage's output directory."""
    if isinstance(value, dict):
        return json.dumps({**value, "path": str(run_dir / value["path"])})
    return str(run_dir / value)


def command(stage: Stage, out: Path, run_dir: Path, resume: bool) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if stage.processes > 1:
        launch += ["--config_file", stage.accelerate_config or str(DDP_CONFIG), "--num_processes", str(stage.processes)]
    else:
        launch += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    flags = ["--config", stage.config, "--output_dir", str(out)]
    for key, source in stage.inputs.items():
        flags += [f"--{key}", input_value(source, run_dir)]
    for key, value in stage.overrides.items():
        # As typed on a command line: a list as several words, a mapping as YAML/JSON text.
        flags += [f"--{key}", *map(str, value)] if isinstance(value, list) else [
            f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    if resume:
        flags += ["--resume_from_checkpoint", "true"]
    return [*launch, "-m", stage.module, *flags]


class RunState:
    """`pipeline.json` in the run directory: each stage's request, wall time and status."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE_FILE
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def aside_path(out: Path) -> Path:
    """A free name beside `out` for its old output; two reruns within a second (a stage that fails at once)
    need two."""
    stamp = int(time.time())
    names = (out.with_name(f"{out.name}.replaced-{stamp}" + (f"-{n}" if n else "")) for n in itertools.count())
    return next(path for path in names if not path.exists())


def run_stage(stage: Stage, run_dir: Path, state: RunState, rerun: bool) -> str:
    """Run, resume or skip one stage; returns what was done."""
    out = run_dir / stage.name
    request, record = stage.request(run_dir), state.stage(stage.name)
    # The report's "started from" and teacher columns (core/report.py reads stage names, not input syntax).
    record["input_stages"] = {key: input_stage(value) for key, value in stage.inputs.items()}
    if out.exists() and "request" not in record and not rerun:
        # Made outside this pipeline (or its record lost): skipping it as complete would build the next stages on
        # a checkpoint of unknown recipe, resuming it would continue someone else's run (issue 30).
        kind = "a complete" if (out / MANIFEST_NAME).exists() else "a started"
        raise PipelineError(f"stage {stage.name!r}: {out} holds {kind} output that {state.path} has no record "
                            f"of, so the pipeline cannot tell which recipe made it; pass --rerun {stage.name} to run "
                            f"the stage again (the old output is kept beside it), or use another output_dir")
    changed = "request" in record and record["request"] != request
    if out.exists() and (changed or rerun):
        if not rerun and (out / MANIFEST_NAME).exists():
            raise PipelineError(f"stage {stage.name!r} was run with another recipe: changed "
                                f"{changed_fields(record['request'], request)}; pass --rerun {stage.name} to run it "
                                f"again (the old output is kept beside it)")
        # --rerun, or a stage that never completed and whose recipe was changed since (the fix after a failure:
        # its partial output cannot be resumed under another recipe). Never deleted: moved aside.
        aside = aside_path(out)
        out.rename(aside)
        print(f"[{stage.name}] old output moved to {aside}"
              + ("" if rerun else f" (unfinished, and its recipe changed: {changed_fields(record['request'], request)})"))
    if (out / MANIFEST_NAME).exists():
        return "skipped (complete)"
    resume = out.exists() and any(out.glob("checkpoint-*"))
    if not resume:  # a resumed stage's time adds up; a fresh run's starts from zero
        record.pop("wall_seconds", None)
    record.update({"request": request, "module": stage.module, "status": "running"})
    state.save()
    print(f"[{stage.name}] {'resuming' if resume else 'running'}: python -m {stage.module} --config {stage.config}",
          flush=True)
    started = time.time()
    result = subprocess.run(command(stage, out, run_dir, resume))
    record["wall_seconds"] = record.get("wall_seconds", 0.0) + time.time() - started
    record["status"] = "complete" if result.returncode == 0 else f"failed (exit {result.returncode})"
    state.save()
    if result.returncode != 0:
        raise SystemExit(f"stage {stage.name!r} failed with exit code {result.returncode}; fix it and run the "
                         f"pipeline again: complete stages are skipped and this one resumes")
    return "resumed" if resume else "ran"


def evaluate(pipeline: Pipeline, state: RunState) -> None:
    """Every stage output that is a model, side by side on the reward suite (rewards.evaluate), once per named
    evaluation: `<output_dir>/eval/<name>/results.json`."""
    run_dir = pipeline.output_dir
    models = [str(run_dir / s.name) for s in pipeline.stages if (run_dir / s.name / "config.json").exists()]
    if not pipeline.evaluate or not models:
        return
    record = state.stage("evaluate")
    record.update({"status": "running", "wall_seconds": {}})
    for name, options in pipeline.evaluate.items():
        flags = [item for key, value in options.items() for item in (f"--{key}", str(value))]
        started = time.time()
        subprocess.run([sys.executable, "-m", "rewards.evaluate", "--model_name_or_path", *models, *flags,
                        "--output_dir", str(run_dir / EVAL_DIR / name)], check=True)
        record["wall_seconds"][name] = time.time() - started
    record["status"] = "complete"
    state.save()


def run(args: argparse.Namespace) -> None:
    pipeline = load_pipeline(args.pipeline, args.set or [])
    check_stage_names(pipeline, args)
    names = [s.name for s in pipeline.stages]
    first = names.index(args.from_stage) if args.from_stage else 0
    last = names.index(args.until) if args.until else len(names) - 1
    run_dir = pipeline.output_dir
    state = RunState(run_dir)
    state.data["pipeline"] = {"file": args.pipeline, "stages": names, "evaluate": list(pipeline.evaluate)}
    ran: set[str] = set()
    for stage in pipeline.stages[first:last + 1]:
        # A stage reading the output of one that just ran again is rerun too, as `make` would.
        rerun = stage.name in (args.rerun or []) or any(name in ran for name in stage.upstream)
        done = run_stage(stage, run_dir, state, rerun)
        if done != "skipped (complete)":
            ran.add(stage.name)
        print(f"[{stage.name}] {done}", flush=True)
    state.save()
    if last == len(names) - 1:
        evaluate(pipeline, state)
    print(write_report(run_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolforge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    run_parser = verbs.add_parser("run", help="run a pipeline file")
    run_parser.add_argument("pipeline")
    run_parser.add_argument("--from", dest="from_stage", help="first stage to run (earlier ones must be complete)")
    run_parser.add_argument("--until", help="last stage to run")
    run_parser.add_argument("--rerun", action="append", help="run this stage again although its recipe changed")
    run_parser.add_argument("--set", action="append",
                            help="<stage>.<field>=<value>: a per-stage override; seed=<N> / output_dir=<dir>: the "
                                 "whole run's seed (every stage whose recipe sets one, every evaluation) and directory")
    report_parser = verbs.add_parser("report", help="write report.md for a run directory")
    report_parser.add_argument("run_dir")
    return parser


def check_stage_names(pipeline: Pipeline, args: argparse.Namespace) -> None:
    names = [s.name for s in pipeline.stages]
    for flag, values in (("from", [args.from_stage]), ("until", [args.until]), ("rerun", args.rerun or [])):
        for value in values:
            if value is not None and value not in names:
                raise PipelineError(f"--{flag} {value!r}: not a stage; stages: {names}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "run":
            run(args)
        else:
            print(write_report(Path(args.run_dir)))
    except (PipelineError, RecipeError) as error:
        raise SystemExit(f"smolforge: {error}") from error


if __name__ == "__main__":
    main()
