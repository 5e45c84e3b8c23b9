"""SmolForgeMoE: the mixture-of-experts MLP of the core (issue 19), a drop-in for SmolForgeMLP.

A top-k token-choice router (softmax or sigmoid scores) sends each token to `num_experts_per_tok` of
`num_experts` SwiGLU experts of width `moe_intermediate_size`, optionally beside an always-on shared
expert with a sigmoid gate (Qwen2-MoE). Parameter names and layouts are transformers' Qwen2-MoE /
Qwen3-MoE ones (`mlp.gate.weight` (E, d), `mlp.experts.gate_up_proj` (E, 2I, d),
`mlp.experts.down_proj` (E, d, I), `mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`), so a
checkpoint converts to and from them by a config translation (`core.export`); DeepseekV3's router and
routed experts (`mlp.gate.e_score_correction_bias` included) have the same names and layout too.

    >>> from core import SmolForgeConfig, SmolForgeForCausalLM
    >>> model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny-moe", vocab_size=512))

Balancing, all off by default:
- The load-balancing loss E * sum_i f_i P_i (Switch, in Qwen-MoE's form: f_i = fraction of routed
  slots, summing to k, P_i = mean routing probability) is computed with f_i counted over the GLOBAL
  batch: the expert counts of every micro-batch of the optimizer step and of every data-parallel rank
  (`set_load_reduction`) are added up before f_i is formed. Qiu et al. 2025 ("Demons in the Detail")
  show that per-micro-batch balancing forces every small batch, hence every domain, to spread evenly,
  and hurts both quality and expert specialisation. Deviation, as in Megatron-LM's global aux loss:
  the counts of micro-batches that are not forwarded yet are unknown when an earlier one runs its
  backward, so micro-batch m uses the counts of micro-batches 1..m of the step (exact with one).
- Aux-loss-free bias balancing (DeepSeek-V3, Wang et al. 2024): a per-expert bias, added to the
  scores for the choice of experts only (the mixing weights stay the unbiased scores), moved by
  `moe_bias_update_rate` against the sign of each expert's load error after every optimizer step
  (`end_moe_step`), from the global counts above.
- The router z-loss (ST-MoE, Zoph et al. 2022): mean logsumexp(router logits)^2.

The step's global counts also give the load statistics the pretraining loop logs and alerts on
(`expert_load`: max/mean load, dead experts). The experts run as a plain loop on CPU and as two
grouped GEMMs (`torch._grouped_mm`) on CUDA in bf16, where torch provides it (bench/moe_grouped_gemm.py
checks the two against each other on a GPU).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .config import SmolForgeConfig
from .kernels import swiglu
from .layers import SmolForgeMLP  # the dense MLP is the shared expert


class SmolForgeRouter(nn.Module):
    """Scores (N, E) and the top-k choice of experts of each token."""

    def __init__(self, config: SmolForgeConfig):
        super().__init__()
        self.top_k, self.num_experts = config.num_experts_per_tok, config.num_experts
        self.scores_fn, self.norm_topk_prob = config.moe_router_scores, config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.moe_bias_update_rate > 0:
            # Persistent: it is part of the model (it decides the routing at inference too), and a
            # resumed run must continue from it. DeepSeek-V3's name for it.
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # (N, E)
        # Scores in fp32 even under autocast: near-ties in bf16 flip the top-k choice.
        scores = logits.float().softmax(-1) if self.scores_fn == "softmax" else logits.float().sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias if hasattr(self, "e_score_correction_bias") else scores
        top_idx = torch.topk(choice, self.top_k, dim=-1).indices  # (N, k)
        top_w = scores.gather(1, top_idx)  # (N, k): the unbiased scores mix the experts' outputs
        if self.norm_topk_prob:
            top_w = top_w / (top_w.sum(-1, keepdim=True) + (1e-20 if self.scores_fn == "sigmoid" else 0.0))
        return logits, scores, top_idx, top_w.to(logits.dtype)


class SmolForgeExperts(nn.Module):
    """`num_experts` SwiGLU MLPs stored as two 3-D tensors (transformers' Qwen-MoE layout)."""

    def __init__(self, config: SmolForgeConfig, use_liger: bool):
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.use_liger = e, use_liger
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))  # gate rows first, then up rows
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """x (N, d), top_idx / top_w (N, k) -> (N, d): sum over the k chosen experts of weight x expert(x)."""
        # torch._grouped_mm's fast CUDA kernel is bf16 only (fp32 / fp16 go through a slow per-group fallback,
        # pytorch#162059), so the grouped path is taken where the experts compute in bf16.
        if x.is_cuda and hasattr(torch, "_grouped_mm") and self.compute_dtype() == torch.bfloat16:
            return self.grouped_forward(x, top_idx, top_w)
        return self.loop_forward(x, top_idx, top_w)

    def compute_dtype(self) -> torch.dtype:
        # grouped_mm is not autocast-aware (pytorch#174763): it runs in the autocast dtype only if cast to it.
        return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else self.gate_up_proj.dtype

    def loop_forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in top_idx.unique().tolist():  # experts that got no token cost nothing
            token, slot = torch.where(top_idx == e)  # (n_e,)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)  # (n_e, I) each
            y = F.linear(swiglu(gate, up, self.use_liger), self.down_proj[e])  # (n_e, d)
            out.index_add_(0, token, (y * top_w[token, slot, None]).to(out.dtype))
        return out

    def grouped_forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """The same sum as two grouped GEMMs over the (token, expert) pairs sorted by expert."""
        k = top_idx.shape[1]
        flat = top_idx.reshape(-1)  # (N*k,)
        order = torch.argsort(flat, stable=True)
        token = order // k  # (N*k,) the token of each sorted pair
        # Group ends; int32 as the kernel wants. bincount, not unique: no host sync.
        offs = torch.cumsum(torch.bincount(flat, minlength=self.num_experts), 0, dtype=torch.int32)  # (E,)
        dtype = self.compute_dtype()
        h = torch._grouped_mm(x[token].to(dtype), self.gate_up_proj.to(dtype).transpose(1, 2), offs=offs)  # (N*k, 2I)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(swiglu(gate, up, self.use_liger), self.down_proj.to(dtype).transpose(1, 2),
                              offs=offs)  # (N*k, d)
        y = y * top_w.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class SmolForgeMoE(nn.Module):
    """The MoE MLP of one layer: router, routed experts (possibly another layer's) and a shared expert."""

    def __init__(self, config: SmolForgeConfig, use_liger: bool):
        super().__init__()
        self.config = config
        self.gate = SmolForgeRouter(config)
        self.experts = SmolForgeExperts(config, use_liger)
        if config.shared_expert_intermediate_size:
            self.shared_expert = SmolForgeMLP(config, use_liger, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        # The load of the current optimizer step, per expert (global once `load_reduction` is set), and
        # the router losses of the last training forward. Plain attributes, not buffers: DDP would
        # broadcast buffers from rank 0, and a checkpoint must not carry a half-counted step.
        self.step_counts: torch.Tensor | None = None
        self.step_tokens = 0.0
        self.load_reduction: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.aux_loss: torch.Tensor | None = None
        self.router_z_loss: torch.Tensor | None = None

    def use_experts_of(self, owner: "SmolForgeMoE") -> None:
        """Compute with `owner`'s expert weights (experts shared between layers). The reference is kept in a
        tuple so that the weights stay registered, and saved, once: under the owner's name."""
        del self.experts
        self._shared_experts = (owner.experts,)

    @property
    def expert_bank(self) -> SmolForgeExperts:
        return self._shared_experts[0] if hasattr(self, "_shared_experts") else self.experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, d), N = B*T
        logits, scores, top_idx, top_w = self.gate(x)
        out = self.expert_bank(x, top_idx, top_w)  # (N, d)
        if self.config.shared_expert_intermediate_size:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.training and torch.is_grad_enabled():
            self.count_load(top_idx)
            self.aux_loss = self.balance_loss(scores)
            self.router_z_loss = torch.logsumexp(logits.float(), dim=-1).square().mean()
        return out.view(shape)

    @torch.no_grad()
    def count_load(self, top_idx: torch.Tensor) -> None:
        counts = torch.bincount(top_idx.reshape(-1), minlength=self.config.num_experts).float()  # (E,)
        counts = torch.cat([counts, counts.new_tensor([top_idx.shape[0]])])  # (E + 1,): + the tokens
        if self.load_reduction is not None:
            counts = self.load_reduction(counts)
        if self.step_counts is None:
            self.step_counts = torch.zeros_like(counts[:-1])
        self.step_counts += counts[:-1]
        self.step_tokens += counts[-1].item()

    def balance_loss(self, scores: torch.Tensor) -> torch.Tensor:
        """E * sum_i f_i P_i with f_i from the step's global counts (no gradient) and P_i this micro-batch's
        mean routing probability. Equals transformers' `load_balancing_loss_func` for one layer, one batch."""
        probs = scores if self.config.moe_router_scores == "softmax" else scores / scores.sum(-1, keepdim=True)
        fraction = self.step_counts / self.step_tokens  # (E,), sums to k
        return self.config.num_experts * (fraction * probs.mean(0)).sum()


