"""Where vLLM cannot serve a block (MLA on vLLM's CPU backend: core/vllm/__init__.py, UNSERVABLE), evaluation
and RL rollouts fall back to transformers' `generate` with one printed line, and a served vLLM the user asked
for fails at once naming the field. No vLLM engine is started on this path: that is the point of deciding from
the config."""

import json

import pytest
import torch

from conftest import write_recipe
from core import SmolForgeConfig, SmolForgeForCausalLM
from core.checkpoint import save_checkpoint
from core.generation import GenerationSettings
from rl_policy import build_policy
from test_rewards_evaluate import arithmetic_tokenizer

FALLBACK_LINE = "generating with transformers instead"


@pytest.fixture(scope="module")
def mla_checkpoint(tmp_path_factory):
    """A tiny-mla core checkpoint with the arithmetic tokenizer, weights large enough to give varied tokens."""
    tokenizer = arithmetic_tokenizer()
    torch.manual_seed(0)
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny-mla", vocab_size=len(tokenizer),
                                                             eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():  # the init's small std makes every logit nearly equal
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mla", model, tokenizer, stage="test",
                               recipe={}, parent=None))


def test_the_reason_names_the_field_and_the_vllm_model_refuses_it():
    from core.vllm import check_servable, vllm_unsupported_reason

    config = SmolForgeConfig.from_preset("tiny-mla")
    assert vllm_unsupported_reason(config).startswith("kv_lora_rank=40: ")
    assert vllm_unsupported_reason(SmolForgeConfig.from_preset("tiny")) is None
    # What the plugin's vLLM model class raises on construction (tests/test_vllm.py starts an engine for head_dim).
    with pytest.raises(ValueError, match="kv_lora_rank=40"):
        check_servable(config)
    with pytest.raises(ValueError, match="layer_types has 'linear_attention' layers"):
        check_servable(SmolForgeConfig.from_preset("tiny-hybrid"))
    with pytest.raises(ValueError, match="num_experts=8: "):
        check_servable(SmolForgeConfig.from_preset("tiny-moe"))


def test_generate_vllm_refuses_before_starting_an_engine(mla_checkpoint):
    from core.generation import generate_vllm

    with pytest.raises(ValueError, match="kv_lora_rank=40"):
        generate_vllm(mla_checkpoint, [[1, 2, 3]], [0], GenerationSettings(max_new_tokens=4), 1 << 20)


def test_evaluation_with_backend_vllm_falls_back_to_generates_greedy_completions(mla_checkpoint, capsys,
                                                                                  monkeypatch):
    """rewards.evaluate's sampling step (preference.build_pairs samples through it too); its reward scoring is
    the same for both backends and left out here (the verifier pool's start alone took 24 s on a busy machine)."""
    from rewards import evaluate
    from rewards.suites import get_suite, load_rows

    def no_engine(*args, **kwargs):
        raise AssertionError("a vLLM engine was started for a checkpoint vLLM cannot serve")

    monkeypatch.setattr(evaluate, "generate_vllm", no_engine)
    rows = load_rows(get_suite("arithmetic"), "test", None)[:8]
    settings = GenerationSettings(max_new_tokens=8, dtype="float32")  # greedy
    completions = {}
    for backend in ("transformers", "vllm"):
        tokenizer, samples, _, used = evaluate.sample_checkpoint(mla_checkpoint, rows, settings, backend, True, 8,
                                                                 1 << 20)
        printed = capsys.readouterr().out
        assert (f"vLLM cannot serve {mla_checkpoint}: kv_lora_rank=40: " in printed) == (backend == "vllm"), printed
        assert (FALLBACK_LINE in printed) == (backend == "vllm")
        assert used == "transformers"  # what really generated: evaluate records it in results.json
        completions[backend] = [tokenizer.decode(ss[0].token_ids) for ss in samples]
    assert completions["vllm"] == completions["transformers"]
    assert len(set(completions["transformers"])) > 1  # varied completions: the comparison can fail


@pytest.fixture(scope="module")
def mla_policy(tokenizer_dir, tmp_path_factory):
    # A few steps only: one GRPO step runs whatever the rewards are.
    path, _ = build_policy(tokenizer_dir, tmp_path_factory.mktemp("rl-mla-policy"), steps=3, preset="tiny-mla")
    return path


def rl_recipe(policy, **fields) -> dict:
    return {"model_name_or_path": str(policy), "suite": "arithmetic", "max_prompt_length": 64,
            "max_completion_length": 4, "num_generations": 2, "per_device_train_batch_size": 4,
            "learning_rate": 3e-3, "temperature": 1.0, "logging_steps": 1, "save_strategy": "no", "max_steps": 1,
            "use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 64, "vllm_sync_check": 0,
            "held_out_eval": False, "seed": 0,
            # A reward without math-verify: its verifier pool's start would cost more than the step (24 s, busy).
            "reward_funcs": ["repetition_penalty"], **fields}


def test_rl_stage_with_use_vllm_rolls_out_with_transformers_on_an_mla_policy(mla_policy, tmp_path, capsys):
    import rl.train

    out = tmp_path / "run"
    # In this process (no stage subprocess to import TRL again): the fallback starts no engine to isolate.
    rl.train.main(["--config", str(write_recipe(tmp_path, rl_recipe(mla_policy))), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert f"vLLM cannot serve {mla_policy}: kv_lora_rank=" in printed
    assert FALLBACK_LINE in printed
    assert "rollouts from transformers generate" in printed
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("step") == 1 and "loss" in row for row in steps), steps
    assert "vllm/sync_seconds" not in {key for row in steps for key in row}


def test_served_vllm_on_an_mla_checkpoint_fails_at_once_naming_the_field(mla_checkpoint, tmp_path):
    import rl.serve
    import rl.train

    with pytest.raises(ValueError, match="vLLM cannot serve .*kv_lora_rank=40"):
        rl.serve.main(["--model_name_or_path", mla_checkpoint])  # raises before it execs `vllm serve`
    recipe = write_recipe(tmp_path, rl_recipe(mla_checkpoint, vllm_mode="server"))
    with pytest.raises(ValueError, match="kv_lora_rank=40"):
        rl.train.main(["--config", str(recipe), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing started


def test_distillation_student_samples_with_transformers_and_a_served_mla_teacher_is_refused(mla_policy, tmp_path,
                                                                                            capsys):
    from distill.train import main as distill_main

    common = {"model_name_or_path": str(mla_policy), "teacher_model_name_or_path": str(mla_policy),
              "suite": "arithmetic", "max_prompts": 4, "max_completion_length": 4, "max_steps": 1,
              "per_device_train_batch_size": 2, "lmbda": 1.0, "logging_steps": 1, "save_strategy": "no",
              "seed": 0, "report_to": "none"}
    out = tmp_path / "run"
    distill_main(["--config", str(write_recipe(tmp_path, {**common, "use_vllm": True, "vllm_mode": "colocate"})),
                  "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert f"vLLM cannot serve {mla_policy}: kv_lora_rank=" in printed and FALLBACK_LINE in printed
    assert "student samples with transformers" in printed
    assert (out / "model.safetensors").exists()

    served = write_recipe(tmp_path, {**common, "teacher_model_server_url": "http://127.0.0.1:9"})
    with pytest.raises(ValueError, match="vLLM cannot serve .*kv_lora_rank=40"):
        distill_main(["--config", str(served), "--output_dir", str(tmp_path / "served")])
    assert not (tmp_path / "served").exists()
