"""Time of the Mamba-2 mixers of hybrid models (Nemotron-H, Nemotron 3), beyond their
projections.

A Mamba-2 layer (Dao & Gu 2024, "Transformers are SSMs", Sec. 7) is an input projection to
z, x, B, C and dt, a causal depthwise convolution over x, B and C, the SSD scan, a gated
RMSNorm and an output projection. The two projections are weight GEMMs and are timed with
the layer's other GEMMs (`flops.mamba_proj_flops`); this module times the rest, which has few
FLOPs and much memory traffic: the scan's fp32 chunk states are written and re-read between
its kernels (mamba_ssm `ssd_combined`: chunk cumsum, chunk state, state passing, chunk
C·B^T, chunk scan). Nothing here is fitted: FLOPs at the GPU's bf16 GEMM rate, bytes at its
HBM rate.
"""

from __future__ import annotations

from . import compute, flops
from .specs import GpuSpec, ModelSpec

SSD_STATE_PASSES = 4
"""Times the fp32 chunk states (H·P·N per chunk) cross HBM in the SSD forward: written by
the chunk-state kernel, read and written by state passing, read by the chunk scan."""
SSD_KERNELS = 5
"""Kernels of the SSD forward (chunk cumsum, chunk state, state passing, C·B^T, chunk scan)."""
MIXER_KERNELS = 2
"""The convolution (with SiLU) and the gated RMSNorm."""
BACKWARD_FACTOR = 2.0
"""Backward over forward work of the scan, convolution and norm: gradients for inputs and
parameters, the states recomputed from the saved inputs (mamba_ssm saves no states)."""


def mixer_stream_bytes(model: ModelSpec, tokens) -> float:
    """HBM bytes of one mixer's forward elementwise and streaming work over `tokens` tokens
    (bf16, whole layer): the convolution reads and writes x, B, C; the scan reads them and
    dt (fp32 after softplus) and writes y; the gated norm reads y and z and writes its
    output; plus the chunk states, `SSD_STATE_PASSES` x 4 bytes x H·P·N per chunk."""
    conv = 2 * 2 * model.mamba_conv_channels
    scan = 2 * model.mamba_conv_channels + 4 * model.mamba_num_heads + 2 * model.mamba_inner
    norm = 3 * 2 * model.mamba_inner
    states = SSD_STATE_PASSES * 4 * model.mamba_num_heads * model.mamba_head_dim \
        * model.mamba_state_dim / model.mamba_chunk_size
    return tokens * (conv + scan + norm + states)


def mixer_times(model: ModelSpec, gpu: GpuSpec, tokens, tp):
    """(forward, backward) seconds of the Mamba-2 mixers' scan, convolution and gated norm,
    one layer and micro-batch on one GPU, averaged over the layers (`ModelSpec.mamba_share`):
    `flops.mamba_scan_flops` at the bf16 GEMM rate (the SSD kernels use tensor cores in bf16
    whatever the GEMM recipe) plus `mixer_stream_bytes` at the HBM rate; tensor parallelism
    splits the heads. 0 for models without Mamba layers."""
    if not model.mamba_layers:
        return 0.0, 0.0
    work = flops.mamba_scan_flops(model, tokens) / tp
    nbytes = mixer_stream_bytes(model, tokens) / tp
    kernels = SSD_KERNELS + MIXER_KERNELS
    fwd = compute.gemm_time(work, kernels, gpu, "bf16") + compute.memory_bound_time(nbytes, gpu)
    bwd = compute.gemm_time(BACKWARD_FACTOR * work, 2 * kernels, gpu, "bf16") \
        + compute.memory_bound_time(BACKWARD_FACTOR * nbytes, gpu)
    return model.mamba_share * fwd, model.mamba_share * bwd
