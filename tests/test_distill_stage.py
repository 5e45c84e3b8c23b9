"""The distillation stage (`python -m distill`): the recipe's teacher is really the one scoring (zero
divergence against itself for every divergence type, not against another model), a vocabulary mismatch
fails before training naming both sizes and the first differing token, λ and the off-policy loss do what
they say, a run resumes after kill -9 with the same losses, 2 processes have world size 2, and the
colocated vLLM engine on CPU receives the student's weights every step."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import chat_templates
from core import SmolForgeForCausalLM
from core.metrics import read_metrics
from core.recipe import parse_recipe
from distill.config import DistillConfig
from distill.data import PromptDataError
from distill.train import VocabularyMismatchError, main as distill_main

from conftest import (PRETRAIN_SOURCES, REPO, launch_stage, logged_losses, ok, save_chat_model, vllm_server,
                      write_recipe)


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("distill-models")
    return save_chat_model(tmp / "a", tokenizer_dir, 0), save_chat_model(tmp / "b", tokenizer_dir, 1)


def recipe(tmp_path: Path, student: Path, teacher: Path, **overrides) -> Path:
    cfg = {"model_name_or_path": str(student), "teacher_model_name_or_path": str(teacher),
           "suite": "arithmetic", "max_prompts": 32, "max_completion_length": 8,
           "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
           "save_strategy": "steps", "save_steps": 2, "seed": 0, "report_to": "none"}
    return write_recipe(tmp_path, {**cfg, **overrides})


def first_loss(run_dir: Path) -> float:
    return logged_losses(run_dir)[1]


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_divergence_is_zero_at_step_0_when_the_student_is_the_teacher(tmp_path, chat_models, divergence):
    """The step-1 loss is the divergence before any update."""
    a, _ = chat_models
    r = recipe(tmp_path, a, a, divergence=divergence, max_steps=1, save_strategy="no")
    distill_main(["--config", str(r), "--output_dir", str(tmp_path / "run")])
    assert abs(first_loss(tmp_path / "run")) < 1e-6


def test_the_recipe_teacher_is_the_one_scoring(tmp_path, chat_models):
    """Against another teacher the same student's step-0 divergence is clearly positive (it is zero
    against itself, above): the teacher named in the recipe is loaded and used, not ignored as TRL
    ignores `teacher_model_name_or_path` when no teacher is passed to its trainer."""
    a, b = chat_models
    r = recipe(tmp_path, a, b, max_steps=1, save_strategy="no")
    distill_main(["--config", str(r), "--output_dir", str(tmp_path / "run")])
    assert first_loss(tmp_path / "run") > 1e-2
    manifest = json.loads((tmp_path / "run" / "stage.json").read_text())
    assert manifest["stage"] == "distill" and manifest["recipe"]["teacher_model_name_or_path"] == str(b)


def test_off_policy_mode_trains_on_teacher_samples_with_cross_entropy(tmp_path, chat_models):
    a, b = chat_models
    r = recipe(tmp_path, a, b, lmbda=0.0, off_policy_loss="sft", max_steps=2, save_strategy="no")
    metrics = distill_main(["--config", str(r), "--output_dir", str(tmp_path / "run")])
    assert metrics["distill/student_tokens"] == 0 and metrics["distill/teacher_tokens"] > 0
    rows = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert all(m["distill/on_policy"] == 0.0 for m in rows)
    # Cross-entropy of the student on the teacher's tokens: nats per token, far from a divergence's ~0.
    assert all(m["loss"] > 1.0 for m in rows)


def test_vocabulary_mismatch_fails_before_training_naming_both_sizes_and_the_first_token(tmp_path, chat_models):
    from pretrain.tokenizer import sample_sources, train_tokenizer

    a, _ = chat_models
    # A tokenizer trained on other documents: the same size, different merges.
    other = train_tokenizer(sample_sources(PRETRAIN_SOURCES, 200), 520)
    chat_templates.install(other, "smollm3", add_missing_tokens=True)
    teacher = tmp_path / "teacher"
    other.save_pretrained(teacher)
    student_vocab = AutoTokenizer.from_pretrained(a).get_vocab()
    r = recipe(tmp_path, a, teacher)
    with pytest.raises(VocabularyMismatchError) as error:
        distill_main(["--config", str(r), "--output_dir", str(tmp_path / "run")])
    message = str(error.value)
    assert f"has {len(student_vocab)} tokens" in message and f"has {len(other.get_vocab())} tokens" in message
    first = min(i for token, i in student_vocab.items() if other.get_vocab().get(token) != i)
    assert f"the first token that differs is id {first}" in message
    assert not (tmp_path / "run").exists()


def test_prompt_rows_without_a_prompt_fail_naming_the_row(tmp_path, chat_models):
    a, b = chat_models
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n" + json.dumps({"question": "What is 3+3?"}) + "\n")
    r = recipe(tmp_path, a, b, suite=None, max_prompts=None, sources=[{"path": str(data)}])
    with pytest.raises(PromptDataError, match=rf"source {data} row 1 has no 'prompt' field"):
        distill_main(["--config", str(r), "--output_dir", str(tmp_path / "run")])


def test_tiny_recipes_parse():
    (on,) = parse_recipe(DistillConfig, args=["--config", str(REPO / "recipes/tiny/distill.yaml")])
    (off,) = parse_recipe(DistillConfig, args=["--config", str(REPO / "recipes/tiny/distill_off_policy.yaml")])
    assert on.lmbda == 1.0 and on.beta == 1.0 and on.divergence == "reverse_kl"
    assert off.lmbda == 0.0 and off.off_policy_loss == "sft" and off.token_budget == on.token_budget


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, chat_models):
    """4 steps, some of them (a seeded draw with λ = 0.5) on teacher samples: both samplers are resumed."""
    a, b = chat_models
    tmp = tmp_path_factory.mktemp("distill-straight")
    # Seed 5 draws student, teacher | teacher, student for steps 1-4: both samplers on both sides of the kill.
    r = recipe(tmp, a, b, lmbda=0.5, divergence="jsd", seed=5)
    ok(launch_stage("distill", r, tmp / "run"))
    return r, tmp / "run"


def test_resume_after_kill_gives_the_same_losses(tmp_path, straight_run):
    r, full = straight_run
    out = tmp_path / "run"
    killed = launch_stage("distill", r, out, fault="kill_after_step:2")
    assert killed.returncode != 0 and (out / "checkpoint-2").is_dir() and not (out / "stage.json").exists()
    ok(launch_stage("distill", r, out, "--resume_from_checkpoint", "true"))
    assert sorted(logged_losses(out)) == list(range(1, 5))
    assert logged_losses(out) == logged_losses(full)  # bit-identical, step by step
    on_policy = [m["distill/on_policy"] for m in read_metrics(full) if "loss" in m]
    assert on_policy == [1.0, 0.0, 0.0, 1.0]
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_metrics, resumed_metrics = (json.loads((d / "stage.json").read_text())["metrics"] for d in (full, out))
    for key in ("distill/student_tokens", "distill/teacher_tokens"):
        assert full_metrics[key] == resumed_metrics[key] > 0, key


def test_two_processes_have_world_size_two(tmp_path, straight_run):
    r, _ = straight_run
    result = ok(launch_stage("distill", r, tmp_path / "run", "--per_device_train_batch_size", "2", processes=2))
    assert "distill: 2 process(es) (world size 2, DistributedType.MULTI_CPU)" in result.stdout
    assert (tmp_path / "run" / "stage.json").exists() and sorted(logged_losses(tmp_path / "run")) == list(range(1, 5))


def test_colocated_vllm_student_gets_its_weights_every_step(tmp_path, chat_models, vllm_module):
    """TRL's colocate sync fails on vLLM's CPU backend; core/vllm/trl.py reloads in place. Three steps
    need two syncs of trained weights; the token budget stops the run once enough tokens are trained."""
    a, b = chat_models
    r = recipe(tmp_path, a, b, use_vllm=True, vllm_mode="colocate", max_steps=3, save_strategy="no")
    result = ok(launch_stage("distill", r, tmp_path / "run"))
    assert "student samples with vLLM (colocate)" in result.stdout
    assert sorted(logged_losses(tmp_path / "run")) == [1, 2, 3]


def test_compare_reports_scores_fraction_of_teacher_and_compute(tmp_path, capsys):
    from distill.compare import main as compare_main

    paths = {name: tmp_path / name for name in ("student", "on", "off", "teacher")}
    for name, path in paths.items():
        path.mkdir()
    for name, lmbda, loss in (("on", 1.0, "divergence"), ("off", 0.0, "sft")):
        (paths[name] / "stage.json").write_text(json.dumps({
            "recipe": {"lmbda": lmbda, "divergence": "reverse_kl", "off_policy_loss": loss},
            "metrics": {"distill/student_tokens": 100 * lmbda, "distill/teacher_tokens": 100 * (1 - lmbda),
                        "distill/steps": 5, "distill/wall_s": 12.3}}))
    scores = {"student": 0.1, "on": 0.3, "off": 0.2, "teacher": 0.4}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"split": "test", "models": {
        name: {"path": str(paths[name]), "summary": {"pass@1": score}} for name, score in scores.items()}}))
    rows = compare_main(["--results", str(results), "--student", str(paths["student"]), "--teacher",
                         str(paths["teacher"]), "--distilled", str(paths["on"]), str(paths["off"])])
    assert [row["of teacher"] for row in rows] == pytest.approx([0.25, 0.75, 0.5, 1.0])
    assert rows[1]["student tokens"] == 100 and rows[2]["teacher tokens"] == 100
    assert "fraction of the teacher's score" in capsys.readouterr().out


@pytest.mark.vllm
def test_a_served_teacher_gives_the_in_process_log_probs_and_divergence(tmp_path, chat_models, vllm_module):
    """One teacher server (python -m rl.serve): its log-probs of the student's tokens equal the in-process
    teacher's, and a run against it trains with the in-process divergence (0 at step 0 for student =
    teacher, the other teacher's value for another student)."""
    from core.vllm.client import TimedVLLMClient

    a, b = chat_models
    # float32 as the in-process teacher (vLLM on CPU would serve a float32 checkpoint in bf16: 0.03 apart).
    with vllm_server(b, tmp_path / "server.log", 512, "--dtype", "float32") as port:
        url = f"http://127.0.0.1:{port}"
        tokenizer = AutoTokenizer.from_pretrained(b)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3+4?"}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion = tokenizer("<think>\n3+4=7\n</think>\n7", add_special_tokens=False)["input_ids"]
        teacher = SmolForgeForCausalLM.from_pretrained(b).eval()
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1:-1]
        local = torch.log_softmax(logits.float(), dim=-1)
        client = TimedVLLMClient(base_url=url, connection_timeout=60, request_timeout=60)
        served = client.get_sequence_logprobs([prompt_ids + completion], [len(prompt_ids)], top_logprobs=local.size(-1))
        dense = torch.full_like(local, float("-inf"))
        for position, (values, ids) in enumerate(zip(served["logprobs"][0], served["logprob_token_ids"][0])):
            dense[position, ids] = torch.tensor(values)
        assert torch.isfinite(dense).all(), "the server returns the whole vocabulary"
        assert torch.allclose(dense, local, atol=1e-3), (dense - local).abs().max()

        # Training against the server: the divergence is the in-process one at step 0.
        common = dict(teacher_model_server_url=url, max_steps=1, save_strategy="no")
        served_run, local_run = tmp_path / "served", tmp_path / "local"
        distill_main(["--config", str(recipe(tmp_path, b, b, **common)), "--output_dir", str(served_run / "same")])
        assert abs(first_loss(served_run / "same")) < 1e-4
        distill_main(["--config", str(recipe(tmp_path, a, b, **common)), "--output_dir", str(served_run / "other")])
    distill_main(["--config", str(recipe(tmp_path, a, b, max_steps=1, save_strategy="no")),
                  "--output_dir", str(local_run)])
    assert first_loss(served_run / "other") == pytest.approx(first_loss(local_run), rel=1e-3, abs=1e-4)
    assert first_loss(local_run) > 1e-3


def test_a_served_teacher_needs_lmbda_1(tmp_path, chat_models):
    a, b = chat_models
    r = recipe(tmp_path, a, b, teacher_model_server_url="http://127.0.0.1:9", lmbda=0.5)
    with pytest.raises(ValueError, match="teacher_model_server_url with lmbda=0.5"):
        distill_main(["--config", str(r), "--output_dir", str(tmp_path / "run")])
