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


def attention_time(flops, gpu: GpuSpec, dtype: str, kernels=1, flops_per_score=0,
                   matmul_passes=1.0):
    """Fused (flash) attention of `flops` forward matmul FLOPs (causal count) in `kernels`
    launches (ring attention launches one per context-parallel step), seconds:

        (matmul_passes + R / flops_per_score) · flops / (attention_fraction · peak)
        + kernels · overhead

    `matmul_passes` copies of the forward matmuls (backward: ~2.5, it recomputes Q·K^T and
    adds dV, dP, dQ, dK; Dao 2023, FA2 Sec. 3) and one softmax exponential per score in each
    pass (the backward recomputes the probabilities), R = `GpuSpec.tensor_flops_per_exp`
    tensor FLOPs' worth of time each: the SFUs, not the tensor cores, set that part. With
    R = 512 / 256 (Hopper) this gives head dim 64 0.75x the per-FLOP rate of head dim 128,
    as FlashAttention-3 measures on H100 (Shah et al. 2024, Fig. 5: 476 vs 638 TFLOP/s
    forward at 4k tokens). flops_per_score 0 (unknown) or R 0: matmuls only.

    Attention runs in bf16 even in FP8 recipes (Transformer Engine), so fp8 uses the bf16 peak.
    """
    kernel_dtype = "bf16"
    eff = gpu.efficiency[kernel_dtype]
    rate = eff.attention_fraction * gpu.peak_flops(kernel_dtype) * gpu.clock_fraction
    exp_share = gpu.tensor_flops_per_exp / flops_per_score if flops_per_score else 0.0
    return (matmul_passes + exp_share) * flops / rate + kernels * eff.overhead_s


def memory_bound_time(nbytes, gpu: GpuSpec):
    """Element-wise kernels moving `nbytes` through HBM: nbytes / (hbm_efficiency · bandwidth)."""
    return nbytes / (gpu.hbm_efficiency * gpu.hbm_bandwidth_GBps * 1e9)
