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

from dataclasses import dataclass, fields, replace
from functools import cache

import numpy as np

from . import comm, compute, flops, layer_mix, mamba, memory, recompute_modules, schedules
from .dims import Group
from .grid import LayoutGrid
from .layer_mix import LayerMix, RankLayers
from .simulator import interleaved_stall_layers
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
    even_split,
)

DEFAULT_HEADROOM = 0.0
"""Fraction of GPU memory kept free when judging fit, on top of the buffer allowance
(memory_GiB is what torch.cuda.mem_get_info reports as total)."""

ELEMENTWISE_PASSES_OUTSIDE = 10
"""HBM passes over the h-wide activations per layer forward: two norms (read+write), two
residual adds (2 reads + 1 write each), rotary/bias/dropout traffic."""
ELEMENTWISE_PASSES_INSIDE = 3
"""HBM passes over the tensor-parallel-split activations (activation function read/write)."""
EAGER_EXTRA_PASSES_OUTSIDE = 45
"""torchtitan without torch.compile: extra HBM passes over the h-wide activations per layer
forward against the fused kernels of `ELEMENTWISE_PASSES_OUTSIDE`, counted from the eager ops
(bf16 units; an fp32 tensor is two): each composite RMSNorm upcasts, squares, means, scales,
downcasts and multiplies by its weight (~18 passes against 2 fused, x2 norms = +32), and the
complex-multiply rotary embedding of q and k upcasts, multiplies and downcasts (~10 passes
over q + k, ~1.25 h for 8 query per KV head: +12.5). Backward takes twice the forward's."""
EAGER_EXTRA_PASSES_INSIDE = 2
"""... and over the MLP's inner width f: eager SwiGLU runs silu (read, write) and the product
(2 reads, 1 write) as two kernels, 5 passes against 3 fused."""
ATTENTION_BACKWARD_FACTOR = 2.5
"""Flash-attention backward costs ~2.5x its forward (it recomputes Q·K^T; Dao 2023, FA2 Sec. 3)."""
P2P_STEADY_EXPOSED = 0.5
"""Fraction of steady-state pipeline send/recv not hidden by batched isend/irecv."""
MOE_PERMUTE_PASSES = 4
"""HBM passes over each routed token copy per MoE layer forward: permute (read, write) and
unpermute (read, write) around the expert GEMMs (Megatron-Core token dispatcher)."""
FP8_CAST_BYTES = {"fp8": 3.0, "mxfp8": 1.0 + 1 / 32}
"""Extra HBM bytes per GEMM-input element to quantise it, forward (and the same for the output
gradients backward), beyond what the producing kernel writes anyway. fp8 with per-tensor
current scaling: the producer (norm, activation) computes the amax, then a separate cast reads
the bf16 tensor (2) and writes fp8 (1): the scale is known only after the whole tensor. mxfp8:
the producer writes the row-wise blocks directly (scales are local), plus a column-wise copy
with its per-32-element scales (1 + 1/32), because the backward GEMMs contract the other
dimension (Transformer Engine MXFP8BlockScaling; OCP MX spec v1.0)."""
ADAM_BYTES_PER_PARAM = 30
"""Adam step HBM traffic per local parameter: read grad 4, read+write master/m/v 24, write bf16 2."""


@dataclass(frozen=True, slots=True)
class GridResult:
    """Vectorised estimate: every field an array over the grid's layouts (seconds, bytes)."""

    compute_s: np.ndarray
    tp_comm_s: np.ndarray
    cp_comm_s: np.ndarray
    ep_comm_s: np.ndarray
    pp_bubble_s: np.ndarray
    pp_p2p_s: np.ndarray
    dp_comm_s: np.ndarray
    optimizer_step_s: np.ndarray
    weights_bytes: np.ndarray
    grads_bytes: np.ndarray
    optimizer_state_bytes: np.ndarray
    activations_bytes: np.ndarray
    buffers_bytes: np.ndarray
    model_flops: float
    hardware_flops: np.ndarray
    unsharded_inflight_bytes: np.ndarray | float = 0.0
    """FSDP: all-gathered parameters and unsharded gradients alive at the peak."""

    def take(self, index) -> GridResult:
        """The rows `index` (integer array or mask)."""
        return replace(self, **{f.name: np.broadcast_to(getattr(self, f.name), self.compute_s.shape)[index]
                                for f in fields(self) if f.name != "model_flops"})

    @staticmethod
    def stack(parts: list[GridResult]) -> GridResult:
        """The rows of `parts`, in order (grid-wide `model_flops`: the first part's)."""
        sizes = [len(p.compute_s) for p in parts]
        return replace(parts[0], **{
            f.name: np.concatenate([np.broadcast_to(getattr(p, f.name), (n,))
                                    for p, n in zip(parts, sizes, strict=True)])
            for f in fields(GridResult) if f.name != "model_flops"})

    @property
    def step_time_s(self) -> np.ndarray:
        return (self.compute_s + self.tp_comm_s + self.cp_comm_s + self.pp_bubble_s + self.pp_p2p_s
                + self.dp_comm_s + self.optimizer_step_s + self.ep_comm_s)

    @property
    def peak_bytes(self) -> np.ndarray:
        return (self.weights_bytes + self.grads_bytes + self.optimizer_state_bytes
                + self.activations_bytes + self.buffers_bytes + self.unsharded_inflight_bytes)

    def time_row(self, i: int) -> TimeBreakdown:
        """Row i's step-time parts (fields matched by name)."""
        return TimeBreakdown(**{f.name: float(getattr(self, f.name)[i]) for f in fields(TimeBreakdown)})

    def memory_row(self, i: int) -> MemoryBreakdown:
        """Row i's memory parts (fields matched by name)."""
        return MemoryBreakdown(**{f.name: float(getattr(self, f.name)[i])
                                  for f in fields(MemoryBreakdown)})


@dataclass(frozen=True, slots=True)
class LayerTimes:
    """Per micro-batch, per layer, per GPU seconds (arrays over the grid)."""

    fwd_s: np.ndarray
    bwd_s: np.ndarray
    recompute_s: np.ndarray
    tp_comm_s: np.ndarray
    cp_comm_s: np.ndarray
    ep_comm_s: np.ndarray | float = 0.0
    """Expert-parallel all-to-all (MoE), averaged over layers."""

    @property
    def compute_s(self) -> np.ndarray:
        return self.fwd_s + self.bwd_s + self.recompute_s

    @property
    def total_s(self) -> np.ndarray:
        return self.compute_s + self.tp_comm_s + self.cp_comm_s + self.ep_comm_s


def require_dense(model: ModelSpec) -> None:
    """For cost models without MoE or hybrid (Mamba) support (pipette, holmes)."""
    if model.layer_pattern:
        raise SpecError(f"model {model.name} is a hybrid ({model.mamba_layers} Mamba, "
                        f"{model.attention_layers} attention layers); the heterogeneous cost "
                        "models do not support it — use --cost-model megatron")
    if model.is_moe:
        raise SpecError(
            f"model {model.name} is a mixture-of-experts model ({model.num_experts} experts); "
            "the heterogeneous cost models do not support MoE yet — use --cost-model megatron"
        )


