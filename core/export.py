"""Convert between the core and transformers' own Llama / Qwen3 / SmolLM3 / DeepseekV3 / Qwen3-MoE / Qwen2-MoE
architectures, both ways.

The core names its parameters as Llama does (its MLA layers as DeepseekV3 does, its MoE layers as Qwen-MoE
does), so a conversion is a config translation plus a strict `load_state_dict`; the re-layouts are MLA's rope
rows, which DeepseekV3 stores in interleaved pairs (`core.mla.interleave_rope_rows`), and DeepseekV3's MoE
details (`deepseek_v3_weights_to_core` and back). Export works whenever the core's knobs fit the target;
import (`from_native`) lets a pretrained checkpoint of any of these continue training as a core model
whenever the core computes what it computes. Either way, what does not fit is refused with an `ExportError`
naming the field and its value.

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
          "smollm3": (SmolLM3Config, SmolLM3ForCausalLM), "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
          # The core's MoE (core/moe.py) stores its router and experts in these models' layout.
          "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM), "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM)}
QWEN_MOE = ("qwen3_moe", "qwen2_moe")
# transformers' DeepseekV3 routes with e_score_correction_bias but never moves it (inference code), so its
# config has no update rate; the core's router holds that bias only when moe_bias_update_rate > 0. An imported
# DeepseekV3 MoE keeps its bias and moves it at DeepSeek-V3's own rate, gamma = 0.001 (DeepSeek-AI 2024,
# arXiv:2412.19437, sec. 4.2); moe_bias_update_rate is a config field like any other to change that.
DEEPSEEK_V3_BIAS_UPDATE_RATE = 1e-3


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
    """MLA exports to DeepseekV3: dense in every layer, or with MoE layers from first_k_dense_layers on, routed as
    DeepseekV3 routes with one expert group and a routed scaling factor of 1 (sigmoid scores, the routing bias)."""
    if has_nope:
        knob = ("position_embedding='none'" if config.position_embedding == "none"
                else f"no_rope_layer_interval={config.no_rope_layer_interval}")
        raise ExportError(f"{knob} with MLA (kv_lora_rank={config.kv_lora_rank}): DeepseekV3 rotates the rope "
                          "dims of every layer")
    if config.num_experts:
        if config.moe_router_scores != "sigmoid":
            raise ExportError(f"moe_router_scores={config.moe_router_scores!r} with MLA: DeepseekV3's router scores "
                              "experts with a sigmoid")
        if config.shared_expert_intermediate_size:
            raise ExportError(f"shared_expert_intermediate_size={config.shared_expert_intermediate_size} with MLA: the "
                              "core's shared expert has a sigmoid gate (Qwen2-MoE's), DeepseekV3's shared experts none")
        if config.moe_expert_share_group != 1:
            raise ExportError(f"moe_expert_share_group={config.moe_expert_share_group}: DeepseekV3 layers do not "
                              "share experts")
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
        # The rope rows are interleaved at export (`to_native`), and rope_interleave=True is the layout vLLM's
        # DeepSeek model always runs. Its latent norms use eps 1e-6, as the core's do (core.mla.LATENT_NORM_EPS).
        common.update(num_key_value_heads=config.num_attention_heads, first_k_dense_replace=config.num_hidden_layers,
                      kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank or None,
                      qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
                      v_head_dim=config.v_head_dim, rope_interleave=True, num_mtp_layers=0)
        if config.num_experts:
            # One group holding every expert (group-limited routing off), no scaling of the routed sum, no shared
            # experts: the core's top-k over sigmoid scores plus the routing bias.
            common.update(first_k_dense_replace=config.first_k_dense_layers, n_routed_experts=config.num_experts,
                          num_experts_per_tok=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
                          moe_intermediate_size=config.moe_intermediate_size, n_group=1, topk_group=1,
                          routed_scaling_factor=1.0, n_shared_experts=0)
        del common["head_dim"]  # DeepseekV3Config derives it from qk_rope_head_dim
    elif target == "smollm3":
        common["no_rope_layers"] = [int(config.layer_uses_rope(i)) for i in range(config.num_hidden_layers)]
        # The RoPE parameters still matter for the RoPE layers; with NoPE everywhere they are unused.
    elif target == "llama":
        common["mlp_bias"] = False
    elif target in QWEN_MOE:
        common.pop("attention_bias")  # Qwen-MoE configs: attention_bias (Qwen3) / qkv_bias (Qwen2)
        common.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                      moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                      mlp_only_layers=list(range(config.first_k_dense_layers)), decoder_sparse_step=1,
                      router_aux_loss_coef=config.router_aux_loss_coef)
        if target == "qwen2_moe":
            common.update(qkv_bias=False, shared_expert_intermediate_size=config.shared_expert_intermediate_size)
        else:
            common.update(attention_bias=False)
    return NATIVE[target][0](**common)


def core_config_from_native(native: PreTrainedConfig) -> SmolForgeConfig:
    """The core config that computes what a native config computes; an ExportError names a field it cannot."""
    kind = native.model_type
    if kind not in NATIVE:
        raise ExportError(f"model_type={kind!r}: only {sorted(NATIVE)} convert to the core")
    if kind == "deepseek_v3":
        return _core_config_from_deepseek_v3(native)
    for name in ("attention_bias", "qkv_bias", "mlp_bias"):  # qkv_bias: Qwen2-MoE's name (True by default)
        if getattr(native, name, False):
            raise ExportError(f"{kind} checkpoint with {name}=True: the core's projections have no bias")
    if getattr(native, "use_sliding_window", False):
        raise ExportError(f"{kind} checkpoint with use_sliding_window=True: the core has no sliding-window attention")
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
        attention_dropout=float(native.attention_dropout), qk_norm=kind in ("qwen3", "qwen3_moe"),
        position_embedding=position_embedding, no_rope_layer_interval=interval,
        rope_parameters=dict(native.rope_parameters), bos_token_id=native.bos_token_id,
        eos_token_id=native.eos_token_id, pad_token_id=native.pad_token_id,
        **(_core_moe_from_qwen(native) if kind in QWEN_MOE else {}),
    )


def _core_moe_from_qwen(native: Qwen3MoeConfig | Qwen2MoeConfig) -> dict:
    """The core's MoE fields for a Qwen3-MoE / Qwen2-MoE config; {} (the dense core) when no layer is sparse."""
    num_layers = native.num_hidden_layers
    dense = set(native.mlp_only_layers or [])
    # transformers' rule (Qwen3MoeDecoderLayer): sparse unless listed in mlp_only_layers, and every
    # decoder_sparse_step-th layer. The core's rule: every layer from first_k_dense_layers on.
    sparse = [i for i in range(num_layers)
              if i not in dense and native.num_experts > 0 and (i + 1) % native.decoder_sparse_step == 0]
    if not sparse:
        return {}
    if sparse != list(range(sparse[0], num_layers)):
        raise ExportError(f"{native.model_type} checkpoint with decoder_sparse_step={native.decoder_sparse_step} and "
                          f"mlp_only_layers={native.mlp_only_layers}: MoE layers {sparse} are not every layer from "
                          "some k on, the one pattern the core has (first_k_dense_layers)")
    shared = getattr(native, "shared_expert_intermediate_size", 0)  # Qwen2-MoE always builds its gated shared expert
    if native.model_type == "qwen2_moe" and not shared:
        raise ExportError("qwen2_moe checkpoint with shared_expert_intermediate_size=0: its shared expert is empty but "
                          "still gated (shared_expert_gate), a weight the core's MoE without shared expert lacks")
    # router_aux_loss_coef is the checkpoint's balancing weight: transformers adds the loss only when asked for
    # router logits (output_router_logits, a run-time switch), the core whenever it trains.
    return dict(num_experts=native.num_experts, num_experts_per_tok=native.num_experts_per_tok,
                moe_intermediate_size=native.moe_intermediate_size, first_k_dense_layers=sparse[0],
                norm_topk_prob=bool(native.norm_topk_prob), shared_expert_intermediate_size=shared,
                router_aux_loss_coef=native.router_aux_loss_coef)


