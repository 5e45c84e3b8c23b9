"""The preference stage (`python -m preference`, issue 14): DPO's loss family, KTO and ORPO on TRL's
trainers. Sanity at step 0 (reference = policy), the prompt/reply boundary, bad data failing before
training naming the row, resume after kill -9, 2 processes, the metrics of each method moving the
right way, on-policy pair building, and checkpoint merging. Tiny models built here."""

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import trl
from safetensors.torch import load_file
from transformers import AutoTokenizer

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM
from core.arithmetic import kto_rows, preference_pairs, question, split_facts
from core.generation import Sample
from core.metrics import read_metrics
from core.sources import SourceSpec, load_rows
from preference import build_pairs as build_pairs_module
from preference.config import DPO_LOSS_TYPES, PreferenceConfig, trainer_args
from preference.data import PreferenceDataError, validate_rows
from preference.merge import MergeError
from preference.merge import main as merge_main
from preference.train import main as preference_main
from preference.train import prepare
from rewards import evaluate as rewards_evaluate  # where build_pairs samples (rewards.evaluate.sample_checkpoint)

from conftest import launch_stage, logged_losses, ok, write_recipe


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, tokenizer_dir) -> Path:
    """A random tiny core model with the pretraining tokenizer and the SmolLM3 template installed (as an
    SFT checkpoint carries it): the reference and the policy at step 0."""
    path = tmp_path_factory.mktemp("chat-base")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_templates.install(tokenizer, "smollm3", add_missing_tokens=True)
    torch.manual_seed(0)
    SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> dict[str, Path]:
    """The built-in no-think pairs as plain strings ("What is 7+5? " -> "12" / "13"): about 10 tokens a
    row instead of the ~190 of SmolLM3's system header, so the multi-step runs stay fast."""
    path = tmp_path_factory.mktemp("short-data")
    pairs = [{"prompt": row["prompt"][0]["content"] + " ", "chosen": row["chosen"][0]["content"],
              "rejected": row["rejected"][0]["content"]}
             for row in preference_pairs() if not row["chat_template_kwargs"]["enable_thinking"]][:16]
    kto = [{"prompt": row["prompt"], "completion": row[name], "label": name == "chosen"}
           for row in pairs for name in ("chosen", "rejected")]
    for name, rows in (("pairs", pairs), ("kto", kto)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"pairs": path / "pairs.jsonl", "kto": path / "kto.jsonl"}


def recipe(tmp_path: Path, base: Path, **overrides) -> Path:
    cfg = {"model_name_or_path": str(base), "max_length": 256, "report_to": "none",
           "sources": [{"path": "builtin:arithmetic_pairs", "max_rows": 16}],
           "max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
           "save_strategy": "steps", "save_steps": 3, "seed": 0}
    return write_recipe(tmp_path, {**cfg, **overrides})


def train(tmp_path: Path, base: Path, **overrides) -> list[dict]:
    """Run the stage in this process (into tmp_path/run); its metrics.jsonl lines."""
    out = tmp_path / "run"
    preference_main(["--config", str(recipe(tmp_path, base, save_strategy="no", **overrides)),
                     "--output_dir", str(out)])
    return read_metrics(out)


# --- sanity at step 0: the reference is the policy ---------------------------------------------------

STEP_ZERO = {
    # The first logged step is the loss of the untrained policy against itself: every log-ratio is 0.
    "dpo_sigmoid": ({"loss_type": ["sigmoid"]}, math.log(2)),
    # A weighted mix: sigmoid's log 2 + 0.5 x APO-zero's (1 - sigmoid(0)) + sigmoid(0) = 1.
    "dpo_mix_apo_zero": ({"loss_type": ["sigmoid", "apo_zero"], "loss_weights": [1.0, 0.5]}, math.log(2) + 0.5),
    "dpo_precomputed_reference": ({"precompute_ref_log_probs": True}, math.log(2)),
    "dpo_lora": ({"use_peft": True, "lora_r": 4, "lora_alpha": 8}, math.log(2)),
    # KTO: 1 - sigmoid(beta x (0 - KL 0)) = 0.5 for desirable and undesirable rows alike.
    "kto": ({"method": "kto", "sources": [{"path": "builtin:arithmetic_kto", "max_rows": 16}]}, 0.5),
    "kto_on_pairs": ({"method": "kto"}, 0.5),  # TRL unpairs them: chosen desirable, rejected undesirable
}


