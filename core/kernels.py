"""The one place that chooses between Liger's Triton kernels and plain torch.

Liger (Hsu et al. 2024) fuses RMSNorm, SwiGLU, RoPE and linear + cross-entropy on CUDA; the fused
cross-entropy never materialises the (tokens x vocab) logits, which is most of a small model's
activation memory at vocab 49152. Liger only runs on CUDA tensors, so the choice is made per call
from the tensor's device and the config switch `use_liger_kernels` (None: automatic; True/False:
forced). Parameters are the same either way, so a checkpoint trained with Liger loads anywhere: the
switch is an execution choice, resolved when the model is built, and a True that this machine cannot
honour falls back to plain torch with a warning instead of refusing to load (issue 11).
"""

import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_use_liger(use_liger_kernels: bool | None) -> bool:
    """Turn the config switch into this machine's decision. A forced True where Liger cannot run
    (no CUDA device or no liger-kernel) warns and runs plain torch: the switch travels in config.json,
    and a checkpoint trained on a GPU must still load on a laptop or in a CPU test."""
    available = liger_installed() and torch.cuda.is_available()
    if use_liger_kernels and not available:
        warnings.warn(
            "use_liger_kernels=True, but Liger kernels need a CUDA device and the liger-kernel package; "
            "running plain torch on this machine (same parameters, same results up to float noise). "
            "Set use_liger_kernels to null (automatic) to choose per machine without this warning",
            stacklevel=2,
        )
        return False
    return available if use_liger_kernels is None else bool(use_liger_kernels)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Llama does (so logits match transformers')."""

    def __init__(self, dim: int, eps: float, use_liger: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_liger = use_liger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_liger and x.is_cuda:
            from liger_kernel.transformers.functional import liger_rms_norm

            # in_place=False: the input is still needed by the residual branch's autograd graph.
            return liger_rms_norm(x, self.weight, self.eps, 0.0, "llama", False)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def swiglu(gate: torch.Tensor, up: torch.Tensor, use_liger: bool) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020)."""
    if use_liger and gate.is_cuda:
        from liger_kernel.transformers.functional import liger_swiglu

        return liger_swiglu(gate, up)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               use_liger: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the leading `cos.shape[-1]` dims of q (B, nh, T, hd) and k (B, nkv, T, hd), GPT-NeoX
    layout (halves, not interleaved pairs), which is what Llama/Qwen3/SmolLM3 checkpoints and vLLM's
    `is_neox_style=True` use. cos/sin: (B, T, rotary_dim)."""
    rotary_dim = cos.shape[-1]
    if use_liger and q.is_cuda:
        from liger_kernel.transformers.functional import liger_rope

        return liger_rope(q, k, cos, sin, rotary_dim=rotary_dim)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rd): broadcast over heads
    if rotary_dim == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q = torch.cat((q_rot * cos + _rotate_half(q_rot) * sin, q_pass), dim=-1)
    k = torch.cat((k_rot * cos + _rotate_half(k_rot) * sin, k_pass), dim=-1)
    return q, k


def causal_lm_loss(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor | None,
                   shift_labels: torch.Tensor | None, z_loss_coefficient: float,
                   num_items_in_batch: int | torch.Tensor | None, use_liger: bool,
                   logits: torch.Tensor | None = None,
                   token_losses: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy plus z-loss, returned as (loss including z-loss, z-loss term, per-token
    cross-entropy or None).

    Normalised by `num_items_in_batch` when the trainer passes it (the count of target tokens over
    all gradient-accumulation micro-batches), otherwise by this batch's target tokens: that is what
    makes accumulation over uneven micro-batches equal to one big batch (transformers' GA fix).
    With Liger on CUDA, logits are never materialised (`logits` is then None).

    `token_losses=True` also returns the detached per-token cross-entropy, shaped like the targets (0 where
    a target is ignored), computed once and summed for the loss, so a trainer can split the loss by data
    source without a second cross-entropy over the logits (issue 22). The gradient is the same as with
    reduction="sum"; the forward sum may differ from it in the last bit (another summation order).
    Liger's fused loss only gives per-token values by recomputing the logits in backward
    (liger_kernel/ops/fused_linear_cross_entropy.py, reduction="none"), so there it stays None.
    """
    if shift_labels is None:
        # Targets are the next token; the last position has none. -100 is ignored (TRL/HF convention).
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    denominator = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1)
    if use_liger and hidden.is_cuda:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out = liger_fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), lm_head.weight, targets,
            lse_square_scale=z_loss_coefficient, reduction="sum", return_z_loss=True,
        )
        # Liger's summed loss already includes lse_square_scale * lse^2; its z_loss is that term.
        return out.loss / denominator, out.z_loss / denominator, None
    logits = logits.reshape(-1, logits.shape[-1]).float()
    per_token = None
    if token_losses:
        per_token = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
        ce = per_token.sum()
        per_token = per_token.detach().view(shift_labels.shape)
    else:
        ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    z = logits.new_zeros(())
    if z_loss_coefficient:
        # A mask, not boolean indexing: `logits[valid]` has a data-dependent shape, which broke
        # torch.compile's graph at this line (torch._dynamo.explain: aten.nonzero, issue 22).
        valid = targets != -100
        z = z_loss_coefficient * torch.where(valid, torch.logsumexp(logits, dim=-1).pow(2), 0.0).sum()
    return (ce + z) / denominator, z / denominator, per_token


def compile_blocks(model: nn.Module, **compile_kwargs) -> None:
    """torch.compile each decoder block of a core model in place (torchtitan applies compile per block too).

    The blocks share their code, so dynamo traces one graph per kind of block (two with RNoPE) and every
    block of that kind reuses it: compile time does not grow with depth, where whole-model compile unrolls
    every layer into one graph (the tiny preset's whole model took 277 s to compile on these 2 busy cores,
    per block 53 s; issue 22). In place, so parameter names and FSDP wrapping are unaffected.

    Inside a compiled block the norms, SwiGLU and RoPE run as torch ops, not Liger's kernels: inductor fuses
    those itself, and dynamo fails to capture Liger's RMSNorm Triton kernel (torch 2.11, liger-kernel 0.8.5:
    "'float' object has no attribute 'to'" in triton_kernel_wrap), breaking the graph. Measured on one H200,
    360M preset, 16 x 2048 tokens, bf16: compiled blocks 43.2% MFU, compiled blocks with Liger inside 39.0%,
    Liger without compile 37.5%. Liger's fused linear + cross-entropy stays: it is outside the blocks, and it
    is the memory win (the logits are never materialised)."""
    for block in model.model.layers:
        for module in block.modules():
            if hasattr(module, "use_liger"):
                module.use_liger = False
        block.compile(**compile_kwargs)

