"""The parallelism planner: which DP / ZeRO / TP / PP layout fits a model on N GPUs, and which is fastest.

    python -m core.infra.plan --config recipes/smollm3/pretrain.yaml --gpus 384 --gpu_memory 80 \
        --global_batch_rows 576

It reads the model (model_preset + model_overrides), the sequence length (max_length) and the batch
(per_device_train_batch_size as the micro-batch; the global batch from --global_batch_rows, else the
recipe's per-device rows x gradient_accumulation_steps x gpus) of a pretraining recipe, and for every
layout DP x TP x PP = gpus, ZeRO stage 0-3 and activation recomputation off / full estimates the memory
per GPU and the communication per step, then ranks the layouts that fit by estimated step time.

Formulas, in the notation of the Ultra-Scale Playbook (Tazi et al. 2025, "The Ultra-Scale Playbook:
Training LLMs on GPU Clusters", the companion of the Smol Training Playbook), Psi = parameters:

- Parameters, gradients, optimizer states ("Memory usage in Transformers", "ZeRO"). smolforge keeps fp32
  weights and gradients and runs bf16 under autocast, so per parameter 4 + 4 bytes, and AdamW's two fp32
  moments 8 bytes: 16 Psi in all, the Playbook's mixed-precision total (2 + 2 + 12) by another split.
  ZeRO-1 divides the optimizer states by N_dp, ZeRO-2 also the gradients, ZeRO-3 / FSDP also the
  parameters (Rajbhandari et al. 2020). Counted per tensor from the model itself (built on the meta
  device), with FSDP2's split of each tensor's first dimension rounded up (torch's `fully_shard`), so the
  figure is the largest shard, the one that must fit: tests/test_infra.py checks it against the local
  shards measured under DDP, FSDP2 and TP.
- Tensor parallelism (Shoeybi et al. 2019, Megatron-LM): the tensors of `base_model_tp_plan`
  (core/config.py: colwise q/k/v/gate/up, rowwise o/down) are divided by t; embeddings, the head and the
  norms are replicated. Pipeline parallelism: the first stage holds L/p layers and the embedding.
- Activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", sec. 4: their 34 sbh + 5 a s^2 b counts every tensor a layer saves for backward).
  Recounted for our layer (RMSNorm, GQA, SwiGLU, no dropout) in 2-byte activations: norm inputs 2 x 2sbh
  (4 bytes: RMSNorm upcasts, 2 x 4sbh), attention input 2sbh, q / k / v 2sb(q_dim + 2 kv_dim), attention
  output 2sb q_dim, MLP input 2sbh, gate / up / silu / product 4 x 2sbf; the s^2 score matrix is never
  stored (sdpa / flash attention recompute it, Dao et al. 2022). TP divides the q/k/v/attention/MLP terms
  by t, and sequence parallelism (Korthikanti sec. 4.2.2) the norm and residual terms too. Full
  recomputation keeps only each layer's input (2sbh) plus one layer's activations while it is recomputed.
  The output head adds the logits, 2 bytes + a 4-byte fp32 copy for the loss: 6 s b V.
  With 1F1B pipelining the first stage holds p micro-batches of L/p layers: the activations of L layers.
- Communication per step, bytes sent per GPU (the Playbook's ring counts): DDP all-reduces the fp32
  gradients, 2 (N-1)/N x their bytes; ZeRO-1/2 reduce-scatter gradients and all-gather parameters, the
  same volume; ZeRO-3 all-gathers parameters twice (forward and backward) and reduce-scatters gradients:
  3 (N-1)/N x. TP: per layer and micro-batch, 2 all-reduces forward and
  2 backward of the sbh activation (SP: all-gather + reduce-scatter, the same volume). PP: one sbh
  activation sent forward and one gradient back per micro-batch and stage boundary.

Step time (to rank the layouts that fit): compute = 6 Psi x tokens x (4/3 with full recomputation)
/ (gpus x bf16 peak x 0.5 MFU); TP and PP traffic are on the critical path; DP traffic overlaps the
backward pass (2/3 of compute) and only its excess counts; the 1F1B bubble adds (p-1)/m of compute. A
group of up to 8 GPUs talks over NVLink, anything wider over InfiniBand (--inter_node_gbps per GPU).
An estimate to rank layouts, not a promise: measure the top ones (python -m core.infra, then a few steps).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
from dataclasses import dataclass

import torch

from core.config import SmolForgeConfig
from core.infra.devices import gpu_peaks

GiB = 1024**3
PARAM_BYTES, GRAD_BYTES, OPTIM_BYTES = 4, 4, 8  # fp32 weights and grads under autocast, AdamW's 2 fp32 moments
ACT_BYTES = 2  # bf16 activations
USABLE_MEMORY = 0.9  # leave 10% for the CUDA context, NCCL buffers and allocator fragmentation
ASSUMED_MFU = 0.5  # compute-time estimate only; the Playbook's SmolLM3 run measured ~0.4-0.5 on H100s


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    tp_style: str | None  # "colwise" | "rowwise" | None (replicated)
    layer: int | None  # decoder layer index, None for embeddings / head / final norm

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def model_tensors(config: SmolForgeConfig) -> list[Tensor]:
    """Every parameter of the core built from `config` (on the meta device: no memory), with its TP style
    from `base_model_tp_plan`. Tied weights appear once, as in model.parameters()."""
    from core.modeling import SmolForgeForCausalLM

    with torch.device("meta"):
        model = SmolForgeForCausalLM(config)
    tensors = []
    for name, p in model.named_parameters():
        inner = name.removeprefix("model.")
        style = next((s for pattern, s in config.base_model_tp_plan.items()
                      if fnmatch.fnmatch(inner, pattern + ".weight")), None)
        layer = int(inner.split(".")[1]) if inner.startswith("layers.") else None
        tensors.append(Tensor(name, tuple(p.shape), style, layer))
    return tensors


def local_numel(t: Tensor, dp_shard: int, tp: int) -> int:
    """Elements of the largest local shard: TP splits colwise tensors on dim 0 and rowwise ones on
    dim 1; FSDP2 then splits dim 0 of what is left into dp_shard pieces, rounded up."""
    shape = list(t.shape)
    if tp > 1 and t.tp_style == "colwise":
        shape[0] //= tp
    elif tp > 1 and t.tp_style == "rowwise":
        shape[1] //= tp
    if dp_shard > 1:
        shape[0] = math.ceil(shape[0] / dp_shard)
    return math.prod(shape)


@dataclass
class Layout:
    dp: int
    tp: int
    pp: int
    zero: int  # 0 = DDP, 1, 2, 3 = FSDP
    recompute: bool
    micro_batch: int
    params: float = 0.0  # bytes per GPU
    grads: float = 0.0
    optim: float = 0.0
    activations: float = 0.0
    comm: float = 0.0  # bytes sent per GPU per step
    step_time: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optim + self.activations

    @property
    def name(self) -> str:
        zero = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3/FSDP"}[self.zero]
        return (f"DP {self.dp} ({zero}) x TP {self.tp} x PP {self.pp}, mbs {self.micro_batch}"
                f"{', full recompute' if self.recompute else ''}")


def state_bytes(tensors: list[Tensor], dp: int, tp: int, pp: int, zero: int) -> tuple[float, float, float]:
    """Parameters, gradients and optimizer states per GPU (the first pipeline stage: layers 0..L/p-1
    and the embedding; the largest, since the head is tied or comparable)."""
    layers = 1 + max(t.layer for t in tensors if t.layer is not None)
    stage = [t for t in tensors if t.layer is None or t.layer < math.ceil(layers / pp)] if pp > 1 else tensors
    if pp > 1:  # the final norm and an untied head sit on the last stage, not the first
        stage = [t for t in stage if t.layer is not None or "embed" in t.name]
    full = sum(local_numel(t, 1, tp) for t in stage)
    sharded = sum(local_numel(t, dp, tp) for t in stage)
    return (PARAM_BYTES * (sharded if zero >= 3 else full), GRAD_BYTES * (sharded if zero >= 2 else full),
            OPTIM_BYTES * (sharded if zero >= 1 else full))


def activation_bytes(config: SmolForgeConfig, seq: int, micro_batch: int, tp: int, pp: int, recompute: bool,
                     sequence_parallel: bool) -> float:
    """Activations held at the peak of one step on the first pipeline stage (formulas in the module doc)."""
    s, b, h, f = seq, micro_batch, config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    sp = tp if sequence_parallel else 1
    # Norm inputs (fp32 upcast) and the residual-side tensors: split by t only with sequence parallelism.
    replicated = s * b * (2 * 4 * h + ACT_BYTES * 2 * h) / sp
    # q, k, v, attention output, gate, up, silu, product: split across the TP ranks.
    split = s * b * ACT_BYTES * (2 * q_dim + 2 * kv_dim + 4 * f) / tp
    per_layer = replicated + split
    layers = config.num_hidden_layers  # 1F1B: the first stage holds p micro-batches of L/p layers
    logits = 6 * s * b * config.vocab_size  # bf16 logits + their fp32 copy for the loss (last stage)
    if recompute:
        kept = layers * s * b * ACT_BYTES * h / sp + per_layer  # layer inputs + one layer being recomputed
    else:
        kept = layers * per_layer
    return kept + (logits if pp == 1 else 0.0)


def layouts(config: SmolForgeConfig, gpus: int, global_rows: int, micro_batch: int,
            gpus_per_node: int = 8) -> list[tuple[int, int, int, int]]:
    """(dp, tp, pp, micro-batch) with dp x tp x pp = gpus, TP inside a node dividing the KV heads, PP
    dividing the layers, DP dividing the global batch."""
    found = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or config.num_key_value_heads % tp or gpus % tp:
            continue
        for pp in [p for p in range(1, config.num_hidden_layers + 1) if config.num_hidden_layers % p == 0]:
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if global_rows % dp:
                continue
            rows = global_rows // dp
            mbs = max(d for d in range(1, min(micro_batch, rows) + 1) if rows % d == 0)
            found.append((dp, tp, pp, mbs))
    return found


def estimate(config: SmolForgeConfig, seq: int, global_rows: int, micro_batch: int, gpus: int, gpu_memory_gib: float,
             peak_flops: float, nvlink: float, inter_node: float) -> list[Layout]:
    tensors = model_tensors(config)
    psi = sum(t.numel for t in tensors)
    tokens = global_rows * seq
    results = []
    for dp, tp, pp, mbs in layouts(config, gpus, global_rows, micro_batch):
        micro_batches = global_rows // dp // mbs
        for zero in (0, 1, 2, 3):
            if zero and dp == 1:
                continue
            for recompute in (False, True):
                lay = Layout(dp, tp, pp, zero, recompute, mbs)
                lay.params, lay.grads, lay.optim = state_bytes(tensors, dp, tp, pp, zero)
                lay.activations = activation_bytes(config, seq, mbs, tp, pp, recompute, sequence_parallel=tp > 1)
                grads_local = lay.params / PARAM_BYTES * GRAD_BYTES * (dp if zero >= 3 else 1)
                ring = (dp - 1) / dp
                dp_comm = (3 if zero >= 3 else 2) * grads_local * ring
                act = seq * mbs * config.hidden_size * ACT_BYTES
                tp_comm = (4 * 2 * (tp - 1) / tp * act * config.num_hidden_layers / pp * micro_batches) if tp > 1 else 0
                pp_comm = 2 * act * micro_batches if pp > 1 else 0
                lay.comm = dp_comm + tp_comm + pp_comm
                compute = 6 * psi * tokens * (4 / 3 if recompute else 1) / (gpus * peak_flops * ASSUMED_MFU)
                bubble = compute * (pp - 1) / micro_batches
                dp_bandwidth = nvlink if dp * tp * pp <= 8 else inter_node  # DP groups span nodes once gpus > 8
                exposed_dp = max(0.0, dp_comm / dp_bandwidth - 2 / 3 * compute)
                pp_bandwidth = nvlink if tp * pp <= 8 else inter_node
                lay.step_time = compute + bubble + tp_comm / nvlink + pp_comm / pp_bandwidth + exposed_dp
                results.append(lay)
    limit = gpu_memory_gib * GiB * USABLE_MEMORY
    return sorted(results, key=lambda lay: (lay.total > limit, lay.step_time, lay.total))


def read_recipe(path: str) -> tuple[SmolForgeConfig, int, int, int]:
    """The model config, sequence length, micro-batch and gradient accumulation of a pretraining recipe."""
    from core.recipe import load_recipe_file

    recipe = load_recipe_file(path)
    overrides = dict(recipe.get("model_overrides") or {})
    config = SmolForgeConfig.from_preset(recipe.get("model_preset", "tiny"), **overrides)
    return (config, int(recipe.get("max_length", 256)), int(recipe.get("per_device_train_batch_size", 16)),
            int(recipe.get("gradient_accumulation_steps", 1)))


def main(argv: list[str] | None = None) -> list[Layout]:
    parser = argparse.ArgumentParser(prog="python -m core.infra.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a pretraining recipe (recipes/.../pretrain.yaml)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    parser.add_argument("--gpu_memory", type=float, required=True, help="GiB of memory per GPU")
    parser.add_argument("--global_batch_rows", type=int, help="rows per optimizer step (default: the recipe's "
                        "per_device_train_batch_size x gradient_accumulation_steps x gpus)")
    parser.add_argument("--gpu", default="H100", help="GPU of core/infra/devices.py for peaks (H100, H200, A100)")
    parser.add_argument("--inter_node_gbps", type=float, default=400, help="InfiniBand Gbit/s per GPU (default 400: "
                        "one ConnectX-7 per H100)")
    parser.add_argument("--top", type=int, default=10, help="layouts to print")
    args = parser.parse_args(argv)
    config, seq, micro_batch, accumulation = read_recipe(args.config)
    global_rows = args.global_batch_rows or micro_batch * accumulation * args.gpus
    peaks = gpu_peaks(args.gpu)
    if peaks is None:
        raise ValueError(f"--gpu {args.gpu!r} is not in core/infra/devices.py (H100, H100 PCIe, H200, A100)")
    ranked = estimate(config, seq, global_rows, micro_batch, args.gpus, args.gpu_memory, peaks.flops["bf16"],
                      peaks.interconnect_bandwidth, args.inter_node_gbps / 8 * 1e9)
    psi = sum(t.numel for t in model_tensors(config))
    limit = args.gpu_memory * USABLE_MEMORY
    print(f"{psi / 1e9:.2f}B parameters, seq {seq}, global batch {global_rows} rows ({global_rows * seq:,} tokens), "
          f"{args.gpus} x {peaks.name}, {args.gpu_memory:g} GiB each ({limit:.0f} GiB usable)")
    print(f"{'layout':<58} {'params':>7} {'grads':>7} {'optim':>7} {'activ.':>7} {'total':>7} {'comm/step':>10} "
          f"{'step s':>7}  (GiB per GPU)")
    fitting = [lay for lay in ranked if lay.total <= limit * GiB]
    for lay in (fitting or ranked)[:args.top]:
        print(f"{lay.name:<58} {lay.params / GiB:7.2f} {lay.grads / GiB:7.2f} {lay.optim / GiB:7.2f} "
              f"{lay.activations / GiB:7.2f} {lay.total / GiB:7.2f} {lay.comm / GiB:9.2f}G {lay.step_time:7.2f}")
    if fitting:
        print(f"recommended: {fitting[0].name} ({len(fitting)} of {len(ranked)} layouts fit)")
    else:
        print(f"no layout fits {args.gpu_memory:g} GiB; the smallest needs {ranked[0].total / GiB:.1f} GiB "
              "(more GPUs, a smaller micro-batch, or a shorter sequence)")
    return fitting


if __name__ == "__main__":
    main()
