"""Data and tensor parallelism applied from outside the model (torchtitan's split): DDP or FSDP2, and
tensor parallelism (`tp_size`) composed with FSDP2 over a 2-D (dp, tp) device mesh.

On GPU everything goes through accelerate: DDP, or FSDP2 from an accelerate config
(recipes/accelerate_configs/fsdp2.yaml: `fsdp_version: 2`), so mixed precision, CPU offload,
activation checkpointing and the state-dict type in that file mean the same thing in pretraining
as in the TRL stages (issue 10).

On CPU, accelerate only turns an FSDP config into FSDP for GPU-type launches: its processes become
plain MULTI_CPU (gloo) and the model would silently be DDP-wrapped instead (accelerate/state.py,
measured with accelerate 1.15). There, and only there, FSDP2 is applied here by hand:
`fully_shard` on each decoder block and then on the root (the torchtitan recipe), with model and
optimizer checkpointed by torch.distributed.checkpoint (each rank writes its shards). Everything
else (RNG, scheduler, data position) goes through accelerate's save_state either way.

Tensor parallelism (Shoeybi et al. 2019) with `tp_size` > 1 is applied by hand too (accelerate 1.15 has
no TP for a model built in the script): torch DTensor's `parallelize_module` with the model's own plan,
`SmolForgeConfig.base_model_tp_plan` (colwise q/k/v/gate/up, rowwise o/down), plus its sequence-parallel
option for the norms. The ranks of one TP group read the same rows (the data stream is split over the
dp = world / tp ranks), and FSDP2 shards what TP leaves over the "dp" dimension of the mesh (torchtitan's
2-D recipe). Embeddings and the head stay replicated across the TP group.
"""

import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)


