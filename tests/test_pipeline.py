"""The pipeline runner (core/pipeline.py): stages in order, each consuming the previous output; a
complete stage is skipped, an interrupted one resumes, a changed recipe is named and refused;
the report is rebuilt from the run directory alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
        "evaluate": {"greedy": {"suite": "arithmetic", "temperature": 0, "num_samples": 1, "max_new_tokens": 8,
                                "max_examples": 4, "backend": "transformers"}}}, "# smolforge run pipeline.yaml")


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


# --- the runner's decisions, with the stage processes stood in for (each test runs in seconds) ----------------

class FakeStages:
    """Stands in for `subprocess.run` in core.pipeline: a stage "runs" by writing its output directory with a
    stage.json that differs on every run (as a real one does); with `models`, a tiny checkpoint there too, which
    the real rewards.evaluate then scores (its command line run in this process). Other commands run as they
    are. Records what ran, with its command."""

    def __init__(self, real_run, models: bool = False):
        self.real_run, self.models = real_run, models
        self.ran: list[str] = []
        self.commands: dict[str, list[str]] = {}

    def __call__(self, cmd, **kwargs):
        if "rewards.evaluate" in cmd:  # the real evaluation, in this process: two interpreters' imports less
            from rewards.evaluate import main

            main(cmd[cmd.index("rewards.evaluate") + 1:])
            return subprocess.CompletedProcess(cmd, 0)
        if "accelerate.commands.launch" not in cmd:  # not a stage (git, for save_checkpoint)
            return self.real_run(cmd, **kwargs)
        out = Path(cmd[cmd.index("--output_dir") + 1])
        self.ran.append(out.name)
        self.commands[out.name] = cmd
        if self.models:
            self.save_model(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stage.json").write_text(json.dumps({"stage": out.name, "run": len(self.ran)}))
        return subprocess.CompletedProcess(cmd, 0)

    def save_model(self, out: Path) -> None:
        import torch

        from core import SmolForgeConfig, SmolForgeForCausalLM
        from core.checkpoint import save_checkpoint
        from test_rewards_evaluate import arithmetic_tokenizer

        tokenizer = arithmetic_tokenizer()
        torch.manual_seed(len(self.ran))
        model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer),
                                                                 eos_token_id=tokenizer.eos_token_id))
        with torch.no_grad():  # larger weights than the init's, so that checkpoints answer differently
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0.0, 0.3)
        save_checkpoint(out, model, tokenizer, stage=out.name, recipe={}, parent=None)


@pytest.fixture
def fake_stages(monkeypatch):
    import core.pipeline

    fake = FakeStages(subprocess.run)
    monkeypatch.setattr(core.pipeline.subprocess, "run", fake)
    return fake


def pipeline_of(tmp_path: Path, stages: list[dict], evaluate: dict | None = None) -> str:
    data = {"output_dir": str(tmp_path / "run"), "stages": stages, **({"evaluate": evaluate} if evaluate else {})}
    return str(write(tmp_path / "pipeline.yaml", data, "# smolforge run pipeline.yaml"))


def recipe(tmp_path: Path, name: str, module: str, fields: dict) -> str:
    return str(write(tmp_path / f"{name}.yaml", fields, f"# python -m {module} --config {name}.yaml"))


def smolforge_run(*args: str) -> None:
    from core.pipeline import main

    main(["run", *args])


def test_a_stage_whose_recipe_names_another_stage_output_reruns_after_it(tmp_path, fake_stages):
    """Issue 30: recipes/smollm3/pipeline.yaml's merge names the APO and mid-training outputs in its recipe, not
    in `inputs`; after `--rerun apo` it was skipped as complete, a merge of the old APO model."""
    run = tmp_path / "run"
    stages = [{"name": n, "module": "sft", "config": recipe(tmp_path, n, "sft", {"learning_rate": 1e-3})}
              for n in ("apo", "midtrain")]
    merge = recipe(tmp_path, "merge", "preference.merge",
                   {"model_name_or_path": [str(run / "apo"), str(run / "midtrain")], "weights": [0.9, 0.1],
                    "output_dir": str(run / "merged")})  # the runner sets output_dir: not a dependency
    path = pipeline_of(tmp_path, [*stages, {"name": "merge", "module": "preference.merge", "config": merge}])

    smolforge_run(path)
    assert fake_stages.ran == ["apo", "midtrain", "merge"]
    smolforge_run(path, "--rerun", "apo")
    assert fake_stages.ran[3:] == ["apo", "merge"]
    # ... and a merge whose input changed behind the runner's back is refused, naming that input.
    (run / "midtrain" / "stage.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"stage 'merge' was run with another recipe.*upstream\.midtrain"):
        smolforge_run(path)

    from core.pipeline import PipelineError, load_pipeline

    # A recipe naming the output of a stage that runs after it: refused when the file is read.
    early = pipeline_of(tmp_path, [{"name": "merge", "module": "preference.merge", "config": merge}, *stages])
    with pytest.raises(PipelineError, match=r"stage 'merge' .* names the output of \['apo', 'midtrain'\]"):
        load_pipeline(early, [])


def test_an_output_the_pipeline_has_no_record_of_is_refused_not_skipped(tmp_path, fake_stages):
    """Issue 30: an output with stage.json but no pipeline.json record was skipped as complete, whatever
    recipe made it."""
    path = pipeline_of(tmp_path, [{"name": "sft", "module": "sft", "config": recipe(tmp_path, "sft", "sft", {})}])
    by_hand = tmp_path / "run" / "sft"
    by_hand.mkdir(parents=True)
    (by_hand / "stage.json").write_text(json.dumps({"stage": "sft", "recipe": {"learning_rate": 0.5}}))

    with pytest.raises(SystemExit, match=r"stage 'sft': .* holds a complete output that .*pipeline.json has no "
                                         r"record of.*--rerun sft"):
        smolforge_run(path)
    assert fake_stages.ran == [] and json.loads((by_hand / "stage.json").read_text())["recipe"]["learning_rate"] == 0.5

    smolforge_run(path, "--rerun", "sft")  # moved aside, never overwritten
    assert fake_stages.ran == ["sft"]
    (aside,) = (tmp_path / "run").glob("sft.replaced-*")
    assert json.loads((aside / "stage.json").read_text())["recipe"]["learning_rate"] == 0.5


def test_edited_recipe_data_file_or_template_is_named_and_refused(tmp_path, fake_stages):
    """Issue 30: the fingerprint hashed the recipe text only, so an edited data file or chat template that a
    recipe names left the stage skipped as complete."""
    data, template = tmp_path / "chats.jsonl", tmp_path / "chat.jinja"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "7+5?"}]}) + "\n")
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    fields = {"sources": [{"path": str(data)}, {"path": "builtin:arithmetic_chat"}], "chat_template": str(template),
              "learning_rate": 1e-3}
    config = recipe(tmp_path, "sft", "sft", fields)
    path = pipeline_of(tmp_path, [{"name": "sft", "module": "sft", "config": config}])
    smolforge_run(path)
    smolforge_run(path)
    assert fake_stages.ran == ["sft"]  # unchanged: skipped

    data.write_text(json.dumps({"messages": [{"role": "user", "content": "7+6?"}]}) + "\n")  # same size
    with pytest.raises(SystemExit, match=rf"stage 'sft' was run with another recipe: changed \['files\.{data}'\]"):
        smolforge_run(path)
    smolforge_run(path, "--rerun", "sft")
    template.write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(SystemExit, match=rf"changed \['files\.{template}'\]"):
        smolforge_run(path)
    smolforge_run(path, "--rerun", "sft")
    write(Path(config), {**fields, "learning_rate": 2e-3}, "# python -m sft --config sft.yaml")
    with pytest.raises(SystemExit, match=r"changed \['recipe\.learning_rate'\]"):
        smolforge_run(path)
    assert fake_stages.ran == ["sft"] * 3


def test_pipeline_json_keeps_no_credentials(tmp_path, fake_stages):
    """Issue 30: pipeline.json stored --set overrides and recipe text unredacted."""
    config = recipe(tmp_path, "grpo", "rl", {"wandb_api_key": "recipe-secret", "learning_rate": 1e-3})
    path = pipeline_of(tmp_path, [{"name": "grpo", "module": "rl", "config": config}])
    smolforge_run(path, "--set", "grpo.hub_token=command-line-secret")
    state = (tmp_path / "run" / "pipeline.json").read_text()
    assert "secret" not in state and "<redacted>" in state
    assert "command-line-secret" in fake_stages.commands["grpo"]  # the stage itself still gets it
    smolforge_run(path, "--set", "grpo.hub_token=command-line-secret")
    assert fake_stages.ran == ["grpo"]  # the redacted record still matches: skipped


def test_report_shows_greedy_and_sampled_pass_at_1_with_standard_errors(tmp_path, monkeypatch):
    """Issue 30: the demo's report showed greedy pass@1 on 40 prompts alone, with no error bar, and read stage
    names by importing the pipeline runner (an import circle)."""
    import core.pipeline

    fake = FakeStages(subprocess.run, models=True)
    monkeypatch.setattr(core.pipeline.subprocess, "run", fake)
    base, tuned = (recipe(tmp_path, n, "sft", {}) for n in ("base", "tuned"))
    flags = {"suite": "arithmetic", "max_examples": 6, "max_new_tokens": 8, "backend": "transformers",
             "dtype": "float32", "item_timeout_s": 2}
    path = pipeline_of(tmp_path, [
        {"name": "base", "module": "sft", "config": base},
        {"name": "tuned", "module": "sft", "config": tuned, "inputs": {"model_name_or_path": "base"}}],
        evaluate={"greedy": {**flags, "temperature": 0, "num_samples": 1},
                  "sampled": {**flags, "temperature": 1.0, "num_samples": 4}})
    smolforge_run(path)

    run = tmp_path / "run"
    sampled = json.loads((run / "eval" / "sampled" / "results.json").read_text())["models"]
    assert {len(m["samples"]) for m in sampled.values()} == {6 * 4}
    report = (run / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| stage |"))
    assert header.split(" | ")[3:7] == ["pass@1 greedy ± SE", "pass@1 sampled ± SE", "Δ greedy", "Δ sampled"]
    tuned_row = next(line for line in report.splitlines() if line.startswith("| tuned |")).split(" | ")
    summaries = {name: json.loads((run / "eval" / name / "results.json").read_text())["models"]
                 for name in ("greedy", "sampled")}
    for column, name in ((3, "greedy"), (4, "sampled")):
        summary = summaries[name]["tuned"]["summary"]
        assert tuned_row[column] == f"{summary['pass@1']:.4f} ± {summary['pass@1_se']:.4f}"
        start = summaries[name]["base"]["summary"]["pass@1"]
        assert tuned_row[column + 2] == f"{summary['pass@1'] - start:+.4f}"  # against the stage it started from
    assert tuned_row[2] == "base"
    assert "- sampled: 6 held-out prompts of the arithmetic suite, 4 sample(s) per prompt, temperature 1.0" in report


def test_evaluate_block_names_each_evaluation(tmp_path):
    from core.pipeline import PipelineError, load_pipeline

    stages = [{"name": "sft", "module": "sft", "config": recipe(tmp_path, "sft", "sft", {})}]
    flat = pipeline_of(tmp_path, stages, evaluate={"suite": "arithmetic", "temperature": 0})  # the old format
    with pytest.raises(PipelineError, match=r"evaluate must map a name to rewards.evaluate flags, e\.g\."):
        load_pipeline(flat, [])
    named = pipeline_of(tmp_path, stages, evaluate={"greedy": {"suite": "arithmetic", "output_dir": "x"}})
    with pytest.raises(PipelineError, match=r"evaluate\.greedy: the runner sets the checkpoints"):
        load_pipeline(named, [])
