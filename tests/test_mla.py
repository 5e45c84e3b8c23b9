"""Multi-head latent attention (core/mla.py): it reproduces transformers' DeepseekV3, exports to it, caches
only the latent, generates the same tokens with and without that cache, and trains in the pretraining stage."""

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.export import ExportError, export_checkpoint, from_native, native_target, to_native
from core.mla import interleave_rope_rows
from conftest import VOCAB, assert_trains_every_parameter, perturb_, tiny_config, write_recipe

# 3 heads, unequal nope / rope / value widths, so a mixed-up split or a wrong head count cannot pass.
MLA = dict(num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=24, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=12)
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
             pad_token_id=None, bos_token_id=None, eos_token_id=None)
ROPE = {"rope_type": "default", "rope_theta": 500.0}


def deepseek_v3(q_lora_rank: int | None, rope_interleave: bool, **rope) -> DeepseekV3ForCausalLM:
    """A dense DeepseekV3 (first_k_dense_replace = every layer), random and perturbed, fp32."""
    config = DeepseekV3Config(**SHAPE, **MLA, q_lora_rank=q_lora_rank, rope_interleave=rope_interleave,
                              first_k_dense_replace=SHAPE["num_hidden_layers"], num_mtp_layers=0,
                              rope_parameters={**ROPE, **rope})
    torch.manual_seed(0)
    return perturb_(DeepseekV3ForCausalLM(config)).eval()


def mla_model(seed: int = 0, **overrides) -> SmolForgeForCausalLM:
    torch.manual_seed(seed)
    config = SmolForgeConfig(**{**SHAPE, **MLA, "rope_parameters": dict(ROPE), **overrides})
    return perturb_(SmolForgeForCausalLM(config), seed=seed).eval()


YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)


@pytest.mark.parametrize("q_lora_rank, rope_interleave, rope", [
    (None, True, {}), (20, True, {}), (20, False, {}), (20, True, YARN),  # YaRN: 48 tokens, past its 16
])
def test_core_reproduces_deepseek_v3_logits(q_lora_rank, rope_interleave, rope):
    native = deepseek_v3(q_lora_rank, rope_interleave, **rope)
    core_model = from_native(native).eval()
    assert core_model.config.kv_lora_rank == 24 and core_model.config.q_lora_rank == q_lora_rank
    x = torch.randint(0, VOCAB, (2, 48))
    native_logits = native(x).logits
    diff = (core_model(x).logits - native_logits).abs().max().item()
    print(f"\nDeepseekV3 (q_lora_rank={q_lora_rank}, rope_interleave={rope_interleave}, "
          f"rope_type={native.config.rope_parameters['rope_type']}) -> core: max abs logit diff {diff:.2e}")
    assert diff < 1e-5, f"max abs logit difference {diff}"
    if rope_interleave:
        # Control: the same weights without moving the rope rows out of DeepSeek's interleaved layout
        # give other logits, so the permutation is what makes the test pass.
        unpermuted = SmolForgeForCausalLM(core_model.config)
        unpermuted.load_state_dict(native.state_dict(), strict=True)
        assert (unpermuted.eval()(x).logits - native_logits).abs().max().item() > 1e-3


def test_core_exports_to_deepseek_v3(tmp_path):
    core_model = mla_model(q_lora_rank=20)
    assert native_target(core_model.config) == "deepseek_v3"
    native = to_native(core_model)
    assert type(native) is DeepseekV3ForCausalLM
    assert native.config.rope_interleave and native.config.first_k_dense_replace == 2
    x = torch.randint(0, VOCAB, (2, 48))
    core_logits = core_model(x).logits
    diff = (native(x).logits - core_logits).abs().max().item()
    print(f"\ncore -> DeepseekV3 (interleaved rope rows): max abs logit diff {diff:.2e}")
    assert diff < 1e-5
    # On disk too: the exported directory loads through the Auto classes as transformers' own model.
    core_model.save_pretrained(tmp_path / "core")
    out = export_checkpoint(tmp_path / "core", tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded) is DeepseekV3ForCausalLM
    assert (loaded(x).logits - core_logits).abs().max().item() < 1e-5


def test_interleave_rope_rows_round_trip():
    w = torch.arange(2 * 6 * 3, dtype=torch.float32).view(12, 3)  # 2 heads of 6 rows: 2 nope + 4 rope
    moved = interleave_rope_rows(w, head_width=6, rope_dim=4)
    # Rope rows (halves) r0 r1 | r2 r3 become pairs (r0, r2), (r1, r3); the nope rows stay.
    assert moved[:, 0].tolist() == [0, 3, 6, 12, 9, 15, 18, 21, 24, 30, 27, 33]
    assert torch.equal(interleave_rope_rows(moved, 6, 4, inverse=True), w)


