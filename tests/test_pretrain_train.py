"""The pretraining loop: it learns, and resume after kill -9 is exact (1 process) or within fp
tolerance (2 processes, DDP and FSDP2 over gloo), reading the same rows with no repeats or gaps."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_stage, logged_losses, ok, write_recipe
from pretrain.train import main as pretrain_main


def recipe(tmp_path: Path, tokenizer_dir: Path, **overrides) -> Path:
    cfg = {
        "tokenizer_name_or_path": str(tokenizer_dir), "model_preset": "tiny", "max_length": 64,
        "sources": [{"name": "arithmetic", "path": "builtin:arithmetic", "weight": 0.7, "max_rows": 3000},
                    {"name": "prose", "path": "builtin:prose", "weight": 0.3}],
        "max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 2, "lr_scheduler_kwargs": {"num_decay_steps": 2, "decay_type": "linear"},
        "save_steps": 3, "eval_steps": 100, "logging_steps": 1, "log_sequence_ids": True,
        "data_cache_dir": str(tmp_path.parent / "data_cache"),
    }
    return write_recipe(tmp_path, {**cfg, **overrides})


def launch(recipe_path: Path, output_dir: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return launch_stage("pretrain", recipe_path, output_dir, *extra, **kw)


losses = logged_losses


def sequence_ids(run_dir: Path) -> dict[int, list]:
    rows = [json.loads(line) for line in (run_dir / "sequence_ids.jsonl").read_text().splitlines()]
    return {r["step"]: sorted(map(tuple, r["rows"])) for r in rows}


def interrupted(recipe_path: Path, out: Path, kill_at: int, **kw) -> Path:
    """Run, kill -9 after step `kill_at`'s checkpoint, then --resume to the end."""
    killed = launch(recipe_path, out, fault=f"kill_after_step:{kill_at}", **kw)
    assert killed.returncode != 0, "the fault injection did not kill the run"
    assert not (out / "stage.json").exists()
    ok(launch(recipe_path, out, "--resume_from_checkpoint", "true", **kw))
    return out


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("straight")
    r = recipe(tmp, tokenizer_dir)
    ok(launch(r, tmp / "run"))
    return r, tmp / "run"


