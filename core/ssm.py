"""SmolForgeGatedDeltaNet: the linear-attention (SSM) token mixer of the hybrid core (issue 19).

The gated delta rule of Yang, Kautz & Hatamizadeh 2024 ("Gated Delta Networks: Improving Mamba2 with
Delta Rule"), laid out as Qwen3-Next's `linear_attention` layers are, so a checkpoint's mixer weights
carry the same names and shapes as transformers' `Qwen3NextGatedDeltaNet` (that is what the parity
test copies). Per value head h, with a (dk, dv) state S that replaces the KV cache:

    S_t = exp(g_t) * S_{t-1}                                   decay (Mamba-2's scalar gate)
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T             delta rule: write only the correction
    o_t = S_t^T q_t

with q, k L2-normalised, q scaled by dk^-0.5, beta = sigmoid(b) and g = -exp(A_log) * softplus(a + dt_bias).
Before the rule, q, k and v pass through a depthwise causal conv (kernel `linear_conv_kernel_dim`) and
SiLU; after it, a gated RMSNorm (norm(o) * silu(z)) and the output projection.

Compute paths:
- prefill / training: the chunked form (chunks of 64 tokens; within a chunk the delta-rule updates
  are one triangular solve, the WY/UT representation of DeltaNet, Yang et al. 2024 "Parallelizing
  Linear Transformers with the Delta Rule"), then a sequential scan over chunks. Linear in length.
- one-token decode with a cache: the recurrence above, one step (`gated_delta_step`).
- fused kernels: on CUDA tensors, `fla` (flash-linear-attention) for the rule and `causal-conv1d` for
  the conv are used when installed; neither runs on CPU, so everywhere else (and in every test here,
  where neither is installed) the plain torch code below runs. Packed rows always take the torch path
  (fla's `cu_seqlens` and causal-conv1d's `seq_idx` would do them fused; not wired up yet).

State for generation lives in transformers' own cache: `DynamicCache(config=...)` reads
`config.layer_types` and gives each "linear_attention" layer a `LinearAttentionLayer` holding the
conv state (B, conv_dim, kernel) and the recurrent state (B, Hv, dk, dv), which is how Qwen3-Next
keeps it. Packed rows (several documents in one row, per-document `position_ids`) mask every term
that would couple two documents, in the conv and in the rule, so each document computes what it
computes alone from a zero state, in one batched pass (the block-diagonal mask of the attention layers).
"""

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .config import SmolForgeConfig
from .kernels import RMSNorm
from .layers import packed_sequence_lengths  # the one rule for document starts

CHUNK_SIZE = 64  # fla's and Qwen3-Next's chunk: the triangular solve is (64, 64) per head and chunk


@functools.cache  # asked per layer and forward on CUDA; installing a package mid-process is not supported
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