def refuse_deepspeed() -> None:
    """The loop steps its own optimizer, clips and checkpoints through DDP / FSDP2; a DeepSpeed engine would
    own all three. Under a DeepSpeed accelerate config (zero2.yaml, zero3.yaml), accelerate itself fails first
    with "invalid literal for int() with base 10: 'auto'" (the configs leave gradient accumulation to the
    TRL stages' Trainer): say what to use instead."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("pretrain runs on DDP or FSDP2 (recipes/accelerate_configs/ddp.yaml, fsdp2.yaml); the DeepSpeed "
                         "configs (zero2.yaml, zero3.yaml) are for the TRL stages: sft, preference, rl, distill")


def fsdp2_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def tensor_parallel_plan(model: torch.nn.Module, sequence_parallel: bool) -> dict:
    """torch ParallelStyles for `parallelize_module`, from the config's plan (module paths under `model.`).

    Without sequence parallelism: colwise / rowwise, activations replicated between the sublayers.
    With it, the residual stream is split along the sequence (dim 1) between the sublayers: the first
    layer takes its slice of the replicated embeddings, each attention / MLP all-gathers the sequence
    before its colwise projections and its rowwise projection reduce-scatters back to sequence shards,
    the norms run on their shard, and the head all-gathers the sequence again (Korthikanti et al. 2022,
    fig. 5; torchtitan's Llama plan)."""
    config = model.config
    if config.qk_norm:
        raise ValueError("tp_size > 1 with model qk_norm=true: the per-head QK-norm weights would see only the "
                         "local heads' gradients; train QK-norm models with tp_size 1 (DDP / FSDP2)")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {}
    for pattern, style in config.base_model_tp_plan.items():
        if pattern == "embed_tokens":
            # transformers adds embedding_rowwise for tied models (configuration_utils.py), for its
            # inference TP with a vocabulary-parallel head; here embeddings and head stay replicated.
            continue
        if style not in styles:
            raise ValueError(f"base_model_tp_plan[{pattern!r}] = {style!r}: pretraining applies colwise / rowwise")
        kwargs = {"output_layouts": Shard(1)} if sequence_parallel and style == "rowwise" else {}
        plan["model." + pattern] = styles[style](**kwargs)
    if sequence_parallel:
        for pattern in config.base_model_sequence_parallel_plan:
            plan["model." + pattern] = SequenceParallel(use_local_output=True)
        plan["model.layers.0"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                    use_local_output=True)
        # attention(hidden, position_embeddings, mask, cache): only the hidden states are laid out.
        plan["model.layers.*.self_attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                              desired_input_layouts=(Replicate(), None, None, None),
                                                              use_local_output=True)
        plan["model.layers.*.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                        use_local_output=True)
        plan["lm_head"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_output=True)
    return plan


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Shard `model` in place over the 1-D `tp_mesh`. Heads are split whole: q and kv head counts must
    divide by the TP size (each rank then runs heads / tp query and kv_heads / tp KV heads, GQA intact)."""
    tp = tp_mesh.size()
    config = model.config
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"tp_size={tp} must divide the model's {name}={getattr(config, name)}")
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model, sequence_parallel))


def data_parallel_rank(accelerator: Accelerator, tp_size: int) -> tuple[int, int]:
    """(rank, world size) of the data stream: the ranks of one TP group read the same rows."""
    if tp_size < 1 or accelerator.num_processes % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the number of processes ({accelerator.num_processes})")
    return accelerator.process_index // tp_size, accelerator.num_processes // tp_size


def _squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of tensors that may be plain (replicated), or DTensors sharded over any mesh
    dimensions (TP, FSDP2 or both): a DTensor's local sum is summed over the mesh dimensions it is
    sharded on, and partial values are reduced first. torch's get_total_norm refuses a mix of plain
    and DTensor parameters, which is what TP leaves (embeddings and norms stay plain tensors)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        if isinstance(t, DTensor):
            if any(p.is_partial() for p in t.placements):
                t = t.redistribute(placements=[Replicate() if p.is_partial() else p for p in t.placements])
            local = t.to_local().double().pow(2).sum()
            for dim, placement in enumerate(t.placements):
                # Not is_shard(): FSDP2 over a TP-sharded dim 0 places a _StridedShard, which is not a Shard
                # (measured: the 2-D norm came out 4% low with is_shard()).
                if not (placement.is_replicate() or placement.is_partial()):
                    torch.distributed.all_reduce(local, group=t.device_mesh.get_group(dim))
            total = total + local.cpu()
        else:
            total = total + t.double().pow(2).sum().cpu()
    return total


class DataParallel:
    """The model and optimizer of a run, replicated (DDP / one process) or sharded (FSDP2, TP, TP x FSDP2)."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, make_optimizer, tp_size: int = 1,
                 sequence_parallel: bool = False):
        self.accelerator = accelerator
        self.tp = tp_size
        self.dp = data_parallel_rank(accelerator, tp_size)[1]
        self.fsdp = (fsdp2_requested() and accelerator.num_processes > 1) or (tp_size > 1 and self.dp > 1)
        # accelerate's own FSDP2 when it set it up (GPU launches); by hand only where it downgraded it,
        # and always with TP (accelerate would wrap the whole world in DDP).
        self.manual = tp_size > 1 or (self.fsdp and accelerator.distributed_type != DistributedType.FSDP)
        if self.manual:
            from torch.distributed.fsdp import fully_shard

            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
            model.to(accelerator.device)
            dp_mesh = None
            if tp_size > 1:
                mesh = init_device_mesh(accelerator.device.type, (self.dp, tp_size), mesh_dim_names=("dp", "tp"))
                apply_tensor_parallel(model, mesh["tp"], sequence_parallel)
                dp_mesh = mesh["dp"]
            if self.fsdp:
                for layer in model.model.layers:
                    fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard)
                fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
            # The optimizer is built on the sharded (DTensor) parameters.
            self.model, self.optimizer = model, make_optimizer(model)
        else:
            # DDP, one process, or accelerate's FSDP2 plugin (which re-maps the optimizer's parameters
            # to the sharded ones when model and optimizer are prepared together).
            self.model, self.optimizer = accelerator.prepare(model, make_optimizer(model))

    @property
    def kind(self) -> str:
        tp = f"TP {self.tp} x DP {self.dp} " if self.tp > 1 else ""
        return tp + ("FSDP2" if self.fsdp else self.accelerator.distributed_type.value)

    def no_sync(self, last_micro_batch: bool):
        """Skip the gradient all-reduce on all but the last micro-batch (DDP). FSDP2 reduce-scatters
        every micro-batch: keeping unsharded gradients across micro-batches would undo the sharding. TP
        alone has no data-parallel reduction to skip."""
        if last_micro_batch or self.fsdp or self.tp > 1:
            return nullcontext()
        return self.accelerator.no_sync(self.model)

    def clip_grad_norm(self, max_norm: float) -> float:
        if self.tp > 1:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = float(_squared_norm(grads).sqrt())
            if norm > max_norm:  # torch's clip_grad_norm_ rule: scale by max_norm / (norm + 1e-6)
                for g in grads:
                    g.mul_(max_norm / (norm + 1e-6))
            return norm
        if self.manual:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def parameter_norm(self) -> float:
        """L2 norm of all weights (sharded ones included): a drifting norm is an early instability sign."""
        if self.tp > 1:
            return float(_squared_norm([p.detach() for p in self.model.parameters()]).sqrt())
        norm = torch.nn.utils.get_total_norm([p.detach() for p in self.model.parameters()])
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def save(self, directory: Path) -> None:
        """Model + optimizer (+ accelerate's RNG and registered objects) into `directory`."""
        self.accelerator.save_state(str(directory))
        if self.manual:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "fsdp2"))

    def load(self, directory: Path) -> None:
        self.accelerator.load_state(str(directory))
        if self.manual:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(directory / "fsdp2"))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict:
        """Unsharded weights for a Hugging Face save (complete on the main process). Collective: call on all ranks."""
        if self.manual:
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.accelerator.get_state_dict(self.model)

    def base_model(self) -> torch.nn.Module:
        return self.model if self.manual else self.accelerator.unwrap_model(self.model)
