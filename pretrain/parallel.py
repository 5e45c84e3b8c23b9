"""Data parallelism applied from outside the model (torchtitan's split): DDP or FSDP2.

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
"""

import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
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


class DataParallel:
    """The model and optimizer of a run, replicated (DDP / one process) or sharded (FSDP2)."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, make_optimizer):
        self.accelerator = accelerator
        self.fsdp = fsdp2_requested() and accelerator.num_processes > 1
        # accelerate's own FSDP2 when it set it up (GPU launches); by hand only where it downgraded it.
        self.manual = self.fsdp and accelerator.distributed_type != DistributedType.FSDP
        if self.manual:
            from torch.distributed.fsdp import fully_shard

            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
            model.to(accelerator.device)
            for layer in model.model.layers:
                fully_shard(layer, reshard_after_forward=reshard)
            fully_shard(model, reshard_after_forward=reshard)
            # The optimizer is built on the sharded (DTensor) parameters.
            self.model, self.optimizer = model, make_optimizer(model)
        else:
            # DDP, one process, or accelerate's FSDP2 plugin (which re-maps the optimizer's parameters
            # to the sharded ones when model and optimizer are prepared together).
            self.model, self.optimizer = accelerator.prepare(model, make_optimizer(model))

    @property
    def kind(self) -> str:
        return "FSDP2" if self.fsdp else self.accelerator.distributed_type.value

    def no_sync(self, last_micro_batch: bool):
        """Skip the gradient all-reduce on all but the last micro-batch (DDP). FSDP2 reduce-scatters
        every micro-batch: keeping unsharded gradients across micro-batches would undo the sharding."""
        return nullcontext() if last_micro_batch or self.fsdp else self.accelerator.no_sync(self.model)

    def clip_grad_norm(self, max_norm: float) -> float:
        if self.manual:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def parameter_norm(self) -> float:
        """L2 norm of all weights (sharded ones included): a drifting norm is an early instability sign."""
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