def _core_config_from_deepseek_v3(native: DeepseekV3Config) -> SmolForgeConfig:
    if native.attention_bias:
        raise ExportError("deepseek_v3 checkpoint uses attention_bias, which the core does not have")
    if native.hidden_act != "silu":
        raise ExportError(f"hidden_act={native.hidden_act!r}: the core's MLP is SwiGLU (silu)")
    if "mscale_all_dim" in native.rope_parameters:
        raise ExportError("deepseek_v3 checkpoint with rope_parameters.mscale_all_dim: the core does not scale "
                          "its softmax by YaRN's mscale")
    moe = {}
    if native.first_k_dense_replace < native.num_hidden_layers:  # DeepseekV3DecoderLayer: MoE from that layer on
        if native.n_shared_experts:
            raise ExportError(f"deepseek_v3 checkpoint with n_shared_experts={native.n_shared_experts}: DeepseekV3 "
                              "adds its shared experts ungated; the core's shared expert has a sigmoid gate")
        groups = native.n_group or 1
        if native.topk_group < groups:
            raise ExportError(f"deepseek_v3 checkpoint with n_group={native.n_group}, topk_group={native.topk_group}: "
                              "DeepseekV3 picks experts within the best topk_group of n_group groups, the core's "
                              "router among all experts (topk_group = n_group, or n_group = 1, converts)")
        # Sigmoid scores with the routing bias for the choice only, optionally renormalised top-k: the core's
        # sigmoid router. routed_scaling_factor is folded into the experts' down_proj (`deepseek_v3_weights_to_core`).
        moe = dict(num_experts=native.n_routed_experts, num_experts_per_tok=native.num_experts_per_tok,
                   moe_intermediate_size=native.moe_intermediate_size,
                   first_k_dense_layers=native.first_k_dense_replace, moe_router_scores="sigmoid",
                   norm_topk_prob=bool(native.norm_topk_prob), moe_bias_update_rate=DEEPSEEK_V3_BIAS_UPDATE_RATE)
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
        **moe,
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


