"""Kernel-time primitives: GEMMs, fused attention and memory-bound ops (seconds).

Calibrated parameters live in `GpuSpec` (`GemmEfficiency` per dtype, `hbm_efficiency`).
All functions broadcast over numpy arrays.
"""

from __future__ import annotations

from .specs import GpuSpec


def gemm_time(flops, kernels, gpu: GpuSpec, dtype: str):
    """`kernels` GEMMs totalling `flops`: flops / (max_fraction · peak · clock_fraction) +
    kernels · overhead (`GpuSpec.clock_fraction`: 1 unless the GPUs are power-capped).

    The fixed per-kernel term captures launch latency and the tail wave, which is what makes
    small (high-tp, small-batch) GEMMs less efficient than large ones.
    """
    eff = gpu.efficiency[dtype]
    rate = eff.max_fraction * gpu.peak_flops(dtype) * gpu.clock_fraction  # power cap
    return flops / rate + kernels * eff.overhead_s


def attention_time(flops, gpu: GpuSpec, dtype: str, kernels=1):
    """Fused (flash) attention of `flops` (causal count) in `kernels` launches:
    flops / (attention_fraction · peak) + kernels · overhead (ring attention launches one
    kernel per context-parallel step).

    Attention runs in bf16 even in FP8 recipes (Transformer Engine), so fp8 uses the bf16 peak.
    """
    kernel_dtype = "bf16"
    eff = gpu.efficiency[kernel_dtype]
    rate = eff.attention_fraction * gpu.peak_flops(kernel_dtype) * gpu.clock_fraction
    return flops / rate + kernels * eff.overhead_s


def memory_bound_time(nbytes, gpu: GpuSpec):
    """Element-wise kernels moving `nbytes` through HBM: nbytes / (hbm_efficiency · bandwidth)."""
    return nbytes / (gpu.hbm_efficiency * gpu.hbm_bandwidth_GBps * 1e9)
