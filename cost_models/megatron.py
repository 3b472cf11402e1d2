"""Megatron-LM-style analytic cost model (homogeneous cluster).

Step time of a 1F1B / interleaved pipeline (Narayanan et al. 2021, SC'21, Sec. 2.2):
    T = m·τ_max + (Σ_r τ_r − τ_max)/v + exposed DP reduction + optimizer
where τ_r is one micro-batch's forward + backward on pipeline rank r (its layers, TP/CP
communication, and the embedding / LM head on the first / last rank). With equal ranks this
is (m + (p−1)/v)·τ: the bubble fraction (p−1)/(v·m) of ideal compute.

`evaluate` works on a `LayoutGrid` (numpy arrays, thousands of layouts at once); `estimate`
wraps it for one `Layout`. Both give the same numbers by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import comm, compute, flops, memory
from .grid import LayoutGrid
from .specs import (
    ClusterSpec,
    Estimate,
    GiB,
    GpuSpec,
    Layout,
    MemoryBreakdown,
    ModelSpec,
    SpecError,
    TimeBreakdown,
)

DEFAULT_HEADROOM = 0.0
"""Fraction of GPU memory kept free when judging fit, on top of the buffer allowance
(memory_GiB is what torch.cuda.mem_get_info reports as total)."""

ELEMENTWISE_PASSES_OUTSIDE = 10
"""HBM passes over the h-wide activations per layer forward: two norms (read+write), two
residual adds (2 reads + 1 write each), rotary/bias/dropout traffic."""
ELEMENTWISE_PASSES_INSIDE = 3
"""HBM passes over the tensor-parallel-split activations (activation function read/write)."""
ATTENTION_BACKWARD_FACTOR = 2.5
"""Flash-attention backward costs ~2.5x its forward (it recomputes Q·K^T; Dao 2023, FA2 Sec. 3)."""
P2P_STEADY_EXPOSED = 0.5
"""Fraction of steady-state pipeline send/recv not hidden by batched isend/irecv."""
ADAM_BYTES_PER_PARAM = 30
"""Adam step HBM traffic per local parameter: read grad 4, read+write master/m/v 24, write bf16 2."""


@dataclass(frozen=True, slots=True)
class GridResult:
    """Vectorised estimate: every field an array over the grid's layouts (seconds, bytes)."""

    compute: np.ndarray
    tp_comm: np.ndarray
    cp_comm: np.ndarray
    pp_bubble: np.ndarray
    pp_p2p: np.ndarray
    dp_comm: np.ndarray
    optimizer: np.ndarray
    weights: np.ndarray
    grads: np.ndarray
    optimizer_state: np.ndarray
    activations: np.ndarray
    buffers: np.ndarray
    model_flops: float
    hardware_flops: np.ndarray

    @property
    def step_time_s(self) -> np.ndarray:
        return (self.compute + self.tp_comm + self.cp_comm + self.pp_bubble + self.pp_p2p
                + self.dp_comm + self.optimizer)

    @property
    def peak_bytes(self) -> np.ndarray:
        return self.weights + self.grads + self.optimizer_state + self.activations + self.buffers


@dataclass(frozen=True, slots=True)
class LayerTimes:
    """Per micro-batch, per layer, per GPU seconds (arrays over the grid)."""

    fwd: np.ndarray
    bwd: np.ndarray
    recompute: np.ndarray
    tp_comm: np.ndarray
    cp_comm: np.ndarray

    @property
    def compute(self) -> np.ndarray:
        return self.fwd + self.bwd + self.recompute

    @property
    def total(self) -> np.ndarray:
        return self.compute + self.tp_comm + self.cp_comm


def require_dense(model: ModelSpec) -> None:
    if model.is_moe:
        raise SpecError(
            f"model {model.name} is a mixture-of-experts model ({model.num_experts} experts); "
            "the dense cost model does not support MoE yet — choose a dense model"
        )


def _links(cluster: ClusterSpec):
    """(intra Bps, inter Bps, intra alpha, inter alpha, gpus per node) of a homogeneous cluster."""
    return (cluster.intra_node.effective_Bps, cluster.inter_node.effective_Bps,
            cluster.intra_node.latency_s, cluster.inter_node.latency_s, cluster.gpus_per_node)


