"""Convert between the core and transformers' own Llama / Qwen3 / SmolLM3 architectures.

The core names its parameters as Llama does, so a conversion is a config translation plus a
strict `load_state_dict`: nothing is re-laid out. Export works whenever the core's knobs fit the
target (it says which knob prevents it otherwise); import lets a pretrained Llama, Qwen3 or
SmolLM3 checkpoint continue training as a core model.

    python -m core.export --model_name_or_path out/pretrain --output_dir out/pretrain-llama
"""

from dataclasses import dataclass, field
import json
from pathlib import Path

import torch
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel,
                          Qwen3Config, Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)

from .config import SmolForgeConfig
from .modeling import SmolForgeForCausalLM

NATIVE = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
          "smollm3": (SmolLM3Config, SmolLM3ForCausalLM)}


class ExportError(ValueError):
    """The core config uses a knob that no native architecture has."""


def native_target(config: SmolForgeConfig) -> str:
    """Which native architecture reproduces this config exactly; raises ExportError naming the knob."""
    if config.layer_types is not None and "linear_attention" in config.layer_types:
        # The one transformers architecture with these delta-net layers, Qwen3-Next, also gates the
        # attention output, uses (1 + w) norms and partial RoPE, so it computes something else.
        raise ExportError(
            "layer_types has 'linear_attention' (gated delta-net) layers: Llama, Qwen3 and SmolLM3 have none, and "
            "Qwen3-Next's attention layers differ from the core's (output gate, 1+w RMSNorm, partial RoPE)"
        )
    if config.position_embedding == "learned":
        raise ExportError("position_embedding='learned': Llama, Qwen3 and SmolLM3 have no learned position table")
    if config.rope_low_freq_removed:
        raise ExportError(f"rope_low_freq_removed={config.rope_low_freq_removed}: no native architecture removes RoPE frequencies")
    if config.position_embedding == "rope" and config.rotary_dim != config.head_dim:
        raise ExportError(
            f"rope_parameters.partial_rotary_factor={config.rope_parameters['partial_rotary_factor']}: "
            "Llama, Qwen3 and SmolLM3 rotate every head dim"
        )
    has_nope = config.position_embedding == "none" or config.no_rope_layer_interval > 0
    if config.qk_norm and has_nope:
        raise ExportError("qk_norm together with NoPE layers: Qwen3 has QK-norm but no NoPE layers, SmolLM3 the reverse")
    if config.qk_norm:
        return "qwen3"
    return "smollm3" if has_nope else "llama"


def native_config(config: SmolForgeConfig) -> PreTrainedConfig:
    target = native_target(config)
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.initializer_range,
        attention_dropout=config.attention_dropout, hidden_act="silu", attention_bias=False,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        rope_parameters=dict(config.rope_parameters),
    )
    if target == "smollm3":
        common["no_rope_layers"] = [int(config.layer_uses_rope(i)) for i in range(config.num_hidden_layers)]
        # The RoPE parameters still matter for the RoPE layers; with NoPE everywhere they are unused.
    elif target == "llama":
        common["mlp_bias"] = False
    return NATIVE[target][0](**common)


def core_config_from_native(native: PreTrainedConfig) -> SmolForgeConfig:
    """The core config that computes what a Llama / Qwen3 / SmolLM3 config computes."""
    kind = native.model_type
    if kind not in NATIVE:
        raise ExportError(f"model_type={kind!r}: only {sorted(NATIVE)} convert to the core")
    if getattr(native, "attention_bias", False) or getattr(native, "mlp_bias", False):
        raise ExportError(f"{kind} checkpoint uses attention_bias/mlp_bias, which the core does not have")
    if getattr(native, "use_sliding_window", False):
        raise ExportError(f"{kind} checkpoint uses sliding-window attention, which the core does not have")
    if native.hidden_act != "silu":
        raise ExportError(f"hidden_act={native.hidden_act!r}: the core's MLP is SwiGLU (silu)")
    rope_layers = getattr(native, "no_rope_layers", None)
    interval, position_embedding = 0, "rope"
    if rope_layers is not None and not all(rope_layers[: native.num_hidden_layers]):
        nope = [i for i in range(native.num_hidden_layers) if not rope_layers[i]]
        interval = nope[0] + 1
        if len(nope) == native.num_hidden_layers:
            position_embedding, interval = "none", 0
        elif nope != [i for i in range(native.num_hidden_layers) if (i + 1) % interval == 0]:
            raise ExportError(f"no_rope_layers={rope_layers} is not 'every k-th layer', which is what the core expresses")
    return SmolForgeConfig(
        vocab_size=native.vocab_size, hidden_size=native.hidden_size, intermediate_size=native.intermediate_size,
        num_hidden_layers=native.num_hidden_layers, num_attention_heads=native.num_attention_heads,
        num_key_value_heads=native.num_key_value_heads,
        head_dim=getattr(native, "head_dim", None) or native.hidden_size // native.num_attention_heads,
        max_position_embeddings=native.max_position_embeddings, rms_norm_eps=native.rms_norm_eps,
        tie_word_embeddings=native.tie_word_embeddings, initializer_range=native.initializer_range,
        attention_dropout=float(native.attention_dropout), qk_norm=kind == "qwen3",
        position_embedding=position_embedding, no_rope_layer_interval=interval,
        rope_parameters=dict(native.rope_parameters), bos_token_id=native.bos_token_id,
        eos_token_id=native.eos_token_id, pad_token_id=native.pad_token_id,
    )


def _convert(model: PreTrainedModel, config: PreTrainedConfig, cls: type[PreTrainedModel]) -> PreTrainedModel:
    config._attn_implementation = model.config._attn_implementation
    out = cls(config).to(dtype=model.dtype)
    # strict=True: every parameter must have its counterpart, so a silent mismatch cannot slip through.
    out.load_state_dict(model.state_dict(), strict=True)
    out.generation_config = model.generation_config
    return out.eval() if not model.training else out


def to_native(model: SmolForgeForCausalLM) -> PreTrainedModel:
    config = native_config(model.config)
    return _convert(model, config, NATIVE[config.model_type][1])


def from_native(model: PreTrainedModel) -> SmolForgeForCausalLM:
    return _convert(model, core_config_from_native(model.config), SmolForgeForCausalLM)


def export_checkpoint(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Write a core checkpoint as its native architecture (safetensors, tokenizer, stage.json)."""
    from .checkpoint import read_manifest, save_checkpoint

    model = SmolForgeForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    native = to_native(model)
    tokenizer = None
    if (Path(model_dir) / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        parent_manifest = read_manifest(model_dir)
    except FileNotFoundError:
        parent_manifest = {}
    return save_checkpoint(output_dir, native, tokenizer, stage="export",
                           recipe={"model_name_or_path": str(model_dir), "target": native.config.model_type},
                           parent=str(model_dir), data_fingerprint=parent_manifest.get("data_fingerprint"))


@dataclass
class ExportConfig:
    model_name_or_path: str = field(metadata={"help": "Core checkpoint directory to export."})
    output_dir: str = field(metadata={"help": "New directory for the native checkpoint (must not exist)."})


def main(argv: list[str] | None = None) -> None:
    from .recipe import parse_recipe

    (cfg,) = parse_recipe(ExportConfig, args=argv)
    out = export_checkpoint(cfg.model_name_or_path, cfg.output_dir)
    print(json.dumps({"output": str(out), "architecture": json.loads((out / "config.json").read_text())["architectures"]}))


if __name__ == "__main__":
    main()
