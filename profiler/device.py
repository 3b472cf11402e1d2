"""Per-device measurements: memory and achieved dense matmul TFLOP/s.

CUDA: memory from `torch.cuda.mem_get_info` (free, total bytes), name from
`torch.cuda.get_device_name`, bf16 matmul via `torch.matmul`, fp8 (compute capability >= 8.9)
via `torch._scaled_mm` with e4m3 inputs and bf16 output. CPU fallback: memory from
/proc/meminfo (MemTotal, MemAvailable), the same bf16 matmul on the CPU, fp8 not measured.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from profiler.context import ProfileContext

GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """One rank's device."""

    name: str
    """torch.cuda.get_device_name, or the CPU model name."""
    kind: str
    """cuda | cpu."""
    memory_total_GiB: float
    memory_free_GiB: float
    tflops: dict[str, float]
    """Achieved dense matmul TFLOP/s per dtype (bf16, fp8 where supported)."""
    matmul_size: int
    """n of the n x n x n matmuls timed."""
    notes: tuple[str, ...] = field(default_factory=tuple)


def _meminfo_bytes(key: str, text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # /proc/meminfo reports kB (KiB)
    return None


def cpu_memory_GiB(meminfo: str | None = None) -> tuple[float, float]:
    """(total, available) GiB of host memory from /proc/meminfo."""
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return 0.0, 0.0
    total = _meminfo_bytes("MemTotal", meminfo) or 0
    free = _meminfo_bytes("MemAvailable", meminfo) or _meminfo_bytes("MemFree", meminfo) or 0
    return total / GiB, free / GiB


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _time_matmul(ctx: ProfileContext, run, n: int, budget_s: float) -> float:
    """TFLOP/s of `run()` (one n^3 matmul = 2 n^3 FLOP) repeated for about budget_s."""
    run()  # warm-up: kernel selection, allocator
    ctx.sync()
    start = time.perf_counter()
    run()
    ctx.sync()
    one = max(time.perf_counter() - start, 1e-6)
    iters = max(2, min(200, int(budget_s / one)))
    start = time.perf_counter()
    for _ in range(iters):
        run()
    ctx.sync()
    seconds = (time.perf_counter() - start) / iters
    return 2 * n**3 / seconds / 1e12


def bf16_tflops(ctx: ProfileContext, n: int, budget_s: float) -> float:
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    return _time_matmul(ctx, lambda: torch.matmul(a, b), n, budget_s)


def fp8_supported(ctx: ProfileContext) -> bool:
    """fp8 tensor cores: Ada/Hopper and newer (compute capability 8.9+), and a torch with fp8."""
    return (ctx.on_cuda and hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(ctx.device) >= (8, 9))


def fp8_tflops(ctx: ProfileContext, n: int, budget_s: float) -> float:
    """e4m3 x e4m3 -> bf16 via torch._scaled_mm; the second operand must be column-major."""
    a = torch.randn(n, n, device=ctx.device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=ctx.device).to(torch.float8_e4m3fn).t()  # column-major view
    one = torch.ones((), device=ctx.device, dtype=torch.float32)  # per-tensor scales
    return _time_matmul(
        ctx, lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        n, budget_s)


def measure_device(ctx: ProfileContext) -> DeviceReport:
    """Memory and matmul throughput of this rank's device (CUDA or CPU, same code path)."""
    notes: list[str] = []
    if ctx.on_cuda:
        free, total = torch.cuda.mem_get_info(ctx.device)
        name, kind = torch.cuda.get_device_name(ctx.device), "cuda"
        total_GiB, free_GiB = total / GiB, free / GiB
        n = 4096 if ctx.quick else 8192
    else:
        name, kind = cpu_name(), "cpu"
        total_GiB, free_GiB = cpu_memory_GiB()
        n = 256 if ctx.quick else 1024
        notes.append("CPU fallback: host memory shared by all ranks of the node")
    budget = 0.2 if ctx.quick else 1.0
    tflops = {"bf16": bf16_tflops(ctx, n, budget)}
    if fp8_supported(ctx):
        try:
            tflops["fp8"] = fp8_tflops(ctx, n, budget)
        except (RuntimeError, TypeError) as exc:  # older drivers/torch builds
            notes.append(f"fp8 matmul failed: {str(exc).splitlines()[0]}")
    return DeviceReport(name, kind, round(total_GiB, 3), round(free_GiB, 3), tflops, n,
                        tuple(notes))


# (substring of torch.cuda.get_device_name, excluded substrings, preset) — first match wins.
_GPU_NAME_RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("H200", (), "H200"),
    ("B200", (), "B200"),
    ("H100", ("PCIE", "NVL"), "H100-SXM"),  # PCIe/NVL parts have lower clocks: no preset
    ("MI300X", (), "MI300X"),
    ("MI250X", (), "MI250X"),
)


def match_gpu_preset(device_name: str, memory_GiB: float) -> str | None:
    """The planner/data/gpus.yaml preset for a device name, or None when none fits.

    A100s are told apart by memory (40 vs 80 GB parts share a name prefix).
    """
    upper = device_name.upper()
    if "A100" in upper:
        return "A100-80GB" if memory_GiB > 60 else "A100-40GB"
    for needle, excluded, preset in _GPU_NAME_RULES:
        if needle in upper and not any(x in upper for x in excluded):
            return preset
    return None
