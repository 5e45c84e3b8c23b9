"""Convert between the core and transformers' own Llama / Qwen3 / SmolLM3 / DeepseekV3 architectures, and export an
MoE core to Qwen3-MoE (or, with a shared expert, Qwen2-MoE).

The core names its parameters as Llama does (and its MLA layers as DeepseekV3 does), so a conversion is
a config translation plus a strict `load_state_dict`; the one re-layout is MLA's rope rows, which
DeepseekV3 stores in interleaved pairs (`core.mla.interleave_rope_rows`). Export works whenever the
core's knobs fit the target (it says which knob prevents it otherwise); import lets a pretrained Llama,
Qwen3, SmolLM3 or dense DeepseekV3 checkpoint continue training as a core model.

    python -m core.export --model_name_or_path out/pretrain --output_dir out/pretrain-llama
"""

from dataclasses import dataclass, field
import json
from pathlib import Path

import torch
from transformers import (AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM,
                          PreTrainedConfig, PreTrainedModel, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)

from .config import SmolForgeConfig
from .mla import interleave_rope_rows
from .modeling import SmolForgeForCausalLM

NATIVE = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
          "smollm3": (SmolLM3Config, SmolLM3ForCausalLM), "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}
# Export targets only: the core's MoE (core/moe.py) stores its experts in these models' layout.
NATIVE_MOE = {"qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM), "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM)}


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
    if config.kv_lora_rank:
        return _deepseek_v3_target(config, has_nope)
    if config.qk_norm and has_nope:
        raise ExportError("qk_norm together with NoPE layers: Qwen3 has QK-norm but no NoPE layers, SmolLM3 the reverse")
    if config.num_experts:
        return native_moe_target(config, has_nope)
    if config.qk_norm:
        return "qwen3"
    return "smollm3" if has_nope else "llama"


def _deepseek_v3_target(config: SmolForgeConfig, has_nope: bool) -> str:
    """MLA exports to DeepseekV3 with every layer dense (first_k_dense_replace = num_hidden_layers)."""
    if has_nope:
        knob = ("position_embedding='none'" if config.position_embedding == "none"
                else f"no_rope_layer_interval={config.no_rope_layer_interval}")
        raise ExportError(f"{knob} with MLA (kv_lora_rank={config.kv_lora_rank}): DeepseekV3 rotates the rope "
                          "dims of every layer")
    if config.num_experts:
        # DeepseekV3's MoE routes by sigmoid scores within expert groups, with a routed scaling factor: a
        # different router from the core's, so MLA exports with dense layers only.
        raise ExportError(f"num_experts={config.num_experts} with MLA (kv_lora_rank={config.kv_lora_rank}): the core "
                          "exports MLA to DeepseekV3 with dense layers only; its MoE router (expert groups, routed "
                          "scaling) is not the core's")
    if "mscale_all_dim" in config.rope_parameters:
        raise ExportError("rope_parameters.mscale_all_dim with MLA: DeepseekV3 multiplies its softmax scale by "
                          "YaRN's mscale(mscale_all_dim)^2, which the core does not")
    return "deepseek_v3"


def native_moe_target(config: SmolForgeConfig, has_nope: bool) -> str:
    """Qwen3-MoE (QK-norm, no shared expert) or Qwen2-MoE (a sigmoid-gated shared expert, no QK-norm)."""
    if has_nope:
        raise ExportError("NoPE layers (position_embedding='none' / no_rope_layer_interval) with num_experts > 0: "
                          "Qwen2-MoE and Qwen3-MoE put RoPE in every layer")
    if config.moe_router_scores != "softmax":
        raise ExportError(f"moe_router_scores={config.moe_router_scores!r}: Qwen-MoE routers use softmax scores")
    if config.moe_bias_update_rate:
        raise ExportError(f"moe_bias_update_rate={config.moe_bias_update_rate}: Qwen-MoE routers have no routing "
                          "bias (DeepSeek-V3's has)")
    if config.moe_expert_share_group != 1:
        raise ExportError(f"moe_expert_share_group={config.moe_expert_share_group}: Qwen-MoE layers do not share "
                          "experts")
    if config.shared_expert_intermediate_size:
        if config.qk_norm:
            raise ExportError("qk_norm with shared_expert_intermediate_size > 0: Qwen2-MoE has the shared expert but no "
                              "QK-norm, Qwen3-MoE the reverse")
        return "qwen2_moe"
    if not config.qk_norm:
        raise ExportError("qk_norm=False with num_experts > 0 and no shared expert: Qwen3-MoE always has QK-norm, "
                          "Qwen2-MoE always a shared expert")
    return "qwen3_moe"


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
    if target == "deepseek_v3":
        # Dense everywhere; the rope rows are interleaved at export (`to_native`), and rope_interleave=True is
        # the layout vLLM's DeepSeek model always runs. Its latent norms use eps 1e-6, as
        # the core's do (core.mla.LATENT_NORM_EPS).
        common.update(num_key_value_heads=config.num_attention_heads, first_k_dense_replace=config.num_hidden_layers,
                      kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank or None,
                      qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
                      v_head_dim=config.v_head_dim, rope_interleave=True, num_mtp_layers=0)
        del common["head_dim"]  # DeepseekV3Config derives it from qk_rope_head_dim
    elif target == "smollm3":
        common["no_rope_layers"] = [int(config.layer_uses_rope(i)) for i in range(config.num_hidden_layers)]
        # The RoPE parameters still matter for the RoPE layers; with NoPE everywhere they are unused.
    elif target == "llama":
        common["mlp_bias"] = False
    elif target in NATIVE_MOE:
        common.pop("attention_bias")  # Qwen-MoE configs: attention_bias (Qwen3) / qkv_bias (Qwen2)
        common.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                      moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                      mlp_only_layers=list(range(config.first_k_dense_layers)), decoder_sparse_step=1,
                      router_aux_loss_coef=config.router_aux_loss_coef)
        if target == "qwen2_moe":
            common.update(qkv_bias=False, shared_expert_intermediate_size=config.shared_expert_intermediate_size)
        else:
            common.update(attention_bias=False)
        return NATIVE_MOE[target][0](**common)
    return NATIVE[target][0](**common)