@dataclass(frozen=True, slots=True)
class Links:
    """A homogeneous cluster's link classes, as the collectives of a group see them: NVLink
    inside a node, the NVLink domain's link between nodes of one domain (GB200 NVL72: 18 trays
    of 4 GPUs on one switch fabric), NICs across domains. With one node per domain (DGX) the
    middle level is the node itself."""

    intra_Bps: float
    inter_Bps: float
    intra_latency_s: float
    inter_latency_s: float
    gpus_per_node: int
    domain_gpus: int = 0
    """GPUs of one NVLink domain (0: one node)."""
    domain_Bps: float = 0.0
    """Achieved bandwidth between nodes of one domain (0: intra_Bps)."""
    domain_latency_s: float = 0.0
    world_gpus: int = 0
    """GPUs of the cluster (a group straddles domains only if there is more than one)."""

    @classmethod
    def of(cls, cluster: ClusterSpec) -> Links:
        dom = cluster.domain_link_spec
        return cls(cluster.intra_node.effective_Bps, cluster.inter_node.effective_Bps,
                   cluster.intra_node.latency_s, cluster.inter_node.latency_s,
                   cluster.gpus_per_node, cluster.domain_gpus,
                   min(dom.effective_Bps, cluster.intra_node.effective_Bps), dom.latency_s,
                   cluster.world_size)

    def _straddle(self, group: Group):
        """(crosses, k): whether the slowest instance of the group leaves its NVLink domain,
        and how many members it has on its smaller side there. The instances of a (size,
        stride) group tile blocks of size·stride ranks; a block larger than a domain always
        leaves it (k = the members one domain holds), and when a domain is not a whole number
        of blocks some block straddles a domain boundary (k = the members of the remainder),
        e.g. cp4 at stride 4 (16-GPU blocks) in a 72-GPU rack: 64..79 has 2 members in each
        rack. Only for domains larger than a node (node-level blocks of power-of-two degrees
        divide a DGX node; that level keeps `comm.spans_nodes`)."""
        dom = self.domain_gpus
        size = np.maximum(group.size, 1)
        stride = np.maximum(group.stride, 1)
        foot = size * stride
        beyond = foot > dom
        split = (dom % foot != 0) & (self.world_gpus > dom) & (size > 1)
        k = np.where(beyond, np.clip(dom // stride, 1, size),
                     np.clip((dom % foot) // stride, 1, size))
        return beyond | split, k

    @property
    def _domain(self) -> tuple[int, float, float]:
        if self.domain_gpus <= self.gpus_per_node:
            return self.gpus_per_node, self.intra_Bps, self.intra_latency_s
        return self.domain_gpus, self.domain_Bps, self.domain_latency_s

    def bandwidth_Bps(self, group: Group):
        """Inside a node: NVLink; across nodes of one domain: the domain link; across
        domains: the NICs the group's members in one domain drive (`comm.group_bandwidth_Bps`)."""
        dom_gpus, dom_Bps, _ = self._domain
        if dom_gpus > self.gpus_per_node:  # a domain of several nodes: the slowest instance
            crosses, k = self._straddle(group)
            outer = np.where(crosses, np.minimum(dom_Bps, k * self.inter_Bps), dom_Bps)
        else:
            outer = comm.group_bandwidth_Bps(group.size, group.stride, dom_gpus, dom_Bps,
                                             self.inter_Bps)
        return np.where(comm.spans_nodes(group.size, group.stride, self.gpus_per_node),
                        outer, self.intra_Bps)

    def latency_s(self, group: Group):
        dom_gpus, _, dom_alpha = self._domain
        if dom_gpus > self.gpus_per_node:
            outer = np.where(self._straddle(group)[0], self.inter_latency_s, dom_alpha)
        else:
            outer = comm.group_latency_s(group.size, group.stride, dom_gpus, dom_alpha,
                                         self.inter_latency_s)
        return np.where(comm.spans_nodes(group.size, group.stride, self.gpus_per_node),
                        outer, self.intra_latency_s)

    def all_to_all_s(self, nbytes, group: Group, dedup_top_k=None):
        """`comm.all_to_all_time` over these links (`dedup_top_k`: a node-deduplicating
        dispatcher's NIC share, `comm.node_dedup_scale`)."""
        dom_gpus, dom_Bps, dom_alpha = self._domain
        if dom_gpus > self.gpus_per_node:
            # The straddling instance: its k members on the small side send (n - k)/n of
            # their bytes over the NICs; the others stay on the domain's NVLink.
            crosses, k = self._straddle(group)
            n = np.maximum(group.size, 1)
            k = np.where(crosses, k, n)
            nic = 1.0 if dedup_top_k is None else comm.node_dedup_scale(dedup_top_k, n / k)
            wire = nbytes / n * ((n - k) * nic / self.inter_Bps + (k - 1) / dom_Bps)
            alpha = np.where(crosses, self.inter_latency_s, dom_alpha)
            return np.where(n > 1, wire + np.log2(n) * alpha, 0.0)
        return comm.all_to_all_time(nbytes, group.size, group.stride, dom_gpus, dom_Bps,
                                    self.inter_Bps, dom_alpha, self.inter_latency_s, dedup_top_k)

    def hop_Bps(self, stage_size, pp):
        """Bandwidth of the slowest pipeline hop between stages `stage_size` ranks apart: a
        NIC when stages sit on different nodes and the pipeline leaves the NVLink domain
        (with one node per domain: stride >= a node, as before), the domain link when it
        stays in one domain, else NVLink inside the node."""
        dom_gpus, dom_Bps, _ = self._domain
        pair = Group(2, stage_size)
        inside = self.bandwidth_Bps(pair)
        if dom_gpus == self.gpus_per_node:
            return np.where(stage_size >= self.gpus_per_node, self.inter_Bps, inside)
        # Some stage boundary is a domain boundary when the pipeline spans several domains
        # (stage blocks need not align with racks: 72 = 2.25 x 32).
        leaves = (stage_size >= self.gpus_per_node) & (stage_size * pp > dom_gpus)
        return np.where(leaves, self.inter_Bps,
                        np.where(stage_size >= self.gpus_per_node, dom_Bps, inside))


@dataclass(frozen=True, slots=True)
class LayerBase:
    """The parts of `layer_times` that no recompute choice changes (arrays over the grid)."""

    tokens: np.ndarray
    """Tokens each GPU processes per micro-batch."""
    fwd_s: np.ndarray
    bwd_s: np.ndarray
    attn_f: np.ndarray
    """Attention core forward (Megatron's default selective recompute redoes it)."""
    experts_f: np.ndarray | float
    titan_sel_s: np.ndarray
    """torchtitan's per-op selective AC recompute."""
    offload_s: np.ndarray | float
    """Activation offload's exposed transfer (`_offload_exposed_s`)."""
    one_ar_s: np.ndarray
    """One TP all-reduce of the layer's activation."""
    tp_hidden: np.ndarray
    """Share of the TP communication overlapped with compute."""
    cp_fwd_s: np.ndarray
    cp_bwd_s: np.ndarray
    ep_one_s: np.ndarray | None
    """One all-to-all of the routed token copies (None for dense models)."""


def layer_base(model: ModelSpec, gpu: GpuSpec, cluster: ClusterSpec, g: LayoutGrid) -> LayerBase:
    """`LayerBase` of every layout in `g` (the terms are explained in `layer_times`)."""
    links = Links.of(cluster)
    b, s, t, c = g.micro_batch_size, g.seq_len, g.tp, g.cp
    tokens = b * s / c  # tokens each GPU processes per micro-batch (CP splits the sequence)
    routed = routed_expert_flops(model, tokens) / t  # per GPU, whatever etp (see below)
    gemm = flops.layer_gemm_flops(model, tokens) / t - routed
    attn = flops.attention_core_flops(model, b, s) / (t * c)  # causal; CP shares the work
    h = model.hidden_size
    outside = np.where(g.sequence_parallel, h / t, h)
    inside = (model.active_ffn_width * model.mlp_matrices + model.qkv_width * model.attention_share) / t
    passes_outside = ELEMENTWISE_PASSES_OUTSIDE * model.blocks_per_layer / 2  # per 2 blocks
    elem_bytes = 2 * tokens * (passes_outside * outside + ELEMENTWISE_PASSES_INSIDE * inside)
    if model.is_moe:  # permute before and unpermute after the experts: read + write each copy
        elem_bytes = elem_bytes + (model.num_moe_layers / model.num_layers) * MOE_PERMUTE_PASSES \
            * 2 * tokens * model.experts_top_k * h
    eager = g.titan & (not g.torch_compile)
    elem_bytes = elem_bytes + np.where(eager, 2 * tokens * (
        EAGER_EXTRA_PASSES_OUTSIDE * outside + (EAGER_EXTRA_PASSES_INSIDE if model.gated_mlp else 0)
        * model.active_ffn_width / t), 0.0)
    if g.dtype in FP8_CAST_BYTES:  # QKV and MLP inputs (h wide), projection and down inputs
        gemm_inputs = tokens * (2 * h + (model.attn_out_width + model.active_ffn_width) / t)
        if model.layer_pattern:  # one h-wide module input per layer
            gemm_inputs = tokens * (h + (model.attn_out_width * model.attention_share
                                         + model.mamba_inner * model.mamba_share
                                         + model.active_ffn_width) / t)
        elem_bytes = elem_bytes + FP8_CAST_BYTES[g.dtype] * gemm_inputs
    attn_f, attn_b = _attention_times(model, gpu, g, attn)
    experts_f, experts_b = expert_gemm_times(model, gpu, g, tokens, routed)
    mamba_f, mamba_b = mamba.mixer_times(model, gpu, tokens, t)
    kernels = 2 * model.blocks_per_layer  # weight GEMMs per layer: 2 per module
    fwd = (compute.gemm_time(gemm, kernels, gpu, g.dtype) + attn_f + experts_f + mamba_f
           + compute.memory_bound_time(elem_bytes, gpu))
    bwd = (compute.gemm_time(2 * gemm, 2 * kernels, gpu, g.dtype) + attn_b + experts_b + mamba_b
           + compute.memory_bound_time(2 * elem_bytes, gpu))
    # torchtitan's per-op selective AC keeps every other matmul output (SDPA saved): backward
    # recomputes the others (`memory.titan_sac_bytes_per_layer`) plus the elementwise ops.
    titan_sel = compute.gemm_time(gemm * titan_sac_recomputed_share(model), 4, gpu, g.dtype) \
        + compute.memory_bound_time(elem_bytes, gpu)
    tpg, cpg = g.dims.group("tp"), g.dims.group("cp")
    tp_bw, tp_alpha = links.bandwidth_Bps(tpg), links.latency_s(tpg)
    one_ar = comm.all_reduce_time(2 * tokens * h, t, tp_bw, tp_alpha)
    tp_hidden = np.where(g.sequence_parallel, gpu.tp_comm_overlap, 0.0)  # TE overlap needs SP
    # torchtitan has no userbuffer overlap; its async TP pipelines the collectives with the
    # matmuls, taken to hide as much as TE does on this GPU (an assumption)
    tp_hidden = np.where(g.titan,
                         gpu.tp_comm_overlap if g.async_tp else 0.0, tp_hidden)
    # CP: ring attention passes K and V chunks around cp ranks, overlapped with attention
    # compute of the chunk in hand; backward also returns dK, dV (2x bytes).
    cp_bw, cp_alpha = links.bandwidth_Bps(cpg), links.latency_s(cpg)
    # K and V of the local chunk (MLA: the decompressed per-head keys and values).
    kv_chunk = 2 * 2 * b * (s / c) * model.kv_width / t if not model.is_mla \
        else 2 * b * (s / c) * model.num_heads * (model.head_dim + model.value_head_dim) / t
    ring_f = (c - 1) * comm.p2p_time(kv_chunk, cp_bw, cp_alpha) * model.attention_share
    window = attn_f * (c - 1) / c
    cp_fwd = np.maximum(ring_f - window, 0.0)
    cp_bwd = np.maximum(2 * ring_f - ATTENTION_BACKWARD_FACTOR * window, 0.0)
    return LayerBase(tokens, fwd, bwd, attn_f, experts_f, titan_sel,
                     _offload_exposed_s(model, gpu, g, fwd, bwd), one_ar, tp_hidden, cp_fwd,
                     cp_bwd, _ep_all_to_all_s(model, cluster, g, tokens))


def layer_times(model: ModelSpec, gpu: GpuSpec, cluster: ClusterSpec, g: LayoutGrid,
                variants: int = 1) -> LayerTimes:
    """Time of one transformer layer for one micro-batch on one GPU, by part. `variants`: runs
    of recompute variants of one layout (`evaluate`); `layer_base` is computed once per run."""
    if variants == 1:
        base = layer_base(model, gpu, cluster, g)
    else:
        base = _repeat_rows(layer_base(model, gpu, cluster, g.take(slice(None, None, variants))),
                            variants)
    fwd, bwd = base.fwd_s, base.bwd_s
    selective = np.where(g.titan, base.titan_sel_s,
                         _module_recompute_s(model, gpu, g, base.tokens, base.attn_f,
                                             base.experts_f))
    recompute = np.where(g.recompute == 2, fwd, np.where(g.recompute == 1, selective, 0.0))
    recompute = recompute + base.offload_s
    # TP: 2 all-reduces (or RS+AG with SP, same bytes) forward, 2 backward, 2 more when the
    # forward is recomputed; each moves the full [tokens x h] bf16 activation. A parallel
    # attention+MLP block sums both branches before one all-reduce per pass (PaLM Sec. 2).
    passes = 2 + np.where(g.recompute == 2, 1, 0)  # forward, backward, recomputed forward
    tp_count = (1 if model.parallel_attention_mlp else model.blocks_per_layer) * passes
    tp_comm = tp_count * base.one_ar_s * (1 - base.tp_hidden)
    cp_comm = np.where(g.cp > 1, base.cp_fwd_s * (1 + (g.recompute == 2)) + base.cp_bwd_s, 0.0)
    # a recomputed MoE layer (--recompute-modules moe) dispatches and combines again
    ep_passes = passes + ((g.recompute == 1) & _has_module(g, "moe"))
    return LayerTimes(fwd_s=fwd, bwd_s=bwd, recompute_s=recompute, tp_comm_s=tp_comm,
                      cp_comm_s=cp_comm,
                      ep_comm_s=_ep_comm_s(model, cluster, g, base.ep_one_s, ep_passes))


def _offload_exposed_s(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid, fwd_s, bwd_s):
    """Activation offload's exposed transfer per layer and micro-batch (averaged over the
    layers, counted with recompute): each offloaded layer's activations go to the host while
    the next layers compute forward and come back while the later ones compute backward, over
    `GpuSpec.host_link_GBps`; only what one layer's compute cannot hide shows."""
    offload = g.column("offload_activation_layers")
    if not np.any(offload):
        return 0.0
    fp8 = g.dtype if g.dtype in FP8_CAST_BYTES else False
    nbytes = memory.activation_bytes_per_layer(model, g.micro_batch_size, g.seq_len, g.tp, g.cp,
                                               g.sequence_parallel, "none", g.flash_attention,
                                               fp8, g.etp)
    move_s = nbytes / (gpu.host_link_GBps * 1e9)
    exposed = np.maximum(move_s - fwd_s, 0.0) + np.maximum(move_s - bwd_s, 0.0)
    return exposed * offload / model.num_layers


def _has_module(g: LayoutGrid, name: str) -> np.ndarray:
    return (g.column("recompute_modules") & recompute_modules.BIT[name]) != 0


def _module_recompute_s(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid, tokens, attn_f,
                        experts_f):
    """Megatron selective recompute, one layer and micro-batch: the forward of every module
    in `Layout.recompute_modules` again (`recompute_modules.recompute_parts`): the attention
    core (default), the dense-MLP / shared-expert / router / MLA up-projection GEMMs, the
    routed experts (moe), and the norms' and activations' elementwise passes."""
    mask = g.column("recompute_modules")
    if not np.any(mask != recompute_modules.DEFAULT_MASK):
        return attn_f
    gemm, elem, core, moe = recompute_modules.recompute_parts(model, tokens, g.tp, mask)
    return (np.where(gemm > 0, compute.gemm_time(gemm, model.blocks_per_layer, gpu, g.dtype),
                     0.0)
            + compute.memory_bound_time(elem, gpu)
            + np.where(core, attn_f, 0.0) + np.where(moe, experts_f, 0.0))


def routed_expert_flops(model: ModelSpec, tokens):
    """Forward FLOPs of the routed experts of one layer (averaged over layers) for `tokens`
    tokens: k copies of each token through one expert's matrices (2·T·k·h·f_e per matrix;
    Fedus et al. 2022 Sec. 2). On a GPU of an expert tensor-parallel group the etp x more
    tokens it receives meet 1/etp of each expert's columns: the same FLOPs per GPU."""
    if not model.is_moe:
        return 0.0
    share = model.num_moe_layers / model.num_layers
    return share * model.experts_top_k * model.mlp_matrices * flops.linear_flops(
        tokens, model.hidden_size, model.expert_ffn_hidden_size)


def expert_rows(model: ModelSpec, g: LayoutGrid, tokens):
    """Tokens per local expert on one GPU per micro-batch (the M of each grouped-GEMM problem):
    the GPU's dispatched tokens (1/tp with sequence parallelism) x top-k x etp (its expert
    tensor-parallel group gathers them) over its E/ep local experts, times the router's
    load imbalance on the busiest expert."""
    local = np.where(g.sequence_parallel, tokens / g.tp, tokens)
    per_expert = local * model.experts_top_k * g.etp / (model.num_experts / g.ep)
    return per_expert * model.expert_load_imbalance


def expert_gemm_flops(model: ModelSpec, g: LayoutGrid, tokens):
    """Forward FLOPs of one local expert's matrices on one GPU per micro-batch (the size of
    each grouped-GEMM problem): `expert_rows` x 2·h·f_e per matrix over etp (the GPU holds
    1/etp of each expert's columns). The size, not the rows alone, sets how far below peak a
    problem runs: DeepSeek-V3's experts (h 7168, f_e 2048) carry 9x the FLOPs per row of
    Qwen3-30B-A3B's (h 2048, f_e 768)."""
    per_row = 2 * model.mlp_matrices * model.hidden_size * model.expert_ffn_hidden_size
    return expert_rows(model, g, tokens) * per_row / g.etp


def expert_gemm_times(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid, tokens, routed):
    """(forward, backward) seconds of the routed experts' grouped GEMMs, one layer and
    micro-batch: the GEMM time of `routed` FLOPs at the large-GEMM rate scaled by
    W/(W + W_half) (W = `expert_gemm_flops`, W_half = `GpuSpec.grouped_gemm_half_gflop`: a
    fixed cost per expert problem - tile tail, prologue, scheduling - that small problems
    cannot amortise), times the load imbalance (the busiest expert rank sets the pace). Two
    grouped kernels forward (fc1, fc2), four backward."""
    if not model.is_moe:
        return 0.0, 0.0
    work = expert_gemm_flops(model, g, tokens)
    slow = (work + 1e9 * gpu.grouped_gemm_half_gflop) / work * model.expert_load_imbalance
    share = model.num_moe_layers / model.num_layers  # kernels per layer, averaged
    fixed = host_share(g) * gpu.moe_layer_overhead_s * share
    fwd = compute.gemm_time(routed * slow, 2 * share, gpu, g.dtype) + fixed
    bwd = compute.gemm_time(2 * routed * slow, 4 * share, gpu, g.dtype) + fixed
    return fwd, bwd


PARTIAL_GRAPH_HOST_SAVED = 0.82
"""Share of the per-MoE-layer host cost (`GpuSpec.moe_layer_overhead_s`) that Megatron's
per-module CUDA graphs of the router and the dispatcher's preprocess remove (their kernel
launches replay as one graph; the dispatch itself stays eager). Fitted on the MoE rows whose
Megatron-Bridge presets set `cuda_graph_scope=[..., "moe_router", "moe_preprocess"]`
(benchmarks/calibrate_moe_blackwell.py)."""


def host_share(g: LayoutGrid) -> float:
    """Share of the per-MoE-layer host cost left: none under whole-iteration graphs or a
    captured MoE layer, 1 - `PARTIAL_GRAPH_HOST_SAVED` with the router or the preprocess
    captured, all of it without graphs."""
    mods = set(g.cuda_graph_modules)
    if g.cuda_graphs or "moe" in mods:
        return 0.0
    return 1.0 - PARTIAL_GRAPH_HOST_SAVED if mods & {"moe_router", "moe_preprocess"} else 1.0


def titan_sac_recomputed_share(model: ModelSpec) -> float:
    """Share of a dense block's forward GEMM FLOPs that torchtitan's per-op SAC recomputes in
    backward: the 2nd, 4th, ... matmuls in forward order (wk, wo, w3; torchtitan 0.3.0
    activation_checkpoint.py `_get_custom_policy`), weighted by their output widths."""
    h, f = model.hidden_size, model.active_ffn_width
    kv = (model.qkv_width - model.attn_out_width) / 2
    widths = [model.attn_out_width, kv, kv, h, f] + ([f] if model.gated_mlp else []) + [h]
    inputs = [h, h, h, model.attn_out_width, h] + ([h] if model.gated_mlp else []) + [f]
    work = [w * i for w, i in zip(widths, inputs, strict=True)]
    return sum(w for k, w in enumerate(work) if k % 2 == 1) / sum(work)


def _ep_all_to_all_s(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid, tokens):
    """One MoE token dispatch (or combine) of a layer: every local token's top-k copies (h
    wide, bf16) to their experts over the expert-parallel group (`ParallelDims.group("ep")`);
    with sequence parallelism each tp rank sends its 1/tp of the tokens. None for a dense
    model. A flex dispatcher (DeepEP / HybridEP) sends each token once per remote node."""
    if not model.is_moe:
        return None
    local = np.where(g.sequence_parallel, tokens / g.tp, tokens)
    nbytes = 2 * local * model.experts_top_k * model.hidden_size
    dedup = None if g.moe_dispatcher == "alltoall" else model.experts_top_k
    return Links.of(cluster).all_to_all_s(nbytes, g.dims.group("ep"), dedup)


def _ep_comm_s(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid, one, per_pass):
    """MoE dispatch + combine per layer (averaged over layers), exposed: each of the
    `per_pass` passes (forward, backward, recomputed forward) runs the all-to-all `one`
    (`_ep_all_to_all_s`) twice, on the compute stream (Megatron-Core's default) or, with
    `Layout.moe_a2a_overlap`, the share `GpuSpec.ep_comm_overlap` under another micro-batch's
    compute."""
    if one is None:
        return 0.0
    share = model.num_moe_layers / model.num_layers
    exposed = np.where(g.column("moe_a2a_overlap"), 1 - cluster.gpu.ep_comm_overlap, 1.0)
    return share * 2 * per_pass * one * exposed  # dispatch + combine in each of the passes


def _attention_times(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid, causal_flops):
    """(forward, backward) seconds of the attention core for one layer and micro-batch.

    Fused (flash) kernels skip masked blocks: causal FLOPs at the attention efficiency, and
    one softmax exponential per score (`compute.attention_time`).
    Unfused (pre-2022 Megatron-LM): Q·K^T and scores·V are batched GEMMs over the full s x s
    square (twice the causal FLOPs), and the score tensor goes through HBM for scale+mask,
    softmax and dropout: ~11 bytes per score forward (write 2, softmax read 2 + write 2,
    dropout mask 1 + output 2, read 2 for scores·V) and twice that backward.
    """
    per_score = flops.attention_flops_per_score(model)
    share = model.attention_share  # kernels per layer, averaged over a hybrid pattern
    fused_f = compute.attention_time(causal_flops, gpu, g.dtype, kernels=g.cp * share,
                                     flops_per_score=per_score)
    # backward: dQ and dK/dV kernels per step
    fused_b = compute.attention_time(causal_flops, gpu, g.dtype, kernels=2 * g.cp * share,
                                     flops_per_score=per_score,
                                     matmul_passes=ATTENTION_BACKWARD_FACTOR)
    scores = model.num_heads * g.micro_batch_size * g.seq_len * (g.seq_len / g.cp) / g.tp * share
    unfused_f = (compute.gemm_time(2 * causal_flops, 2 * share, gpu, g.dtype)
                 + compute.memory_bound_time(11 * scores, gpu))
    unfused_b = (compute.gemm_time(4 * causal_flops, 4 * share, gpu, g.dtype)
                 + compute.memory_bound_time(22 * scores, gpu))
    # torchtitan's SDPA kernels run at `GpuSpec.sdpa_attention_factor` of TE's
    sdpa = np.where(g.titan, 1 / gpu.sdpa_attention_factor, 1.0)
    return (np.where(g.flash_attention, fused_f * sdpa, unfused_f),
            np.where(g.flash_attention, fused_b * sdpa, unfused_b))


def head_time(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid, layer_s=0.0) -> np.ndarray:
    """LM head + cross entropy + final norm, forward and backward, one micro-batch (last
    rank). Each multi-token prediction module (`memory.mtp_modules`) adds its 2h -> h
    projection, one transformer layer (`layer_s`: `LayerTimes.total_s`) and another pass
    through the shared head and loss (DeepSeek-V3 Sec. 2.2; Megatron-Core places the modules
    on the last pipeline stage)."""
    tokens = g.micro_batch_size * g.seq_len / g.cp
    gemm = flops.lm_head_flops(model, tokens) / g.tp
    logits = tokens * model.vocab_size / g.tp * 4  # fp32 logits
    head = (compute.gemm_time(3 * gemm, 3, gpu, g.dtype)
            + compute.memory_bound_time(5 * logits + 6 * tokens * model.hidden_size, gpu))
    mtp = memory.mtp_modules(model, g)
    if not np.any(mtp):
        return head
    proj = compute.gemm_time(3 * flops.mtp_projection_flops(model, tokens) / g.tp, 3, gpu,
                             g.dtype)
    return head + mtp * (head + proj + layer_s)


def embedding_time(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid) -> np.ndarray:
    """Embedding lookup forward and its gradient scatter backward, one micro-batch (first rank)."""
    tokens = g.micro_batch_size * g.seq_len / g.cp
    return compute.memory_bound_time(3 * 2 * tokens * model.hidden_size, gpu)


def rank_params(model: ModelSpec, g: LayoutGrid, layers, first, last):
    """(replicated, expert) parameters held by one GPU of a pipeline rank with `layers` layers
    (`RankLayers`, or a count of averaged layers; `first`/`last`: boolean arrays, whether the
    rank holds the embedding / the LM head). Replicated parameters are split over tp and
    reduced over dp*cp; routed experts are split over expert tp and ep, and reduced over the
    expert data-parallel group."""
    layers = RankLayers.of(layers)
    table = model.vocab_size * model.hidden_size / g.tp
    dense = layers.dense * memory.dense_layer_params(model) / g.tp + np.where(first, table, 0.0)
    # The last rank holds the LM head (a copy of the embedding when tied and pp > 1).
    head = np.where(model.tied_embeddings & (g.pp == 1), 0.0, table) + model.hidden_size
    # and the MTP modules: a layer and a 2h x h projection each, and the embedding they read
    # (a copy when pp > 1 and the first rank holds it; tied, the head's copy is that one)
    mtp = memory.mtp_modules(model, g)
    head = head + mtp * (memory.dense_layer_params(model) + 2 * model.hidden_size ** 2) / g.tp \
        + np.where((mtp > 0) & (g.pp > 1) & (not model.tied_embeddings), table, 0.0)
    dims = g.dims
    expert = (layers.expert + np.where(last, mtp, 0)) * memory.expert_layer_params(model) \
        / (dims.expert_tp * dims.ep)
    return dense + np.where(last, head, 0.0), expert


def pp_hop_time(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid) -> np.ndarray:
    """One pipeline send of a micro-batch's activation, split over tp (Megatron-LM's
    scatter/gather optimisation), between neighbouring stages (`ParallelDims.stage_size`
    ranks apart)."""
    links = Links.of(cluster)
    pair = Group(2, g.dims.stage_size)  # one rank and its neighbour in the next stage
    bw = links.hop_Bps(pair.stride, g.pp)
    alpha = links.latency_s(pair)
    nbytes = 2 * g.micro_batch_size * g.seq_len / g.cp * model.hidden_size / g.tp
    return comm.p2p_time(nbytes, bw, alpha)


EVALUATE_CHUNK_ROWS = 65536
"""Rows `evaluate` prices at a time. Its ~100 grid-sized temporaries then stay in the CPU
caches and reuse the memory freed by the chunk before: over DeepSeek-V3's 272,074 layouts on
16,384 H100 in one piece it took 0.56-0.65 s in a fresh process (page faults, memory traffic),
in 64k-row chunks 0.22 s (benchmarks/plan_speed.py)."""


def evaluate(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid,
             variants: int = 1) -> GridResult:
    """Step time and peak memory of every layout in `g` (vectorised; `variants`: see
    `_evaluate`), priced `EVALUATE_CHUNK_ROWS` rows (whole runs of variants) at a time."""
    return stack_results(model, g, evaluate_parts(model, cluster, g, variants))


def evaluate_parts(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid,
                   variants: int = 1) -> list[GridResult]:
    """`evaluate`'s chunks of `EVALUATE_CHUNK_ROWS` rows, not yet stacked: a caller pricing
    several grids stacks them once (`stack_results`) rather than copying each grid's result
    again into the whole."""
    step = max(variants, EVALUATE_CHUNK_ROWS // variants * variants)
    if len(g) <= step:
        return [_evaluate(model, cluster, g, variants)]
    return [_evaluate(model, cluster, g.take(slice(s, s + step)), variants)
            for s in range(0, len(g), step)]


def stack_results(model: ModelSpec, g: LayoutGrid, parts: list[GridResult]) -> GridResult:
    """The results `parts` of `g`'s rows, in order, as one (a single part: `g` priced in one
    piece, as it is); the grid-wide FLOP counts are the whole grid's (a chunk may lack its
    MTP rows)."""
    if len(parts) == 1:
        return parts[0]
    return replace(GridResult.stack(parts), model_flops=max(p.model_flops for p in parts),
                   hardware_flops=_hardware_flops(model, g))


def _evaluate(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid,
              variants: int = 1) -> GridResult:
    """Step time and peak memory of every layout in `g` (vectorised). `variants`: the rows
    come in runs of this many consecutive layouts that differ only in `RECOMPUTE_COLUMNS`
    (the search's innermost axis); each run's recompute-free per-rank terms (`RankStatic`:
    parameters, gradient sync, optimizer step, static memory, in-flight micro-batches) are
    then computed once, the same values as row by row."""
    assert variants == 1 or _variant_runs_hold(g, variants), "rows are not recompute runs"
    gpu = cluster.gpu
    lt = layer_times(model, gpu, cluster, g, variants)
    acts = memory.activation_terms(model, g, variants)  # the same for every rank kind
    kinds = _rank_kinds(g, layer_mix_of(model, cluster, g, lt, acts))
    (first_l, *_), (last_l, *_), (mid_l, *_) = kinds
    m, p, v = g.num_microbatches, g.pp, g.vp
    head, emb = head_time(model, gpu, g, lt.total_s), embedding_time(model, gpu, g)
    single = p == 1
    ends_first, ends_last = _end_times(g, emb, head)
    # τ per rank kind (first, last, busiest middle); with pp == 1 one rank has both ends.
    tau_first = first_l.time * lt.total_s + ends_first
    tau_last = np.where(single, tau_first, last_l.time * lt.total_s + ends_last)
    tau_mid = mid_l.time * lt.total_s
    # DualPipe's F&B pairs hide each micro-batch's all-to-all under the other's compute, per
    # layer a rank holds (not under its embedding or LM head): the critical rank, the first
    # of equals (first, last, middle; `_first_of_max`), is the busiest after that hiding
    ep_hidden = schedules.overlapped_pairs(g.schedule, p, m) * fb_hidden(lt)
    keep = [uneven_pair_share(g, lt, kind.count) for kind in (first_l, last_l, mid_l)]
    hid = (tau_first - first_l.time * ep_hidden * keep[0],
           tau_last - last_l.time * ep_hidden * keep[1], tau_mid - mid_l.time * ep_hidden * keep[2])
    take_last, take_mid = _first_of_max(*hid)
    tau_max = np.maximum(np.maximum(tau_first, tau_last), tau_mid)
    layers_crit = np.where(take_mid, mid_l.time, np.where(take_last, last_l.time, first_l.time))
    keep_crit = np.where(take_mid, keep[2], np.where(take_last, keep[1], keep[0]))
    ends_crit = np.where(take_mid, 0.0, np.where(take_last, ends_last, ends_first))
    # Σ_r τ_r = all layers + both ends (pp == 1: the single rank's τ).
    tau_sum = np.where(single, tau_first, model.num_layers * lt.total_s + emb + head)
    w_frac, b_frac = schedule_fractions(model, gpu, g, lt)
    spread = tau_sum - tau_max
    pair_frac = fb_hidden(lt) / np.maximum(lt.total_s, 1e-30)
    bubble = spread * schedules.bubble_factor(g.schedule, g.pp, g.vp, w_frac, b_frac,
                                              g.num_microbatches, pair_frac)
    floor = spread * schedules.end_fill_floor(g.schedule, g.pp, w_frac, b_frac)
    bubble = np.maximum(bubble - _end_rank_surplus(g, (tau_first, tau_last, tau_mid)), floor)
    bubble = bubble + interleaved_stall_s(model, g, lt, emb, head)
    hop = pp_hop_time(model, cluster, g)
    p2p = np.where(single, 0.0, 2 * (p - 1) * hop + 2 * m * v * hop * P2P_STEADY_EXPOSED)
    dp_exposed, opt_time, mem = _dp_optimizer_memory(model, cluster, g, lt, emb, head, kinds,
                                                     acts, variants)
    return GridResult(
        compute_s=m * (layers_crit * lt.compute_s + ends_crit),
        tp_comm_s=m * layers_crit * lt.tp_comm_s, cp_comm_s=m * layers_crit * lt.cp_comm_s,
        ep_comm_s=m * layers_crit * (lt.ep_comm_s - ep_hidden * keep_crit),
        pp_bubble_s=bubble, pp_p2p_s=p2p, dp_comm_s=dp_exposed, optimizer_step_s=opt_time, **mem,
        model_flops=float(flops.model_flops_per_step(model, 1, g.seq_len,
                                                     mtp_layers=_grid_mtp(model, g))),
        hardware_flops=_hardware_flops(model, g),
    )


def _end_times(g: LayoutGrid, emb, head):
    """(first rank's, last rank's) embedding + LM-head seconds per micro-batch. pp == 1 and
    the V schedules (zb-v, dualpipev): the first rank holds both ends, the last none (pp > 1).
    DualPipe: rank 0 runs stage 0 of one direction and stage pp-1 of the other, rank pp-1 the
    reverse, each direction for half the micro-batches: both hold half of each end."""
    vshape, mirror = schedules.is_v_shape(g.schedule), schedules.is_mirrored(g.schedule)
    first = emb + np.where((g.pp == 1) | vshape, head, 0.0)
    last = np.where(vshape, 0.0, head)
    half = (emb + head) / 2
    return np.where(mirror, half, first), np.where(mirror, half, last)


STALL_END_QUANTUM = 8
"""The embedding and LM head enter the stall's unit pattern rounded to 1/8 of a layer (one
cached playback serves the rows that differ by less)."""


def uneven_interleaved(model: ModelSpec, g: LayoutGrid) -> np.ndarray:
    """Rows whose interleaved chunks hold unequal layer counts: the only ones that stall."""
    inter = g.schedule == schedules.CODE["interleaved"]
    if g.layers_per_stage is not None:
        return inter & (len(set(g.layers_per_stage)) > 1)
    return inter & (model.num_layers % (g.pp * g.vp) != 0)


def interleaved_stall_s(model: ModelSpec, g: LayoutGrid, lt: LayerTimes, emb, head):
    """Seconds per step the fixed interleaved order idles beyond (Σ_r τ_r − τ_max)/v when its
    chunks are uneven (`simulator.interleaved_stall_layers`, in layer τ units, of the row's
    split with the embedding and LM head as fractions of a layer), for the rows with
    `price_stall`; 0 elsewhere (for the unpriced rows a lower bound)."""
    out = np.zeros(len(g))
    rows = np.nonzero(uneven_interleaved(model, g) & g.column("price_stall"))[0]
    if not len(rows):
        return out
    layer = np.broadcast_to(np.asarray(lt.total_s, dtype=float), (len(g),))[rows]
    q = STALL_END_QUANTUM
    ends = [np.round(np.broadcast_to(np.asarray(x, dtype=float), (len(g),))[rows]
                     / np.maximum(layer, 1e-30) * q) / q for x in (emb, head)]
    keys = np.stack([g.pp[rows], g.vp[rows], g.num_microbatches[rows], *ends], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    units = np.array([_stall_units(model.num_layers, g.layers_per_stage, *key) for key in uniq])
    out[rows] = units[inverse.ravel()] * layer
    return out


def _stall_units(num_layers: int, split, pp, vp, m, emb_layers, head_layers) -> float:
    """`simulator.interleaved_stall_layers` of a split (even unless given), ends added."""
    pp, vp, m = int(pp), int(vp), int(m)
    loads = [float(n) for n in (split or even_split(num_layers, pp * vp))]
    loads[0] += float(emb_layers)
    loads[-1] += float(head_layers)
    return interleaved_stall_layers(tuple(loads), pp, m)


def weight_grad_time(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid) -> np.ndarray:
    """W of one layer and micro-batch: the weight-gradient GEMMs, one forward's worth of GEMM
    FLOPs (the backward's 2x GEMM work is half input gradients B, half weight gradients W;
    Qi et al. 2024 Sec. 2, "zero bubble" F/B/W split)."""
    tokens = g.micro_batch_size * g.seq_len / g.cp
    return compute.gemm_time(flops.layer_gemm_flops(model, tokens) / g.tp,
                             2 * model.blocks_per_layer, gpu, g.dtype)  # as `layer_base`


def schedule_fractions(model: ModelSpec, gpu: GpuSpec, g: LayoutGrid, lt: LayerTimes):
    """(W, B) shares of one layer's τ (`cost_models.schedules` notation): W the weight
    gradients, B the rest of the backward (recompute and the backward's share of the
    exposed collectives included)."""
    total = np.maximum(lt.total_s, 1e-30)
    w = np.minimum(weight_grad_time(model, gpu, g), lt.bwd_s) / total
    comm = lt.tp_comm_s + lt.cp_comm_s + lt.ep_comm_s
    f = (lt.fwd_s + comm * lt.fwd_s / np.maximum(lt.compute_s, 1e-30)) / total
    return w, np.maximum(1.0 - f - w, 0.0)


def fb_hidden(lt: LayerTimes):
    """All-to-all seconds per layer and micro-batch that DualPipe's F&B pairing hides: each
    pass's dispatch + combine (half of ep_comm_s each) under the other pass's compute, the
    forward's under the paired backward (~2/3 of the compute) and the backward's under the
    paired forward (~1/3) (DeepSeek-V3 Sec. 3.2.1, Fig. 4)."""
    half, (fwd, bwd) = lt.ep_comm_s / 2, _pass_computes(lt)
    return pair_hidden(half, fwd, half, bwd)


def _pass_computes(lt: LayerTimes):
    """(forward, backward) compute seconds of one layer and micro-batch (recompute with the
    backward)."""
    fwd_share = lt.fwd_s / np.maximum(lt.compute_s, 1e-30)
    return lt.compute_s * fwd_share, lt.compute_s * (1 - fwd_share)


def pair_hidden(hide_f, fwd_s, hide_b, bwd_s):
    """Seconds one F&B pair hides: the forward's hideable all-to-all under the backward's
    compute and the backward's under the forward's (`pipeline_orders.pair_saving_s`, the
    simulator's form)."""
    return np.minimum(hide_f, bwd_s) + np.minimum(hide_b, fwd_s)


def uneven_pair_share(g: LayoutGrid, lt: LayerTimes, count):
    """Share of the balanced F&B hiding (`fb_hidden` per layer) a DualPipeV rank keeps when
    its two chunks hold unequal layers: an odd `count` splits into c//2 and c//2 + 1 (what an
    even split gives; an explicit one is taken as balanced as its rank total allows). Each
    micro-batch pairs one chunk's forward with the other's backward and the reverse
    (`pair_hidden` of a and b layers), against (a + b) `fb_hidden` for equal chunks. 1 for
    the other schedules (DualPipe's ranks pass one stage per micro-batch) and even counts."""
    dualpipev = g.schedule == schedules.CODE["dualpipev"]
    if not np.any(dualpipev):
        return 1.0
    a = np.floor(np.asarray(count, dtype=float) / 2)
    b = np.asarray(count, dtype=float) - a
    h, (fwd, bwd) = lt.ep_comm_s / 2, _pass_computes(lt)
    pairs = pair_hidden(a * h, a * fwd, b * h, b * bwd) + pair_hidden(b * h, b * fwd, a * h,
                                                                      a * bwd)
    balanced = (a + b) * fb_hidden(lt)
    share = np.divide(pairs, balanced, out=np.ones(np.broadcast(pairs, balanced).shape),
                      where=balanced > 0)
    return np.where(dualpipev, share, 1.0)


def _end_rank_surplus(g: LayoutGrid, taus):
    """Bubble seconds the critical ranks holding both ends (the V's rank 0, both DualPipe end
    ranks) fill with their own extra work: `schedules.end_absorption` (ZB-V m, DualPipe(V)
    2(p-1)) times their surplus per micro-batch over the busiest other rank (`taus`: first,
    last and middle rank τ), down to `schedules.end_fill_floor`. Measured in the fixed orders
    (DeepSeek's, PyTorch's ZBVZeroBubble) for F:B:W ratios, pp 2-16 and m 2p-8p
    (tests/test_pipeline_orders.py); 0 for the looped schedules. The τ are before the F&B
    hiding: the fill and drain run unpaired (after it, DeepSeek-V3 DualPipe pp 32 priced its
    bubble at 1.10 s against 1.76 s simulated; before, 1.56 s)."""
    first, last, mid = taus
    mid = np.where(g.layers_mid > 0, mid, -np.inf)  # pp <= 2: no middle rank
    mirror = schedules.is_mirrored(g.schedule)
    others = np.where(mirror, mid, np.maximum(last, mid))  # DualPipe: both ends are alike
    k = schedules.end_absorption(g.schedule, g.pp, g.num_microbatches)
    surplus = np.where((k > 0) & np.isfinite(others), np.maximum(first - others, 0.0), 0.0)
    return k * surplus


def _grid_mtp(model: ModelSpec, g: LayoutGrid) -> int:
    """The MTP modules the grid's rows run (its frameworks agree in practice; the most)."""
    return int(np.max(memory.mtp_modules(model, g)))


def _hardware_flops(model: ModelSpec, g: LayoutGrid) -> np.ndarray:
    """Per-sequence hardware FLOPs by recompute code (scaled by gbs when reported)."""
    mtp = _grid_mtp(model, g)
    by_code = np.array([flops.hardware_flops_per_step(model, 1, g.seq_len, k, mtp_layers=mtp)
                        for k in ("none", "selective", "full")], dtype=float)
    return by_code[g.recompute]


@dataclass(frozen=True, slots=True)
class RankCosts:
    """One pipeline rank kind's DP reduction, optimizer and memory (arrays over the grid)."""

    dp_comm_s: np.ndarray
    """Full DP reduction time (before overlap)."""
    dp_exposed_s: np.ndarray
    optimizer_step_s: np.ndarray
    memory: dict
    """Bytes by `MemoryBreakdown` field (`memory.rank_memory`)."""

    @property
    def total_bytes(self) -> np.ndarray:
        return sum(self.memory.values())


@dataclass(frozen=True, slots=True)
class RankState:
    """Parameters one GPU of a pipeline rank holds (arrays over the grid)."""

    dense: np.ndarray
    """Replicated parameters (split over tp), times the schedule's weight copies."""
    expert: np.ndarray
    """Routed-expert parameters (split over etp x ep), times the weight copies."""
    sharded: np.ndarray
    """The FSDP shard of both: dense over the dp_shard group, experts over edp / replicate."""
    optimizer: np.ndarray
    """Parameters whose optimizer state the GPU keeps: all (plain optimizer), the DP shard
    (distributed optimizer) or `sharded` (FSDP)."""


def rank_state(model: ModelSpec, g: LayoutGrid, layers, first, last, copies) -> RankState:
    """`RankState` of a rank holding `layers` layers (`first`/`last`: the embedding / LM head,
    `copies`: `schedules.weight_copies`). DualPipe's mirrored copies are one more replica
    each: the distributed optimizer shards their state over copies x dp ranks (Megatron-style
    ZeRO-1). The copies are of the layers (`layers` is the mean of the two stages a DualPipe
    rank holds); the embedding and LM head (with the MTP modules) are held once: an end rank
    of DualPipe holds stage 0 of one direction and stage pp-1 of the other, so both ends."""
    dims = g.dims
    dpc, edp = dims.group("dp_cp").size, dims.group("edp").size
    dense, expert = rank_params(model, g, layers, first, last)
    end_dense, end_expert = rank_params(model, g, 0.0, first, last)
    dense = (dense - end_dense) * copies + end_dense
    expert = (expert - end_expert) * copies + end_expert
    local_opt = dense / np.where(g.distributed_optimizer, dpc * copies, 1) \
        + expert / np.where(g.distributed_optimizer, edp * copies, 1)
    expert_shard = np.maximum(edp // dims.dp_replicate, 1)
    sharded = dense / dims.group("dp_shard").size + expert / expert_shard
    return RankState(dense, expert, sharded, np.where(g.column("fsdp"), sharded, local_opt))


def state_bytes_lower_bound(model: ModelSpec, g: LayoutGrid,
                            fp8_transpose_copy: bool = True) -> np.ndarray:
    """A lower bound of the peak bytes (`GridResult.peak_bytes`) of every row of `g` valid for
    any vp, schedule, layer split, micro-batch size, recompute and sequence parallelism: only
    the degrees and the sharding columns (distributed optimizer, fsdp, dp_replicate,
    grad_reduce_fp32, framework) are read.

    The peak is the fullest rank's total, so at least the weights, gradients and optimizer
    state (`memory.state_bytes`) of the rank with the most layers, plus the fixed buffer
    allowance (activations, fragmentation and FSDP's unsharded parameters are >= 0). That
    rank holds >= ceil(L / pp) layers (the pp ranks share the L layers) and each term grows
    with its layers - for a model of several layer kinds (`layer_mix`) the fullest rank's
    layers may be lighter than the averaged one, but the L layers' state is L averaged
    layers', so the fullest rank holds >= L / pp of them; the embedding and LM head are left
    out (the rank may hold neither) and
    one weight copy is counted (DualPipe's second only adds; its optimizer shard is the
    same). `fp8_transpose_copy`: the GPU's (`GpuSpec.fp8_transpose_copy`). Used by the
    search to skip degree combinations whose static memory alone cannot fit, before their
    inner choices are expanded."""
    mixed = layer_mix.layer_kinds(model) is not None
    layers = model.num_layers / g.pp if mixed else -(-model.num_layers // g.pp)
    single = g.pp == 1  # the only rank holds both ends
    state = rank_state(model, g, layers, single, single, 1)
    parts = memory.state_bytes(g, state.dense + state.expert, state.optimizer, fp8_transpose_copy)
    return sum(parts.values()) + memory.BUFFER_FIXED_BYTES


@dataclass(frozen=True, slots=True)
class RankStatic:
    """The per-rank terms of `rank_costs` that no recompute choice changes (arrays over the
    grid): what the recompute variants of one layout share."""

    first: np.ndarray
    """The rank holds the embedding (pp == 1 included)."""
    last: np.ndarray
    """The rank holds the LM head (pp == 1 included)."""
    comm_s: np.ndarray
    """Megatron's DP gradient reduction (`_grad_sync`), before overlap."""
    optimizer_step_s: np.ndarray
    memory: memory.RankStaticMemory
    fsdp_params: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    """(the rank's FSDP shard, one block's and the LM head's parameters before sharding) for
    `fsdp_comm`; None when the grid has no FSDP row."""


def rank_static(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid, layers, first, last,
                pp_rank) -> RankStatic:
    """`RankStatic` of pipeline rank `pp_rank` holding `layers` layers (`rank_costs`'s
    arguments). Megatron-LM reduces the replicated gradients over the data-parallel x
    context-parallel group and the experts' over the expert data-parallel group (the ranks
    holding the same experts); Adam touches `ADAM_BYTES_PER_PARAM` per local parameter."""
    layers = RankLayers.of(layers)
    gpu = cluster.gpu
    links = Links.of(cluster)
    dims = g.dims
    dpg, edpg = dims.group("dp_cp"), dims.group("edp")
    dp_bw, dp_alpha = links.bandwidth_Bps(dpg), links.latency_s(dpg)
    first = np.asarray(first) | (g.pp == 1)
    last = np.asarray(last) | (g.pp == 1)
    state = rank_state(model, g, layers, first, last, schedules.weight_copies(g.schedule))
    edp_bw, edp_alpha = links.bandwidth_Bps(edpg), links.latency_s(edpg)
    grad_bytes = np.where(g.column("grad_reduce_fp32"), memory.GRAD_BYTES, memory.BF16_GRAD_BYTES)
    comm_s = (_grad_sync(state.dense, dpg.size, dp_bw, dp_alpha, g.distributed_optimizer,
                         grad_bytes)
              + _grad_sync(state.expert, edpg.size, edp_bw, edp_alpha, g.distributed_optimizer,
                           grad_bytes))
    # one FSDP block: the rank's average layer (its layers' kinds, `layer_mix`)
    layer_params = memory.dense_layer_params(model) / g.tp * layers.per_layer(layers.dense) \
        + memory.expert_layer_params(model) / (dims.expert_tp * dims.ep) \
        * layers.per_layer(layers.expert)
    head_params = np.where(last, model.vocab_size * model.hidden_size / g.tp, 0.0)
    opt = compute.memory_bound_time(ADAM_BYTES_PER_PARAM * state.optimizer, gpu)
    block = heaviest_block_params(model, g) if g.column("fsdp").any() else layer_params
    mem = memory.rank_static_memory(g, state.dense + state.expert, state.optimizer,
                                    layers.count, pp_rank, layer_params, head_params,
                                    gpu.fp8_transpose_copy, block)
    fsdp = (state.sharded, layer_params, head_params) if g.column("fsdp").any() else None
    return RankStatic(first, last, comm_s, opt, mem, fsdp)


def rank_costs(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid, lt: LayerTimes, emb, head,
               layers, first, last, pp_rank,
               acts: memory.ActivationTerms | None = None,
               static: RankStatic | None = None) -> RankCosts:
    """DP reduction, optimizer step and peak memory of pipeline rank `pp_rank` holding `layers`
    layers (`RankLayers`, or a count of averaged layers; `first`/`last`: it holds the
    embedding / the LM head); `acts`: the grid's `memory.activation_terms` and `static`: the
    rank's `rank_static`, when already computed. The DP reduction overlaps the rank's compute
    (`GpuSpec.dp_comm_overlap`)."""
    layers = RankLayers.of(layers)
    if static is None:
        static = rank_static(model, cluster, g, layers, first, last, pp_rank)
    first, last = static.first, static.last
    comm_s = static.comm_s
    ends = np.where(first, emb, 0.0) + np.where(last, head, 0.0)
    # a DualPipe rank's last micro-batch of each direction passes one of its two stages, and
    # its end rank runs each end for half its micro-batches (`_end_times`)
    mirror = schedules.is_mirrored(g.schedule)
    window = (np.where(mirror, 2.0, 1.0) * layers.time * lt.compute_s
              + np.where(mirror, ends / 2, ends))
    exposed = comm.overlapped(comm_s, window, cluster.gpu.dp_comm_overlap)
    fsdp = g.column("fsdp")
    if static.fsdp_params is not None:
        sharded, layer_params, head_params = static.fsdp_params
        f_comm, f_exposed = fsdp_comm(model, cluster, g, lt, layers.count, layer_params,
                                      head_params, head, sharded, layers.per_layer(layers.time))
        comm_s, exposed = np.where(fsdp, f_comm, comm_s), np.where(fsdp, f_exposed, exposed)
    # the parameters and the static memory are in `static.memory` already
    mem = memory.rank_memory(model, g, None, None, layers.acts, first, last, pp_rank,
                             acts=acts, static=static.memory)
    return RankCosts(dp_comm_s=comm_s, dp_exposed_s=exposed,
                     optimizer_step_s=static.optimizer_step_s, memory=mem)


def fsdp_comm(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid, lt: LayerTimes, layers,
              layer_params, head_params, head_s, sharded, block_time=1.0):
    """(total, exposed) seconds of FSDP / HSDP communication per step on one GPU; `layers`
    blocks of `layer_params` parameters each, whose compute is `block_time` averaged layers'
    (a rank's average layer, `layer_mix.RankLayers.per_layer`).

    Per micro-batch and block (ZeRO-3, Rajbhandari et al. 2020 Sec. 7.2.1; FSDP2 in torchtitan
    0.3.0): all-gather the block's bf16 parameters (fp8 with fp8 all-gather) over the shard
    group before its forward, again before its backward when it resharded after forward
    (pp == 1), and reduce-scatter its fp32 gradients after its backward (FSDP2 reduces every
    micro-batch unless gradient sync is switched off). The prefetch overlaps each gather with
    the previous block's compute, so a block exposes max(0, comm - compute) per pass; the first
    gather of a step has nothing to hide behind. The LM head is one more unit. HSDP then
    all-reduces the fp32 gradient shards over the replicate group once per step, overlapped
    with the backward like Megatron's DP reduction (`GpuSpec.dp_comm_overlap`)."""
    links = Links.of(cluster)
    dims = g.dims
    sg, rg = dims.group("dp_shard"), dims.group("dp_replicate")
    bw, alpha = links.bandwidth_Bps(sg), links.latency_s(sg)
    gather = np.where(g.dtype in memory.FP8_DTYPES, memory.FSDP_FP8_GATHER_BYTES,
                      memory.FSDP_GATHER_BYTES)
    m = g.num_microbatches
    # blocks kept unsharded between forward and backward are not gathered again
    again = np.where(memory.keeps_unsharded(g), 0.0, 1.0)
    zero2 = memory.zero2_rows(g)  # parameters whole: no per-block gathers

    def unit(params, fwd_s, bwd_s):
        ag = np.where(zero2, 0.0, comm.all_gather_time(params * gather, sg.size, bw, alpha))
        rs = comm.reduce_scatter_time(params * memory.FSDP_GRAD_BYTES, sg.size, bw, alpha)
        total = ag * (1 + again) + rs
        hidden = np.maximum(ag - fwd_s, 0.0) + np.maximum(again * ag + rs - bwd_s, 0.0)
        return np.where(sg.size > 1, total, 0.0), np.where(sg.size > 1, hidden, 0.0), ag

    blk_total, blk_exposed, blk_ag = unit(layer_params,
                                          block_time * (lt.fwd_s + lt.tp_comm_s / 2),
                                          block_time * (lt.bwd_s + lt.recompute_s
                                                        + lt.tp_comm_s / 2))
    head_total, head_exposed, _ = unit(head_params, head_s / 3, 2 * head_s / 3)
    total = m * (layers * blk_total + head_total)
    exposed = m * (layers * blk_exposed + head_exposed) + blk_ag
    rep_bw, rep_alpha = links.bandwidth_Bps(rg), links.latency_s(rg)
    rep = comm.all_reduce_time(sharded * memory.FSDP_GRAD_BYTES, rg.size, rep_bw, rep_alpha)
    rep = np.where(rg.size > 1, rep, 0.0)
    window = layers * block_time * (lt.bwd_s + lt.recompute_s)
    # ZeRO-2: once per step the updated shards are all-gathered back into the whole
    # parameters, overlapped with the next step's first forward as the distributed
    # optimizer's parameter gather is
    whole = np.where(zero2, comm.all_gather_time((layers * layer_params + head_params)
                                                 * gather, sg.size, bw, alpha), 0.0)
    whole = np.where(sg.size > 1, whole, 0.0)
    return (total + rep + whole,
            exposed + comm.overlapped(rep, window, cluster.gpu.dp_comm_overlap)
            + comm.overlapped(whole, layers * block_time * lt.fwd_s,
                              cluster.gpu.dp_comm_overlap))


def _grad_sync(params, size, bw, alpha, distributed, grad_bytes=memory.GRAD_BYTES):
    """Gradient reduction of `params` parameters over `size` ranks: reduce-scatter of the main
    grads (fp32, or bf16 with grad_reduce_in_fp32 off) + all-gather of bf16 params
    (distributed optimizer), else an all-reduce of the main grads."""
    grad_bytes = params * grad_bytes
    distributed = np.asarray(distributed)
    # each branch only where some row takes it (the search's rows all use the distributed one)
    split = 0.0 if not distributed.any() else (
        comm.reduce_scatter_time(grad_bytes, size, bw, alpha)
        + comm.all_gather_time(params * memory.WEIGHT_BYTES, size, bw, alpha))
    whole = 0.0 if distributed.all() else comm.all_reduce_time(grad_bytes, size, bw, alpha)
    return np.where(distributed, split, whole)


def _rank_kinds(g: LayoutGrid, mix: LayerMix | None = None) -> tuple[tuple, ...]:
    """(layers, first, last, pp_rank) of the first, last and busiest middle pipeline ranks;
    layers: `RankLayers`, the grid's counts of averaged layers, or with a multi-kind model's
    `mix` the layers those ranks really hold (`LayerMix.ranks`)."""
    mirror = schedules.is_mirrored(g.schedule)  # DualPipe: both end ranks hold both ends
    if mix is not None:
        first, last, mid = mix.ranks(g)
    else:
        # a DualPipe end rank holds stage 0 of one direction and stage pp-1 of the other: the
        # mean of the two (the busiest middle stage bounds its middle ranks' means)
        ends = (g.layers_first + g.layers_last) / 2
        first, last, mid = (RankLayers.uniform(n) for n in (
            np.where(mirror, ends, g.layers_first), np.where(mirror, ends, g.layers_last),
            g.layers_mid))
    return ((first, *schedules.holds_ends(g.schedule, g.pp, 0), 0),
            (last, *schedules.holds_ends(g.schedule, g.pp, g.pp - 1), g.pp - 1),
            (mid, False, False, np.minimum(1, g.pp - 1)))


@cache
def kind_params(model: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(replicated, routed-expert) parameters of one layer of each kind (`layer_mix.
    layer_kinds`) over the averaged layer's, (K,) each, read-only (cached per model); ones
    for a model of one kind."""
    found = layer_mix.layer_kinds(model)
    if found is None:
        dense = expert = np.ones(1)
    else:
        avg_dense = memory.dense_layer_params(model)
        avg_expert = memory.expert_layer_params(model)
        probes = [layer_mix.probe(model, name) for name in found[0]]
        dense = np.array([memory.dense_layer_params(p) / avg_dense for p in probes])
        expert = np.array([memory.expert_layer_params(p) / avg_expert if avg_expert else 0.0
                           for p in probes])
    for a in (dense, expert):
        a.setflags(write=False)
    return dense, expert


def heaviest_block_params(model: ModelSpec, g: LayoutGrid) -> np.ndarray:
    """Parameters on one GPU of the model's heaviest layer (of any kind, `kind_params`)
    before FSDP sharding: the size of the blocks FSDP prefetches and of the one block's
    unsharded gradients (`memory.fsdp_inflight_bytes`) - an upper bound for a rank holding
    none of that kind, and one value per layout, so the partition ILP's memory stays affine
    in each kind's layer count (`stage_costs`)."""
    dense, expert = kind_params(model)
    per_gpu = np.multiply.outer(memory.dense_layer_params(model) / np.asarray(g.tp), dense) \
        + np.multiply.outer(memory.expert_layer_params(model)
                            / np.asarray(g.dims.expert_tp * g.dims.ep), expert)
    return per_gpu.max(axis=-1)


def layer_mix_of(model: ModelSpec, cluster: ClusterSpec, g: LayoutGrid, lt: LayerTimes,
                 acts: memory.ActivationTerms) -> LayerMix | None:
    """Each layer kind's weights against the averaged layer on the grid `g` (`layer_mix`):
    the probes' `layer_times` and activation bytes over `lt` and `acts` (the averaged
    layer's), once per distinct per-layer setting (`layer_mix.layer_rows`); parameters from
    the parameter counts. None for a model of one kind."""
    found = layer_mix.layer_kinds(model)
    if found is None:
        return None
    names, codes = found
    counts = np.bincount(codes, minlength=len(names)).astype(float)
    rows, setting = layer_mix.layer_rows(g)
    sub = g.take(rows)
    time, act = np.ones((len(rows), len(names))), np.ones((len(rows), len(names)))
    dense, expert = kind_params(model)
    avg_acts = np.broadcast_to(acts.per_layer, (len(g),))[rows]
    for k, name in enumerate(names):
        probe = layer_mix.probe(model, name)
        if k == np.argmax(counts):
            continue  # derived: the weights then price the whole model as the average does
        time[:, k] = layer_times(probe, cluster.gpu, cluster, sub).total_s / lt.total_s[rows]
        act[:, k] = memory.activation_terms(probe, sub).per_layer / avg_acts
    return LayerMix(codes, layer_mix.derive_weights(counts, time),
                    layer_mix.derive_weights(counts, act), dense, expert, setting)


RECOMPUTE_COLUMNS = ("recompute", "recompute_modules", "moe_a2a_overlap")
"""The columns in which the rows of a run of recompute variants differ (`evaluate`)."""


def _repeat_rows(value, n: int):
    """`value` (an array over rows, or a dataclass / dict / tuple of them) with each row
    repeated n times; scalars and None stay as they are."""
    if isinstance(value, dict):
        return {k: _repeat_rows(v, n) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, n) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return type(value)(**{f.name: _repeat_rows(getattr(value, f.name), n)
                              for f in fields(value)})
    return np.repeat(value, n) if np.ndim(value) else value


def _variant_runs_hold(g: LayoutGrid, variants: int) -> bool:
    """Whether every run of `variants` consecutive rows agrees on every column but the
    recompute ones (the invariant `evaluate(variants=...)` relies on)."""
    if len(g) % variants:
        return False
    for f in fields(g):
        col = getattr(g, f.name)
        if f.name in RECOMPUTE_COLUMNS or not isinstance(col, np.ndarray) or col.ndim == 0:
            continue  # grid-wide values (scalars, an explicit layer split) hold for every run
        runs = np.asarray(col).reshape(-1, variants)
        if not (runs == runs[:, :1]).all():
            return False
    return True


def _rank_statics(model, cluster, g: LayoutGrid, kinds, variants: int) -> list[RankStatic]:
    """`rank_static` of each rank kind (`_rank_kinds`), computed once per run of `variants`
    recompute variants (on the run's first row) and repeated over the run."""
    if variants == 1:
        return [rank_static(model, cluster, g, *kind) for kind in kinds]
    run = slice(None, None, variants)
    base = g.take(run)
    return [_repeat_rows(rank_static(model, cluster, base, layers.take(run),
                                     *(np.asarray(x)[run] if np.ndim(x) else x for x in rest)),
                         variants)
            for layers, *rest in kinds]


def _first_of_max(first, last, mid):
    """(take last, take mid) masks of the row-wise argmax of (first, last, mid), ties to the
    earlier one, as `np.argmax` over the stacked three would pick, without stacking copies
    of grid-sized arrays (the search evaluates ~10^6 rows)."""
    take_last = last > first
    return take_last, mid > np.maximum(first, last)


def _dp_optimizer_memory(model, cluster, g, lt, emb, head, kinds, acts, variants: int = 1):
    """Exposed DP reduction, optimizer time and the memory breakdown of the fullest rank,
    over the first, last and busiest middle pipeline ranks (`kinds`: `_rank_kinds`; `acts`:
    the grid's `memory.activation_terms`; `variants`: see `evaluate`)."""
    statics = _rank_statics(model, cluster, g, kinds, variants)
    ranks = [rank_costs(model, cluster, g, lt, emb, head, *kind, acts, static)
             for kind, static in zip(kinds, statics, strict=True)]
    has_mid = g.layers_mid > 0  # pp <= 2: no middle rank
    first, last, mid = ranks
    # the fullest rank, the first of equals (first, last, middle)
    take_last, take_mid = _first_of_max(first.total_bytes, last.total_bytes,
                                        np.where(has_mid, mid.total_bytes, -1.0))
    mem = {k: np.where(take_mid, mid.memory[k], np.where(take_last, last.memory[k],
                                                         first.memory[k]))
           for k in first.memory}
    exposed = np.maximum(np.maximum(first.dp_exposed_s, last.dp_exposed_s),
                         mid.dp_exposed_s * has_mid)
    opt = np.maximum(np.maximum(first.optimizer_step_s, last.optimizer_step_s),
                     mid.optimizer_step_s)
    return exposed, opt, mem


def capacity_GiB(gpu: GpuSpec, headroom: float = DEFAULT_HEADROOM) -> float:
    return gpu.memory_GiB * (1 - headroom)


def estimate(model: ModelSpec, cluster: ClusterSpec, layout: Layout,
             headroom: float = DEFAULT_HEADROOM) -> Estimate:
    """Predict one layout (validated first; SpecError explains what is wrong)."""
    layout.validate(model, cluster.world_size)
    gpu = cluster.gpu
    r = evaluate(model, cluster, LayoutGrid.from_layout(layout, model.num_layers))
    return result_estimate(r, 0, layout, gpu, headroom)


def result_estimate(r: GridResult, i: int, layout: Layout, gpu: GpuSpec,
                    headroom: float = DEFAULT_HEADROOM, cost_model: str = "megatron") -> Estimate:
    """Row i of a GridResult as an Estimate."""
    gbs = layout.global_batch_size
    return Estimate(
        layout=layout, time=r.time_row(i), memory=r.memory_row(i),
        capacity_GiB=capacity_GiB(gpu, headroom),
        model_flops=r.model_flops * gbs, hardware_flops=float(r.hardware_flops[i]) * gbs,
        peak_flops_per_gpu=gpu.peak_flops(layout.dtype), cost_model=cost_model,
    )


def fits_mask(r: GridResult, gpu: GpuSpec, headroom: float = DEFAULT_HEADROOM) -> np.ndarray:
    return r.peak_bytes <= capacity_GiB(gpu, headroom) * GiB


# --------------------------------------------------------------------------------------------
# Per-stage view of one layout: inputs of the partition ILP (the simulator's are in
# cost_models/step_tasks.py).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StageCosts:
    """Per pipeline rank costs of one layout (arrays of length pp), for the partition ILP."""

    layer_time_s: float | np.ndarray
    """Forward + backward (+ recompute, exposed TP/CP comm) of one layer, one micro-batch;
    one entry per layer (model order) for a model of several layer kinds."""
    extra_time_s: np.ndarray
    """Embedding on rank 0, LM head + loss on the last rank, per micro-batch."""
    layer_mem_bytes: np.ndarray
    """Bytes one more layer costs on each rank (its parameters, gradients, optimizer share and
    the activations of the micro-batches that rank keeps in flight); (pp, layers) for a model
    of several layer kinds."""
    fixed_mem_bytes: np.ndarray
    """Bytes a rank needs with no layers (embedding / LM head, logits, buffers)."""
    capacity_bytes: np.ndarray


@dataclass(frozen=True, slots=True)
class LayoutParts:
    """One layout on a uniform cluster, as the per-rank formulas take it."""

    grid: LayoutGrid
    """The layout as a grid of one."""
    gpu: GpuSpec
    layer: LayerTimes
    embedding_s: np.ndarray
    head_s: np.ndarray


def layout_parts(layout: Layout, model: ModelSpec, cluster: ClusterSpec) -> LayoutParts:
    g = LayoutGrid.from_layout(layout, model.num_layers)
    gpu = cluster.gpu
    lt = layer_times(model, gpu, cluster, g)
    return LayoutParts(g, gpu, lt, embedding_time(model, gpu, g), head_time(model, gpu, g,
                                                                            lt.total_s))


def stage_costs(model: ModelSpec, cluster: ClusterSpec, layout: Layout,
                headroom: float = DEFAULT_HEADROOM) -> StageCosts:
    """Linear per-rank time and memory model of `layout`, exact for any layer split: memory
    and time of rank r are affine in its layer count (see `rank_costs`), or for a model of
    several layer kinds (`layer_mix`) in its count of each kind - then the layer time has one
    entry per layer and the layer memory one per (rank, layer). (FSDP resharding after
    forward with pp > 1, `fsdp_reshard_after_forward="always"`: its prefetched blocks,
    min(layers, 2), are counted once per layer, an upper bound.)"""
    parts = layout_parts(layout, model, cluster)
    g, gpu, lt, emb, head = parts.grid, parts.gpu, parts.layer, parts.embedding_s, parts.head_s
    p = layout.pp
    ranks = np.arange(p)
    first, last = ranks == 0, ranks == p - 1

    def memory_at(layers) -> np.ndarray:
        return rank_costs(model, cluster, g, lt, emb, head, layers, first, last,
                          ranks).total_bytes

    # Rank costs are affine in the layer count: evaluate every rank at 0 and 1 layers at once.
    fixed = memory_at(np.zeros(p))
    extra = np.where(first, emb[0], 0.0) + np.where(last, head[0], 0.0)
    cap = np.full(p, capacity_GiB(gpu, headroom) * GiB)
    mix = layer_mix_of(model, cluster, g, lt, memory.activation_terms(model, g))
    if mix is None:
        return StageCosts(layer_time_s=float(lt.total_s[0]), extra_time_s=extra,
                          layer_mem_bytes=memory_at(np.ones(p)) - fixed, fixed_mem_bytes=fixed,
                          capacity_bytes=cap)
    one_of = np.eye(mix.time.shape[1])  # ... or at one layer of each kind
    per_kind = np.stack([memory_at(mix.holding(np.tile(one_of[k], (p, 1)), slice(0, 1)))
                         for k in range(len(one_of))], axis=1) - fixed[:, None]  # (pp, K)
    return StageCosts(layer_time_s=float(lt.total_s[0]) * mix.time[0, mix.codes],
                      extra_time_s=extra, layer_mem_bytes=per_kind[:, mix.codes],
                      fixed_mem_bytes=fixed, capacity_bytes=cap)
