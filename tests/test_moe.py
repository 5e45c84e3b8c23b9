"""Mixture of experts (core/moe.py, issue 19): parity with transformers' Qwen3-MoE / Qwen2-MoE, export,
global-batch load balancing, bias balancing, grouped GEMM, generation with the cache, load alerts."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.export import ExportError, export_checkpoint, from_native, native_target, to_native
from core.moe import MoEStepCallback, SmolForgeExperts, end_moe_step, expert_load, moe_layers, set_load_reduction
from conftest import VOCAB, perturb_
from pretrain.monitor import Monitor, resolve_policies

# Two layers, the first dense: both kinds of MLP in one model. 8 experts of 48, 2 per token.
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
             rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
             pad_token_id=None, bos_token_id=None, eos_token_id=None)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)


def moe_config(**overrides) -> SmolForgeConfig:
    return SmolForgeConfig(**{**SHAPE, **MOE, "first_k_dense_layers": 1, **overrides})


def moe_model(seed: int = 0, **overrides) -> SmolForgeForCausalLM:
    torch.manual_seed(seed)
    return perturb_(SmolForgeForCausalLM(moe_config(**overrides)), seed=seed).eval()


def qwen_moe(reference: str, **overrides) -> Qwen3MoeForCausalLM | Qwen2MoeForCausalLM:
    """A transformers Qwen3-MoE / Qwen2-MoE built on its own (random init, perturbed), first layer dense."""
    torch.manual_seed(0)
    qwen = dict(**SHAPE, **MOE, mlp_only_layers=[0], decoder_sparse_step=1)
    if reference == "qwen3_moe":
        native = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**qwen, "attention_bias": False, **overrides}))
    else:
        native = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**qwen, "qkv_bias": False, "shared_expert_intermediate_size": 96,
                                                       **overrides}))
    return perturb_(native).eval()


@pytest.mark.parametrize("reference, overrides, first_k_dense_layers", [
    ("qwen3_moe", {}, 1), ("qwen2_moe", {}, 1),
    ("qwen3_moe", dict(mlp_only_layers=[]), 0),  # every layer sparse
    ("qwen3_moe", dict(mlp_only_layers=[], decoder_sparse_step=2), 1),  # layer 1 of 2: "from layer 1 on"
])
def test_from_native_reproduces_transformers_qwen_moe(reference, overrides, first_k_dense_layers):
    """`core.export.from_native` converts the transformers model, and `to_native` gives it back weight for weight."""
    native = qwen_moe(reference, **overrides)
    core_model = from_native(native)
    config = core_model.config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 48)
    assert config.first_k_dense_layers == first_k_dense_layers and config.norm_topk_prob
    assert config.qk_norm == (reference == "qwen3_moe")
    assert config.shared_expert_intermediate_size == (96 if reference == "qwen2_moe" else 0)
    x = torch.randint(0, VOCAB, (2, 48))
    native_logits = native(x).logits
    diff = (core_model(x).logits - native_logits).abs().max().item()
    assert diff < 1e-5, f"{reference}: max abs logit difference {diff}"
    back = to_native(core_model)
    assert type(back) is type(native) and back.config.mlp_only_layers == list(range(first_k_dense_layers))
    assert back.state_dict().keys() == native.state_dict().keys()
    assert all(torch.equal(t, native.state_dict()[name]) for name, t in back.state_dict().items())
    assert (back(x).logits - native_logits).abs().max().item() < 1e-5


def test_from_native_qwen_moe_without_sparse_layers_is_the_dense_core():
    native = qwen_moe("qwen3_moe", mlp_only_layers=[0, 1])
    core_model = from_native(native)
    assert core_model.config.num_experts == 0 and core_model.config.qk_norm
    x = torch.randint(0, VOCAB, (2, 24))
    assert (core_model(x).logits - native(x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("reference, overrides, named", [
    ("qwen3_moe", dict(num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2), "decoder_sparse_step=2"),
    ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1]), r"mlp_only_layers=\[1\]"),
    ("qwen3_moe", dict(attention_bias=True), "attention_bias=True"),
    ("qwen3_moe", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("qwen2_moe", dict(qkv_bias=True), "qkv_bias=True"),  # Qwen2-MoE's default
    ("qwen2_moe", dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size=0"),
])
def test_from_native_names_the_qwen_moe_field_the_core_lacks(reference, overrides, named):
    with pytest.raises(ExportError, match=named):
        from_native(qwen_moe(reference, **overrides))


@pytest.mark.parametrize("knobs, target", [(dict(qk_norm=True), "qwen3_moe"),
                                           (dict(shared_expert_intermediate_size=96), "qwen2_moe")])
def test_export_loads_with_plain_transformers(tmp_path, knobs, target):
    model = moe_model(**knobs, router_aux_loss_coef=0.01)
    model.save_pretrained(tmp_path / "core")
    out = export_checkpoint(tmp_path / "core", tmp_path / "native")
    assert json.loads((out / "config.json").read_text())["model_type"] == target
    native = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert native.config.mlp_only_layers == [0] and native.config.num_experts == 8
    x = torch.randint(0, VOCAB, (2, 40))
    assert (native(x).logits - model(x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("knobs, named", [
    (dict(qk_norm=True, moe_router_scores="sigmoid"), "moe_router_scores"),
    (dict(qk_norm=True, moe_bias_update_rate=1e-3), "moe_bias_update_rate"),
    (dict(qk_norm=True, moe_expert_share_group=2, num_hidden_layers=3), "moe_expert_share_group"),
    (dict(qk_norm=True, shared_expert_intermediate_size=32), "qk_norm"),
    (dict(), "qk_norm"),
    (dict(shared_expert_intermediate_size=32, no_rope_layer_interval=2), "no_rope_layer_interval"),
])
def test_export_names_the_blocking_moe_knob(knobs, named):
    with pytest.raises(ExportError, match=named):
        native_target(moe_config(**knobs))
    with pytest.raises(ExportError, match=named):
        to_native(SmolForgeForCausalLM(moe_config(**knobs)))


@pytest.mark.parametrize("bad, named", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(moe_intermediate_size=None), "moe_intermediate_size"),
    (dict(first_k_dense_layers=2), "first_k_dense_layers"),
    (dict(moe_router_scores="relu"), "moe_router_scores"),
    (dict(num_experts=0, first_k_dense_layers=1), "first_k_dense_layers"),
    (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
])
def test_config_names_the_bad_moe_field(bad, named):
    with pytest.raises(Exception, match=named):  # transformers' @strict wraps the ValueError
        moe_config(**bad)


def test_tiny_moe_preset_has_the_active_parameters_of_tiny():
    dense, moe = SmolForgeConfig.from_preset("tiny"), SmolForgeConfig.from_preset("tiny-moe")
    assert moe.num_experts_per_tok * moe.moe_intermediate_size == dense.intermediate_size
    assert {k: v for k, v in moe.to_dict().items() if k in dense.to_dict() and k not in MOE_KEYS} == \
        {k: v for k, v in dense.to_dict().items() if k not in MOE_KEYS}


MOE_KEYS = {"num_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_layers",
            "moe_bias_update_rate", "router_z_loss_coef"}


def test_training_changes_every_parameter_and_round_trips(tmp_path):
    """Shared expert, experts shared by layers 1 and 2, aux loss, z-loss and routing bias, all at once."""
    model = moe_model(num_hidden_layers=3, shared_expert_intermediate_size=32, moe_expert_share_group=2,
                      router_aux_loss_coef=0.01, router_z_loss_coef=1e-3, moe_bias_update_rate=1e-2).train()
    assert model.model.layers[2].mlp.expert_bank is model.model.layers[1].mlp.experts
    assert not any(k.startswith("model.layers.2.mlp.experts") for k in model.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, VOCAB, (4, 32))
    for _ in range(3):
        out = model(x, labels=x)
        assert out.aux_loss > 0
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        end_moe_step(model)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.model.layers[2].mlp.expert_bank is loaded.model.layers[1].mlp.experts
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_aux_loss_is_transformers_load_balancing_loss_on_one_batch():
    model = moe_model(router_aux_loss_coef=1.0).train()
    x = torch.randint(0, VOCAB, (2, 24))
    captured = []
    handle = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    model(x, labels=x)
    handle.remove()
    expected = load_balancing_loss_func((captured[0],), num_experts=8, top_k=2)
    torch.testing.assert_close(model.model.layers[1].mlp.aux_loss, expected)


def test_aux_loss_counts_experts_over_the_global_batch():
    """f_i from the counts of every micro-batch so far and of every rank (here a second rank simulated by
    the reduction), P_i from this micro-batch: the Playbook's global-batch balancing (Qiu et al. 2025)."""
    model = moe_model().train()
    moe = model.model.layers[1].mlp
    other_rank = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 14])  # 8 expert counts, then its tokens: 14 x k=2 = 28 slots
    set_load_reduction(model, lambda t: t + other_rank)
    x = torch.randint(0, VOCAB, (4, 16))
    captured = []
    moe.gate.register_forward_hook(lambda m, i, o: captured.append(o))
    model(x[:2], labels=x[:2])
    model(x[2:], labels=x[2:])
    counts = sum(torch.bincount(o[2].reshape(-1), minlength=8).float() for o in captured)
    torch.testing.assert_close(moe.step_counts, counts + 2 * other_rank[:8])
    assert moe.step_tokens == 64 + 2 * 14
    f = moe.step_counts / moe.step_tokens
    torch.testing.assert_close(moe.aux_loss, 8 * (f * captured[1][1].mean(0)).sum())
    local_f = torch.bincount(captured[1][2].reshape(-1), minlength=8).float() / 32
    assert not torch.allclose(moe.aux_loss, 8 * (local_f * captured[1][1].mean(0)).sum())
    assert expert_load(model)["moe/max_mean_load"] == pytest.approx(float(moe.step_counts.max() / moe.step_counts.mean()))
    end_moe_step(model)
    assert moe.step_counts is None and expert_load(model) == {}


