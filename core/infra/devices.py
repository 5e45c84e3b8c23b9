"""Peak figures of known accelerators, and the measured matmul peak of a CPU.

One table, used by every MFU and every "fraction of peak" this project prints (pretraining's log
line, the diagnostics report, the benches), so that they all divide by the same number and say
which one it is. The GPU figures are the vendors' dense (no 2:4 sparsity) datasheet numbers; a CPU
has no useful datasheet figure for a 2-thread box, so its peak is a matmul measured here, as the
Playbook advises for any hardware ("measure before trusting", the infrastructure chapter).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    name: str
    flops: dict[str, float]          # dtype name -> dense FLOP/s
    memory_bandwidth: float          # bytes/s of device memory (HBM)
    interconnect_bandwidth: float    # bytes/s per GPU, one direction, of NVLink (0 where there is none)
    source: str


# NVIDIA datasheets (H100 SXM5/PCIe: "NVIDIA H100 Tensor Core GPU" datasheet; H200: "NVIDIA H200"
# datasheet, same SM count and clocks as H100 SXM5 with HBM3e; A100: "NVIDIA A100 Tensor Core GPU"
# datasheet). fp32 is the non-tensor-core figure: torch's default fp32 matmul does not use TF32.
# Order matters: the first key contained in torch.cuda.get_device_name() wins ("H100 PCIe" before "H100").
_GPUS: tuple[tuple[str, DevicePeaks], ...] = (
    ("H200", DevicePeaks("NVIDIA H200", {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12,
                                         "fp8": 1979e12}, 4.8e12, 450e9, "NVIDIA H200 datasheet, dense")),
    ("H100 PCIe", DevicePeaks("NVIDIA H100 PCIe", {"fp32": 51e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12,
                                                   "fp8": 1513e12}, 2.0e12, 300e9, "NVIDIA H100 datasheet (PCIe), dense")),
    ("H100", DevicePeaks("NVIDIA H100 SXM5", {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12,
                                              "fp8": 1979e12}, 3.35e12, 450e9, "NVIDIA H100 datasheet (SXM5), dense")),
    ("A100-SXM4-40GB", DevicePeaks("NVIDIA A100 SXM4 40GB", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12,
                                                             "fp16": 312e12}, 1.555e12, 300e9,
                                   "NVIDIA A100 datasheet, dense")),
    ("A100", DevicePeaks("NVIDIA A100 80GB", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                         2.039e12, 300e9, "NVIDIA A100 datasheet, dense")),
)

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else _DTYPE_NAMES[dtype]


def gpu_peaks(device_name: str) -> DevicePeaks | None:
    """The table's row for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    for key, peaks in _GPUS:
        if key in device_name:
            return peaks
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype_key: str, device: str = "cpu", n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul on `device` with the current thread count.
    Cached per process: it is the denominator, not a benchmark (that is `python -m core.infra`)."""
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}[dtype_key]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: first call pays for allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device | str, dtype: torch.dtype | str) -> tuple[float, str]:
    """The MFU denominator for one process on `device` computing in `dtype`, and where it comes
    from (to print next to every MFU). Known GPUs: the datasheet; a CPU or an unknown GPU: a
    matmul measured now, with the thread count it will train with."""
    device = torch.device(device)
    key = dtype_name(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = gpu_peaks(name)
        if peaks and key in peaks.flops:
            return peaks.flops[key], f"{peaks.flops[key] / 1e12:.0f} TFLOP/s, {peaks.name} {key} ({peaks.source})"
        measured = measured_matmul_flops(key, str(device), n=8192)
        return measured, f"{measured / 1e12:.0f} TFLOP/s, {key} matmul measured on {name} (not in core/infra/devices.py)"
    measured = measured_matmul_flops(key)
    return measured, (f"{measured / 1e9:.0f} GFLOP/s, {key} 1024^3 matmul measured on this CPU with "
                      f"{torch.get_num_threads()} thread(s)")