def layer_times(model: ModelSpec, gpu: GpuSpec, cluster: ClusterSpec, g: LayoutGrid) -> LayerTimes:
    """Time of one transformer layer for one micro-batch on one GPU, by part."""
    intra, inter, a_intra, a_inter, gpn = _links(cluster)
    b, s, t, c = g.micro_batch_size, g.seq_len, g.tp, g.cp
    tokens = b * s / c  # tokens each GPU processes per micro-batch (CP splits the sequence)
    gemm = flops.layer_gemm_flops(model, tokens) / t
    attn = flops.attention_core_flops(model, b, s) / (t * c)  # causal; CP shares the work
    h, f = model.hidden_size, model.ffn_hidden_size
    outside = np.where(g.sequence_parallel, h / t, h)
    inside = (f * model.mlp_matrices + model.q_width + 2 * model.kv_width) / t
    elem_bytes = 2 * tokens * (ELEMENTWISE_PASSES_OUTSIDE * outside + ELEMENTWISE_PASSES_INSIDE * inside)
    attn_f, attn_b = _attention_times(model, gpu, g, attn)
    fwd = (compute.gemm_time(gemm, 4, gpu, g.dtype) + attn_f
           + compute.memory_bound_time(elem_bytes, gpu))
    bwd = (compute.gemm_time(2 * gemm, 8, gpu, g.dtype) + attn_b
           + compute.memory_bound_time(2 * elem_bytes, gpu))
    recompute = np.where(g.recompute == 2, fwd, np.where(g.recompute == 1, attn_f, 0.0))
    # TP: 2 all-reduces (or RS+AG with SP, same bytes) forward, 2 backward, 2 more when the
    # forward is recomputed; each moves the full [tokens x h] bf16 activation.
    tp_bw = comm.group_bandwidth_Bps(t, 1, gpn, intra, inter)
    tp_alpha = comm.group_latency_s(t, 1, gpn, a_intra, a_inter)
    one_ar = comm.all_reduce_time(2 * tokens * h, t, tp_bw, tp_alpha)
    tp_count = 4 + np.where(g.recompute == 2, 2, 0)
    tp_hidden = np.where(g.sequence_parallel, gpu.tp_comm_overlap, 0.0)  # TE overlap needs SP
    tp_comm = tp_count * one_ar * (1 - tp_hidden)
    # CP: ring attention passes K and V chunks around cp ranks, overlapped with attention
    # compute of the chunk in hand; backward also returns dK, dV (2x bytes).
    cp_bw = comm.group_bandwidth_Bps(c, t, gpn, intra, inter)
    cp_alpha = comm.group_latency_s(c, t, gpn, a_intra, a_inter)
    kv_chunk = 2 * 2 * b * (s / c) * model.kv_width / t
    ring_f = (c - 1) * comm.p2p_time(kv_chunk, cp_bw, cp_alpha)
    window = attn_f * (c - 1) / c
    cp_fwd = np.maximum(ring_f - window, 0.0)
    cp_bwd = np.maximum(2 * ring_f - ATTENTION_BACKWARD_FACTOR * window, 0.0)
    cp_comm = np.where(c > 1, cp_fwd * (1 + (g.recompute == 2)) + cp_bwd, 0.0)
    return LayerTimes(fwd, bwd, recompute, tp_comm, cp_comm)


def _attention_times(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid, causal_flops):
    """(forward, backward) seconds of the attention core for one layer and micro-batch.

    Fused (flash) kernels skip masked blocks: causal FLOPs at the attention efficiency.
    Unfused (pre-2022 Megatron-LM): Q·K^T and scores·V are batched GEMMs over the full s x s
    square (twice the causal FLOPs), and the score tensor goes through HBM for scale+mask,
    softmax and dropout: ~11 bytes per score forward (write 2, softmax read 2 + write 2,
    dropout mask 1 + output 2, read 2 for scores·V) and twice that backward.
    """
    fused_f = compute.attention_time(causal_flops, gpu, g.dtype)
    scores = model.num_heads * g.micro_batch_size * g.seq_len * (g.seq_len / g.cp) / g.tp
    unfused_f = (compute.gemm_time(2 * causal_flops, 2, gpu, g.dtype)
                 + compute.memory_bound_time(11 * scores, gpu))
    unfused_b = (compute.gemm_time(4 * causal_flops, 4, gpu, g.dtype)
                 + compute.memory_bound_time(22 * scores, gpu))
    return (np.where(g.flash_attention, fused_f, unfused_f),
            np.where(g.flash_attention, ATTENTION_BACKWARD_FACTOR * fused_f, unfused_b))


def head_time(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid) -> np.ndarray:
    """LM head + cross entropy + final norm, forward and backward, one micro-batch (last rank)."""
    tokens = g.micro_batch_size * g.seq_len / g.cp
    gemm = flops.lm_head_flops(model, tokens) / g.tp
    logits = tokens * model.vocab_size / g.tp * 4  # fp32 logits
    return (compute.gemm_time(3 * gemm, 3, gpu, g.dtype)
            + compute.memory_bound_time(5 * logits + 6 * tokens * model.hidden_size, gpu))


def embedding_time(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid) -> np.ndarray:
    """Embedding lookup forward and its gradient scatter backward, one micro-batch (first rank)."""
    tokens = g.micro_batch_size * g.seq_len / g.cp
    return compute.memory_bound_time(3 * 2 * tokens * model.hidden_size, gpu)


