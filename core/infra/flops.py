"""Training FLOPs per token of the core, the numerator of every MFU this project prints.

The denominator is `core.infra.devices.peak_flops` (one table, per device and dtype). Kept in core, not
in the pretraining stage, because the benches use it too, including the GPU one, which must import
nothing beyond torch and transformers (bench/throughput_gpu.sh).
"""

from core.config import SmolForgeConfig
from core.mla import mla_flop_terms


def flops_per_token(config: SmolForgeConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, appendix B).

    N counts the parameters that take part in a matmul: attention and MLP projections of every layer
    plus the output head (d x V), counted even when it is tied to the embedding (the lookup is free, the
    head's matmul is not); norm gains and the embedding lookup do no matmul. 6 = 2 (multiply-add) x 3
    (forward, and backward for activations and for weights). 12 L H Q T is attention's QK^T and AV:
    2 matmuls x 2 (multiply-add) x 3 (forward and backward), H query heads of width Q over T keys; like
    PaLM, the causal half is not discounted (that is what MFU comparisons use). MLA, MoE and delta-net
    layers (issue 19) count what they compute: MLA's low-rank projections and its own QK/PV widths, an MoE
    layer's active parameters, a delta-net layer's projections and no attention term."""
    d, L = config.hidden_size, config.num_hidden_layers
    # The knobs of issue 19 (MLA, MoE, delta-net layers) exist on the core's config only: a continued
    # Llama/Qwen3 checkpoint's config has none of them, and is the dense case.
    core = isinstance(config, SmolForgeConfig)
    if core and config.kv_lora_rank:
        attn, attn_width = mla_flop_terms(config)  # the low-rank projections; QK^T over qk, PV over v widths
    else:
        attn = d * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
        attn_width = 2 * config.num_attention_heads * config.head_dim
    n = d * config.vocab_size
    attention_layers = 0
    for i in range(L):
        if core and config.layer_is_linear_attention(i):
            # Gated delta-net (core/ssm.py): its projections. The recurrence itself (a state update of
            # heads x key x value per token, and the chunked form's 64-token blocks) is left out: no matmul
            # over the context, and small next to the projections at the presets' widths.
            key_dim = config.linear_num_key_heads * config.linear_key_head_dim
            value_dim = config.linear_num_value_heads * config.linear_value_head_dim
            n += d * (2 * key_dim + 2 * value_dim) + d * 2 * config.linear_num_value_heads + value_dim * d
        else:
            n += attn
            attention_layers += 1
        if core and config.layer_is_moe(i):
            # Active parameters only: the router, the k chosen experts, the shared expert and its gate.
            n += d * config.num_experts + 3 * d * config.num_experts_per_tok * config.moe_intermediate_size
            if config.shared_expert_intermediate_size:
                n += 3 * d * config.shared_expert_intermediate_size + d
        else:
            n += 3 * d * config.intermediate_size
    return 6 * n + 6 * attention_layers * attn_width * seq_len
