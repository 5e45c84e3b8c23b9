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

ARITHMETIC = [{"name": "arithmetic", "path": "builtin:arithmetic", "max_documents": 3000}]


def alerts(run: Path) -> list[dict]:
    path = run / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.parametrize("processes", [1, 2])
def test_nan_is_caught_before_the_update_and_skipped(tmp_path, tokenizer_dir, processes):
    r = recipe(tmp_path, tokenizer_dir, max_steps=5, per_device_batch_size=8 // processes, save_steps=5)
    out = tmp_path / "run"
    # On 2 processes the NaN appears on rank 1 only: both ranks must skip the same step.
    fault = "nan_at_step:3" + (":1" if processes == 2 else "")
    ok(launch(r, out, processes=processes, fault=fault))
    (alert,) = alerts(out)
    assert alert["kind"] == "nan" and alert["step"] == 3 and alert["action"] == "skip"
    assert len(alert["rows"]) == 8  # the skipped rows are recorded
    m = metrics(out)
    assert m[3]["skipped"] and m[3]["param_norm"] == m[2]["param_norm"]  # parameters untouched
    assert m[4]["param_norm"] != m[3]["param_norm"] and all(np.isfinite(m[s]["loss"]) for s in (4, 5))


def test_nan_on_one_rank_stops_both(tmp_path, tokenizer_dir):
    r = recipe(tmp_path, tokenizer_dir, max_steps=5, per_device_batch_size=4, alert_policies={"nan": "stop"})
    result = launch(r, tmp_path / "run", processes=2, fault="nan_at_step:2:0")  # launch's timeout guards a hang
    assert result.returncode != 0
    assert "stopped at step 2 by alert(s) ['nan']" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "stage.json").exists()


def test_loss_spike_rolls_back_and_excludes_the_poisoned_batch_deterministically(tmp_path, tokenizer_dir):
    r = recipe(tmp_path, tokenizer_dir, sources=ARITHMETIC, max_steps=22, per_device_batch_size=4, save_steps=8,
               warmup_steps=3, decay_steps=3, spike_warmup=8, alert_policies={"loss_spike": "rollback"})
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
    r = recipe(tmp_path, tokenizer_dir, max_steps=12, per_device_batch_size=4, save_steps=12,
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
    r = recipe(tmp_path, tokenizer_dir, **overrides)
    with pytest.raises(PreflightError) as failure:
        pretrain_main(["--config", str(r), "--output_dir", str(out), "--preflight", "true"])
    printed = capsys.readouterr().out
    assert expected in printed and "->" in str(failure.value)  # names what failed and what to do
    assert printed.count("preflight FAIL") == 1  # only the broken thing fails


def test_preflight_passes_and_estimates_time(tmp_path, tokenizer_dir, capsys):
    r = recipe(tmp_path, tokenizer_dir)
    assert pretrain_main(["--config", str(r), "--output_dir", str(tmp_path / "run"), "--preflight", "true"]) == {
        "preflight": "passed"}
    printed = capsys.readouterr().out
    assert printed.count("preflight PASS") == 7 and "tokens/s per process" in printed and "GiB free" in printed
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_midtraining_extends_context(tmp_path, tokenizer_dir):
    """Base at 32 tokens; mid-training at 64 with a raised RoPE theta lowers the loss on 64-token rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.data import PackedSource, make_batch, pack_source
    from pretrain.sources import SourceSpec

    sources = [{"name": "prose", "path": "builtin:prose"}]
    base = tmp_path / "base"
    ok(launch(recipe(tmp_path, tokenizer_dir, sources=sources, seq_len=32, max_steps=40, per_device_batch_size=16,
                     save_steps=40, warmup_steps=4, decay_steps=8, log_sequence_ids=False), base))
    mid = tmp_path / "mid"
    ok(launch(recipe(tmp_path, tokenizer_dir, sources=sources, seq_len=64, max_steps=20, per_device_batch_size=8,
                     save_steps=20, warmup_steps=2, decay_steps=5, learning_rate=1e-3, log_sequence_ids=False,
                     model_name_or_path=str(base),
                     model_overrides={"rope_parameters": {"rope_type": "default", "rope_theta": 40000.0},
                                      "max_position_embeddings": 1024}), mid))
    config = json.loads((mid / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 40000.0 and config["max_position_embeddings"] == 1024

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = SourceSpec(**sources[0])
    long_rows = PackedSource("prose", pack_source(spec, tok, 64, tmp_path.parent / "data_cache"), 8)
    batch = make_batch([(0, r) for r in long_rows.validation], [long_rows], tok.eos_token_id)

    def long_loss(path):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss.item()

    before, after = long_loss(base), long_loss(mid)
    print(f"\nloss on 64-token validation rows: base (32-token context) {before:.4f}, mid-trained {after:.4f}")
    assert after < before
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
