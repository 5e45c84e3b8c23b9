"""The seam between on-policy pair building and the preference stage (issue 30): what
`preference.build_pairs` writes, the preference stage accepts; build_pairs' output is a complete stage
(stage.json) that the pipeline skips, and an incomplete one is replaced, not a dead end; KTO rows are in
an order TRL's KL baseline can use (each prompt with another prompt's reply).

Deterministic by construction, never by a lucky sample: the "steered" models below are tiny core models
whose next token depends only on the current one (every block's output projection is zero, so the
residual stream is the current token's embedding) and follows a chain given by hand, e.g. the
generation prompt's last token -> "4" -> "2" -> <|im_start|> -> "6" -> <|im_end|>, the reply that broke
`make demo` on some machines."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM
from core.checkpoint import MANIFEST_NAME, data_fingerprint, read_manifest
from core.generation import GenerationSettings, Sample, generate_transformers, generate_vllm
from core.sources import SourceSpec, load_rows
from preference import build_pairs as build_pairs_module
from preference.config import PreferenceConfig
from preference.data import PreferenceDataError, load_sources, unpair, validate_rows
from preference.train import prepare
from rewards import evaluate as rewards_evaluate  # where build_pairs samples (rewards.evaluate.sample_checkpoint)
from rewards.suites import get_suite
from rewards.suites import load_rows as suite_rows

from conftest import REPO

FIRST_PROMPT = suite_rows(get_suite("arithmetic"), "train")[0]  # {"prompt": "What is 3*1?", "answer": "3"}


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir):
    """The pretraining tokenizer with the SmolLM3 template installed, as an SFT checkpoint carries it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_templates.install(tokenizer, "smollm3", add_missing_tokens=True)
    return tokenizer


