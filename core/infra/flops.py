"""Training FLOPs per token of the core, the numerator of every MFU this project prints.

The denominator is `core.infra.devices.peak_flops` (one table, per device and dtype). Kept in core, not
in the pretraining stage, because the benches use it too, including the GPU one, which must import
nothing beyond torch and transformers (bench/throughput_gpu.sh).
"""

from core.config import SmolForgeConfig


def flops_per_token(config: SmolForgeConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, appendix B).

    N counts the parameters that take part in a matmul: attention and MLP projections of every layer
    plus the output head (d x V), counted even when it is tied to the embedding (the lookup is free, the
    head's matmul is not); norm gains and the embedding lookup do no matmul. 6 = 2 (multiply-add) x 3
    (forward, and backward for activations and for weights). 12 L H Q T is attention's QK^T and AV:
    2 matmuls x 2 (multiply-add) x 3 (forward and backward), H query heads of width Q over T keys; like
    PaLM, the causal half is not discounted (that is what MFU comparisons use)."""
    d, L = config.hidden_size, config.num_hidden_layers
    attn = d * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * d * config.intermediate_size
    n = L * (attn + mlp) + d * config.vocab_size
    return 6 * n + 12 * L * config.num_attention_heads * config.head_dim * seq_len
