"""The training marathon: alerts and their policies under injected faults, preflight, mid-training,
ablations. Faults are injected into real runs through SMOLFORGE_FAULT (pretrain/monitor.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pretrain.preflight import PreflightError
from pretrain.train import main as pretrain_main
from test_pretrain_train import launch, losses, ok, recipe

ARITHMETIC = [{"name": "arithmetic", "path": "builtin:arithmetic", "max_rows": 3000}]


def alerts(run: Path) -> list[dict]:
    path = run / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.parametrize("processes", [1, 2])
def test_nan_is_caught_before_the_update_and_skipped(tmp_path, tokenizer_dir, processes):
    r = recipe(tmp_path, tokenizer_dir, max_steps=5, per_device_train_batch_size=8 // processes, save_steps=5)
    out = tmp_path / "run"
    # On 2 processes the NaN appears on rank 1 only: both ranks must skip the same step.
    fault = "nan_at_step:3" + (":1" if processes == 2 else "")
    ok(launch(r, out, processes=processes, fault=fault))
    # Only the NaN's: on 2 processes of a busy machine a straggler warning (issue 21) may come too.
    (alert,) = [a for a in alerts(out) if a["kind"] != "straggler"]
    assert alert["kind"] == "nan" and alert["step"] == 3 and alert["action"] == "skip"
    assert len(alert["rows"]) == 8  # the skipped rows are recorded
    m = metrics(out)
    assert m[3]["skipped"] and m[3]["param_norm"] == m[2]["param_norm"]  # parameters untouched
    assert m[4]["param_norm"] != m[3]["param_norm"] and all(np.isfinite(m[s]["loss"]) for s in (4, 5))
    # Issue 11: the skipped step still advances the schedule, so every later step uses the rate
    # of its own step (WSD: 2 warmup, 2 decay steps of 5), and the decay still ends at step 5.
    from transformers import get_wsd_schedule

    schedule = get_wsd_schedule(torch.optim.SGD([torch.zeros(1)], lr=3e-3), 2, 2, 5, decay_type="linear")
    expected = []
    for _ in range(5):
        expected.append(schedule.get_last_lr()[0])
        schedule.step()
    assert [m[s]["learning_rate"] for s in range(1, 6)] == pytest.approx(expected)


def test_nan_on_one_rank_stops_both(tmp_path, tokenizer_dir):
    r = recipe(tmp_path, tokenizer_dir, max_steps=5, per_device_train_batch_size=4, alert_policies={"nan": "stop"})
    result = launch(r, tmp_path / "run", processes=2, fault="nan_at_step:2:0")  # launch's timeout guards a hang
    assert result.returncode != 0
    assert "stopped at step 2 by alert(s) ['nan']" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "stage.json").exists()


def test_a_stall_on_one_rank_stops_every_rank(tmp_path, tokenizer_dir):
    """Issue 11: throughput and stall alerts used per-rank timings, so with policy `stop` one rank
    raised while the other waited forever in the next collective. Decisions now read the slowest
    rank's timing, reduced across ranks, so both stop at the same step."""
    r = recipe(tmp_path, tokenizer_dir, max_steps=8, per_device_train_batch_size=4, data_stall_seconds=0.5,
               alert_policies={"data_stall": "stop"})
    result = launch(r, tmp_path / "run", processes=2, fault="slow_data:3:1.0:1", timeout=240)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "stopped at step 4 by alert data_stall" in output, output[-3000:]  # no hang: the launch returned