@pytest.mark.parametrize("case", sorted(STEP_ZERO))
def test_step_zero_loss_and_rewards_with_the_reference_equal_to_the_policy(tmp_path, chat_base, case):
    overrides, expected_loss = STEP_ZERO[case]
    first = train(tmp_path, chat_base, max_steps=1, per_device_train_batch_size=4, **overrides)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(expected_loss, abs=1e-5)
    # Precomputed reference log-probs come from other (padded) batches: equal up to float rounding.
    kto = ("kl",) if case.startswith("kto") else ()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", *kto):
        assert first[name] == pytest.approx(0.0, abs=1e-6), name
    if not kto:
        assert first["logps/chosen"] != first["logps/rejected"]  # the pair does differ; only the ratios are 0
    if case == "dpo_lora":  # the adapter is merged: a plain checkpoint, trained
        saved, base = load_file(tmp_path / "run/model.safetensors"), load_file(chat_base / "model.safetensors")
        assert saved.keys() == base.keys() and any(not torch.equal(saved[k], base[k]) for k in base)


# --- config ------------------------------------------------------------------------------------------

def test_dpo_loss_types_are_the_ones_trl_documents():
    documented = re.findall(r"`'(\w+)'`", trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])
    assert set(DPO_LOSS_TYPES) == set(documented)


@pytest.mark.parametrize("fields, message", [
    ({"method": "orpo", "loss_weights": [1.0]}, r"loss_weights=\[1.0\] is a field of method dpo; method orpo does "
                                                r"not use it"),
    ({"method": "dpo", "desirable_weight": 2.0}, r"desirable_weight=2.0 is a field of method kto; method dpo"),
    ({"method": "kto", "use_weighting": True}, r"use_weighting=True is a field of method dpo; method kto"),
    ({"method": "orpo", "precompute_ref_log_probs": True}, r"precompute_ref_log_probs=True is a field of method "
                                                           r"dpo / kto"),
    ({"loss_type": ["apo_zeros"]}, r"loss_type \['apo_zeros'\] unknown to DPO"),
    ({"method": "kto", "loss_type": ["sigmoid"]}, r"KTO takes one loss type, one of \['kto', 'apo_zero_unpaired'\]"),
])
def test_fields_of_another_method_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        PreferenceConfig(model_name_or_path="m", **fields)


def test_each_method_gets_its_own_trl_config_with_its_defaults():
    kto = trainer_args(PreferenceConfig(model_name_or_path="m", method="kto", desirable_weight=1.5))
    assert isinstance(kto, trl.KTOConfig) and kto.loss_type == "kto" and kto.desirable_weight == 1.5
    assert kto.train_sampling_strategy == "sequential"  # KTO's default: its KL term pairs batch neighbours
    dpo = trainer_args(PreferenceConfig(model_name_or_path="m", loss_type=["apo_zero"], beta=0.2))
    assert type(dpo) is trl.DPOConfig and dpo.loss_type == ["apo_zero"] and dpo.beta == 0.2
    orpo = trainer_args(PreferenceConfig(model_name_or_path="m", method="orpo"))
    assert type(orpo).__name__ == "ORPOConfig" and not hasattr(orpo, "loss_type")


# --- built-in data -----------------------------------------------------------------------------------

def test_builtin_pairs_hold_out_the_test_facts_and_state_a_wrong_answer():
    train_facts, test_facts = split_facts()
    held_out = {question(f) for f in test_facts}
    rows = preference_pairs("train")
    assert len(rows) == 2 * len(train_facts) and not {r["prompt"][0]["content"] for r in rows} & held_out
    assert {r["prompt"][0]["content"] for r in preference_pairs("test")} == held_out
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and chosen.split("\n")[-1] != rejected.split("\n")[-1]  # final answers differ
        assert ("<think>" in chosen) == row["chat_template_kwargs"]["enable_thinking"]
    kto = kto_rows("train")
    assert [r["label"] for r in kto[:4]] == [True, False, True, False] and len(kto) == 2 * len(rows)
    assert load_rows(SourceSpec(path="builtin:arithmetic_pairs", max_rows=3)) == rows[:3]


# --- the prompt/reply boundary --------------------------------------------------------------------