def moe_layers(model: nn.Module) -> list[SmolForgeMoE]:
    return [m for m in model.modules() if isinstance(m, SmolForgeMoE)]


def share_experts_between_layers(layers: nn.ModuleList, config: SmolForgeConfig) -> None:
    """Consecutive MoE layers, in groups of `moe_expert_share_group`, compute with the first one's experts."""
    moe = [layer.mlp for i, layer in enumerate(layers) if config.layer_is_moe(i)]
    group = config.moe_expert_share_group
    for j, mlp in enumerate(moe):
        if j % group:
            mlp.use_experts_of(moe[j - j % group])


def router_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over MoE layers of the load-balancing loss and of the router z-loss of the last training forward."""
    layers = moe_layers(model)
    aux = torch.stack([m.aux_loss for m in layers]).mean()
    z = torch.stack([m.router_z_loss for m in layers]).mean()
    return aux, z


def set_load_reduction(model: nn.Module, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Sum the expert counts over data-parallel ranks with `reduce_sum` (e.g. accelerate's
    `lambda t: accelerator.reduce(t, "sum")`), so that f_i, the load statistics and the bias updates are
    those of the global batch. Every rank must then forward in lockstep, as DDP and FSDP training do."""
    for m in moe_layers(model):
        m.load_reduction = reduce_sum