def test_loss_spike_rolls_back_and_excludes_the_poisoned_batch_deterministically(tmp_path, tokenizer_dir):
    r = recipe(tmp_path, tokenizer_dir, sources=ARITHMETIC, max_steps=22, per_device_train_batch_size=4, save_steps=8,
               warmup_steps=3, lr_scheduler_kwargs={"num_decay_steps": 3, "decay_type": "linear"}, spike_warmup=8, alert_policies={"loss_spike": "rollback"})
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        ok(launch(r, out, fault="poison_step:19"))  # step 20's rows become noise tokens
        runs.append(out)
    spikes = [a for a in alerts(runs[0]) if a["kind"] == "loss_spike"]
    assert [(a["step"], a["action"]) for a in spikes] == [(20, "rollback")]
    poisoned = {tuple(x) for x in spikes[0]["rows"]}
    replayed = [json.loads(line) for line in (runs[0] / "sequence_ids.jsonl").read_text().splitlines()]
    assert [e["step"] for e in replayed] == list(range(20)) + list(range(16, 22))  # back to checkpoint-16
    after = [row for entry in replayed[20:] for row in map(tuple, entry["rows"])]
    assert not poisoned & set(after)
    assert metrics(runs[0])[22]["loss"] < 4  # training went on normally
    assert losses(runs[0]) == losses(runs[1])
    a, b = load_file(runs[0] / "model.safetensors"), load_file(runs[1] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_slow_data_raises_throughput_and_stall_alerts(tmp_path, tokenizer_dir):
    r = recipe(tmp_path, tokenizer_dir, max_steps=12, per_device_train_batch_size=4, save_steps=12,
               throughput_windows=3, throughput_fraction=0.5, data_stall_seconds=1.0)
    out = tmp_path / "run"
    ok(launch(r, out, fault="slow_data:8:2.0"))  # every batch after step 8 waits 2 s
    kinds = {a["kind"] for a in alerts(out)}
    assert {"throughput_drop", "data_stall"} <= kinds
    assert all(a["step"] > 8 for a in alerts(out) if a["kind"] in ("throughput_drop", "data_stall"))


@pytest.mark.parametrize("case, expected", [
    ("source", "FAIL  sources: DataSourceError: source 'web'"),
    ("vocab", "FAIL  tokenizer/model vocab"),
    ("output_dir", "FAIL  output_dir"),
    ("checkpoint", "FAIL  checkpoint round trip: ValueError: weights differ after save and load"),
    # issue 11: a newcomer who has not trained the tokenizer is told so, with the command
    ("no_tokenizer", "FAIL  tokenizer: FileNotFoundError: tokenizer_name_or_path"),
])
def test_preflight_catches(tmp_path, tokenizer_dir, monkeypatch, capsys, case, expected):
    overrides = {}
    out = tmp_path / "run"
    if case == "source":
        (tmp_path / "web.jsonl").write_text("{broken json\n")
        overrides["sources"] = [{"name": "web", "path": str(tmp_path / "web.jsonl")}]
    if case == "vocab":
        overrides["model_overrides"] = {"vocab_size": 256}
    if case == "output_dir":
        (tmp_path / "a_file").write_text("not a directory")
        out = tmp_path / "a_file" / "run"
    if case == "checkpoint":
        monkeypatch.setenv("SMOLFORGE_FAULT", "corrupt_checkpoint")
    if case == "no_tokenizer":
        overrides["tokenizer_name_or_path"] = str(tmp_path / "out/tiny/tokenizer")
    r = recipe(tmp_path, tokenizer_dir, **overrides)
    with pytest.raises(PreflightError) as failure:
        pretrain_main(["--config", str(r), "--output_dir", str(out), "--preflight", "true"])
    printed = capsys.readouterr().out
    assert expected in printed and "->" in str(failure.value)  # names what failed and what to do
    if case == "no_tokenizer":
        assert "does not exist" in printed and "python -m pretrain.tokenizer --config" in printed
    assert printed.count("preflight FAIL") == 1  # only the broken thing fails


def test_preflight_passes_and_estimates_time(tmp_path, tokenizer_dir, capsys):
    r = recipe(tmp_path, tokenizer_dir)
    assert pretrain_main(["--config", str(r), "--output_dir", str(tmp_path / "run"), "--preflight", "true"]) == {
        "preflight": "passed"}
    printed = capsys.readouterr().out
    assert printed.count("preflight PASS") == 8 and "tokens/s per process" in printed and "GiB free" in printed
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_midtraining_extends_context(tmp_path, tokenizer_dir):
    """Base at 32 tokens; mid-training at 64 with a raised RoPE theta lowers the loss at positions
    beyond the old context, compared with a control that trains as long at the old context without
    the RoPE change (issue 11: without the control, any 20 more steps would pass)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.data import PackedSource, make_batch, pack_source
    from core.sources import SourceSpec

    sources = [{"name": "prose", "path": "builtin:prose"}]
    base = tmp_path / "base"
    ok(launch(recipe(tmp_path, tokenizer_dir, sources=sources, max_length=32, max_steps=40,
                     per_device_train_batch_size=16, save_steps=40, warmup_steps=4,
                     lr_scheduler_kwargs={"num_decay_steps": 8, "decay_type": "linear"}, log_sequence_ids=False), base))
    mid_recipe = dict(sources=sources, max_steps=20, per_device_train_batch_size=8, save_steps=20, warmup_steps=2,
                      lr_scheduler_kwargs={"num_decay_steps": 5, "decay_type": "linear"}, learning_rate=1e-3,
                      log_sequence_ids=False, model_name_or_path=str(base))
    mid, control = tmp_path / "mid", tmp_path / "control"
    ok(launch(recipe(tmp_path, tokenizer_dir, max_length=64, **mid_recipe,
                     model_overrides={"rope_parameters": {"rope_type": "default", "rope_theta": 40000.0},
                                      "max_position_embeddings": 1024}), mid))
    # The same tokens per step (16 x 32 = 8 x 64), at the old context, RoPE untouched.
    ok(launch(recipe(tmp_path, tokenizer_dir, max_length=32, **{**mid_recipe, "per_device_train_batch_size": 16}),
              control))
    config = json.loads((mid / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 40000.0 and config["max_position_embeddings"] == 1024

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = SourceSpec(**sources[0])
    long_rows = PackedSource("prose", pack_source(spec, tok, 64, tmp_path.parent / "data_cache"), 8)
    batch = make_batch([(0, r) for r in long_rows.validation], [long_rows], tok.eos_token_id)
    beyond = batch["position_ids"][:, 1:] >= 32  # targets whose position the base never trained on
    assert beyond.sum() > 50

    def loss_beyond_old_context(path):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                   reduction="none")
        return losses[beyond].mean().item()

    before, after, same_steps = (loss_beyond_old_context(p) for p in (base, mid, control))
    print(f"\nloss at positions 32-63: base {before:.4f}, mid-trained at 64 {after:.4f}, "
          f"control (20 more steps at 32, no RoPE change) {same_steps:.4f}")
    assert after < same_steps and after < before
    assert json.loads((mid / "stage.json").read_text())["parent"] == str(base)


def test_ablation_writes_table_and_plot(tmp_path, tokenizer_dir):
    from pretrain.ablate import main as ablate

    r = recipe(tmp_path, tokenizer_dir, max_steps=4, save_steps=4, eval_steps=2, log_sequence_ids=False)
    results = ablate(["--config", str(r), "--vary", "model_overrides.qk_norm=true", "--output_dir",
                      str(tmp_path / "abl")])
    assert set(results) == {"baseline", "model_overrides.qk_norm=true"}
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "model_overrides.qk_norm=true" in table and "val arithmetic" in table and "tokens/s" in table
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 10_000
    assert results["baseline"]["final_val_loss"] != results["model_overrides.qk_norm=true"]["final_val_loss"]
    assert json.loads((tmp_path / "abl" / "model_overrides.qk_norm=true" / "run" / "config.json").read_text())["qk_norm"]