def core_config_from_native(native: PreTrainedConfig) -> SmolForgeConfig:
    """The core config that computes what a Llama / Qwen3 / SmolLM3 config computes."""
    kind = native.model_type
    if kind not in NATIVE:
        raise ExportError(f"model_type={kind!r}: only {sorted(NATIVE)} convert to the core")
    if kind == "deepseek_v3":
        return _core_config_from_deepseek_v3(native)
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


def _core_config_from_deepseek_v3(native: DeepseekV3Config) -> SmolForgeConfig:
    if native.first_k_dense_replace < native.num_hidden_layers:
        raise ExportError(f"deepseek_v3 checkpoint with first_k_dense_replace={native.first_k_dense_replace} < "
                          f"num_hidden_layers={native.num_hidden_layers} has MoE layers; only dense DeepseekV3 "
                          "converts to the MLA core")
    if native.attention_bias:
        raise ExportError("deepseek_v3 checkpoint uses attention_bias, which the core does not have")
    if native.hidden_act != "silu":
        raise ExportError(f"hidden_act={native.hidden_act!r}: the core's MLP is SwiGLU (silu)")
    if "mscale_all_dim" in native.rope_parameters:
        raise ExportError("deepseek_v3 checkpoint with rope_parameters.mscale_all_dim: the core does not scale "
                          "its softmax by YaRN's mscale")
    return SmolForgeConfig(
        vocab_size=native.vocab_size, hidden_size=native.hidden_size, intermediate_size=native.intermediate_size,
        num_hidden_layers=native.num_hidden_layers, num_attention_heads=native.num_attention_heads,
        num_key_value_heads=native.num_attention_heads, max_position_embeddings=native.max_position_embeddings,
        rms_norm_eps=native.rms_norm_eps, tie_word_embeddings=native.tie_word_embeddings,
        initializer_range=native.initializer_range, attention_dropout=float(native.attention_dropout),
        rope_parameters=dict(native.rope_parameters), kv_lora_rank=native.kv_lora_rank,
        q_lora_rank=native.q_lora_rank, qk_nope_head_dim=native.qk_nope_head_dim,
        qk_rope_head_dim=native.qk_rope_head_dim, v_head_dim=native.v_head_dim,
        bos_token_id=native.bos_token_id, eos_token_id=native.eos_token_id, pad_token_id=native.pad_token_id,
    )


def mla_rope_layout(state_dict: dict[str, torch.Tensor], config: PreTrainedConfig,
                    to_interleaved: bool) -> dict[str, torch.Tensor]:
    """The MLA weights with their rope rows moved between our halves layout and DeepSeek's interleaved pairs
    (both projections that produce rope dims: the query's, per head, and the shared key's, once)."""
    out = dict(state_dict)
    qk_head = config.qk_nope_head_dim + config.qk_rope_head_dim
    for name, tensor in state_dict.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            width = qk_head
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            width = config.kv_lora_rank + config.qk_rope_head_dim
        else:
            continue
        out[name] = interleave_rope_rows(tensor, width, config.qk_rope_head_dim, inverse=not to_interleaved)
    return out


def _convert(model: PreTrainedModel, config: PreTrainedConfig, cls: type[PreTrainedModel]) -> PreTrainedModel:
    config._attn_implementation = model.config._attn_implementation
    out = cls(config).to(dtype=model.dtype)
    state_dict = model.state_dict()
    if config.model_type == "deepseek_v3":
        state_dict = mla_rope_layout(state_dict, config, to_interleaved=True)
    elif model.config.model_type == "deepseek_v3" and model.config.rope_interleave:
        state_dict = mla_rope_layout(state_dict, config, to_interleaved=False)
    # strict=True: every parameter must have its counterpart, so a silent mismatch cannot slip through.
    out.load_state_dict(state_dict, strict=True)
    out.generation_config = model.generation_config
    return out.eval() if not model.training else out


def to_native(model: SmolForgeForCausalLM) -> PreTrainedModel:
    config = native_config(model.config)
    return _convert(model, config, {**NATIVE, **NATIVE_MOE}[config.model_type][1])


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