@functools.cache
def causal_conv1d_installed() -> bool:
    return importlib.util.find_spec("causal_conv1d") is not None


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim: the eps placement of fla (and Qwen3-Next's torch path)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           initial_state: torch.Tensor | None,
                           doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a whole sequence, chunk by chunk, in fp32.

    q, k: (B, T, H, dk), already L2-normalised and q scaled; v: (B, T, H, dv); g (log decay, <= 0) and
    beta: (B, T, H); initial_state: (B, H, dk, dv) or None (zeros). Returns (B, T, H, dv) in v's dtype
    and the final state (B, H, dk, dv), fp32.

    Inside a chunk with cumulative log decay c_i and start state S0, the pseudo-values u_i (what each
    token writes) satisfy  u_i + sum_{j<i} beta_i e^{c_i - c_j} (k_i.k_j) u_j = beta_i v_i - beta_i e^{c_i} S0^T k_i,
    a unit lower-triangular system solved once for both right-hand sides. Then
    o_i = e^{c_i} S0^T q_i + sum_{j<=i} e^{c_i - c_j} (q_i.k_j) u_j  and
    S_end = e^{c_L} S0 + sum_j e^{c_L - c_j} k_j u_j^T.

    doc_ids (B, T), non-decreasing along each row, packs several documents per row (no initial_state
    then): every term above that couples two positions of different documents is masked out, and a
    position reads S0 only if its document began before the chunk. That is each document run alone
    from a zero state, in one batched pass.
    """
    out_dtype = v.dtype
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))  # (B, H, T, d)
    g, beta = (x.transpose(1, 2).float() for x in (g, beta))  # (B, H, T)
    pad = (-t) % CHUNK_SIZE
    if pad:  # padded tokens have k = v = 0, beta = 0, g = 0: they write nothing and decay nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // CHUNK_SIZE
    q, k, v = (x.reshape(b, h, n, CHUNK_SIZE, -1) for x in (q, k, v))  # (B, H, N, L, d)
    g, beta = (x.reshape(b, h, n, CHUNK_SIZE) for x in (g, beta))  # (B, H, N, L)

    c = g.cumsum(-1)  # (B, H, N, L) cumulative log decay inside each chunk
    causal = torch.ones(CHUNK_SIZE, CHUNK_SIZE, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = e^{c_i - c_j} for j <= i, 0 above the diagonal (masked before exp: no overflow)
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, N, L, L)
    from_start = c.exp()  # e^{c_i}: how much of S0 position i still sees
    to_end = (c[..., -1:] - c).exp()  # e^{c_L - c_j}: how much of position j's write reaches the chunk end
    if doc_ids is not None:
        doc = torch.cat([doc_ids, doc_ids[:, -1:].expand(b, pad)], dim=1)  # padding joins the last document
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        doc, starts = doc.view(b, 1, n, CHUNK_SIZE), starts.view(b, 1, n, CHUNK_SIZE).int()  # broadcast over heads
        same_doc = doc[..., :, None] == doc[..., None, :]  # (B, 1, N, L, L)
        continues = starts.cumsum(-1) == 0  # (B, 1, N, L): no document began in this chunk up to i
        decay = decay * same_doc
        from_start = from_start * continues
        to_end = to_end * same_doc[..., -1, :]
    k_beta = k * beta[..., None]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # strictly-lower part is the system; diagonal ignored
    rhs = torch.cat([v * beta[..., None], k_beta * from_start[..., None]], dim=-1)  # (B, H, N, L, dv + dk)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_values, u_state = solved.split([dv, dk], dim=-1)  # u = u_values - u_state @ S0
    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, N, L, L) within-chunk attention
    q_decayed = q * from_start[..., None]  # reads the start state
    k_to_end = k * to_end[..., None]  # writes into the end state
    chunk_decay = from_start[..., -1, None, None]  # (B, H, N, 1, 1)

    state = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.float()
    out = torch.empty_like(v)  # (B, H, N, L, dv)
    for i in range(n):  # sequential over chunks only: T / 64 steps
        u = u_values[:, :, i] - u_state[:, :, i] @ state  # (B, H, L, dv)
        out[:, :, i] = q_decayed[:, :, i] @ state + scores[:, :, i] @ u
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ u
    out = out.reshape(b, h, -1, dv)[:, :, :t].transpose(1, 2).contiguous()  # (B, T, H, dv)
    return out.to(out_dtype), state


def gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the rule (decode), in fp32: q, k (B, H, dk) as for the chunked form, v (B, H, dv),
    g and beta (B, H), state (B, H, dk, dv). Returns the output (B, H, dv) and the new state."""
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    state = state.float() * g.exp()[..., None, None]  # decay
    predicted = (k[..., None, :] @ state).squeeze(-2)  # S^T k: (B, H, dv)
    state = state + k[..., :, None] * ((v - predicted) * beta[..., None])[..., None, :]  # write the correction
    return (q[..., None, :] @ state).squeeze(-2), state


class SmolForgeRMSNormGated(RMSNorm):
    """weight * RMSNorm(x) * silu(z): normalise first, then gate (Qwen3-Next's and fla's FusedRMSNormGated
    order). An RMSNorm subclass so everything that treats norm gains alike (no weight decay) covers it."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (x * F.silu(gate.float())).to(dtype)


class SmolForgeGatedDeltaNet(nn.Module):
    # Mamba's and fla's convention: weight decay would pull every head's decay rate toward A = 1 and
    # dt_bias toward 0, so the optimiser leaves these out (pretrain/train.py:parameter_groups).
    no_weight_decay = ("A_log", "dt_bias")

    def __init__(self, config: SmolForgeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.v_per_k = self.num_v_heads // self.num_k_heads  # value heads sharing one key head (like GQA)
        self.conv_kernel_size = config.linear_conv_kernel_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim  # q, k and v are convolved; z, b, a are not
        # Fused projections grouped per key head, [q | k | v | z] and [b | a], Qwen3-Next's layout.
        self.in_proj_qkvz = nn.Linear(config.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(config.hidden_size, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim,
                                padding=self.conv_kernel_size - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.norm = SmolForgeRMSNormGated(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)
        self.reset_ssm_parameters(config.initializer_range)

    @torch.no_grad()
    def reset_ssm_parameters(self, std: float) -> None:
        """A = exp(A_log) uniform in [0.01, 16] per head as Qwen3-Next/fla initialise it (a spread of decay
        rates: some heads remember long, some short; the lower bound keeps log(A) finite), dt_bias 1."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
        self.dt_bias.fill_(1.0)
        nn.init.normal_(self.conv1d.weight, mean=0.0, std=std)
        self.norm.weight.fill_(1.0)

    def _split_projections(self, hidden_states: torch.Tensor):
        """(B, T, d) -> q, k (B, T, Hk*dk), v, z (B, T, Hv, dv), b, a (B, T, Hv), undoing the per-key-head grouping."""
        bsz, t = hidden_states.shape[:2]
        qkvz = self.in_proj_qkvz(hidden_states).view(bsz, t, self.num_k_heads, -1)  # (B, T, Hk, 2dk + 2r*dv)
        ba = self.in_proj_ba(hidden_states).view(bsz, t, self.num_k_heads, -1)  # (B, T, Hk, 2r)
        grouped_v = self.v_per_k * self.head_v_dim
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, grouped_v, grouped_v], dim=-1)
        b, a = ba.split([self.v_per_k, self.v_per_k], dim=-1)
        return (q.reshape(bsz, t, -1), k.reshape(bsz, t, -1), v.reshape(bsz, t, -1, self.head_v_dim),
                z.reshape(bsz, t, -1, self.head_v_dim), b.reshape(bsz, t, -1), a.reshape(bsz, t, -1))

    def forward(self, hidden_states: torch.Tensor, cache: Cache | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """hidden_states (B, T, d) -> (B, T, d). `attention_mask`: the 2D padding mask (1 = token) or None;
        padded positions are zeroed so they leave the state untouched (their k is 0 after the L2 norm)."""
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        bsz, seq_len, _ = hidden_states.shape
        q, k, v, z, b, a = self._split_projections(hidden_states)
        mixed = torch.cat([q, k, v.reshape(bsz, seq_len, -1)], dim=-1).transpose(1, 2)  # (B, conv_dim, T)
        beta = b.sigmoid()  # (B, T, Hv)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # (B, T, Hv), log decay <= 0

        if cache is None:
            doc_ids = self._document_ids(position_ids, kwargs.get("cu_seq_lens_q"), bsz, seq_len)
            out, _ = self._mix(mixed, g, beta, initial_state=None, doc_ids=doc_ids)
        else:
            decoding = cache.has_previous_state(self.layer_idx)
            layer_cache = cache.layers[self.layer_idx]
            if decoding and seq_len == 1 and mixed.is_cuda and causal_conv1d_installed():
                from causal_conv1d import causal_conv1d_update

                # Updates the (B, conv_dim, kernel) state in place, as the torch path below does.
                conv_out = causal_conv1d_update(mixed, layer_cache.conv_states[0], self.conv1d.weight.squeeze(1),
                                                None, "silu")
                mixed = None
            else:
                # Prefill stores the last `kernel` inputs (zero-padded when shorter); decode returns
                # [state | new inputs], so the conv sees its left context either way.
                mixed = cache.update_conv_state(mixed, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
                conv_out = None
            initial = layer_cache.recurrent_states[0] if decoding else None
            out, state = self._mix(mixed, g, beta, initial, conv_out=conv_out, seq_len=seq_len)
            cache.update_recurrent_state(state, self.layer_idx)

        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))  # per value head
        return self.out_proj(out.view(bsz, seq_len, self.value_dim))

    def _mix(self, mixed: torch.Tensor | None, g: torch.Tensor, beta: torch.Tensor, initial_state: torch.Tensor | None,
             conv_out: torch.Tensor | None = None, seq_len: int | None = None,
             doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal conv + SiLU over `mixed` (B, conv_dim, T' >= T; extra leading columns are cached context),
        then the gated delta rule on the last T tokens. Returns (B, T, Hv, dv) and the final state.
        doc_ids (B, T): packed documents, kept apart in the conv and in the rule (no cache then)."""
        seq_len = g.shape[1] if seq_len is None else seq_len
        if conv_out is None and seq_len == 1 and mixed.shape[-1] >= self.conv_kernel_size:
            # Decode: the one new output is a dot product with the last `kernel` inputs (cached + new);
            # a conv call costs ~100 us on CPU for this (measured), most of a tiny layer's step.
            window = mixed[:, :, -self.conv_kernel_size:].to(self.conv1d.weight.dtype)  # (B, C, kernel)
            conv_out = F.silu((window * self.conv1d.weight.squeeze(1)).sum(-1, keepdim=True)).to(mixed.dtype)
        elif conv_out is None:
            conv_out = self._causal_conv(mixed, doc_ids)[:, :, -seq_len:]  # (B, conv_dim, T)
        bsz = conv_out.shape[0]
        q, k, v = conv_out.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(bsz, seq_len, self.num_k_heads, self.head_k_dim)
        k = k.reshape(bsz, seq_len, self.num_k_heads, self.head_k_dim)
        v = v.reshape(bsz, seq_len, self.num_v_heads, self.head_v_dim)
        if q.is_cuda and fla_installed() and doc_ids is None:  # packed rows: fla's cu_seqlens API is not wired up
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

            if self.v_per_k > 1:
                q, k = (x.repeat_interleave(self.v_per_k, dim=2) for x in (q, k))
            rule = fla_recurrent if initial_state is not None and seq_len == 1 else fla_chunk
            return rule(q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=True,
                        use_qk_l2norm_in_kernel=True)
        q = l2_normalize(q.float()) * self.head_k_dim**-0.5
        k = l2_normalize(k.float())
        if self.v_per_k > 1:  # value head h reads key head h // v_per_k
            q, k = (x.repeat_interleave(self.v_per_k, dim=2) for x in (q, k))  # (B, T, Hv, dk)
        if initial_state is not None and seq_len == 1:
            out, state = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], initial_state)
            return out[:, None].to(v.dtype), state  # (B, 1, Hv, dv)
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state, doc_ids)

    def _causal_conv(self, mixed: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise causal conv + SiLU, (B, C, T) -> (B, C, T). With doc_ids (B, T), a tap that would
        read a previous document reads zero instead, as if each document were convolved alone."""
        weight = self.conv1d.weight.squeeze(1)  # (C, kernel)
        kernel = self.conv_kernel_size
        if doc_ids is not None:
            x = F.pad(mixed.to(weight.dtype), (kernel - 1, 0))  # (B, C, kernel - 1 + T)
            docs = F.pad(doc_ids, (kernel - 1, 0), value=-1)  # (B, kernel - 1 + T)
            t = mixed.shape[-1]
            out = 0
            for back in range(kernel):  # the tap reading `back` steps into the past has weight[:, kernel-1-back]
                lo = kernel - 1 - back
                same = (docs[:, lo:lo + t] == doc_ids)[:, None, :]  # (B, 1, T)
                out = out + weight[:, lo, None] * x[:, :, lo:lo + t] * same
            return F.silu(out).to(mixed.dtype)
        if mixed.is_cuda and causal_conv1d_installed():
            from causal_conv1d import causal_conv1d_fn

            return causal_conv1d_fn(mixed, weight, None, activation="silu")
        out = F.conv1d(mixed.to(weight.dtype), self.conv1d.weight, padding=kernel - 1,
                       groups=self.conv_dim)[:, :, : mixed.shape[-1]]
        return F.silu(out).to(mixed.dtype)

    @staticmethod
    def _document_ids(position_ids: torch.Tensor | None, cu_seq_lens: torch.Tensor | None,
                      bsz: int, seq_len: int) -> torch.Tensor | None:
        """(B, T) index of the document each token belongs to when some row packs more than one
        document; None when every row is one sequence (the common case, no masking at all).
        Documents come from flash's `cu_seq_lens_q` when the batch runs as one flattened row, else
        from where `position_ids` restart (the rule the attention layers' block-diagonal mask uses)."""
        if cu_seq_lens is None:
            if position_ids is None:
                return None
            cu_seq_lens = packed_sequence_lengths(position_ids.expand(bsz, -1))["cu_seq_lens_q"]
        if cu_seq_lens.numel() - 1 == bsz:  # as many documents as rows, and every row starts one
            return None
        starts = torch.zeros(bsz * seq_len, dtype=torch.long, device=cu_seq_lens.device)
        starts[cu_seq_lens[:-1].long()] = 1
        return starts.cumsum(0).view(bsz, seq_len)
