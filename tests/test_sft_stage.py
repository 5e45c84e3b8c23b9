"""The SFT stage end to end (`python -m sft`): it teaches the tiny base model to stop and to follow
the requested reasoning mode, resumes exactly after kill -9, runs on 2 processes, and rejects bad
data before training, naming the row."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM
from core.arithmetic import conversations, question, split_facts
from core.recipe import parse_recipe
from sft.config import SFTConfig
from sft.data import SFTDataError, load_sources
from sft.train import main as sft_main

from conftest import REPO, launch_stage, logged_losses, ok, write_recipe



@pytest.fixture(scope="module")
def random_base(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised tiny core model with the pretraining tokenizer: enough for the
    mechanics (resume, processes, data checks)."""
    path = tmp_path_factory.mktemp("random-base")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def recipe(tmp_path: Path, base: Path, **overrides) -> Path:
    cfg = {"model_name_or_path": str(base), "chat_template": "smollm3", "max_length": 512,
           "sources": [{"path": "builtin:arithmetic_chat", "max_rows": 48}], "think_ratio": 0.5,
           "max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
           "save_strategy": "steps", "save_steps": 3, "seed": 0}
    return write_recipe(tmp_path, {**cfg, **overrides})


def launch(recipe_path: Path, output_dir: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return launch_stage("sft", recipe_path, output_dir, *extra, **kw)


losses = logged_losses


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny base model: a short pretraining run on the built-in arithmetic and math text."""
    from pretrain.train import main as pretrain_main

    tmp = tmp_path_factory.mktemp("pretrained-base")
    r = tmp / "pretrain.yaml"
    r.write_text(yaml.safe_dump({
        "tokenizer_name_or_path": str(tokenizer_dir), "model_preset": "tiny", "max_length": 64,
        "sources": [{"name": "arithmetic", "path": "builtin:arithmetic", "weight": 0.7, "max_rows": 3000},
                    {"name": "math", "path": "builtin:math", "weight": 0.3, "max_rows": 1000}],
        "max_steps": 80, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 10, "lr_scheduler_kwargs": {"num_decay_steps": 20, "decay_type": "linear"},
        "save_steps": 80, "eval_steps": 80, "logging_steps": 20, "data_cache_dir": str(tmp / "cache")}))
    pretrain_main(["--config", str(r), "--output_dir", str(tmp / "base")])
    return tmp / "base"


def test_sft_teaches_the_base_model_to_stop_and_follow_the_reasoning_mode(tmp_path, pretrained_base, capsys):
    r = recipe(tmp_path, pretrained_base, sources=[{"path": "builtin:arithmetic_chat", "split": "train"}],
               # Rows of 130-270 tokens: max_length 320 packs about one per row, which keeps the padding-free
               # attention (one flattened row per batch on CPU sdpa) small.
               max_steps=150, per_device_train_batch_size=4, max_length=320, learning_rate=3e-3, warmup_steps=3,
               save_strategy="no", logging_steps=10,
               generation_eval={"path": "builtin:arithmetic_chat", "split": "test", "max_new_tokens": 40})
    metrics = sft_main(["--config", str(r), "--output_dir", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + next(line for line in printed.splitlines() if line.startswith("held-out generations")))
    assert metrics["generation_before/end_of_turn_rate"] < 0.5  # the base model never saw <|im_end|> end a turn
    assert metrics["generation/end_of_turn_rate"] >= 0.95
    assert metrics["generation/mode_rate"] >= 0.95
    saved = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert saved.chat_template == chat_templates.load("smollm3").training


def test_tiny_recipe_parses():
    (cfg,) = parse_recipe(SFTConfig, args=["--config", str(REPO / "recipes/tiny/sft.yaml")])
    assert cfg.packing and cfg.assistant_only_loss and cfg.chat_template == "qwen3" and not cfg.truncation


def test_builtin_chats_hold_out_the_test_facts_and_mix_modes():
    train, test = split_facts()
    held_out = {question(f) for f in test}
    questions = {m["content"] for r in conversations("train") for m in r["messages"] if m["role"] == "user"}
    assert questions and not questions & held_out
    test_questions = {r["messages"][0]["content"] for r in conversations("test")}
    assert test_questions == held_out
    for ratio in (0.25, 0.5, 1.0):
        rows, origins = load_sources([{"path": "builtin:arithmetic_chat"}], ratio, seed=0)
        think = sum(r["chat_template_kwargs"]["enable_thinking"] for r in rows)
        assert think / len(rows) == pytest.approx(ratio, abs=0.01) and len(origins) == len(rows)
        assert all(("<think>" in r["messages"][-1]["content"]) == r["chat_template_kwargs"]["enable_thinking"]
                   for r in rows)


# A template that forbids non-alternating roles, as Llama 2 / Mistral templates do.
ALTERNATING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
BAD_DATA = {
    "no_assistant_turn": ({"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "What is 2+2?"}]},
                          "chatml", r"row 2: field 'messages' has no assistant turn"),
    "non_alternating_roles": ({"messages": [{"role": "user", "content": "What is 2+2?"},
                                            {"role": "user", "content": "And 3+3?"},
                                            {"role": "assistant", "content": "6"}]},
                              "alternating", r"row 2: the chat template refuses .*must alternate"),
    "missing_messages_column": ({"text": "What is 2+2? 4"}, "chatml", r"row 2 has no 'messages' field"),
    "longer_than_max_length": ({"messages": [{"role": "user", "content": "What is 2+2? " * 40},
                                             {"role": "assistant", "content": "4"}]},
                               "chatml", r"row 2: \d+ tokens, longer than max_length 64, and truncation is off"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_fails_before_training_naming_the_row(tmp_path, random_base, case):
    bad, template, message = BAD_DATA[case]
    data = tmp_path / "chats.jsonl"
    # The bad row is row 2; other rows are fine (a missing column is a row without the field).
    data.write_text("".join(json.dumps(row) + "\n" for row in (GOOD, GOOD, bad, GOOD)))
    if template == "alternating":
        template = tmp_path / "alternating.jinja"
        template.write_text(ALTERNATING_TEMPLATE)
    r = recipe(tmp_path, random_base, sources=[{"path": str(data)}], chat_template=str(template), think_ratio=None,
               max_length=64)
    out = tmp_path / "run"
    with pytest.raises(SFTDataError, match=f"source {data} {message}"):
        sft_main(["--config", str(r), "--output_dir", str(out)])
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, random_base):
    tmp = tmp_path_factory.mktemp("sft-straight")
    r = recipe(tmp, random_base)
    ok(launch(r, tmp / "run"))
    return r, tmp / "run"


def test_resume_after_kill_gives_the_same_losses(tmp_path, straight_run):
    r, full = straight_run
    out = tmp_path / "run"
    killed = launch(r, out, fault="kill_after_step:3")
    assert killed.returncode != 0 and (out / "checkpoint-3").is_dir() and not (out / "stage.json").exists()
    refused = launch(r, out)
    assert refused.returncode != 0 and "pass --resume_from_checkpoint true" in refused.stderr
    ok(launch(r, out, "--resume_from_checkpoint", "true"))
    assert sorted(losses(out)) == list(range(1, 7))
    assert losses(out) == losses(full)  # bit-identical, step by step
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((out / "stage.json").read_text())
    assert manifest["stage"] == "sft" and manifest["data_fingerprint"] == json.loads(
        (full / "stage.json").read_text())["data_fingerprint"]


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(tmp_path, straight_run):
    """Issue 11: the Trainer writes checkpoint-6 in place; killed before its trainer_state.json, the
    directory exists but is incomplete. Resume must take checkpoint-3, not the highest number."""
    r, full = straight_run
    out = tmp_path / "run"
    killed = launch(r, out, fault="kill_in_checkpoint:6")
    assert killed.returncode != 0 and (out / "checkpoint-6").is_dir()
    assert not (out / "checkpoint-6" / "trainer_state.json").exists()
    resumed = ok(launch(r, out, "--resume_from_checkpoint", "true"))
    assert "checkpoint-3" in resumed.stdout + resumed.stderr
    assert sorted(losses(out)) == list(range(1, 7)) and losses(out) == losses(full)
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_have_world_size_two_and_match_one_process(tmp_path, straight_run):
    r, single = straight_run
    out = tmp_path / "run"
    # 2 processes x 1 row: the rows of each step are the 2 rows the single process takes (accelerate
    # hands consecutive batches of the same sampler order to the ranks).
    result = ok(launch(r, out, "--per_device_train_batch_size", "1", processes=2))
    assert "sft: 2 process(es) (world size 2, DistributedType.MULTI_CPU)" in result.stdout
    assert (out / "stage.json").exists() and sorted(losses(out)) == list(range(1, 7))
    for step, loss in losses(single).items():
        assert losses(out)[step] == pytest.approx(loss, rel=1e-3), step