def test_bias_update_rule_and_that_bias_only_picks_experts():
    model = moe_model(moe_bias_update_rate=0.1)
    moe = model.model.layers[1].mlp
    moe.step_counts, moe.step_tokens = torch.tensor([10.0, 2, 2, 2, 0, 0, 0, 0]), 8.0  # mean 2
    end_moe_step(model, update_bias=False)  # a skipped step's load moves nothing
    assert moe.gate.e_score_correction_bias.abs().sum() == 0 and moe.step_counts is None
    moe.step_counts, moe.step_tokens = torch.tensor([10.0, 2, 2, 2, 0, 0, 0, 0]), 8.0
    end_moe_step(model)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.1, 0, 0, 0, 0.1, 0.1, 0.1, 0.1]))
    # A large bias decides the experts, but the mixing weights stay the unbiased (renormalised) scores.
    moe.gate.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0]))
    _, scores, idx, w = moe.gate(torch.randn(5, 64))
    assert (idx.sort(-1).values == torch.tensor([6, 7])).all()
    expected = scores[:, 6:] / scores[:, 6:].sum(-1, keepdim=True)
    torch.testing.assert_close(w.sort(-1).values, expected.sort(-1).values)


def test_trainer_stages_end_each_optimizer_steps_count_and_move_the_bias(tmp_path):
    """The TRL stages train through transformers' Trainer: MoEStepCallback ends the expert count after every
    optimizer step (so the aux loss's f_i is one step's global batch, not the whole run's) and moves the bias."""
    from transformers import Trainer, TrainingArguments

    model = moe_model(moe_bias_update_rate=0.1)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 16))]
    seen, biases = [], []

    class Spy(MoEStepCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(sum(m.step_tokens for m in moe_layers(model)) / len(moe_layers(model)))
            super().on_step_end(args, state, control, model=model, **kwargs)
            biases.append([m.gate.e_score_correction_bias.clone() for m in moe_layers(model)])

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Spy()]).train()
    assert seen == [64.0, 64.0]  # 2 micro-batches x 2 rows x 16 tokens per optimizer step, counted afresh each step
    assert all(m.step_counts is None for m in moe_layers(model))
    # After the first step every layer's bias moved by the rate, against its load error.
    for bias in biases[0]:
        assert bias.abs().sum() > 0
        torch.testing.assert_close(bias.abs(), torch.where(bias == 0, 0.0, 0.1))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped GEMM")
