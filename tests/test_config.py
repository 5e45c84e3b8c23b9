"""Config validation names the field at fault; presets have the sizes their names promise."""

import pytest
import torch

from core import PRESETS, SmolForgeConfig, SmolForgeForCausalLM
from conftest import tiny_config


@pytest.mark.parametrize("overrides, field", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(position_embedding="alibi"), "position_embedding"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "rope_type"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.01}),
     "partial_rotary_factor"),
    (dict(rope_low_freq_removed=1.0), "rope_low_freq_removed"),
    (dict(position_embedding="learned", no_rope_layer_interval=4), "no_rope_layer_interval"),
    (dict(z_loss_coefficient=-1e-4), "z_loss_coefficient"),
    (dict(head_dim=None, hidden_size=130, num_attention_heads=4), "hidden_size"),
    # use_liger_kernels=True is not a bad config where Liger cannot run: it falls back with a
    # warning (tests/test_kernels.py), so a checkpoint from a GPU run loads anywhere (issue 11).
])
def test_bad_config_fails_at_construction_naming_the_field(overrides, field):
    with pytest.raises(Exception, match=field):
        SmolForgeForCausalLM(tiny_config(**overrides))


def test_bad_config_json_fails_on_load(tmp_path):
    cfg = tiny_config()
    cfg.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"num_key_value_heads": 1', '"num_key_value_heads": 3')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(Exception, match="num_key_value_heads"):
        SmolForgeConfig.from_pretrained(tmp_path)


def test_unknown_override_key_names_the_closest_field():
    with pytest.raises(ValueError, match="'num_key_value_head'.*'num_key_value_heads'"):
        tiny_config(num_key_value_head=2)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny"):
        SmolForgeConfig.from_preset("7B")


@pytest.mark.parametrize("name, expected_millions", [("135M", 135), ("360M", 360), ("1B", 1000), ("3B", 3000)])
def test_preset_parameter_counts(name, expected_millions):
    with torch.device("meta"):  # shapes only: no memory for billions of weights
        model = SmolForgeForCausalLM(SmolForgeConfig.from_preset(name))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - expected_millions) / expected_millions < 0.1, f"{name}: {n:.1f}M parameters"


def test_tiny_preset_runs_on_vllm_cpu_head_dim():
    assert PRESETS["tiny"]["head_dim"] == 64


def test_rnope_layers():
    cfg = tiny_config(num_hidden_layers=8, no_rope_layer_interval=4)
    assert [cfg.layer_uses_rope(i) for i in range(8)] == [True, True, True, False] * 2
    assert not any(tiny_config(position_embedding="none").layer_uses_rope(i) for i in range(4))
