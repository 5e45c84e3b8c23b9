"""Multi-head latent attention (MLA, DeepSeek-V2: DeepSeek-AI 2024, arXiv:2405.04434; kept in V3): the
token mixer `SmolForgeDecoderLayer` uses instead of GQA when `config.kv_lora_rank > 0`.

Keys and values are not projected from the hidden state per head. The hidden state is compressed to one
latent of `kv_lora_rank` dims per token (RMS-normalised), and each head's key (no-position part,
`qk_nope_head_dim`) and value (`v_head_dim`) are expanded from that latent by `kv_b_proj`. Position goes
through a separate, decoupled key of `qk_rope_head_dim` dims, one per token and shared by all heads (RoPE
cannot be applied to the latent: it would not commute with the up-projection, paper section 2.1.3).
Queries are projected directly, or through a `q_lora_rank` bottleneck. Each query head is
[q_nope ; q_rope] against the key [k_nope ; k_rope], so the softmax scale is 1/sqrt(nope + rope dims).

The KV cache holds what the token contributes before expansion: the normalised latent and the rotated
shared key, `kv_lora_rank + qk_rope_head_dim` numbers per token per layer, against
`2 * num_key_value_heads * head_dim` for GQA. They go through transformers' ordinary `DynamicCache` as a
one-head "key" (the latent) and a one-head "value" (the rope key), as transformers' DeepseekV3 does: a
`DynamicLayer` concatenates whatever (B, heads, T, dim) it is given, and `get_seq_length` reads the token
axis, so no cache class of our own is needed and generate, cropping and beam reordering work unchanged.
The heads are expanded from the cached latent at every step (the plain form). DeepSeek's "absorbed"
inference form, which folds `kv_b_proj` into the query and output projections to attend in latent space,
is not done here: it changes no result, only decode cost.

Parameter names are transformers' DeepseekV3 names (`q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`,
`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`), so `core.export` maps an MLA core (dense, or
with sigmoid-routed MoE layers) onto DeepseekV3ForCausalLM and back with one permutation of the rope rows
(`interleave_rope_rows`).
"""

import torch
from torch import nn
from transformers.cache_utils import Cache

from .config import SmolForgeConfig
from .kernels import RMSNorm, apply_rope
from .layers import attend

# The two latent RMSNorms use DeepSeek's eps, not `rms_norm_eps`: DeepSeek-V3's reference code and
# transformers' DeepseekV3Attention build them with their default 1e-6 whatever the config says, and the
# exported checkpoint must compute what the core computes.
LATENT_NORM_EPS = 1e-6


class SmolForgeMLAttention(nn.Module):
    def __init__(self, config: SmolForgeConfig, layer_idx: int, use_liger: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.num_key_value_groups = 1  # read by transformers' sdpa/flex wrappers: keys are per query head
        self.scaling = self.qk_head_dim**-0.5
        self.is_causal = True
        self.use_rope = config.layer_uses_rope(layer_idx)
        self.use_liger = use_liger
        h, nh = config.hidden_size, self.num_heads
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS, use_liger)
            self.q_b_proj = nn.Linear(config.q_lora_rank, nh * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, nh * self.qk_head_dim, bias=False)
        # One projection gives the latent and the shared rope key ("with MQA": one key head for all).
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, use_liger)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, h, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                attention_mask: torch.Tensor | None, past_key_values: Cache | None = None, **kwargs):
        batch_size, seq_len = hidden_states.shape[:-1]
        if self.config.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        else:
            q = self.q_proj(hidden_states)
        # -1 heads, not num_heads: under tensor parallelism (base_model_tp_plan) a rank holds only its heads.
        q = q.view(batch_size, seq_len, -1, self.qk_head_dim).transpose(1, 2)  # (B, nh, T, dn+dr)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, nh, T, dn), (B, nh, T, dr)

        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(batch_size, 1, seq_len, self.kv_lora_rank)  # (B, 1, T, r)
        k_rope = k_rope.view(batch_size, 1, seq_len, self.rope_dim)  # (B, 1, T, dr): one key for all heads
        if self.use_rope:
            q_rope, k_rope = apply_rope(q_rope, k_rope, *position_embeddings, use_liger=self.use_liger)
        if past_key_values is not None:
            # The cache stores the latent, not the heads: (B, 1, S, r) and (B, 1, S, dr) come back.
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)

        kv = self.kv_b_proj(latent)  # (B, 1, S, nh*(dn+dv))
        kv = kv.view(*kv.shape[:-1], -1, self.nope_dim + self.v_dim)[:, 0].transpose(1, 2)  # (B, nh, S, dn+dv)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, nh, S, dn), (B, nh, S, dv)
        k = torch.cat((k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)  # (B, nh, S, dn+dr)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, nh, T, dn+dr)

        # The core's attention serves MLA as is: num_key_value_groups = 1 repeats nothing, and the eager path
        # never assumes the value width equals the query/key width.
        out, weights = attend(self, q, k, v, attention_mask, **kwargs)
        out = self.o_proj(out.reshape(batch_size, seq_len, -1).contiguous())  # (B, T, d)
        return out, weights


def mla_flop_terms(config: SmolForgeConfig) -> tuple[int, int]:
    """For `core.infra.flops.flops_per_token`: the matmul parameters of one MLA layer, and the attention width
    H * (qk_head_dim + v_head_dim) that QK^T and PV cost per token of context (the GQA counterpart is
    2 * H * head_dim)."""
    d, nh, r = config.hidden_size, config.num_attention_heads, config.kv_lora_rank
    qk, dv = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    q = d * config.q_lora_rank + config.q_lora_rank * nh * qk if config.q_lora_rank else d * nh * qk
    params = q + d * (r + config.qk_rope_head_dim) + r * nh * (config.qk_nope_head_dim + dv) + nh * dv * d
    return params, nh * (qk + dv)


def interleave_rope_rows(weight: torch.Tensor, head_width: int, rope_dim: int, inverse: bool = False) -> torch.Tensor:
    """Reorder the output rows of a projection whose every `head_width` rows end with `rope_dim` rope rows,
    from our GPT-NeoX halves layout (dim i pairs with i + rope_dim/2) to DeepSeek's interleaved pairs
    (2i with 2i+1), or back with `inverse`. transformers' DeepseekV3 with `rope_interleave=True` (its default,
    and the only layout vLLM's DeepSeek model runs: `is_neox_style=False`) reads q_rope[0::2] and q_rope[1::2]
    as the two halves, so after this permutation it rotates exactly the pairs we rotate, with the same
    frequencies, and returns them in halves order: the scores are identical."""
    half = rope_dim // 2
    to_interleaved = torch.stack((torch.arange(half), torch.arange(half) + half), dim=-1).reshape(-1)  # new j <- old
    order = torch.argsort(to_interleaved) if inverse else to_interleaved
    rows = weight.view(-1, head_width, weight.shape[-1])  # (heads, head_width, in)
    nope = head_width - rope_dim
    return torch.cat((rows[:, :nope], rows[:, nope:][:, order]), dim=1).reshape(weight.shape)