@pytest.mark.parametrize("knobs, match", [
    (dict(no_rope_layer_interval=2), "no_rope_layer_interval=2"),
    (dict(position_embedding="none"), "position_embedding='none'"),
    (dict(rope_parameters={**ROPE, "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (dict(rope_low_freq_removed=0.25), "rope_low_freq_removed"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                           "original_max_position_embeddings": 32, "mscale_all_dim": 1.0}), "mscale_all_dim"),
    (dict(num_experts=4, moe_intermediate_size=16), "moe_router_scores='softmax'"),
    (dict(num_experts=4, moe_intermediate_size=16, moe_router_scores="sigmoid", shared_expert_intermediate_size=16),
     "shared_expert_intermediate_size=16"),
    (dict(num_experts=4, moe_intermediate_size=16, moe_router_scores="sigmoid", moe_expert_share_group=2,
          num_hidden_layers=3), "moe_expert_share_group=2"),
])
def test_export_refuses_mla_knobs_deepseek_v3_lacks(knobs, match):
    config = SmolForgeConfig(**{**SHAPE, **MLA, "rope_parameters": dict(ROPE), **knobs})
    with pytest.raises(ExportError, match=match):
        native_target(config)


# DeepseekV3 with MoE layers from layer 1 on, in the form the core expresses: no shared experts, and expert groups
# that do not limit the choice (2 groups, both taken). routed_scaling_factor stays at DeepseekV3's 2.5.
DEEPSEEK_MOE = dict(first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    n_group=2, topk_group=2, n_shared_experts=0, norm_topk_prob=True, num_mtp_layers=0)


def deepseek_v3_moe(**overrides) -> DeepseekV3ForCausalLM:
    """A DeepseekV3 with MLA and MoE layers, random and perturbed, with a routing bias large enough to change
    which experts are chosen (transformers' init leaves it at zero)."""
    config = DeepseekV3Config(**SHAPE, **MLA, q_lora_rank=20, rope_parameters=dict(ROPE), **{**DEEPSEEK_MOE, **overrides})
    torch.manual_seed(0)
    native = perturb_(DeepseekV3ForCausalLM(config)).eval()
    with torch.no_grad():
        for layer in native.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.5 * torch.randn(8))
    return native


def test_core_reproduces_deepseek_v3_with_moe_layers():
    native = deepseek_v3_moe()
    core_model = from_native(native)
    config = core_model.config
    assert (config.kv_lora_rank, config.num_experts, config.num_experts_per_tok, config.first_k_dense_layers) == (24, 8, 2, 1)
    assert config.moe_router_scores == "sigmoid" and config.norm_topk_prob and config.moe_bias_update_rate > 0
    x = torch.randint(0, VOCAB, (2, 48))
    native_logits = native(x).logits
    diff = (core_model(x).logits - native_logits).abs().max().item()
    print(f"\nDeepseekV3 (MLA + MoE) -> core: max abs logit diff {diff:.2e}")
    assert diff < 1e-5, f"max abs logit difference {diff}"
    # Controls: without the routing bias, or without the routed scaling folded in, the logits are others.
    unbiased = from_native(native)
    unbiased.model.layers[1].mlp.gate.e_score_correction_bias.zero_()
    assert (unbiased(x).logits - native_logits).abs().max().item() > 1e-3
    unscaled = from_native(native)
    with torch.no_grad():
        unscaled.model.layers[1].mlp.experts.down_proj.div_(native.config.routed_scaling_factor)
    assert (unscaled(x).logits - native_logits).abs().max().item() > 1e-3
    # And back: DeepseekV3 again (one expert group, scaling 1, the same bias), with the same logits.
    back = to_native(core_model)
    assert type(back) is DeepseekV3ForCausalLM
    assert (back.config.n_group, back.config.routed_scaling_factor, back.config.first_k_dense_replace) == (1, 1.0, 1)
    assert torch.equal(back.model.layers[1].mlp.gate.e_score_correction_bias,
                       native.model.layers[1].mlp.gate.e_score_correction_bias)
    assert (back(x).logits - native_logits).abs().max().item() < 1e-5


def test_core_with_moe_exports_to_deepseek_v3(tmp_path):
    """A core MLA + sigmoid MoE without routing bias (moe_bias_update_rate=0) is DeepseekV3 with a zero bias."""
    core_model = mla_model(q_lora_rank=20, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           first_k_dense_layers=1, moe_router_scores="sigmoid")
    assert native_target(core_model.config) == "deepseek_v3"
    core_model.save_pretrained(tmp_path / "core")
    out = export_checkpoint(tmp_path / "core", tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded) is DeepseekV3ForCausalLM and loaded.config.n_routed_experts == 8
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0
    x = torch.randint(0, VOCAB, (2, 48))
    assert (loaded(x).logits - core_model(x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("overrides, match", [
    (dict(n_shared_experts=1), "n_shared_experts=1"),
    (dict(n_group=4, topk_group=2), "n_group=4, topk_group=2"),
])
def test_from_native_names_the_deepseek_v3_moe_field_the_core_lacks(overrides, match):
    with pytest.raises(ExportError, match=match):
        from_native(deepseek_v3_moe(**overrides))


@pytest.mark.parametrize("knobs, match", [
    (dict(qk_norm=True), "qk_norm does not combine with MLA"),
    (dict(head_dim=16), "head_dim is the RoPE width and must equal qk_rope_head_dim=8"),
    (dict(num_key_value_heads=1), "num_key_value_heads must equal num_attention_heads=3"),
    (dict(v_head_dim=None), "needs v_head_dim > 0"),
    (dict(kv_lora_rank=0, head_dim=16), "qk_nope_head_dim=16 only applies to multi-latent attention"),
    (dict(kv_lora_rank=0, head_dim=16, qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None, q_lora_rank=8),
     "q_lora_rank=8 only applies"),
])
def test_config_refuses_bad_mla_combinations(knobs, match):
    # huggingface_hub's @strict wraps the ValueError in its own StrictDataclassClassValidationError.
    with pytest.raises(StrictDataclassClassValidationError, match=match):
        SmolForgeConfig(**{**SHAPE, **MLA, "rope_parameters": dict(ROPE), **knobs})


def test_cache_holds_the_latent_only():
    """Per token per layer the cache holds kv_lora_rank + qk_rope_head_dim numbers (24 + 8 = 32), where the
    expanded keys and values would be 3 heads x (16 + 8 + 12) = 108."""
    model = mla_model()
    batch, tokens = 2, 10
    cache = DynamicCache(config=model.config)
    model(torch.randint(0, VOCAB, (batch, tokens)), past_key_values=cache, use_cache=True)
    per_layer = [(layer.keys.numel() + layer.values.numel()) / (batch * tokens) for layer in cache.layers]
    print(f"\ncache numbers per token per layer: {per_layer} (kv_lora_rank + qk_rope_head_dim = 24 + 8)")
    assert per_layer == [24 + 8] * SHAPE["num_hidden_layers"]
    assert cache.get_seq_length() == tokens
    # The tiny-mla preset against tiny: 40 + 32 = 72 against GQA's 2 x 1 head x 64 = 128.
    sizes = {}
    for preset in ("tiny", "tiny-mla"):
        m = SmolForgeForCausalLM(SmolForgeConfig.from_preset(preset, vocab_size=VOCAB, num_hidden_layers=1))
        cache = DynamicCache(config=m.config)
        m(torch.randint(0, VOCAB, (1, 8)), past_key_values=cache, use_cache=True)
        sizes[preset] = (cache.layers[0].keys.numel() + cache.layers[0].values.numel()) / 8
    print(f"tiny vs tiny-mla cache numbers per token per layer: {sizes}")
    assert sizes == {"tiny": 128, "tiny-mla": 72}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_generate_with_latent_cache_equals_full_forward_greedy(attn_implementation):
    model = mla_model(q_lora_rank=20)
    model.config._attn_implementation = attn_implementation
    prompt = torch.randint(0, VOCAB, (2, 7))
    new_tokens = 16
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):  # no cache: every step recomputes the whole sequence
            next_token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_token), dim=1)
    assert torch.equal(generated, ids), f"{generated}\n{ids}"
    assert len(set(ids[0, 7:].tolist())) > 1  # not a degenerate repeat of one token


def test_training_steps_change_every_parameter():
    model = mla_model(q_lora_rank=20)
    assert_trains_every_parameter(model, VOCAB)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_documents_do_not_attend_to_each_other(attn_implementation):
    """A packed row (positions restarting at each document) gives each document the logits it has alone."""
    model = mla_model()
    model.config._attn_implementation = attn_implementation
    docs = [torch.randint(0, VOCAB, (1, n)) for n in (11, 5, 16)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
        leaked = model(packed).logits  # control: the same row read as one document
    # Float noise only (different matmul shapes); leakage between documents moves logits by O(1).
    scale = alone.abs().max().item()
    assert (packed_logits - alone).abs().max().item() < 1e-5 * scale
    assert (leaked - alone).abs().max().item() > 1e-2 * scale


def test_tiny_mla_preset_matches_tiny_parameters():
    count = {p: sum(t.numel() for t in SmolForgeForCausalLM(SmolForgeConfig.from_preset(p)).parameters())
             for p in ("tiny", "tiny-mla")}
    print(f"\nparameters: {count} ({(count['tiny-mla'] - count['tiny']) / count['tiny']:+.2%})")
    assert abs(count["tiny-mla"] - count["tiny"]) / count["tiny"] < 0.005
    assert tiny_config().kv_lora_rank == 0  # the dense preset is untouched


def test_tiny_mla_pretrains(tmp_path, tokenizer_dir):
    """The pretraining stage runs the preset (a config field like any other) and its loss falls."""
    from pretrain.train import main as pretrain_main

    recipe = write_recipe(tmp_path, {
        "tokenizer_name_or_path": str(tokenizer_dir), "model_preset": "tiny-mla", "max_length": 64,
        "sources": [{"name": "arithmetic", "path": "builtin:arithmetic", "max_rows": 500}],
        "max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 2,
        "save_steps": 12, "eval_steps": 100, "logging_steps": 1, "data_cache_dir": str(tmp_path / "data_cache"),
    })
    pretrain_main(["--config", str(recipe), "--output_dir", str(tmp_path / "run"), "--skip_preflight", "true"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"\ntiny-mla pretraining loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert model.config.kv_lora_rank == 40 and type(model.model.layers[0].self_attn).__name__ == "SmolForgeMLAttention"
