"""Hardware diagnostics and node health: measure what the machine really does, per rank.

    python -m core.infra [--quick] [--json report.json] [--data_dir DIR]
    torchrun --nproc_per_node 8 -m core.infra            # or: accelerate launch -m core.infra

"Measure the hardware before trusting it" (Smol Training Playbook, infrastructure chapter: realistic
bf16 matmul reaches 72-77% of the H100's datasheet peak, and the SmolLM3 team found two throttling
GPUs this way). Every rank measures:
- matmul throughput per dtype (fp32, bf16, and fp8 where the GPU has it: compute capability >= 8.9);
- memory bandwidth of a copy kernel (bytes read + bytes written per second, as STREAM counts a copy);
- on GPU, host<->device bandwidth from pinned and from pageable host memory;
- read throughput of a data directory (first pass: includes whatever the page cache already holds);
and all ranks together measure all-reduce and all-gather bus bandwidth from 1 KiB to 256 MiB, with
nccl-tests' definition of bus bandwidth (so the figure compares to the link's bandwidth whatever the
number of ranks): all-reduce busbw = size / time x 2(n-1)/n, all-gather busbw = size / time x (n-1)/n,
size being the full (gathered) tensor.

Each figure is divided by its peak from core/infra/devices.py (one table for the whole project). On a
CPU the matmul peak is the matmul measured by devices.py (so the fraction reads as run-to-run noise)
and bandwidths have no peak. Node health: a rank whose matmul or bandwidth figure is more than 10%
below the median of all ranks is named sick (`sick_ranks`), as one throttling GPU slows every
synchronous step of the whole job.

Plain argparse, not core.recipe: this must run on a bare GPU box where TRL is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.faults import start_slow_rank_fault
from core.infra.devices import gpu_peaks, measured_matmul_flops

KiB, MiB = 1024, 1024**2
SICK_FRACTION = 0.9  # "more than 10% below the median" (issue 21)
# Figures each rank measures alone, compared across ranks for node health (collectives are shared by
# all ranks and cannot single one out).
PER_RANK_KINDS = ("matmul", "copy", "h2d", "d2h", "data_read")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int, min_block: float = 0.05, calls: int | None = None) -> float:
    """Seconds per call, the best of `repeats` blocks of calls lasting at least `min_block` each (after
    a warm-up call): sustained throughput, so that a throttled device or a rank that must share its
    cores cannot hide behind one lucky call, while the best block still filters out passing noise.
    Collectives pass `calls`: every rank must make the same number of them."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    calls = calls or max(1, int(min_block / max(time.perf_counter() - t0, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def fp8_supported(device: torch.device) -> bool:
    """fp8 tensor cores: Ada / Hopper and later (compute capability 8.9+), and torch's scaled matmul."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            and hasattr(torch, "_scaled_mm"))


def matmul_flops(device: torch.device, dtype: str, n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs). fp8 goes through torch._scaled_mm (e4m3 inputs,
    bf16 output, unit scales) as fp8 training recipes do; the second operand must be column-major."""
    if dtype == "fp8":
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a = torch.randn(n, n, device=device, dtype=torch_dtype)
        b = torch.randn(n, n, device=device, dtype=torch_dtype)
        fn = lambda: a @ b  # noqa: E731
    return 2 * n**3 / _best_seconds(fn, device, repeats)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes/s of dst.copy_(src): each byte is read once and written once, so 2 x nbytes move."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device, repeats)


def host_device_bandwidth(device: torch.device, nbytes: int, pinned: bool, to_device: bool, repeats: int) -> float:
    """Bytes/s between host and GPU. Pageable memory goes through a staging copy in the driver, so it
    is usually well below pinned: the reason data loaders pin memory."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).fill_(1)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    fn = (lambda: gpu.copy_(host, non_blocking=pinned)) if to_device else (lambda: host.copy_(gpu))
    return nbytes / _best_seconds(fn, device, repeats)


def data_read_throughput(directory: Path, max_bytes: int) -> tuple[float, int]:
    """Bytes/s reading the files of `directory` (recursively, in 8 MiB chunks) up to max_bytes, and
    the bytes read. The first read of a file may come from the page cache: this is what training sees."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"--data_dir {directory} holds no file to read")
    total, t0 = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while total < max_bytes and (chunk := f.read(8 * MiB)):
                total += len(chunk)
        if total >= max_bytes:
            break
    return total / (time.perf_counter() - t0), total