def steered_model(path: Path, tokenizer, chain: list[str]) -> Path:
    """A tiny core checkpoint that, after the generation prompt, writes `chain` greedily, token by token, then
    <|endoftext|>: token chain[i]'s embedding is the unit vector e_i and the output head maps e_i to chain[i+1]
    (untied embeddings; the first element is the generation prompt's last token, "\\n")."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in chain]
    assert len(set(ids)) == len(ids), f"a chain token repeats, the next token would be ambiguous: {chain}"
    config = SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), tie_word_embeddings=False)
    model = SmolForgeForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                parameter.zero_()  # blocks add nothing: the last position's state is its token's embedding
        for i, (token, following) in enumerate(zip(ids, ids[1:])):
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[following, i] = 100.0
    # Any token outside the chain has a zero embedding, so every logit is 0 and greedy picks id 0,
    # <|endoftext|>: the EOS, which ends the reply there.
    assert tokenizer.convert_ids_to_tokens(0) == tokenizer.eos_token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The reply that broke `make demo`: "42<|im_start|>6" (a wrong answer to 3*1 with a control token in it).
WEAK_CHAIN = ["Ċ", "4", "2", "<|im_start|>", "6", "<|im_end|>"]
STRONG_CHAIN = ["Ċ", FIRST_PROMPT["answer"], "<|im_end|>"]


@pytest.fixture(scope="module")
def steered(tmp_path_factory, chat_tokenizer) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("steered")
    return {"weak": steered_model(tmp / "weak", chat_tokenizer, WEAK_CHAIN),
            "strong": steered_model(tmp / "strong", chat_tokenizer, STRONG_CHAIN)}


def prompt_ids(tokenizer) -> list[list[int]]:
    return rewards_evaluate.prompt_token_ids(tokenizer, [FIRST_PROMPT["prompt"]], True)


# --- generation stops at the template's control tokens -------------------------------------------------

@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_generation_stops_at_the_extra_stop_ids_on_both_backends(steered, chat_tokenizer, backend, request):
    if backend == "vllm":
        request.getfixturevalue("vllm_module")  # a missing or broken vLLM fails this test (conftest)
    stop = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    settings = GenerationSettings(max_new_tokens=8, stop_token_ids=(stop,))
    eos = [chat_tokenizer.eos_token_id]
    if backend == "vllm":  # one engine (about 20 s); the steered model's greedy tokens are the same in both
        (samples,) = generate_vllm(str(steered["weak"]), prompt_ids(chat_tokenizer), eos, settings, 64 << 20)
    else:
        model = SmolForgeForCausalLM.from_pretrained(steered["weak"])
        (samples,) = generate_transformers(model, prompt_ids(chat_tokenizer), eos, settings)
        # Without the stop id the model writes on past it: the stop, not the model, ends the reply.
        (unstopped,) = generate_transformers(model, prompt_ids(chat_tokenizer), eos, GenerationSettings(max_new_tokens=8))
        assert chat_tokenizer.decode(unstopped[0].token_ids) == "42<|im_start|>6<|im_end|>"
    assert chat_tokenizer.decode(samples[0].token_ids) == "42"
    assert samples[0].eos_token_id == stop and not samples[0].truncated


# --- build_pairs writes what the preference stage accepts -----------------------------------------------

def test_build_pairs_output_is_accepted_and_trained_on_by_the_preference_stage(tmp_path, steered, chat_tokenizer):
    out = tmp_path / "pairs"
    # Strong vs weak, greedy: one sample from each model, with transformers' generate (the real sampler).
    summary = build_pairs_module.main([
        "--model_name_or_path", str(steered["weak"]), "--strong_model_name_or_path", str(steered["strong"]),
        "--output_dir", str(out), "--suite", "arithmetic", "--max_prompts", "1", "--num_samples", "1",
        "--temperature", "0", "--max_new_tokens", "8", "--backend", "transformers", "--pair_reward", "accuracy"])
    assert summary["pairs"] == 1
    (row,) = load_rows(SourceSpec(path=str(out / "pairs.jsonl")))
    assert row["chosen"] == [{"role": "assistant", "content": FIRST_PROMPT["answer"]}]
    assert row["rejected"] == [{"role": "assistant", "content": "42"}]  # stopped at <|im_start|>

    # The preference stage's own loader and checks, then a short APO run on the file.
    recipe = {"model_name_or_path": str(steered["weak"]), "sources": [{"path": str(out / "pairs.jsonl")}],
              "loss_type": ["apo_zero", "sft"], "loss_weights": [1.0, 1.0], "max_length": 512, "max_steps": 2,
              "per_device_train_batch_size": 1, "save_strategy": "no", "report_to": "none",
              "output_dir": str(tmp_path / "apo")}
    prepared = prepare(PreferenceConfig(**recipe))
    assert len(prepared.trainer.train_dataset) == 1
    prepared.trainer.train()

    manifest = read_manifest(out)
    assert manifest["stage"] == "preference/build_pairs"
    assert manifest["parent"] == [str(steered["strong"]), str(steered["weak"])]
    assert manifest["recipe"]["pair_reward"] == ["accuracy"]
    assert manifest["data_fingerprint"] == data_fingerprint([(out / "pairs.jsonl").read_text()])
    assert manifest["metrics"]["pairs"] == 1 and manifest["metrics"]["samples_with_control_token"] == 0


def spelled(tokenizer, text: str) -> list[int]:
    """`text`'s ids with its control tokens spelled out in ordinary tokens ("<", "|", "im", ...): what a model
    can sample although generation stops at the control token's own id."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def fake_generation(replies: list[str], tokenizer):
    """generate_transformers stand-in: the same k replies (control tokens spelled out) to every prompt, with
    the correct answer wherever a reply says ANSWER."""
    def generate(model, prompts, eos_ids, settings, batch_size=32):
        assert settings.num_samples == len(replies)
        samples = []
        for ids in prompts:
            a, op, b = re.findall(r"What is (\d)([+*])(\d)\?", tokenizer.decode(ids))[-1]
            value = int(a) + int(b) if op == "+" else int(a) * int(b)
            samples.append([Sample(spelled(tokenizer, r.replace("ANSWER", str(value))), truncated=False)
                            for r in replies])
        return samples
    return generate