def test_grouped_gemm_path_equals_the_expert_loop():
    """The CUDA path (two torch._grouped_mm) run on CPU, where torch also has the kernel: same output, same grads."""
    torch.manual_seed(0)
    experts = perturb_(SmolForgeExperts(moe_config(), use_liger=False))
    x = torch.randn(40, 64, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    idx[:10] = torch.tensor([3, 5])  # uneven groups, and expert 0..7 some empty in slices
    w = torch.rand(40, 2, requires_grad=True)
    results = []
    for fn in (experts.loop_forward, experts.grouped_forward):
        out = fn(x, idx, w)
        grads = torch.autograd.grad(out.square().sum(), [x, w, experts.gate_up_proj, experts.down_proj])
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("knobs", [dict(qk_norm=True), dict(shared_expert_intermediate_size=32,
                                                             moe_router_scores="sigmoid", moe_bias_update_rate=1e-3)])
def test_generate_with_cache_equals_greedy_full_forwards(knobs):
    model = moe_model(**knobs)
    prompt = torch.randint(0, VOCAB, (2, 7))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0,
                            attention_mask=torch.ones_like(prompt))
    tokens = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
    assert torch.equal(cached, tokens)


def test_eval_forward_leaves_the_load_count_alone():
    model = moe_model(moe_bias_update_rate=1e-3)
    with torch.no_grad():
        model.train()(torch.randint(0, VOCAB, (2, 8)))
    model.eval()(torch.randint(0, VOCAB, (2, 8)))
    assert all(m.step_counts is None for m in moe_layers(model))