def deepseek_v3_weights_to_core(state_dict: dict[str, torch.Tensor],
                                native: DeepseekV3Config) -> dict[str, torch.Tensor]:
    """A DeepseekV3 state dict in the core's layout: rope rows in halves, routed_scaling_factor folded into each
    expert's down_proj (sum_k s w_k E_k(x) = sum_k w_k (s E_k)(x): an expert is linear in its down_proj, so the
    logits are unchanged; training is not quite, since AdamW's steps do not grow with the weights' scale), and
    the shared experts' zero-width matrices (n_shared_experts=0) dropped: they hold no weight."""
    out = mla_rope_layout(state_dict, native, to_interleaved=False) if native.rope_interleave else dict(state_dict)
    for name, tensor in state_dict.items():
        if name.endswith("mlp.experts.down_proj") and native.routed_scaling_factor != 1.0:
            out[name] = tensor * native.routed_scaling_factor
        elif ".mlp.shared_experts." in name and not tensor.numel():
            del out[name]
    return out


def core_weights_to_deepseek_v3(model: SmolForgeForCausalLM, native: DeepseekV3Config) -> dict[str, torch.Tensor]:
    """The core's state dict in DeepseekV3's layout: rope rows interleaved, and what DeepseekV3's MoE layers hold
    that the core's may not: the routing bias (zeros where the core routes without one, moe_bias_update_rate=0)
    and the empty shared experts (n_shared_experts=0)."""
    out = mla_rope_layout(model.state_dict(), native, to_interleaved=True)
    d = native.hidden_size
    for i in filter(model.config.layer_is_moe, range(native.num_hidden_layers)):
        prefix = f"model.layers.{i}.mlp."
        out.setdefault(prefix + "gate.e_score_correction_bias", torch.zeros(native.n_routed_experts))
        out.update({prefix + "shared_experts.gate_proj.weight": torch.empty(0, d),
                    prefix + "shared_experts.up_proj.weight": torch.empty(0, d),
                    prefix + "shared_experts.down_proj.weight": torch.empty(d, 0)})
    return out


def _convert(model: PreTrainedModel, config: PreTrainedConfig, cls: type[PreTrainedModel],
             state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    config._attn_implementation = model.config._attn_implementation
    out = cls(config).to(dtype=model.dtype)
    # strict=True: every parameter must have its counterpart, so a silent mismatch cannot slip through.
    out.load_state_dict(state_dict, strict=True)
    out.generation_config = model.generation_config
    return out.eval() if not model.training else out


def to_native(model: SmolForgeForCausalLM) -> PreTrainedModel:
    config = native_config(model.config)
    state_dict = model.state_dict()
    if config.model_type == "deepseek_v3":
        state_dict = core_weights_to_deepseek_v3(model, config)
    return _convert(model, config, NATIVE[config.model_type][1], state_dict)


def from_native(model: PreTrainedModel) -> SmolForgeForCausalLM:
    config = core_config_from_native(model.config)
    state_dict = model.state_dict()
    if model.config.model_type == "deepseek_v3":
        state_dict = deepseek_v3_weights_to_core(state_dict, model.config)
    return _convert(model, config, SmolForgeForCausalLM, state_dict)


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