def rank_params(model: ModelSpec, g: LayoutGrid, layers: np.ndarray, first: bool, last: bool):
    """Parameters held by one GPU of a pipeline rank with `layers` layers (`first`/`last`:
    boolean arrays, whether the rank holds the embedding / the LM head)."""
    table = model.vocab_size * model.hidden_size / g.tp
    params = layers * memory.layer_params(model) / g.tp + np.where(first, table, 0.0)
    # The last rank holds the LM head (a copy of the embedding when tied and pp > 1).
    head = np.where(model.tied_embeddings & (g.pp == 1), 0.0, table) + model.hidden_size
    return params + np.where(last, head, 0.0)


def evaluate(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid) -> GridResult:
    """Step time and peak memory of every layout in `g` (vectorised)."""
    require_dense(model)
    gpu = cluster.gpu
    intra, inter, a_intra, a_inter, gpn = _links(cluster)
    lt = layer_times(model, gpu, cluster, g)
    m, p, v = g.num_microbatches, g.pp, g.vp
    head, emb = head_time(model, gpu, g), embedding_time(model, gpu, g)
    single = p == 1
    # τ per rank kind (first, last, busiest middle); with pp == 1 one rank has both ends.
    tau_first = g.layers_first * lt.total + emb + np.where(single, head, 0.0)
    tau_last = np.where(single, tau_first, g.layers_last * lt.total + head)
    tau_mid = g.layers_mid * lt.total
    taus = np.stack([tau_first, tau_last, tau_mid])
    crit = np.argmax(taus, axis=0)
    tau_max = np.max(taus, axis=0)
    layers_crit = np.choose(crit, [g.layers_first, g.layers_last, g.layers_mid])
    ends_crit = np.choose(crit, [emb + np.where(single, head, 0.0), head, np.zeros_like(head)])
    # Σ_r τ_r = all layers + both ends (pp == 1: the single rank's τ).
    tau_sum = np.where(single, tau_first, model.num_layers * lt.total + emb + head)
    bubble = (tau_sum - tau_max) / v
    # Pipeline p2p: activation of one micro-batch (split over tp: Megatron's scatter/gather).
    pp_stride = g.tp * g.cp * g.dp
    pp_bw = comm.group_bandwidth_Bps(2, pp_stride, gpn, intra, inter)
    pp_bw = np.where(pp_stride >= gpn, inter, pp_bw)  # each GPU sends over its own NIC
    pp_alpha = comm.group_latency_s(2, pp_stride, gpn, a_intra, a_inter)
    hop = comm.p2p_time(2 * g.micro_batch_size * g.seq_len / g.cp * model.hidden_size / g.tp,
                        pp_bw, pp_alpha)
    p2p = np.where(single, 0.0, 2 * (p - 1) * hop + 2 * m * v * hop * P2P_STEADY_EXPOSED)
    dp_exposed, opt_time, mem = _dp_optimizer_memory(model, cluster, gpu, g, lt, emb, head)
    return GridResult(
        compute=m * (layers_crit * lt.compute + ends_crit),
        tp_comm=m * layers_crit * lt.tp_comm, cp_comm=m * layers_crit * lt.cp_comm,
        pp_bubble=bubble, pp_p2p=p2p, dp_comm=dp_exposed, optimizer=opt_time, **mem,
        model_flops=float(flops.model_flops_per_step(model, 1, g.seq_len)),
        hardware_flops=_hardware_flops(model, g),
    )


def _hardware_flops(model: ModelSpec, g: LayoutGrid) -> np.ndarray:
    """Per-sequence hardware FLOPs by recompute code (scaled by gbs when reported)."""
    by_code = np.array([flops.hardware_flops_per_step(model, 1, g.seq_len, k)
                        for k in ("none", "selective", "full")], dtype=float)
    return by_code[g.recompute]


