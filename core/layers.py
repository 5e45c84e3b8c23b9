"""The pieces the core's blocks share: attention through transformers' interface, the SwiGLU MLP, and the
document boundaries of packed rows.

GQA (`core.modeling`) and MLA (`core.mla`) attend through `attend`; the dense layers and MoE's shared
expert (`core.moe`) are `SmolForgeMLP`; flash attention's varlen arguments and the delta-net's
per-document masking (`core.ssm`) both find documents with `packed_sequence_lengths`. They live here, below
the blocks, so that every block imports them and `core.modeling` imports the blocks: one direction only.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .config import SmolForgeConfig
from .kernels import swiglu


def packed_sequence_lengths(position_ids: torch.Tensor) -> dict:
    """Flash attention's varlen arguments for a (B, T) batch read as one row of B*T tokens.

    A document starts at every row start and wherever the position does not continue the previous
    one by 1 (the rule of transformers' `find_packed_sequence_indices`, which builds the eager/sdpa/flex
    mask), so flash separates exactly the documents that the other implementations' masks separate,
    and no document runs on from the end of one row into the next.
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    start_indices = starts.reshape(-1).nonzero().view(-1)  # (N,) offsets into the B*T row
    cu_seq_lens = torch.cat([start_indices, start_indices.new_tensor([position_ids.numel()])]).to(torch.int32)
    max_length = int(cu_seq_lens.diff().max())
    return dict(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=max_length, max_length_k=max_length)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hd) -> (B, nkv * n_rep, T, hd): each KV head serves n_rep query heads (GQA)."""
    if n_rep == 1:
        return x
    b, nkv, t, hd = x.shape
    return x[:, :, None].expand(b, nkv, n_rep, t, hd).reshape(b, nkv * n_rep, t, hd)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, nh, hd)
    return out, probs


def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention through transformers' interface (eager, sdpa, flash, flex: `config._attn_implementation`),
    with the core's eager function as the default; shared by GQA and MLA (core/mla.py). `kwargs` carries
    cu_seq_lens etc. for padding-free flash attention."""
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    return attention_interface(module, query, key, value, attention_mask,
                               dropout=module.config.attention_dropout if module.training else 0.0,
                               scaling=module.scaling, **kwargs)


class SmolForgeMLP(nn.Module):
    def __init__(self, config: SmolForgeConfig, use_liger: bool, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size  # another width: MoE's shared expert
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.use_liger = use_liger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.use_liger))