def boundary_replies(tokenizer, prompt: str) -> tuple[str, str]:
    """A reply whose first token merges with the prompt's trailing space, and one that does not, both
    starting with punctuation: split per reply, their prompt token ids would differ."""
    def merges(reply):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt + reply, add_special_tokens=False)["input_ids"][:len(ids)] != ids

    candidates = ["(7)", ", 7", ".7", "-7", "?7", "'7'", ":7", "[7]", "!7", "\"7\"", "#7", "*7", "/7"]
    merging = [c for c in candidates if merges(c)]
    plain = [c for c in candidates if not merges(c)]
    assert merging and plain, f"the test tokenizer has no merging ({merging}) and non-merging ({plain}) reply"
    return merging[0], plain[0]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_chosen_and_rejected_share_the_prompt_token_ids(tmp_path, chat_base, method):
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    prompt = "Answer with the number: "  # ends in a space
    merging, plain = boundary_replies(tokenizer, prompt)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": prompt, "chosen": merging, "rejected": plain},
            {"prompt": prompt, "chosen": plain, "rejected": merging}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PreferenceConfig(model_name_or_path=str(chat_base), method=method, output_dir=str(tmp_path / "run"),
                           sources=[{"path": str(data)}], max_length=64, report_to="none")
    dataset = prepare(cfg).trainer.train_dataset
    eos = tokenizer.eos_token
    for row, tokenized in zip(rows, dataset):
        if method == "dpo":
            prompt_ids = tokenized["prompt_ids"]
            chosen = prompt_ids + tokenized["chosen_ids"]
            rejected = prompt_ids + tokenized["rejected_ids"]
            chosen_prompt = rejected_prompt = prompt_ids
        else:
            n_chosen = tokenized["chosen_labels"].count(-100)
            n_rejected = tokenized["rejected_labels"].count(-100)
            chosen, rejected = tokenized["chosen_input_ids"], tokenized["rejected_input_ids"]
            chosen_prompt, rejected_prompt = chosen[:n_chosen], rejected[:n_rejected]
            assert tokenized["prompt_input_ids"] == chosen_prompt
        assert chosen_prompt == rejected_prompt
        # Each sequence is exactly the tokenised text: nothing lost or doubled at the boundary.
        assert chosen == tokenizer(prompt + row["chosen"] + eos, add_special_tokens=False)["input_ids"]
        assert rejected == tokenizer(prompt + row["rejected"] + eos, add_special_tokens=False)["input_ids"]
        assert prompt.startswith(tokenizer.decode(chosen_prompt))


def test_conversational_pairs_share_the_rendered_prompt(tmp_path, chat_base):
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    cfg = PreferenceConfig(model_name_or_path=str(chat_base), output_dir=str(tmp_path / "run"), report_to="none",
                           sources=[{"path": "builtin:arithmetic_pairs", "max_rows": 4}], max_length=256)
    for row, tokenized in zip(preference_pairs()[:4], prepare(cfg).trainer.train_dataset):
        kwargs = row["chat_template_kwargs"]
        full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True,
                                             **kwargs)["input_ids"]
        assert tokenized["prompt_ids"] + tokenized["chosen_ids"] == full
        assert "What is" in tokenizer.decode(tokenized["prompt_ids"])
        assert tokenizer.decode(tokenized["chosen_ids"]).endswith("<|im_end|>\n")


