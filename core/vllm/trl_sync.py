"""Weight sync from a TRL trainer into its colocated vLLM engine: the one place smolforge changes how
TRL talks to vLLM.

    class DistillTrainer(FaultInjectionMixin, ColocatedWeightSyncMixin, trl.DistillationTrainer): ...
    class GRPOTrainer(FaultInjectionMixin, ColocatedWeightSyncMixin, trl.GRPOTrainer): ...

TRL 1.16's trainers (GRPO, RLOO, distillation) generate through `trl.generation.VLLMGeneration`. In
colocate mode its `sync_weights` pushes the training weights with `model.load_weights` on the engine's
model, one parameter at a time. On vLLM's CPU backend that fails ("'Parameter' object has no attribute
'weight_loader'"): the CPU backend repacks linear weights after loading and drops their loaders
(shared/FACTS.md). What works there is the model runner's `reload_weights` with the new weights, which
re-runs vLLM's post-load processing (`core.vllm.update_weights`).

So, on a CPU platform only, `ColocatedWeightSyncMixin` replaces the trainer's
`vllm_generation.sync_weights` with `sync_colocated_weights`, which hands TRL's own parameter stream
(`VLLMGeneration._iter_named_params`: PEFT adapters merged, FSDP / ZeRO-3 parameters gathered, vLLM's
names) to `update_weights`. Everything else is TRL's: when to sync (once per optimizer step, before
generating), the prefix-cache reset, server mode (untouched), and the GPU path (TRL's `load_weights`,
which is cheaper there than a full reload).

It also sizes the colocated engine's KV cache on CPU (`VLLM_CPU_KVCACHE_SPACE`, GiB, unless already set):
without it vLLM reserves `vllm_gpu_memory_utilization` of host RAM minus the process's resident memory,
which fails or takes gigabytes on a shared machine.
"""

from __future__ import annotations

import os

from core.vllm import update_weights

# GiB of KV cache for a colocated engine on CPU: the tiny recipes need a few MiB; vLLM takes whole GiB.
CPU_KV_CACHE_GIB = "1"


def needs_reload_sync() -> bool:
    """True where TRL's colocate `load_weights` sync fails and the in-place reload is needed (CPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def sync_colocated_weights(vllm_generation) -> None:
    """Push the trainer's current weights into its colocated engine with vLLM's in-place reload.

    The replacement of `VLLMGeneration.sync_weights` for colocate mode on CPU. The parameter stream
    is TRL's (it gathers sharded parameters, which is collective: every process iterates it)."""
    update_weights(vllm_generation.llm, vllm_generation._iter_named_params())


class ColocatedWeightSyncMixin:
    """Put before the TRL trainer in a trainer subclass's bases; pass the config as `args=`.

    On a CPU platform with `use_vllm` and `vllm_mode: colocate`, the trainer's vLLM weight sync is
    `sync_colocated_weights` (module docstring); otherwise the trainer is TRL's, unchanged."""

    def __init__(self, *args, **kwargs):
        config = kwargs["args"]
        colocated_on_cpu = config.use_vllm and config.vllm_mode == "colocate" and needs_reload_sync()
        if colocated_on_cpu:
            if config.vllm_enable_sleep_mode:
                raise ValueError("vllm_enable_sleep_mode is not supported by the colocated vLLM engine on CPU "
                                 "(its weight sync reloads the weights in place); set it to false")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        super().__init__(*args, **kwargs)
        if colocated_on_cpu:
            generation = self.vllm_generation
            generation.sync_weights = lambda: sync_colocated_weights(generation)
