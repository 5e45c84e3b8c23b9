"""The core reproduces transformers' own Llama, Qwen3 and SmolLM3, and exports back to them."""

import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.export import ExportError, export_checkpoint, from_native, native_target, to_native
from conftest import perturb_, tiny_config, tiny_model

SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False,
             pad_token_id=None, bos_token_id=None, eos_token_id=None)
NATIVE = {
    # GQA (4 query heads, 2 KV heads) + RoPE, and RoPE's two scalings.
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama-yarn": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128})),
    "llama-linear": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE)),  # QK-norm
    "smollm3": lambda: SmolLM3ForCausalLM(SmolLM3Config(**SHAPE, no_rope_layer_interval=4)),  # RNoPE every 4th
}


@pytest.mark.parametrize("name", NATIVE)
def test_core_reproduces_native_logits(name):
    torch.manual_seed(0)
    native = perturb_(NATIVE[name]()).eval()
    core_model = from_native(native)
    assert type(core_model) is SmolForgeForCausalLM
    if name == "qwen3":
        assert core_model.config.qk_norm
    if name == "smollm3":
        assert core_model.config.no_rope_layer_interval == 4
    x = torch.randint(0, 256, (2, 300))  # past YaRN's original 128 positions
    diff = (core_model(x).logits - native(x).logits).abs().max().item()
    assert diff < 1e-5, f"{name}: max abs logit difference {diff}"


def test_partial_rotary_reproduces_phi3_logits():
    """partial_rotary_factor against an implementation that is not ours: transformers' Phi-3 rotates the
    leading fraction of each head's dims (GPT-NeoX halves) and is otherwise Llama-shaped, with q/k/v and
    gate/up fused into one projection each. (The vLLM test only compares two users of our own
    `rope_frequencies`; issue 11.)"""
    # Phi-3 has no head_dim field: hidden_size // num_attention_heads = 64.
    shape = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=None,
                 bos_token_id=None, eos_token_id=None)
    rope = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    torch.manual_seed(0)
    native = perturb_(Phi3ForCausalLM(Phi3Config(**shape, rope_parameters=dict(rope)))).eval()
    core_model = SmolForgeForCausalLM(SmolForgeConfig(**shape, head_dim=64, rope_parameters=dict(rope))).eval()
    assert core_model.config.rotary_dim == 32
    weights = {}
    for name, tensor in native.state_dict().items():
        if name.endswith("self_attn.qkv_proj.weight"):  # rows: q (2 heads x 64), k (64), v (64)
            prefix = name.removesuffix("qkv_proj.weight")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split([128, 64, 64])):
                weights[f"{prefix}{proj}.weight"] = part
        elif name.endswith("mlp.gate_up_proj.weight"):  # rows: gate, then up (Phi3MLP's chunk(2))
            prefix = name.removesuffix("gate_up_proj.weight")
            weights[f"{prefix}gate_proj.weight"], weights[f"{prefix}up_proj.weight"] = tensor.chunk(2)
        else:
            weights[name] = tensor
    core_model.load_state_dict(weights, strict=True)
    x = torch.randint(0, 256, (2, 300))
    native_logits = native(x).logits
    diff = (core_model(x).logits - native_logits).abs().max().item()
    assert diff < 1e-5, f"max abs logit difference {diff}"
    # Control: rotating every dim instead moves the logits far beyond that tolerance.
    full = SmolForgeForCausalLM(SmolForgeConfig(**shape, head_dim=64, rope_parameters={**rope, "partial_rotary_factor": 1.0}))
    full.load_state_dict(weights, strict=True)
    assert (full.eval()(x).logits - native_logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("knobs, target", [
    (dict(), "llama"),
    (dict(qk_norm=True), "qwen3"),
    (dict(no_rope_layer_interval=2), "smollm3"),
    (dict(position_embedding="none"), "smollm3"),
])
def test_export_loads_with_plain_transformers(tmp_path, knobs, target):
    model = tiny_model(**knobs)
    model.save_pretrained(tmp_path / "core")
    out = export_checkpoint(tmp_path / "core", tmp_path / "native")
    assert json.loads((out / "config.json").read_text())["model_type"] == target
    assert json.loads((out / "stage.json").read_text())["stage"] == "export"
    native = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert native.config.model_type == target
    x = torch.randint(0, 256, (2, 40))
    assert (native(x).logits - model(x).logits).abs().max().item() < 1e-5


def test_export_refuses_existing_output(tmp_path):
    tiny_model().save_pretrained(tmp_path / "core")
    export_checkpoint(tmp_path / "core", tmp_path / "native")
    before = (tmp_path / "native" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        export_checkpoint(tmp_path / "core", tmp_path / "native")
    assert (tmp_path / "native" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("knobs, named", [
    (dict(position_embedding="learned"), "position_embedding"),
    (dict(rope_low_freq_removed=0.25), "rope_low_freq_removed"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(qk_norm=True, no_rope_layer_interval=4), "qk_norm"),
])
def test_export_names_the_blocking_knob(knobs, named):
    with pytest.raises(ExportError, match=named):
        native_target(tiny_config(**knobs))
    with pytest.raises(ExportError, match=named):
        to_native(tiny_model(**knobs))