def _dp_optimizer_memory(model, cluster, gpu, g, lt, emb, head):
    """Exposed DP reduction, optimizer time and the memory breakdown of the fullest rank."""
    intra, inter, a_intra, a_inter, gpn = _links(cluster)
    # Megatron-LM reduces gradients over the data-parallel x context-parallel group.
    dpc = g.dp * g.cp
    dp_bw = comm.group_bandwidth_Bps(dpc, g.tp, gpn, intra, inter)
    dp_alpha = comm.group_latency_s(dpc, g.tp, gpn, a_intra, a_inter)
    p = g.pp
    kinds = (  # (layers, first?, last?, in-flight rank index)
        (g.layers_first, True, False, 0),
        (g.layers_last, False, True, p - 1),
        (g.layers_mid, False, False, np.minimum(1, p - 1)),
    )
    fp8 = g.dtype == "fp8"
    per_layer_act = memory.activation_bytes_per_layer(
        model, g.micro_batch_size, g.seq_len, g.tp, g.cp, g.sequence_parallel, g.recompute,
        g.flash_attention, fp8)
    full_layer_act = memory.activation_bytes_per_layer(
        model, g.micro_batch_size, g.seq_len, g.tp, g.cp, g.sequence_parallel, "none",
        g.flash_attention, fp8)
    best = None
    for layers, first, last, rank in kinds:
        first = first | (p == 1)
        last = last | (p == 1)
        params = rank_params(model, g, layers, first, last)
        grad_bytes = params * memory.GRAD_BYTES
        comm_s = np.where(
            g.distributed_optimizer,
            comm.reduce_scatter_time(grad_bytes, dpc, dp_bw, dp_alpha)
            + comm.all_gather_time(params * memory.WEIGHT_BYTES, dpc, dp_bw, dp_alpha),
            comm.all_reduce_time(grad_bytes, dpc, dp_bw, dp_alpha))
        window = layers * lt.compute + np.where(first, emb, 0.0) + np.where(last, head, 0.0)
        exposed = np.where(layers > 0, comm.overlapped(comm_s, window, gpu.dp_comm_overlap), 0.0)
        local_opt = params / np.where(g.distributed_optimizer, dpc, 1)
        opt = compute.memory_bound_time(ADAM_BYTES_PER_PARAM * local_opt, gpu)
        inflight = memory.inflight_microbatches(p, g.vp, g.num_microbatches, rank)
        act = per_layer_act * layers * inflight
        act = act + np.where(g.recompute > 0, full_layer_act - per_layer_act, 0.0)  # rematerialised layer
        act = act + np.where(first, memory.embedding_output_bytes(
            model, g.micro_batch_size, g.seq_len, g.tp, g.cp, g.sequence_parallel) * inflight, 0.0)
        act = act + np.where(last, memory.logits_bytes(
            model, g.micro_batch_size, g.seq_len, g.tp, g.cp), 0.0)
        act = np.where(layers > 0, act, 0.0)
        mem = dict(
            weights=params * (memory.WEIGHT_BYTES + (memory.FP8_EXTRA_WEIGHT_BYTES if fp8 else 0)),
            grads=grad_bytes, optimizer_state=local_opt * memory.OPTIMIZER_BYTES,
            activations=act, buffers=memory.BUFFER_FIXED_BYTES + memory.FRAGMENTATION * act,
        )
        total = sum(mem.values())
        if best is None:
            best = (exposed, opt, mem, total)
            continue
        take = total > best[3]
        best = (np.maximum(best[0], exposed), np.maximum(best[1], opt),
                {k: np.where(take, mem[k], best[2][k]) for k in mem}, np.maximum(total, best[3]))
    return best[0], best[1], best[2]


def capacity_GiB(gpu: GpuSpec, headroom: float = DEFAULT_HEADROOM) -> float:
    return gpu.memory_GiB * (1 - headroom)


def estimate(model: ModelSpec, cluster: ClusterSpec, layout: Layout,
             headroom: float = DEFAULT_HEADROOM) -> Estimate:
    """Predict one layout (validated first; SpecError explains what is wrong)."""
    require_dense(model)
    layout.validate(model, cluster.world_size)
    gpu = cluster.gpu
    r = evaluate(model, cluster, LayoutGrid.from_layout(layout, model.num_layers))
    return result_estimate(r, 0, layout, gpu, headroom)


def result_estimate(r: GridResult, i: int, layout: Layout, gpu: GpuSpec,
                    headroom: float = DEFAULT_HEADROOM, cost_model: str = "megatron") -> Estimate:
    """Row i of a GridResult as an Estimate."""
    time = TimeBreakdown(*(float(getattr(r, k)[i]) for k in
                           ("compute", "tp_comm", "cp_comm", "pp_bubble", "pp_p2p", "dp_comm",
                            "optimizer")))
    mem = MemoryBreakdown(*(float(getattr(r, k)[i]) for k in
                            ("weights", "grads", "optimizer_state", "activations", "buffers")))
    gbs = layout.global_batch_size
    return Estimate(
        layout=layout, time=time, memory=mem, capacity_GiB=capacity_GiB(gpu, headroom),
        model_flops=r.model_flops * gbs, hardware_flops=float(r.hardware_flops[i]) * gbs,
        peak_flops_per_gpu=gpu.peak_flops(layout.dtype), cost_model=cost_model,
    )


def fits_mask(r: GridResult, gpu: GpuSpec, headroom: float = DEFAULT_HEADROOM) -> np.ndarray:
    return r.peak_bytes <= capacity_GiB(gpu, headroom) * GiB