def test_samples_holding_a_control_token_are_dropped_and_counted(tmp_path, steered, chat_tokenizer, monkeypatch):
    # Per prompt: a wrong reply that spells <|im_start|> (the first of the lowest: `rejected` if it were kept),
    # the right answer, and a plain wrong one.
    monkeypatch.setattr(rewards_evaluate, "generate_transformers",
                        fake_generation(["9<|im_start|>", "ANSWER", "9"], chat_tokenizer))
    out = tmp_path / "pairs"
    summary = build_pairs_module.main([
        "--model_name_or_path", str(steered["weak"]), "--output_dir", str(out), "--suite", "arithmetic",
        "--max_prompts", "3", "--num_samples", "3", "--backend", "transformers", "--pair_reward", "accuracy"])
    assert summary["pairs"] == 3 and summary["samples_with_control_token"] == 3
    assert read_manifest(out)["metrics"]["samples_with_control_token"] == 3
    for row in load_rows(SourceSpec(path=str(out / "pairs.jsonl"))):
        assert row["rejected"] == [{"role": "assistant", "content": "9"}]


def test_rows_the_preference_template_refuses_are_never_written(tmp_path, steered, chat_tokenizer, monkeypatch):
    # The preference stage trains with another template than the policy's: ChatML, plus a refusal of any
    # reply with a "9" in it. build_pairs checks its rows with that template before writing anything.
    template = tmp_path / "strict.jinja"
    template.write_text(chat_templates.load("chatml").inference.replace(
        "{%- for message in messages %}",
        "{%- for message in messages %}{%- if message.role == 'assistant' and '9' in message.content %}"
        "{{- raise_exception('no nines') }}{%- endif %}", 1))
    assert "no nines" in template.read_text()
    monkeypatch.setattr(rewards_evaluate, "generate_transformers", fake_generation(["ANSWER", "9"], chat_tokenizer))
    out = tmp_path / "pairs"
    with pytest.raises(PreferenceDataError,
                       match=re.escape(f"{out}/pairs.jsonl row 0: the chat template refuses") + ".*no nines"):
        build_pairs_module.main([
            "--model_name_or_path", str(steered["weak"]), "--output_dir", str(out), "--suite", "arithmetic",
            "--max_prompts", "2", "--num_samples", "2", "--backend", "transformers", "--pair_reward", "accuracy",
            "--chat_template", str(template)])
    assert not out.exists()