def test_tiny_model_learns_well_below_unigram_entropy(tmp_path, tokenizer_dir):
    r = recipe(tmp_path, tokenizer_dir, max_steps=80, per_device_train_batch_size=16, warmup_steps=10, lr_scheduler_kwargs={"num_decay_steps": 20, "decay_type": "linear"},
               save_steps=80, eval_steps=40, logging_steps=20, log_sequence_ids=False,
               sources=[{"name": "arithmetic", "path": "builtin:arithmetic", "max_rows": 3000}])
    result = ok(launch(r, tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "stage.json").read_text())["metrics"]
    print(f"\nfinal training loss {metrics['loss']:.4f}, validation {metrics['val_loss/arithmetic']:.4f}, "
          f"unigram entropy of the data {metrics['unigram_entropy']:.4f} nats/token")
    assert "unigram entropy" in result.stdout
    assert metrics["val_loss/arithmetic"] < 0.7 * metrics["unigram_entropy"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").config.model_type == "smolforge"


def test_resume_after_kill_is_exact_on_one_process(tmp_path, straight_run):
    r, full = straight_run
    half = interrupted(r, tmp_path / "run", kill_at=3)
    assert losses(half) == losses(full)  # bit-identical, step by step
    assert sequence_ids(half) == sequence_ids(full)
    a, b = load_file(full / "model.safetensors"), load_file(half / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, straight_run, tokenizer_dir):
    r, full = straight_run
    r2 = recipe(tmp_path, tokenizer_dir, save_steps=2)
    out = tmp_path / "run"
    killed = launch(r2, out, fault="kill_in_checkpoint:4")
    assert killed.returncode != 0
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert list(out.glob(".checkpoint-4.tmp"))  # the half-written one
    resumed = ok(launch(r2, out, "--resume_from_checkpoint", "true"))
    assert "resumed from" in resumed.stdout and "checkpoint-2 at step 2" in resumed.stdout
    assert losses(out) == losses(full)
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_resume_matches(tmp_path, straight_run, tokenizer_dir, fsdp):
    _, single = straight_run
    r = recipe(tmp_path, tokenizer_dir, per_device_train_batch_size=4)  # same global batch as 1 x 8
    full = tmp_path / "full"
    result = ok(launch(r, full, processes=2, fsdp=fsdp))
    assert ("FSDP2" if fsdp else "MULTI_CPU") in result.stdout and "2 process(es)" in result.stdout
    half = interrupted(r, tmp_path / "half", kill_at=3, processes=2, fsdp=fsdp)
    for run in (full, half):
        for step, loss in losses(run).items():
            assert loss == pytest.approx(losses(single)[step], rel=1e-4, abs=1e-5), (run.name, step)
        # The same rows as one process, each row of a source once: no repeats, no gaps.
        assert sequence_ids(run) == sequence_ids(single)
    ids = [row for rows in sequence_ids(half).values() for row in rows]
    assert len(ids) == len(set(ids))
    a, b = load_file(full / "model.safetensors"), load_file(half / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def weights(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["weight/arithmetic"] for r in rows if "weight/arithmetic" in r}


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory, tokenizer_dir):
    """Adaptive mixture on, re-weighted at every evaluation (each 2 steps), so a resume at step 3
    must restore the last validation losses and the factors (issue 11)."""
    tmp = tmp_path_factory.mktemp("adaptive")
    r = recipe(tmp, tokenizer_dir, adaptive_mixture=True, eval_steps=2, max_steps=8, save_steps=3)
    ok(launch(r, tmp / "run"))
    assert len(set(weights(tmp / "run").values())) > 2  # the mixture really moved
    return r, tmp / "run"


def test_adaptive_mixture_resumes_exactly_on_one_process(tmp_path, adaptive_run):
    r, full = adaptive_run
    half = interrupted(r, tmp_path / "run", kill_at=3)
    assert weights(half) == weights(full) and losses(half) == losses(full)
    assert sequence_ids(half) == sequence_ids(full)


def test_adaptive_mixture_on_two_processes_matches_one(tmp_path, adaptive_run, tokenizer_dir):
    _, single = adaptive_run
    r = recipe(tmp_path, tokenizer_dir, adaptive_mixture=True, eval_steps=2, max_steps=8, save_steps=3,
               per_device_train_batch_size=4)
    half = interrupted(r, tmp_path / "half", kill_at=3, processes=2)
    assert weights(half) == pytest.approx(weights(single), rel=1e-4)
    assert sequence_ids(half) == sequence_ids(single)  # both ranks chose the same rows as one process
    for step, loss in losses(half).items():
        assert loss == pytest.approx(losses(single)[step], rel=1e-4, abs=1e-5), step


def test_gradient_accumulation_equals_one_big_batch(tmp_path, straight_run, tokenizer_dir):
    """Issue 11: 1 x 8 and 2 x 4 give the same per-step losses and weights; dividing each micro-batch
    by its own token count instead of the step's (num_items_in_batch) would double them."""
    _, single = straight_run
    r = recipe(tmp_path, tokenizer_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    ok(launch(r, tmp_path / "accumulated"))
    for step, loss in losses(single).items():
        assert losses(tmp_path / "accumulated")[step] == pytest.approx(loss, rel=1e-5), step
    a, b = load_file(single / "model.safetensors"), load_file(tmp_path / "accumulated" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_save_total_limit_zero_is_refused(tmp_path, tokenizer_dir):
    """Issue 11: `[:-0]` kept every checkpoint; keeping none would make resume impossible."""
    r = recipe(tmp_path, tokenizer_dir, save_total_limit=0)
    with pytest.raises(ValueError, match="save_total_limit=0: keep at least 1 checkpoint"):
        pretrain_main(["--config", str(r), "--output_dir", str(tmp_path / "run"), "--skip_preflight", "true"])


def test_bad_input_fails_before_the_first_step(tmp_path, tokenizer_dir):
    (tmp_path / "web.jsonl").write_text('{"body": "wrong column"}\n')
    r = recipe(tmp_path, tokenizer_dir, sources=[{"name": "web", "path": str(tmp_path / "web.jsonl")}])
    with pytest.raises(ValueError, match="source 'web'.*no 'text' field"):
        pretrain_main(["--config", str(r), "--output_dir", str(tmp_path / "a")])
    r = recipe(tmp_path, tokenizer_dir, model_overrides={"vocab_size": 128})
    with pytest.raises(ValueError, match="has 512 tokens but the model's vocab_size is 128"):
        pretrain_main(["--config", str(r), "--output_dir", str(tmp_path / "b")])
    for run in ("a", "b"):
        assert not (tmp_path / run / "metrics.jsonl").exists() and not list((tmp_path / run).glob("checkpoint-*"))


def test_finished_run_is_never_overwritten(straight_run):
    r, full = straight_run
    before = (full / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a finished model"):
        pretrain_main(["--config", str(r), "--output_dir", str(full)])
    assert (full / "model.safetensors").read_bytes() == before