def collective_bus_bandwidth(op: str, nbytes: int, device: torch.device, repeats: int) -> float:
    """nccl-tests' bus bandwidth of one all-reduce / all-gather of an nbytes tensor over all ranks."""
    world = dist.get_world_size()
    if op == "all_reduce":
        x = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)  # zeros: summing stays finite
        fn = lambda: dist.all_reduce(x)  # noqa: E731
        factor = 2 * (world - 1) / world
    else:
        shard = torch.zeros(max(1, nbytes // 4 // world), dtype=torch.float32, device=device)
        out = torch.empty(shard.numel() * world, dtype=torch.float32, device=device)
        fn = lambda: dist.all_gather_into_tensor(out, shard)  # noqa: E731
        factor = (world - 1) / world
    dist.barrier()
    # The same number of calls on every rank (a per-rank calibration would deadlock): enough for
    # ~64 MiB per block, at least 1, at most 20.
    seconds = _best_seconds(fn, device, repeats, calls=min(20, max(1, 64 * MiB // nbytes)))
    return nbytes / seconds * factor


def message_sizes(max_bytes: int) -> list[int]:
    """1 KiB, 4 KiB, ... (x4) up to max_bytes: latency-bound at the small end, bandwidth-bound at the top."""
    sizes, size = [], KiB
    while size <= max_bytes:
        sizes.append(size)
        size *= 4
    return sizes


def _barrier() -> None:
    """Ranks measure each figure at the same moment, so they compare like with like: a rank still in its
    matmuls would otherwise take CPU or memory bandwidth from another rank's copy."""
    if dist.is_initialized():
        dist.barrier()


def measure_rank(device: torch.device, quick: bool, data_dir: Path | None, in_step: bool = True) -> list[dict]:
    """This rank's own figures, each {kind, name, value, unit, peak, peak_source}. `in_step`: every rank of
    the process group runs this together (False when one process measures alone: preflight)."""
    sync = _barrier if in_step else (lambda: None)
    rows = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peaks = gpu_peaks(name) if device.type == "cuda" else None
    n = (2048 if quick else 8192) if device.type == "cuda" else (256 if quick else 1024)
    repeats = 3 if quick else 10
    dtypes = ["fp32", "bf16"] + (["fp8"] if fp8_supported(device) else [])
    for dtype in dtypes:
        sync()
        value = matmul_flops(device, dtype, n, repeats)
        if peaks and dtype in peaks.flops:
            peak, source = peaks.flops[dtype], f"{peaks.name} datasheet, dense"
        elif device.type == "cpu":
            # The CPU peak is the 1024^3 matmul of devices.py (cached per process), as every MFU here uses.
            peak = measured_matmul_flops(dtype)
            source = f"1024^3 matmul measured on this CPU, {torch.get_num_threads()} thread(s)"
        else:
            peak, source = None, f"{name} not in core/infra/devices.py"
        rows.append(dict(kind="matmul", name=f"matmul {dtype} {n}^3", value=value, unit="FLOP/s", peak=peak,
                         peak_source=source))
    nbytes = (64 * MiB if quick else 1024 * MiB) if device.type == "cuda" else (16 * MiB if quick else 256 * MiB)
    sync()
    rows.append(dict(kind="copy", name=f"copy {nbytes // MiB} MiB", value=copy_bandwidth(device, nbytes, repeats),
                     unit="B/s", peak=peaks.memory_bandwidth if peaks else None,
                     peak_source=f"{peaks.name} HBM" if peaks else "none on CPU"))
    if device.type == "cuda":
        h2d_bytes = 64 * MiB if quick else 256 * MiB
        for pinned in (True, False):
            for to_device in (True, False):
                sync()
                label = f"{'h2d' if to_device else 'd2h'} {'pinned' if pinned else 'pageable'} {h2d_bytes // MiB} MiB"
                rows.append(dict(kind="h2d" if to_device else "d2h", name=label,
                                 value=host_device_bandwidth(device, h2d_bytes, pinned, to_device, repeats),
                                 unit="B/s", peak=None, peak_source="PCIe/C2C link: not in the table"))
    if data_dir is not None:
        sync()
        value, read = data_read_throughput(data_dir, 256 * MiB if quick else 4096 * MiB)
        rows.append(dict(kind="data_read", name=f"read {data_dir} ({read / MiB:.0f} MiB)", value=value, unit="B/s",
                         peak=None, peak_source="storage: not in the table"))
    return rows


def measure_collectives(device: torch.device, max_bytes: int, repeats: int) -> list[dict]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peaks = gpu_peaks(name) if device.type == "cuda" else None
    rows = []
    for op in ("all_reduce", "all_gather"):
        for size in message_sizes(max_bytes):
            rows.append(dict(kind=op, name=f"{op} {human_bytes(size)}", bytes=size,
                             value=collective_bus_bandwidth(op, size, device, repeats), unit="B/s",
                             peak=peaks.interconnect_bandwidth if peaks else None,
                             peak_source=f"{peaks.name} NVLink, one direction" if peaks else "gloo: no peak"))
    return rows


def find_sick_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """Every (rank, figure) more than 10% below the median of that figure over all ranks."""
    sick = []
    for i, row in enumerate(per_rank[0]):
        if row["kind"] not in PER_RANK_KINDS:
            continue
        values = [rank_rows[i]["value"] for rank_rows in per_rank]
        median = statistics.median(values)
        for rank, value in enumerate(values):
            if value < SICK_FRACTION * median:
                sick.append(dict(rank=rank, figure=row["name"], value=value, median=median,
                                 below_median=1 - value / median))
    return sick


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def human_value(value: float, unit: str) -> str:
    if unit == "FLOP/s":
        return f"{value / 1e12:.2f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.1f} GFLOP/s"
    return f"{value / 1e9:.2f} GB/s" if value >= 1e9 else f"{value / 1e6:.1f} MB/s"


def format_report(report: dict) -> str:
    lines = [f"device: {report['device']}, {report['world_size']} rank(s), backend {report['backend']}",
             f"{'figure':<40} {'rank 0':>16} {'peak':>16} {'fraction':>9}  min..max over ranks"]
    for i, row in enumerate(report["ranks"][0] + report["collectives"]):
        peak = human_value(row["peak"], row["unit"]) if row["peak"] else "-"
        fraction = f"{row['value'] / row['peak']:.1%}" if row["peak"] else "-"
        spread = ""
        if i < len(report["ranks"][0]) and report["world_size"] > 1:
            values = [r[i]["value"] for r in report["ranks"]]
            spread = f"{human_value(min(values), row['unit'])}..{human_value(max(values), row['unit'])}"
        lines.append(f"{row['name']:<40} {human_value(row['value'], row['unit']):>16} {peak:>16} {fraction:>9}  {spread}")
    if report["world_size"] == 1:
        lines.append("collectives: one process; launch with torchrun --nproc_per_node N -m core.infra to measure them")
    if report["sick_ranks"]:
        for s in report["sick_ranks"]:
            lines.append(f"SICK rank {s['rank']}: {s['figure']} {s['below_median']:.0%} below the median of all ranks")
    else:
        lines.append("node health: no rank more than 10% below the median")
    return "\n".join(lines)


def init_distributed() -> torch.device:
    """torch.distributed from a torchrun / accelerate launch environment (gloo on CPU, NCCL on GPU);
    one process without one."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def run_diagnostics(quick: bool = False, data_dir: str | None = None, max_collective_bytes: int | None = None) -> dict:
    """Measure every rank, gather the figures, find the sick ranks. Collective: call on every rank."""
    device = init_distributed()
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    start_slow_rank_fault(rank)  # tests: a busy thread makes this rank slow (core/faults.py)
    if distributed:
        dist.barrier()  # every rank measures at the same time, as they train at the same time
    rows = measure_rank(device, quick, Path(data_dir) if data_dir else None)
    per_rank = [rows]
    collectives = []
    if distributed:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, rows)
        default_max = 4 * MiB if quick else 256 * MiB
        collectives = measure_collectives(device, max_collective_bytes or default_max, 3 if quick else 10)
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                world_size=len(per_rank), backend=dist.get_backend() if dist.is_initialized() else "none",
                torch=torch.__version__, threads=torch.get_num_threads(), quick=quick, ranks=per_rank,
                collectives=collectives, sick_ranks=find_sick_ranks(per_rank))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m core.infra", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds; preflight)")
    parser.add_argument("--json", help="write the report here as JSON (default: $OUT/infra_report.json if OUT is set)")
    parser.add_argument("--data_dir", help="also measure the read throughput of this directory")
    parser.add_argument("--max_collective_bytes", type=int, help="largest collective message (default 256 MiB; "
                        "4 MiB with --quick)")
    args = parser.parse_args(argv)
    report = run_diagnostics(args.quick, args.data_dir, args.max_collective_bytes)
    path = args.json or (str(Path(os.environ["OUT"]) / "infra_report.json") if os.environ.get("OUT") else None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(format_report(report), flush=True)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(report, indent=1))
            print(f"report written to {path}")
    return report
