"""Pretraining data: sources, packing, the mixture stream, and bad input caught before training."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.data import MixtureSchedule, MixtureStream, PackedSource, pack_source, position_ids_from_eos
from core.sources import DataSourceError, SourceSpec, iter_documents
from pretrain.tokenizer import measure

from conftest import PRETRAIN_SOURCES as SOURCES


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def packed(tokenizer, tmp_path, specs, seq_len=32, validation_rows=4):
    return [PackedSource(s.name, pack_source(s, tokenizer, seq_len, tmp_path), validation_rows) for s in specs]


def test_tokenizer_splits_digits_and_has_chat_tokens(tokenizer):
    ids = tokenizer("12345+678=13023", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids][:5] == ["1", "2", "3", "4", "5"]
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|pad|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id
    assert tokenizer.eos_token == "<|endoftext|>"
    m = measure(tokenizer, ["the quick brown fox jumps over the lazy dog"])
    assert 1.0 <= m["tokens_per_word"] < 4 and m["bytes_per_token"] > 1


def test_tokenizer_cli_reports_fertility(tmp_path, tokenizer_dir):
    recipe = tmp_path / "tok.yaml"
    recipe.write_text(json.dumps({"output_dir": str(tmp_path / "tok"), "vocab_size": 400, "sample_documents": 200,
                                  "sources": SOURCES, "compare_with": [str(tokenizer_dir)]}))
    out = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", "--config", str(recipe)],
                         capture_output=True, text=True, check=True).stdout
    report = json.loads((tmp_path / "tok" / "tokenizer_report.json").read_text())
    assert set(report) == {"trained", str(tokenizer_dir)}
    assert set(report["trained"]) == {"arithmetic", "prose"}
    assert "tokens/word" in out and "bytes/token" in out


def test_packing_keeps_document_boundaries(tokenizer, tmp_path):
    (src,) = packed(tokenizer, tmp_path, [SourceSpec(name="arithmetic", path="builtin:arithmetic", max_rows=200)], seq_len=128)
    row = torch.from_numpy(np.asarray(src.tokens[0], dtype=np.int64))[None]
    eos = tokenizer.eos_token_id
    assert (row == eos).sum() > 0
    pos = position_ids_from_eos(row, eos)[0]
    after = (row[0, :-1] == eos).nonzero().flatten() + 1
    assert (pos[after] == 0).all() and pos[0] == 0
    assert (pos[1:][pos[1:] != 0] == (pos[:-1] + 1)[pos[1:] != 0]).all()
    # A second call reuses the cache instead of re-tokenising.
    again = pack_source(SourceSpec(name="arithmetic", path="builtin:arithmetic", max_rows=200), tokenizer, 128, tmp_path)
    assert again == next(tmp_path.glob("arithmetic-*"))


def stream(sources, stages, world=1, rank=0, micro=4, accum=2, weights=None):
    names = [s.name for s in sources]
    schedule = MixtureSchedule(names, weights or {n: 1.0 for n in names}, stages, tokens_per_step=micro * accum * world * 32)
    return MixtureStream(sources, schedule, seed=3, micro_batch_size=micro, accumulation_steps=accum, rank=rank,
                         world_size=world, eos_id=0)


def test_mixture_shares_and_exact_stage_switch(tokenizer, tmp_path):
    sources = packed(tokenizer, tmp_path, [SourceSpec(**SOURCES[0]), SourceSpec(**SOURCES[1])])
    s = stream(sources, [{"start_step": 0, "weights": {"arithmetic": 0.7, "prose": 0.3}},
                         {"start_step": 25, "weights": {"arithmetic": 0.0, "prose": 1.0}}])
    rows = [s.next_step_rows() for _ in range(30)]
    first = np.array([src for step in rows[:25] for src, _ in step])
    share = (first == 0).mean()
    print(f"arithmetic share over 25 steps: {share:.4f} (configured 0.7)")
    assert abs(share - 0.7) <= 0.02
    assert any(src == 0 for src, _ in rows[24])  # the last step of stage 1 still mixes
    assert all(src == 1 for step in rows[25:] for src, _ in step)  # stage 2 exactly from step 25


def test_stream_resumes_exactly_and_ranks_split_the_global_batch(tokenizer, tmp_path):
    sources = packed(tokenizer, tmp_path, [SourceSpec(**SOURCES[0]), SourceSpec(**SOURCES[1])])
    straight = stream(sources, None)
    expected = [straight.next_step_rows() for _ in range(12)]
    first = stream(sources, None)
    for _ in range(5):
        first.next_step_rows()
    resumed = stream(sources, None)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through JSON, as on disk
    assert [resumed.next_step_rows() for _ in range(7)] == expected[5:]
    # Two ranks read disjoint halves whose union is the one-process step.
    ranks = [iter(stream(sources, None, world=2, rank=r, micro=2)) for r in range(2)]
    got = []
    for _ in range(2):  # accumulation steps of step 0
        for it in ranks:
            b = next(it)
            got += list(zip(b["source"].tolist(), b["row"].tolist()))
    assert sorted(got) == sorted(expected[0])
    # Each source's rows are a permutation: no repeats until an epoch is exhausted.
    ids = [r for step in expected for r in step]
    assert len(ids) == len(set(ids))


def test_validation_rows_never_trained_on(tokenizer, tmp_path):
    sources = packed(tokenizer, tmp_path, [SourceSpec(**SOURCES[0])], validation_rows=4)
    s = stream(sources, None)
    seen = {r for _ in range(200) for _, r in s.next_step_rows()}
    assert not seen & set(sources[0].validation)


@pytest.mark.parametrize("source, message", [
    ({"name": "broken", "path": "BROKEN.jsonl"}, "source 'broken': cannot read"),
    ({"name": "nocol", "path": "NOCOL.jsonl"}, "source 'nocol'.*row 0 has no 'text' field"),
    ({"name": "empty", "path": "EMPTY.jsonl"}, "source 'empty'.*empty"),
    ({"name": "blank", "path": "BLANK.txt"}, "source 'blank'.*empty"),
    ({"name": "gone", "path": "missing.parquet"}, "source 'gone': file .* does not exist"),
    ({"name": "odd", "path": "builtin:poetry"}, "source 'odd': unknown built-in"),
    ({"name": "x", "path": "data.csv"}, "source 'x'.*unsupported extension"),
    ({"name": "x", "path": "builtin:prose", "wieght": 1}, r"unknown keys \['wieght'\]"),
])
def test_bad_sources_name_the_source_and_problem(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BROKEN.jsonl").write_text('{"text": "fine"}\n{not json at all\n')
    (tmp_path / "NOCOL.jsonl").write_text('{"body": "no text column here"}\n')
    (tmp_path / "EMPTY.jsonl").write_text("")
    (tmp_path / "BLANK.txt").write_text("\n   \n\n")
    with pytest.raises(DataSourceError, match=message):
        list(iter_documents(SourceSpec.from_dict(source, 0)))


def test_local_formats_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"content": f"doc {i}"}) for i in range(3)))
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "c.parquet")
    assert list(iter_documents(SourceSpec(name="a", path=str(tmp_path / "a.jsonl"), text_field="content"))) == ["doc 0", "doc 1", "doc 2"]
    assert list(iter_documents(SourceSpec(name="b", path=str(tmp_path / "b.txt")))) == ["line one", "line two"]
    assert list(iter_documents(SourceSpec(name="c", path=str(tmp_path / "c.parquet")))) == ["p1", "p2"]


def test_stage_errors_name_the_stage():
    with pytest.raises(ValueError, match=r"stages\[1\].weights names unknown sources \['web'\]"):
        MixtureSchedule(["a", "b"], {}, [{"start_step": 0, "weights": {"a": 1}}, {"start_step": 5, "weights": {"web": 1}}], 1)
    with pytest.raises(ValueError, match="begin at 0"):
        MixtureSchedule(["a"], {}, [{"start_step": 3, "weights": {"a": 1}}], 1)
    s = MixtureSchedule(["a"], {}, [{"start_step": 0, "weights": {"a": 1}}, {"start_tokens": 1000, "weights": {"a": 1}}], 300)
    assert [start for start, _ in s.stages] == [0, 4]


def test_adaptive_rule_moves_weight_to_the_slowest_learner():
    from pretrain.data import adapt_factors

    factors = np.ones(3)
    previous = np.array([3.0, 3.0, 3.0])
    current = np.array([2.0, 2.9, 2.5])  # source 1 improves least, source 0 most
    new = adapt_factors(factors, previous, current, rate=0.5)
    assert new[1] > new[2] > new[0]
    assert new.min() >= 0.05
    assert np.allclose(adapt_factors(factors, previous, previous - 0.1, rate=0.5), 1.0)  # equal progress: unchanged


def test_parameter_groups_exempt_embeddings_norms():
    from core import SmolForgeConfig, SmolForgeForCausalLM
    from core.optim import parameter_groups

    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=256, qk_norm=True,
                                                             position_embedding="learned"))
    decay, no_decay = parameter_groups(model, 0.1, ["embeddings", "norms", "biases"])
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in exempt and "model.embed_positions.weight" in exempt
    assert all("norm" in n or "embed" in n for n in exempt)
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - exempt
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    only_norms = parameter_groups(model, 0.1, ["norms"])[1]["params"]
    assert "model.embed_tokens.weight" not in {names[id(p)] for p in only_norms}
    with pytest.raises(ValueError, match="unknown kinds"):
        parameter_groups(model, 0.1, ["embedding"])


def test_datatrove_filters_and_dedup(tmp_path):
    good = ("The committee met on Tuesday to discuss the budget for the coming year. Members agreed that the "
            "library should stay open longer during the exam period, and that the new reading room would be "
            "finished before the winter. The chair thanked everyone for their work and closed the meeting.")
    spam = "buy now " * 200
    rows = [good, spam, good, "   "]
    (tmp_path / "web.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rows))
    stats = {}
    spec = SourceSpec.from_dict({"name": "web", "path": str(tmp_path / "web.jsonl"),
                                 "filters": ["gopher_repetition", "fineweb_quality"], "dedup": True}, 0)
    assert list(iter_documents(spec, stats)) == [good]
    assert stats["kept"] == 1 and stats["duplicate"] == 1 and stats["empty"] == 1
    assert any(k.startswith("gopher_rep") for k in stats)  # the spam's reason, from datatrove
    only_spam = tmp_path / "spam.jsonl"
    only_spam.write_text(json.dumps({"text": spam}))
    with pytest.raises(DataSourceError, match="source 'spam'.*empty.*dropped"):
        list(iter_documents(SourceSpec.from_dict({"name": "spam", "path": str(only_spam),
                                                  "filters": ["gopher_repetition"]}, 0)))
    with pytest.raises(DataSourceError, match="unknown filters"):
        SourceSpec.from_dict({"name": "x", "path": "builtin:prose", "filters": ["gopher"]}, 0)


def test_new_adaptive_factors_do_not_pay_back_the_old_deficit(tokenizer, tmp_path):
    """Issue 11: a change of adaptive factors kept the round robin's counts, so the deficit built
    under the old weights came back as single-source batches (steps 5-8 all prose)."""
    sources = packed(tokenizer, tmp_path, [SourceSpec(**SOURCES[0]), SourceSpec(**SOURCES[1])])
    s = stream(sources, None)
    for _ in range(10):
        s.next_step_rows()
    s.set_adaptive_factors(np.array([2.0, 1.0]))
    for _ in range(4):
        rows = s.next_step_rows()
        assert {source for source, _ in rows} == {0, 1}, rows  # every step still mixes both sources
    state = s.state_dict()
    assert state["adaptive_factors"] == [2.0, 1.0]


def test_monitor_checkpoint_keeps_counters_not_thresholds():
    """Issue 11: a resumed run restored every attribute, silently reverting changed thresholds."""
    from pretrain.monitor import Monitor

    knobs = dict(spike_warmup=2, ema_beta=0.9, grad_factor=10.0, throughput_fraction=0.5, throughput_windows=3,
                 data_stall_seconds=30.0)
    before = Monitor(spike_sigma=6.0, **knobs)
    before.accept_step(1.0, 0.5)
    after = Monitor(spike_sigma=3.0, **{**knobs, "data_stall_seconds": 5.0})
    after.load_state_dict(json.loads(json.dumps(before.state_dict())))
    assert (after.spike_sigma, after.data_stall_seconds) == (3.0, 5.0)
    assert (after.seen, after.recent_losses, after.grad_mean) == (1, [1.0], 0.5)