def test_sources_with_and_without_template_kwargs_train_together(tmp_path, chat_base):
    """build_pairs' rows carry no chat_template_kwargs, the built-in pairs do: one dataset takes both."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 2+2?"}],
                                "chosen": [{"role": "assistant", "content": "4"}],
                                "rejected": [{"role": "assistant", "content": "5"}]}) + "\n")
    cfg = PreferenceConfig(model_name_or_path=str(chat_base), output_dir=str(tmp_path / "run"), report_to="none",
                           sources=[{"path": "builtin:arithmetic_pairs", "max_rows": 2}, {"path": str(data)}])
    dataset = prepare(cfg).trainer.train_dataset
    assert len(dataset) == 3 and all(len(row["chosen_ids"]) > 0 for row in dataset)


# --- bad data --------------------------------------------------------------------------------------

GOOD = {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}
BAD_DATA = {
    "missing_rejected": ({"prompt": "What is 2+2?", "chosen": " 4"}, "dpo",
                         r"row 2: field 'rejected' is missing"),
    "chosen_identical_to_rejected": ({"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 4"}, "dpo",
                                     r"row 2: 'chosen' is identical to 'rejected'"),
    "empty_string": ({"prompt": "What is 2+2?", "chosen": "", "rejected": " 5"}, "orpo",
                     r"row 2: field 'chosen' is an empty string"),
    "empty_message": ({"prompt": [{"role": "user", "content": "What is 2+2?"}],
                       "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": " "}]}, "dpo",
                      r"row 2: rejected\[0\] \(assistant\) has empty content"),
    "longer_than_max_length": ({"prompt": "What is 2+2? " * 40, "chosen": " 4", "rejected": " 5"}, "dpo",
                               r"row 2: \d+ tokens \(prompt \+ answer\), longer than max_length 64"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_fails_before_training_naming_the_row(tmp_path, chat_base, case):
    bad, method, message = BAD_DATA[case]
    good = GOOD if isinstance(bad["prompt"], str) else {
        "prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in (good, good, bad, good)))
    out = tmp_path / "run"
    with pytest.raises(PreferenceDataError, match=f"source {data} {message}"):
        preference_main(["--config", str(recipe(tmp_path, chat_base, sources=[{"path": str(data)}], method=method,
                                                max_length=64)), "--output_dir", str(out)])
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_a_kto_set_with_a_single_label_fails_before_training(tmp_path, chat_base):
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is 2+2?", "completion": f" {n}", "label": True}) + "\n"
                            for n in range(4)))
    with pytest.raises(PreferenceDataError, match=r"every one of the 4 KTO rows has label True"):
        preference_main(["--config", str(recipe(tmp_path, chat_base, sources=[{"path": str(data)}], method="kto")),
                         "--output_dir", str(tmp_path / "run")])


def test_unpaired_rows_are_refused_by_dpo_naming_the_row(chat_base):
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    rows = [{"prompt": "a", "completion": " b", "label": True}]
    with pytest.raises(PreferenceDataError, match=r"source x row 0 is an unpaired .* method dpo needs"):
        validate_rows(rows, ["source x row 0"], "dpo", tokenizer, 64, False)


# --- training moves the metrics the right way ---------------------------------------------------------

DIRECTION = {"dpo_apo_zero": ("pairs", {"loss_type": ["apo_zero"]}), "kto": ("kto", {"method": "kto"}),
             "orpo": ("pairs", {"method": "orpo"})}


@pytest.mark.parametrize("case", sorted(DIRECTION))
def test_training_moves_the_preference_metrics_the_right_way(tmp_path, chat_base, short_data, case):
    # 8 rows seen again and again: the policy must come to prefer the chosen replies.
    data, overrides = DIRECTION[case]
    logs = [r for r in train(tmp_path, chat_base, sources=[{"path": str(short_data[data]), "max_rows": 8}],
                             max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3, **overrides)
            if "loss" in r]
    first, last = logs[0], logs[-1]
    assert last["loss"] < first["loss"]
    assert last["rewards/margins"] > first["rewards/margins"] and last["rewards/margins"] > 0
    if case == "orpo":
        assert last["log_odds_ratio"] > first["log_odds_ratio"] and last["nll_loss"] < first["nll_loss"]
    if case == "dpo_apo_zero":
        assert last["rewards/chosen"] > 0  # APO-zero pushes the chosen likelihood up, not only the margin
        assert last["rewards/accuracies"] == 1.0


# --- resume and processes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, chat_base, short_data):
    tmp = tmp_path_factory.mktemp("preference-straight")
    r = recipe(tmp, chat_base, loss_type=["apo_zero"], sources=[{"path": str(short_data["pairs"])}])
    ok(launch_stage("preference", r, tmp / "run"))
    return r, tmp / "run"


def test_resume_after_kill_gives_the_same_losses(tmp_path, straight_run):
    r, full = straight_run
    out = tmp_path / "run"
    killed = launch_stage("preference", r, out, fault="kill_after_step:3")
    assert killed.returncode != 0 and (out / "checkpoint-3").is_dir() and not (out / "stage.json").exists()
    refused = launch_stage("preference", r, out)
    assert refused.returncode != 0 and "pass --resume_from_checkpoint true" in refused.stderr
    ok(launch_stage("preference", r, out, "--resume_from_checkpoint", "true"))
    assert sorted(logged_losses(out)) == list(range(1, 7))
    assert logged_losses(out) == logged_losses(full)  # bit-identical, step by step
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((out / "stage.json").read_text())
    assert manifest["stage"] == "preference/dpo" and manifest["recipe"]["loss_type"] == ["apo_zero"]


def test_two_processes_have_world_size_two_and_match_one_process(tmp_path, straight_run):
    r, single = straight_run
    out = tmp_path / "run"
    # 2 processes x 1 pair: each step sees the same 2 pairs as the single process's batch of 2.
    result = ok(launch_stage("preference", r, out, "--per_device_train_batch_size", "1", processes=2))
    assert "2 process(es) (world size 2, DistributedType.MULTI_CPU)" in result.stdout
    assert (out / "stage.json").exists() and sorted(logged_losses(out)) == list(range(1, 7))
    for step, loss in logged_losses(single).items():
        assert logged_losses(out)[step] == pytest.approx(loss, rel=1e-3), step


# --- building pairs on-policy ----------------------------------------------------------------------

def fake_generation(replies_by_model: dict[str, list[str]], tokenizer):
    """generate_transformers stand-in: per model directory, the same k replies to every prompt, with the
    correct answer wherever a reply says ANSWER."""
    def generate(model, prompts, eos_ids, settings, batch_size=32):
        replies = replies_by_model[Path(model.name_or_path).name]
        assert settings.num_samples == len(replies)
        samples = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            fact = re.findall(r"What is (\d)([+*])(\d)\?", text)[-1]
            a, op, b = int(fact[0]), fact[1], int(fact[2])
            value = a + b if op == "+" else a * b
            samples.append([Sample(tokenizer(r.replace("ANSWER", str(value)), add_special_tokens=False)["input_ids"],
                                   truncated=False) for r in replies])
        return samples
    return generate


def test_build_pairs_pairs_best_with_worst_and_counts_prompts_without_a_pair(tmp_path, chat_base, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    weak = tmp_path / "weak"
    strong = tmp_path / "strong"
    for path in (weak, strong):
        SmolForgeForCausalLM.from_pretrained(chat_base).save_pretrained(path)
        tokenizer.save_pretrained(path)
    monkeypatch.setattr(rewards_evaluate, "generate_transformers", fake_generation(
        {"weak": ["ANSWER", "ANSWER1", "ANSWER", "x"], "strong": ["ANSWER", "ANSWER", "ANSWER", "ANSWER"]},
        tokenizer))
    common = ["--suite", "arithmetic", "--backend", "transformers", "--num_samples", "4", "--max_prompts", "5"]

    summary = build_pairs_module.main(["--model_name_or_path", str(weak), "--output_dir", str(tmp_path / "self"),
                                       *common])
    assert summary["prompts"] == 5 and summary["pairs"] == 5 and summary["prompts_without_pair"] == 0
    rows = load_rows(SourceSpec(path=str(tmp_path / "self/pairs.jsonl")))
    answers = [r["answer"] for r in build_pairs_module.load_rows(build_pairs_module.get_suite("arithmetic"), "train")]
    for row, answer in zip(rows, answers):
        assert row["chosen"] == [{"role": "assistant", "content": answer}]
        assert row["rejected"][0]["content"] != answer and row["score_chosen"] > row["score_rejected"]
    validate_rows(rows, [f"row {i}" for i in range(len(rows))], "dpo", tokenizer, 256, False)

    with pytest.raises(ValueError, match=r"pair_reward='helpfulness' is not a reward of suite 'arithmetic'"):
        build_pairs_module.main(["--model_name_or_path", str(weak), "--output_dir", str(tmp_path / "other"),
                                 "--pair_reward", "helpfulness", *common])

    # Every strong sample is right: self mode has nothing to prefer, every prompt is a tie.
    with pytest.raises(ValueError, match=r"no prompt gave a pair \(\{'tied': 5"):
        build_pairs_module.main(["--model_name_or_path", str(strong), "--output_dir", str(tmp_path / "tied"),
                                 *common])

    summary = build_pairs_module.main(["--model_name_or_path", str(weak), "--strong_model_name_or_path", str(strong),
                                       "--output_format", "kto", "--output_dir", str(tmp_path / "strong-weak"),
                                       *common])
    assert summary["mode"] == "strong_vs_weak" and summary["pairs"] == 5
    kto = load_rows(SourceSpec(path=str(tmp_path / "strong-weak/kto.jsonl")))
    assert [r["label"] for r in kto] == [True, False] * 5
    assert json.loads((tmp_path / "strong-weak/summary.json").read_text())["rows_written"] == 10


def test_build_pairs_ranks_by_named_rewards_and_never_pairs_an_empty_reply(tmp_path, chat_base, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    policy = tmp_path / "policy"
    SmolForgeForCausalLM.from_pretrained(chat_base).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    # Per prompt: a lucky guess after a think block that concluded 99, an empty reply (the policy ended its
    # turn at once), a wrong answer that contradicts its think block, and the reasoned right answer.
    replies = ["<think>\n99\n</think>\nANSWER", "", "<think>\nANSWER\n</think>\n99", "<think>\nANSWER\n</think>\nANSWER"]
    monkeypatch.setattr(rewards_evaluate, "generate_transformers", fake_generation({"policy": replies}, tokenizer))
    summary = build_pairs_module.main(["--model_name_or_path", str(policy), "--output_dir", str(tmp_path / "pairs"),
                                       "--suite", "arithmetic", "--backend", "transformers", "--num_samples", "4",
                                       "--max_prompts", "3", "--pair_reward", "accuracy", "answer_consistency"])
    assert summary["pairs"] == 3
    rows = load_rows(SourceSpec(path=str(tmp_path / "pairs/pairs.jsonl")))
    answers = [r["answer"] for r in build_pairs_module.load_rows(build_pairs_module.get_suite("arithmetic"), "train")]
    for row, answer in zip(rows, answers):
        # accuracy 1 + 0.5 x agreement: the reasoned answer (1.5) beats the guess (1.0); the contradicting
        # wrong answer (0.0) is rejected, not the empty reply, which cannot be trained on.
        assert row["chosen"][0]["content"] == f"<think>\n{answer}\n</think>\n{answer}"
        assert row["rejected"][0]["content"] == f"<think>\n{answer}\n</think>\n99"
        assert (row["score_chosen"], row["score_rejected"]) == (1.5, 0.0)
    validate_rows(rows, [f"row {i}" for i in range(len(rows))], "dpo", tokenizer, 256, False)


# --- merging ---------------------------------------------------------------------------------------

def test_merge_is_the_weighted_average_and_refuses_other_vocabularies_or_architectures(tmp_path, chat_base):
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}"
        SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    out = merge_main(["--model_name_or_path", str(chat_base), *map(str, paths), "--weights", "2", "1", "1",
                      "--output_dir", str(tmp_path / "merged")])
    merged = load_file(out / "model.safetensors")
    parts = [load_file(p / "model.safetensors") for p in (chat_base, *paths)]
    for name, tensor in merged.items():
        assert torch.allclose(tensor, 0.5 * parts[0][name] + 0.25 * parts[1][name] + 0.25 * parts[2][name], atol=1e-6)
    manifest = json.loads((out / "stage.json").read_text())
    assert manifest["stage"] == "merge" and manifest["parent"] == [str(chat_base), *map(str, paths)]

    other_vocab = tmp_path / "other-vocab"
    SmolForgeForCausalLM.from_pretrained(chat_base).save_pretrained(other_vocab)
    bigger = AutoTokenizer.from_pretrained(chat_base)
    bigger.add_tokens(["<extra>"])
    bigger.save_pretrained(other_vocab)
    with pytest.raises(MergeError, match=r"different vocabulary: .* only in the other: \['<extra>'\]"):
        merge_main(["--model_name_or_path", str(chat_base), str(other_vocab), "--weights", "1", "1",
                    "--output_dir", str(tmp_path / "refused")])
    other_arch = tmp_path / "other-arch"
    SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), num_hidden_layers=1)
                         ).save_pretrained(other_arch)
    tokenizer.save_pretrained(other_arch)
    with pytest.raises(MergeError, match=r"different architecture: num_hidden_layers is \d+ in .* but 1 in"):
        merge_main(["--model_name_or_path", str(chat_base), str(other_arch), "--weights", "1", "1",
                    "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