def test_a_complete_output_is_kept_and_an_incomplete_one_replaced(tmp_path, steered, chat_tokenizer, monkeypatch):
    out = tmp_path / "pairs"
    out.mkdir()
    # What a run that did not finish left (the demo's failure: an earlier build_pairs wrote no stage.json).
    (out / "pairs.jsonl").write_text('{"prompt": "stale"}\n')
    (out / "summary.json").write_text("{}")
    args = ["--model_name_or_path", str(steered["weak"]), "--output_dir", str(out), "--suite", "arithmetic",
            "--max_prompts", "2", "--num_samples", "2", "--backend", "transformers", "--pair_reward", "accuracy"]
    monkeypatch.setattr(rewards_evaluate, "generate_transformers", fake_generation(["ANSWER", "7"], chat_tokenizer))
    summary = build_pairs_module.main(args)
    rows = load_rows(SourceSpec(path=str(out / "pairs.jsonl")))
    assert len(rows) == summary["pairs"] == 2 and "stale" not in (out / "pairs.jsonl").read_text()
    assert json.loads((out / "summary.json").read_text())["pairs"] == 2
    manifest = (out / "stage.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    # Complete now: never written over, and refused before any sampling.
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled for an output_dir that is complete")
    monkeypatch.setattr(rewards_evaluate, "generate_transformers", no_sampling)
    with pytest.raises(FileExistsError, match=r"holds a complete build_pairs output \(stage.json\)"):
        build_pairs_module.main(args)
    assert (out / "stage.json").read_text() == manifest and load_rows(SourceSpec(path=str(out / "pairs.jsonl"))) == rows


def test_the_pipeline_finishes_after_a_failed_stage_is_fixed_and_then_skips_it(tmp_path, steered):
    """The demo's dead end, end to end (issue 30). A pairs output the run has no record of (as the failed demo left
    it: pairs.jsonl with a control token, no stage.json) is refused, naming --rerun; rerun, pairs is rebuilt
    without the token and completes; the preference stage then fails on its recipe, is fixed and run again, and
    finishes; the next invocation skips both."""
    pairs_recipe = tmp_path / "pairs.yaml"
    pairs_recipe.write_text(yaml.safe_dump({
        "model_name_or_path": str(steered["weak"]), "strong_model_name_or_path": str(steered["strong"]),
        "suite": "arithmetic", "max_prompts": 1, "num_samples": 1, "temperature": 0, "max_new_tokens": 8,
        "backend": "transformers", "pair_reward": ["accuracy"]}))
    apo_recipe = tmp_path / "apo.yaml"
    apo = {"model_name_or_path": str(steered["weak"]), "loss_type": ["apo_zero"], "max_length": 512, "max_steps": 1,
           "per_device_train_batch_size": 1, "save_strategy": "no", "report_to": "none"}
    apo_recipe.write_text(yaml.safe_dump({**apo, "loss_type": ["apo_zeroo"]}))  # the typo to fix
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "stages": [
        {"name": "pairs", "module": "preference.build_pairs", "config": str(pairs_recipe)},
        {"name": "apo", "module": "preference", "config": str(apo_recipe),
         "inputs": {"sources": {"path": "pairs/pairs.jsonl"}}}]}))
    stale = tmp_path / "run" / "pairs"
    stale.mkdir(parents=True)
    (stale / "pairs.jsonl").write_text(json.dumps({
        "prompt": [{"role": "user", "content": FIRST_PROMPT["prompt"]}],
        "chosen": [{"role": "assistant", "content": "3"}],
        "rejected": [{"role": "assistant", "content": "42<|im_start|>6"}]}) + "\n")

    def smolforge(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "core.pipeline", "run", str(pipeline), *flags],
                              capture_output=True, text=True, cwd=REPO, timeout=900,
                              env={**os.environ, "SMOLFORGE_FAULT": ""})

    unrecorded = smolforge()
    assert unrecorded.returncode != 0 and "pass --rerun pairs" in unrecorded.stderr, unrecorded.stderr[-3000:]
    failed = smolforge("--rerun", "pairs")
    assert "[pairs] ran" in failed.stdout and failed.returncode != 0, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "stage 'apo' failed" in failed.stderr and "apo_zeroo" in failed.stdout + failed.stderr
    assert (stale / MANIFEST_NAME).exists() and "<|im_start|>" not in (stale / "pairs.jsonl").read_text()
    apo_recipe.write_text(yaml.safe_dump(apo))  # fixed
    fixed = smolforge()
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert "[pairs] skipped (complete)" in fixed.stdout and "[apo] ran" in fixed.stdout
    assert (tmp_path / "run" / "apo" / "stage.json").exists()
    again = smolforge()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[pairs] skipped (complete)" in again.stdout and "[apo] skipped (complete)" in again.stdout


# --- KTO rows in an order TRL's KL baseline can use ------------------------------------------------------

def distinct_pairs(n: int) -> list[dict]:
    """n conversational pairs with distinct prompts and distinct replies ("What is a+b?": "a+b=<right>" vs
    "a+b=<right + 1>")."""
    facts = [(a, b) for a in range(1, 10) for b in range(1, 10)][:n]
    return [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
             "chosen": [{"role": "assistant", "content": f"{a}+{b}={a + b}"}],
             "rejected": [{"role": "assistant", "content": f"{a}+{b}={a + b + 1}"}]} for a, b in facts]


def test_unpair_labels_the_chosen_reply_desirable_and_the_rejected_one_not():
    pairs = distinct_pairs(7)
    rows = unpair(pairs)
    assert len(rows) == 14
    by_prompt = {json.dumps(p["prompt"]): p for p in pairs}
    for row in rows:
        pair = by_prompt[json.dumps(row["prompt"])]
        assert row["completion"] == (pair["chosen"] if row["label"] else pair["rejected"]), row
    # Every pair's two replies, once each.
    assert sorted(json.dumps([r["prompt"], r["completion"]]) for r in rows) == sorted(
        json.dumps([p["prompt"], p[name]]) for p in pairs for name in ("chosen", "rejected"))


def test_unpair_spreads_a_prompt_asked_in_several_pairs():
    # Three prompts, the first asked in two pairs (as the built-in pairs ask each fact in two reasoning modes).
    pairs = distinct_pairs(4)
    pairs[2] = {**pairs[2], "prompt": pairs[0]["prompt"]}
    rows = unpair(pairs + distinct_pairs(8)[4:])
    prompts = [json.dumps(r["prompt"]) for r in rows]
    assert all(a != b for a, b in zip(prompts, prompts[1:])), prompts
    assert [r["label"] for r in rows] == [True, False] * 8


