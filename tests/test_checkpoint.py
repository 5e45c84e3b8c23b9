"""Tests for core/checkpoint.py: atomic save, stage.json manifest, refusal to overwrite."""

import datetime
import hashlib
import os
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from core.checkpoint import (
    data_fingerprint,
    is_complete_checkpoint,
    read_manifest,
    save_checkpoint,
)

RECIPE = {"learning_rate": 1e-3, "max_steps": 3, "eval_steps": [1, 2], "model_name_or_path": "runs/pretrain"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    # Built in memory: no test downloads anything.
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 64)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def save(path, model, tokenizer=None, **overrides):
    kwargs = dict(stage="sft", recipe=RECIPE, parent="runs/pretrain", data_fingerprint="abc123", metrics={"loss": 1.5})
    return save_checkpoint(path, model, tokenizer, **(kwargs | overrides))


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftover_temporaries(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_save_writes_hf_directory_and_manifest(tmp_path, model, tokenizer):
    target = save(tmp_path / "out", model, tokenizer)

    assert target == (tmp_path / "out").absolute()
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "stage.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    assert leftover_temporaries(tmp_path) == []
    assert is_complete_checkpoint(target)

    manifest = read_manifest(target)
    assert manifest["stage"] == "sft"
    assert manifest["recipe"] == RECIPE
    assert manifest["parent"] == "runs/pretrain"
    assert manifest["data_fingerprint"] == "abc123"
    assert manifest["metrics"] == {"loss": 1.5}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["transformers"] == transformers.__version__
    assert {"trl", "peft", "datasets", "accelerate", "vllm"} <= manifest["versions"].keys()
    revision, dirty = manifest["git"]["revision"], manifest["git"]["dirty"]
    if revision is None:  # not a git checkout, or no commit yet
        assert dirty is None
    else:
        assert len(revision) == 40 and isinstance(dirty, bool)
    created = datetime.datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - created) < datetime.timedelta(minutes=5)


def test_saved_checkpoint_loads_back_with_identical_weights(tmp_path, model, tokenizer):
    target = save(tmp_path / "out", model, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(target)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    assert PreTrainedTokenizerFast.from_pretrained(target)("w2 w5").input_ids == [2, 5]


def test_second_save_raises_and_leaves_first_intact(tmp_path, model, tokenizer):
    target = save(tmp_path / "out", model, tokenizer)
    before = file_hashes(target)

    with pytest.raises(FileExistsError, match=str(target)):
        save(target, model, tokenizer, stage="dpo", metrics={"loss": 0.1})

    assert file_hashes(target) == before
    assert read_manifest(target)["stage"] == "sft"
    assert leftover_temporaries(tmp_path) == []


@pytest.mark.parametrize("existing", ["config.json", "pytorch_model.bin", "model-00001-of-00002.safetensors"])
def test_existing_dir_with_model_files_but_no_manifest_is_refused(tmp_path, model, existing):
    target = tmp_path / "out"
    target.mkdir()
    (target / existing).write_text("someone else's model")
    with pytest.raises(FileExistsError, match=existing):
        save(target, model)
    assert [p.name for p in target.iterdir()] == [existing]
    assert leftover_temporaries(tmp_path) == []


def test_existing_dir_is_refused_if_any_saved_file_would_overwrite_one_of_its_files(tmp_path, model, tokenizer):
    target = tmp_path / "out"
    target.mkdir()
    (target / "tokenizer.json").write_text("user's own tokenizer")  # not a model file, but ours to keep
    with pytest.raises(FileExistsError, match="tokenizer.json"):
        save(target, model, tokenizer)
    assert [p.name for p in target.iterdir()] == ["tokenizer.json"]
    assert (target / "tokenizer.json").read_text() == "user's own tokenizer"
    assert leftover_temporaries(tmp_path) == []


def test_failure_mid_save_leaves_no_temporary_and_no_target(tmp_path, model, tokenizer, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "out", model, tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_pickle_weights_are_rejected(tmp_path, model, monkeypatch):
    original_save = model.save_pretrained

    def save_with_pickle(directory, **kwargs):
        original_save(directory, **kwargs)
        torch.save(model.state_dict(), Path(directory) / "pytorch_model.bin")

    monkeypatch.setattr(model, "save_pretrained", save_with_pickle)
    with pytest.raises(RuntimeError, match="pytorch_model.bin"):
        save(tmp_path / "out", model)
    assert list(tmp_path.iterdir()) == []


def test_save_into_output_dir_holding_only_trainer_checkpoints(tmp_path, model, tokenizer):
    target = tmp_path / "out"
    (target / "checkpoint-1").mkdir(parents=True)
    (target / "checkpoint-1" / "model.safetensors").write_bytes(b"step 1 weights")
    (target / "train.log").write_text("step 1\n")

    save(target, model, tokenizer)

    assert is_complete_checkpoint(target)
    assert (target / "checkpoint-1" / "model.safetensors").read_bytes() == b"step 1 weights"
    assert (target / "train.log").read_text() == "step 1\n"
    assert leftover_temporaries(tmp_path) == []


def test_failure_while_moving_into_existing_dir_restores_it(tmp_path, model, monkeypatch):
    target = tmp_path / "out"
    (target / "checkpoint-1").mkdir(parents=True)
    real_replace = os.replace
    moved = []

    def replace_failing_on_weights(src, dst):
        # Sorted move order: config.json, generation_config.json, model.safetensors, stage.json.
        if Path(dst).name == "model.safetensors":
            raise OSError("interrupted")
        real_replace(src, dst)
        moved.append(Path(dst).name)

    monkeypatch.setattr("core.checkpoint.os.replace", replace_failing_on_weights)
    with pytest.raises(OSError, match="interrupted"):
        save(target, model)
    assert moved == ["config.json", "generation_config.json"]  # these were moved, then removed again
    assert [p.name for p in target.iterdir()] == ["checkpoint-1"]
    assert leftover_temporaries(tmp_path) == []


def test_is_complete_checkpoint_needs_manifest_and_weights(tmp_path, model):
    target = save(tmp_path / "out", model)
    assert is_complete_checkpoint(target)

    (target / "stage.json").write_text("{not json")
    assert not is_complete_checkpoint(target)
    (target / "stage.json").unlink()
    assert not is_complete_checkpoint(target)

    other = save(tmp_path / "other", model)
    (other / "model.safetensors").unlink()
    assert not is_complete_checkpoint(other)
    assert not is_complete_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="stage.json"):
        read_manifest(tmp_path / "missing")


def test_non_json_recipe_fails_before_anything_is_written(tmp_path, model):
    with pytest.raises(TypeError):
        save(tmp_path / "out", model, recipe={"output_dir": Path("runs")})
    assert list(tmp_path.iterdir()) == []


def test_data_fingerprint(tmp_path):
    assert data_fingerprint(["ab", "c"]) == data_fingerprint(["ab", "c"])
    assert data_fingerprint(["ab", "c"]) != data_fingerprint(["a", "bc"])
    assert data_fingerprint(["ab"]) != data_fingerprint([b"ab"])
    assert len(data_fingerprint([])) == 16

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    first = data_fingerprint([data])
    assert first != data_fingerprint([str(data)])  # a str is text, a Path is its contents
    copy = tmp_path / "copy" / "train.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    assert data_fingerprint([copy]) == first  # contents, not location
    assert data_fingerprint([copy.parent]) != first  # a directory also hashes its file names
    data.write_text('{"text": "hellO"}\n')
    assert data_fingerprint([data]) != first