def expert_load(model: nn.Module) -> dict[str, float]:
    """Load statistics of the current step, worst MoE layer: max/mean load (1 = balanced, E/k = every token
    on the same k experts) and experts that got no token at all. Empty before any training forward."""
    counts = [m.step_counts for m in moe_layers(model) if m.step_counts is not None]
    if not counts:
        return {}
    ratios = [float(c.max() / c.mean()) for c in counts]
    dead = [int((c == 0).sum()) for c in counts]
    return {"moe/max_mean_load": max(ratios), "moe/mean_max_mean_load": sum(ratios) / len(ratios),
            "moe/dead_experts": max(dead), "moe/num_experts": counts[0].numel()}


@torch.no_grad()
def end_moe_step(model: nn.Module, update_bias: bool = True) -> None:
    """After an optimizer step: move each layer's routing bias against its load error (DeepSeek-V3: an
    overloaded expert's bias goes down by the rate, an underloaded one's up), and start a new step's count.
    `update_bias=False` for a step whose update was dropped (alert policy skip / rollback)."""
    for m in moe_layers(model):
        bias = getattr(m.gate, "e_score_correction_bias", None)
        if update_bias and bias is not None and m.step_counts is not None:
            bias += m.config.moe_bias_update_rate * torch.sign(m.step_counts.mean() - m.step_counts).to(bias)
        m.step_counts, m.step_tokens = None, 0.0


class MoEStepCallback(TrainerCallback):
    """What pretraining's loop does after each optimizer step (`end_moe_step`), for the stages built on
    transformers' Trainer (SFT, preference, GRPO, distillation, reward models): without it the expert counts
    behind the global-batch aux loss would accumulate over the whole run, and the routing bias never move.
    `on_step_end` runs once per optimizer step, after the gradient-accumulation micro-batches."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        end_moe_step(model)