def kto_dataset_rows(tmp_path: Path, chat_base: Path, source: Path, batch_size: int):
    """The train dataset TRL's KTOTrainer built (with its KL completions), and its first dataloader batch."""
    cfg = PreferenceConfig(model_name_or_path=str(chat_base), method="kto", output_dir=str(tmp_path / "run"),
                           sources=[{"path": str(source)}], max_length=512, report_to="none",
                           per_device_train_batch_size=batch_size)
    trainer = prepare(cfg).trainer
    assert trainer.calculate_KL  # loss_type kto estimates the KL baseline
    return list(trainer.train_dataset), next(iter(trainer.get_train_dataloader()))


def assert_kl_pairs_other_prompts(rows: list[dict], batch_size: int) -> None:
    completions = [json.dumps(r["completion_ids"]) for r in rows]
    assert len(set(completions)) == len(rows), "the check needs distinct replies"
    for i, row in enumerate(rows):
        source = rows[completions.index(json.dumps(row["KL_completion_ids"]))]
        # TRL's own rotation within a batch: the KL reply of a row comes from the batch's previous row.
        start = i - i % batch_size
        assert source is rows[start + (i - start - 1) % min(batch_size, len(rows) - start)]
        assert source["prompt_ids"] != row["prompt_ids"], f"row {i} is paired with its own prompt's reply"
    for start in range(0, len(rows) - len(rows) % batch_size, batch_size):
        labels = [r["label"] for r in rows[start:start + batch_size]]
        assert sum(labels) == batch_size // 2, f"batch at row {start}: labels {labels}"


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, tokenizer_dir, chat_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("chat-base")
    torch.manual_seed(0)
    SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(chat_tokenizer))).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("batch_size", [2, 4])
def test_kto_on_pairs_gives_trls_kl_baseline_another_prompts_reply(tmp_path, chat_base, batch_size):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in distinct_pairs(6)))
    rows, batch = kto_dataset_rows(tmp_path, chat_base, source, batch_size)
    assert len(rows) == 12
    assert_kl_pairs_other_prompts(rows, batch_size)
    # Sequential sampling: the first training batch is the dataset's first rows, in order.
    assert batch["label"].tolist() == [r["label"] for r in rows[:batch_size]]


def test_build_pairs_kto_rows_give_trls_kl_baseline_another_prompts_reply(tmp_path, steered, chat_base,
                                                                         chat_tokenizer, monkeypatch):
    monkeypatch.setattr(rewards_evaluate, "generate_transformers",
                        fake_generation(["ANSWER", "ANSWER1"], chat_tokenizer))
    out = tmp_path / "pairs"
    build_pairs_module.main([
        "--model_name_or_path", str(steered["weak"]), "--output_dir", str(out), "--suite", "arithmetic",
        "--max_prompts", "6", "--num_samples", "2", "--backend", "transformers", "--pair_reward", "accuracy",
        "--output_format", "kto"])
    written, origins = load_sources([{"path": str(out / "kto.jsonl")}])
    validate_rows(written, origins, "kto", chat_tokenizer, None, False)
    rows, _ = kto_dataset_rows(tmp_path, chat_base, out / "kto.jsonl", 2)
    assert_kl_pairs_other_prompts(rows, 2)


@pytest.mark.parametrize("batch_size", [2, 4])
def test_unpaired_kto_rows_side_by_side_give_trls_kl_baseline_another_prompts_reply(tmp_path, chat_base, batch_size):
    """KTO rows that come paired side by side, as core/arithmetic.py `kto_rows` (builtin:arithmetic_kto) writes
    them, are reordered by the stage too: only paired rows were, and the built-in KTO recipe trained with each
    prompt's KL term on its own reply."""
    source = tmp_path / "kto.jsonl"
    source.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p[name], "label": name == "chosen"}) + "\n"
                              for p in distinct_pairs(6) for name in ("chosen", "rejected")))
    rows, batch = kto_dataset_rows(tmp_path, chat_base, source, batch_size)
    assert len(rows) == 12
    assert_kl_pairs_other_prompts(rows, batch_size)