def test_collapse_alert():
    monitor = Monitor(spike_sigma=6, spike_warmup=5, ema_beta=0.9, grad_factor=10, throughput_fraction=0.5,
                      throughput_windows=3, data_stall_seconds=30, expert_collapse_ratio=2.5)
    balanced = {"moe/max_mean_load": 1.2, "moe/dead_experts": 0, "moe/num_experts": 8}
    collapsed = {"moe/max_mean_load": 4.0, "moe/dead_experts": 6, "moe/num_experts": 8}
    assert monitor.check_expert_load(1, balanced) == [] and monitor.check_expert_load(1, {}) == []
    alerts = monitor.check_expert_load(2, collapsed)
    assert [a.kind for a in alerts] == ["expert_collapse"] and "6 of 8 experts" in alerts[0].message
    assert monitor.check_expert_load(3, collapsed) == []  # once per episode
    assert monitor.check_expert_load(4, balanced) == [] and monitor.check_expert_load(5, collapsed)
    assert resolve_policies({"expert_collapse": "stop"})["expert_collapse"] == "stop"
    with pytest.raises(ValueError, match="expert_collapse"):
        resolve_policies({"expert_collapse": "skip"})


def test_pretraining_logs_expert_load_and_stops_on_collapse(tmp_path, tokenizer_dir):
    """The loop end to end: load statistics in metrics.jsonl, bias moved, the alert's `stop` policy applied
    (a threshold of 1.0 makes any imbalance a collapse)."""
    from conftest import write_recipe
    from pretrain.train import TrainingStopped, main as pretrain_main

    recipe = write_recipe(tmp_path, {
        "tokenizer_name_or_path": str(tokenizer_dir), "model_preset": "tiny-moe",
        "model_overrides": {"num_hidden_layers": 2, "moe_bias_update_rate": 1e-2, "router_aux_loss_coef": 1e-2},
        "max_length": 32, "sources": [{"name": "arithmetic", "path": "builtin:arithmetic", "max_rows": 300}],
        "max_steps": 4, "per_device_train_batch_size": 4, "warmup_steps": 1, "logging_steps": 1, "eval_steps": 100,
        "save_steps": 100, "lr_scheduler_kwargs": {"num_decay_steps": 1, "decay_type": "linear"},
        "data_cache_dir": str(tmp_path / "data_cache"), "skip_preflight": True,
        "alert_policies": {"expert_collapse": "stop"}, "expert_collapse_ratio": 1.0})
    with pytest.raises(TrainingStopped, match="expert_collapse"):
        pretrain_main(["--config", str(recipe), "--output_dir", str(tmp_path / "run")])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["moe/max_mean_load"] > 1.0 and rows[0]["moe/num_experts"] == 8 and rows[0]["aux_loss"] > 0
    alerts = [json.loads(line) for line in (tmp_path / "run" / "alerts.jsonl").read_text().splitlines()]
    assert [a["kind"] for a in alerts] == ["expert_collapse"] and alerts[0]["action"] == "stop"
