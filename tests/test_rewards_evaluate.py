"""`python -m rewards.evaluate` on tiny core checkpoints with a locally trained tokenizer.

Checkpoints are built here (nothing is downloaded): a byte-level BPE trained on the arithmetic
suite's text, with a small chat template, saved with random tiny core models.
"""

import json
import subprocess
import sys

import pytest
import torch

import core  # noqa: F401  (registers the core with the Auto classes)
from core import SmolForgeConfig, SmolForgeForCausalLM
from core.checkpoint import save_checkpoint
from rewards.evaluate import main, prompt_token_ids
from rewards.suites import arithmetic_rows

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def arithmetic_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    rows = arithmetic_rows("train") + arithmetic_rows("test")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([f"{r['prompt']} {r['answer']}" for r in rows], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny core checkpoints (different random weights) sharing one tokenizer."""
    tokenizer = arithmetic_tokenizer()
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer),
                                                                 eos_token_id=tokenizer.eos_token_id))
        with torch.no_grad():  # the init's small std makes every logit nearly equal: use larger weights
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0.0, 0.3)
        paths.append(str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{seed}", model, tokenizer,
                                         stage="test", recipe={}, parent=None)))
    return paths


GREEDY = ["--suite", "arithmetic", "--temperature", "0", "--num_samples", "1", "--dtype", "float32",
          "--max_examples", "20", "--item_timeout_s", "2"]


def test_chat_template_is_applied_when_present_and_can_be_turned_off(checkpoints):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints[0])
    with_template = prompt_token_ids(tokenizer, ["What is 7+5?"], use_chat_template=True)[0]
    raw = prompt_token_ids(tokenizer, ["What is 7+5?"], use_chat_template=False)[0]
    assert tokenizer.decode(with_template) == "<|user|>What is 7+5?<|assistant|>"
    assert tokenizer.decode(raw) == "What is 7+5?"


def test_two_checkpoints_side_by_side_with_pass_at_k_json_and_png(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    report = main(["--model_name_or_path", checkpoints[0], "--model_name_or_path", checkpoints[1], "--suite", "arithmetic",
                   "--backend", "transformers", "--num_samples", "4", "--temperature", "1.0", "--max_examples", "10",
                   "--item_timeout_s", "2", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "tiny-0", "tiny-1"]  # one column per checkpoint
    for row in ("accuracy (mean)", "accuracy unscored", "soft_overlong_punishment (mean)", "pass@1", "pass@4",
                "mean completion tokens", "truncation rate"):
        assert any(line.startswith(row) and len(line.split()) >= 3 for line in printed.splitlines()), row

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for name in ("tiny-0", "tiny-1"):
        model = saved["models"][name]
        assert len(model["samples"]) == 10 * 4
        summary = model["summary"]
        assert summary["pass@4"] >= summary["pass@1"]
        assert summary["pass@1"] == pytest.approx(summary["rewards"]["accuracy"]["mean"])
        assert 0 < summary["mean_completion_tokens"] <= 8
        assert model["chat_template"] is True
    # Different weights, different completions: the columns are really per checkpoint.
    assert [s["completion"] for s in saved["models"]["tiny-0"]["samples"]] != \
        [s["completion"] for s in saved["models"]["tiny-1"]["samples"]]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vllm_and_transformers_give_identical_greedy_scores(checkpoints, tmp_path, vllm_module):
    # vllm_module: a missing or broken vLLM fails this test, it is not skipped (conftest).
    reports = {backend: main(["--model_name_or_path", checkpoints[0], *GREEDY, "--backend", backend,
                              "--output_dir", str(tmp_path / backend)])
               for backend in ("transformers", "vllm")}
    hf, vl = (reports[b]["models"]["tiny-0"] for b in ("transformers", "vllm"))
    assert (hf["backend"], vl["backend"]) == ("transformers", "vllm")
    assert [s["completion"] for s in vl["samples"]] == [s["completion"] for s in hf["samples"]]
    assert [s["rewards"] for s in vl["samples"]] == [s["rewards"] for s in hf["samples"]]
    assert vl["summary"] == hf["summary"]
    # Not a vacuous comparison: the greedy completions differ from prompt to prompt.
    assert len({s["completion"] for s in hf["samples"]}) > 5


def test_command_line_entry_point_and_errors(checkpoints, tmp_path):
    run = subprocess.run([sys.executable, "-m", "rewards.evaluate", "--model_name_or_path", checkpoints[0], *GREEDY,
                          "--max_examples", "3", "--backend", "transformers", "--output_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pass@1" in run.stdout and (tmp_path / "results.json").is_file()

    with pytest.raises(ValueError, match="num_samples=4 with temperature 0"):
        main(["--model_name_or_path", checkpoints[0], "--temperature", "0", "--num_samples", "4", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown suite 'gsm9k'"):
        main(["--model_name_or_path", checkpoints[0], "--suite", "gsm9k", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown command-line flag '--num_sample'"):
        main(["--model_name_or_path", checkpoints[0], "--num_sample", "4", "--output_dir", str(tmp_path)])


def test_pass_at_1_has_a_standard_error_over_prompts():
    """Issue 30: pass@1 on 40 prompts was reported without its error, so two checkpoints a few answers apart
    looked different. SE = sample std over prompts of the per-prompt success fraction / sqrt(prompts)."""
    from core.generation import Sample
    from rewards.evaluate import format_table, summarize_model
    from rewards.suites import get_suite

    suite = get_suite("arithmetic")
    samples = [[Sample([1, 2], truncated=False)] * 2 for _ in range(3)]
    accuracy = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # per-prompt fractions 1, 0.5, 0
    rewards = {name: accuracy if name == "accuracy" else [0.0] * 6 for name in suite.reward_weights}
    summary = summarize_model(suite, samples, rewards, num_samples=2)
    assert summary["pass@1"] == pytest.approx(0.5)
    assert summary["pass@1_se"] == pytest.approx(0.5 / 3 ** 0.5)  # stdev([1, 0.5, 0]) = 0.5
    assert summary["pass@2"] == pytest.approx(2 / 3) and summary["pass@2_se"] == pytest.approx(1 / 3)
    table = format_table({"ckpt": {"summary": summary}}, num_samples=2)
    rows = {line.rsplit(None, 1)[0].strip(): line.split()[-1] for line in table.splitlines()[2:]}
    assert (rows["pass@1"], rows["pass@1 SE"]) == ("0.5000", "0.2887")
    # One prompt has no spread to measure: no SE rather than a made-up 0.
    one = summarize_model(suite, samples[:1], {name: values[:2] for name, values in rewards.items()}, 2)
    assert one["pass@1_se"] is None
    rows = {line.rsplit(None, 1)[0].strip(): line.split()[-1]
            for line in format_table({"c": {"summary": one}}, 2).splitlines()[2:]}
    assert (rows["pass@1"], rows["pass@1 SE"]) == ("1.0000", "n/a")
