"""Heterogeneous-cluster cost model: one layout on one node placement (Pipette / Holmes styles).

Nothing here re-derives a formula. For every group of ranks the placement puts on particular
nodes, the model builds the *homogeneous view* that group sees — its slowest GPU type and its
slowest member link — and hands that view to the Megatron-style primitives of
`cost_models.megatron` (`layer_times`, `embedding_time`, `head_time`, `rank_costs`,
`pp_hop_time`; the simulator's inputs are `cost_models.step_tasks`). On a uniform cluster every view is the cluster itself, so the
step time equals `megatron.estimate` exactly.

Groups under the rank order of `cost_models.dims.ParallelDims` (node rank k holds global
ranks [kG, (k+1)G)):
- TP and CP groups of pipeline stage s, replica d: their collectives run at the slowest link
  between any two member nodes (a ring is as fast as its slowest hop; NCCL may order the ring
  freely, so every pair counts) [Pipette, Yim et al. 2024, Sec. 4.1];
- the DP x CP gradient group of stage s: all replicas of the stage, bounded the same way;
- the pipeline hop s -> s+1 of replica d: the slowest of its rank pairs' node links;
- a stage of one replica computes at the pace of its slowest GPU [Holmes, Yang et al. 2023,
  Sec. 3: stage speeds differ, the layer partition follows them].

Step time (generalising Narayanan et al. SC'21 Sec. 2.2 to per-stage τ_{s,d}):
    T_d  = m·max_s τ_{s,d} + (Σ_s τ_{s,d} − max_s τ_{s,d})/v
           + 2·Σ_{s<p-1} hop_{s,d} + 2·m·v·max_k hop_{k,d}·P2P_STEADY_EXPOSED
    step = max_d T_d + max_s DP_exposed_s + max_s optimizer_s
With equal τ and hops this is megatron.evaluate's formula term for term.

Link styles (`STYLES`, used by `fabric`; `--cost-model pipette|holmes`):
- pipette [Yim et al. 2024]: `ClusterSpec.link_between` — the measured per-pair matrices when
  the spec has them (NIC-kind links where it has none); a pipeline hop costs its actual node
  pair, a TP/CP/DP collective its slowest member link;
- holmes [Yang et al. 2023]: NIC-kind links only (the measured matrix ignored): a group inside
  one NIC kind uses that fabric, a mixed group falls back to the common transport
  (`ClusterSpec._common_link`, e.g. TCP over Ethernet); stages run at their slowest GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import flops, megatron
from .grid import LayoutGrid
from .specs import (
    ClusterSpec,
    Estimate,
    GiB,
    Layout,
    LinkSpec,
    MemoryBreakdown,
    ModelSpec,
    NodeSpec,
    SpecError,
    TimeBreakdown,
)

STYLES = {"pipette": True, "holmes": False}
"""Link style -> whether it uses the cluster's measured per-pair links (module docstring)."""


@dataclass(frozen=True, slots=True)
class Fabric:
    """Node-pair links of a cluster as arrays (one style), built once per planning run."""

    style: str
    bw_Bps: np.ndarray
    """[i, j] achieved bytes/s per GPU from node i to node j; diagonal: intra-node (NVLink)."""
    latency_s: np.ndarray
    """[i, j] one-message latency, seconds; diagonal: intra-node."""
    gpu: tuple[str, ...]
    """GPU type key per node."""
    gpus_per_node: int

    @property
    def num_nodes(self) -> int:
        return len(self.gpu)

    def bw_GBps(self) -> np.ndarray:
        """Achieved pair bandwidth in GB/s (10^9 B/s), the placement ILP's input."""
        return self.bw_Bps / 1e9


def fabric(cluster: ClusterSpec, style: str = "pipette") -> Fabric:
    """The cluster's node-pair links under `style` (pipette: measured; holmes: NIC kinds)."""
    if style not in STYLES:
        raise SpecError(f"link style must be one of {tuple(STYLES)}, got {style!r}")
    gpn = cluster.gpus_per_node  # SpecError when nodes differ in GPU count
    source = cluster if STYLES[style] else replace(cluster, bandwidth_GBps=None, latency_s=None)
    n = cluster.num_nodes
    bw, alpha = np.empty((n, n)), np.empty((n, n))
    for i in range(n):
        for j in range(n):
            link = source.link_between(i, j)
            bw[i, j], alpha[i, j] = link.effective_Bps, link.latency_s
    return Fabric(style, bw, alpha, tuple(node.gpu for node in cluster.nodes), gpn)


# --------------------------------------------------------------------------------------------
# where every rank runs
# --------------------------------------------------------------------------------------------


def rank_nodes(layout: Layout, gpus_per_node: int, node_order) -> np.ndarray:
    """Physical node index of every global rank, indexed like `ParallelDims.rank_grid`
    ([pp, dp, cp, tp]); node rank = global rank // G."""
    order = np.asarray(node_order, dtype=int)
    if order.shape != (layout.world // gpus_per_node,) or layout.world % gpus_per_node:
        raise SpecError(
            f"node order has {order.size} entries but the layout's {layout.world} GPUs fill "
            f"{layout.world / gpus_per_node:g} nodes of {gpus_per_node}; give one node per node rank"
        )
    return order[layout.dims.rank_grid() // gpus_per_node]


def worst_link(fab: Fabric, groups) -> tuple[float, float]:
    """(bytes/s, latency s) of the slowest link between two nodes of any group in `groups`
    (each an array of node indices); intra-node when every group sits on one node."""
    bw, alpha = fab.bw_Bps[0, 0], fab.latency_s[0, 0]
    spans = {tuple(np.unique(g)) for g in groups if np.min(g) != np.max(g)}
    for nodes in spans:  # distinct node sets only: groups of one stage often share theirs
        sub = np.ix_(nodes, nodes)
        off = ~np.eye(len(nodes), dtype=bool)
        bw = min(bw, float(fab.bw_Bps[sub][off].min()))
        alpha = max(alpha, float(fab.latency_s[sub][off].max()))
    return float(bw), float(alpha)


def slowest_gpu(cluster: ClusterSpec, names, dtype: str) -> str:
    """The GPU type among `names` with the lowest dense peak of `dtype` (a stage runs at it)."""
    return min(sorted(set(names)), key=lambda k: cluster.gpu_types[k].peak_flops(dtype))


# --------------------------------------------------------------------------------------------
# homogeneous views of one group
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StageView:
    """What one (stage, replica) sees: its GPU type, and the link its TP/CP collectives,
    its DP reduction and its outgoing pipeline hop run over (bytes/s, seconds)."""

    gpu: str
    tpcp: tuple[float, float]
    dp: tuple[float, float]
    hop: tuple[float, float]


def view_cluster(cluster: ClusterSpec, gpu: str, link: tuple[float, float],
                 only: bool = False) -> ClusterSpec:
    """A one-node homogeneous cluster of `gpu` whose inter-node link is `link` (bytes/s,
    latency): the spec the Megatron primitives need to cost one group of the real cluster.
    only=True makes `link` the intra-node link too (a pipeline hop whose actual node pair is
    known, whatever the homogeneous stride rule would assume)."""
    bps, alpha = link
    inter = LinkSpec("view", bps / 1e9, alpha, 1.0)  # already achieved bandwidth
    return ClusterSpec(
        name=f"{cluster.name}:{gpu}", nodes=(NodeSpec("view", cluster.nodes[0].gpus, gpu),),
        gpu_types={gpu: cluster.gpu_types[gpu]}, intra_node=inter if only else cluster.intra_node,
        inter_node=inter,
    )


def stage_views(cluster: ClusterSpec, fab: Fabric, layout: Layout, node_order) -> list[list[StageView]]:
    """[stage][replica] views of `layout` placed by `node_order` (node rank -> node index)."""
    where = rank_nodes(layout, fab.gpus_per_node, node_order)  # (pp, dp, cp, tp)
    p, d = layout.pp, layout.dp
    kinds = sorted(set(fab.gpu), key=lambda g: cluster.gpu_types[g].peak_flops(layout.dtype))
    slowness = np.array([len(kinds) - 1 - kinds.index(g) for g in fab.gpu])  # 0: fastest
    out = []
    for s in range(p):
        stage = where[s]  # (dp, cp, tp)
        dp_link = worst_link(fab, [stage[:, :, t].ravel() for t in range(layout.tp)])
        nxt = where[(s + 1) % p]
        hop_bw = fab.bw_Bps[stage, nxt].reshape(d, -1)
        hop_alpha = fab.latency_s[stage, nxt].reshape(d, -1)
        gpu_of = slowness[stage].reshape(d, -1).max(axis=1)
        tp_span = stage.min(axis=2) != stage.max(axis=2)  # (dp, cp): TP group crosses nodes
        cp_span = stage.min(axis=1) != stage.max(axis=1)  # (dp, tp)
        row = []
        for r in range(d):
            groups = [stage[r, c] for c in np.flatnonzero(tp_span[r])]
            groups += [stage[r, :, t] for t in np.flatnonzero(cp_span[r])]
            hop = (float(hop_bw[r].min()), float(hop_alpha[r].max()))
            gpu = kinds[len(kinds) - 1 - int(gpu_of[r])]
            row.append(StageView(gpu, worst_link(fab, groups), dp_link, hop))
        out.append(row)
    return out


class GroupCosts:
    """Megatron primitives of one layout on memoised views (keyed by GPU type and link);
    pass one to `evaluate` to reuse them across placements of that layout."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, layout: Layout):
        self.model, self.cluster, self.layout = model, cluster, layout
        self.grid = LayoutGrid.from_layout(layout, model.num_layers)
        self._memo: dict = {}

    def _get(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def view(self, gpu: str, link: tuple[float, float]) -> ClusterSpec:
        return self._get(("view", gpu, link), lambda: view_cluster(self.cluster, gpu, link))

    def layer(self, gpu: str, link):
        """(LayerTimes, embedding s, head s) for one micro-batch on `gpu` with TP/CP `link`."""
        def make():
            spec = self.cluster.gpu_types[gpu]
            g = self.grid
            lt = megatron.layer_times(self.model, spec, self.view(gpu, link), g)
            return (lt, megatron.embedding_time(self.model, spec, g),
                    megatron.head_time(self.model, spec, g, lt.total_s))
        return self._get(("layer", gpu, link), make)

    def hop(self, link) -> float:
        """One pipeline send over the hop's actual link (intra-node when both ends share
        nodes; megatron.pp_hop_time would infer that from the rank stride instead)."""
        def make():
            view = view_cluster(self.cluster, self.cluster.nodes[0].gpu, link, only=True)
            return float(megatron.pp_hop_time(self.model, view, self.grid)[0])
        return self._get(("hop", link), make)

    def rank(self, gpu: str, link, layers: int, s: int) -> megatron.RankCosts:
        """DP reduction, optimizer and memory of pipeline rank s holding `layers` layers."""
        def make():
            lt, emb, head = self.layer(gpu, link)
            p = self.layout.pp
            return megatron.rank_costs(self.model, self.view(gpu, link), self.grid, lt, emb, head,
                                       np.array([layers]), s == 0, s == p - 1, s)
        return self._get(("rank", gpu, link, layers, s), make)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeteroResult:
    """A placed layout's estimate plus what the critical path runs through."""

    estimate: Estimate
    critical_replica: int
    """Data-parallel replica whose pipeline is slowest."""
    critical_stage: int
    """Pipeline rank with the largest per-micro-batch time τ on that replica."""
    stage_time_s: tuple[tuple[float, ...], ...]
    """[stage][replica] τ: one micro-batch's forward + backward (+ TP/CP comm), seconds."""
    hop_s: tuple[tuple[float, ...], ...]
    """[stage][replica] pipeline send from stage s to s+1 (s = p-1: the wrap to stage 0)."""
    stage_gpu: tuple[str, ...]
    """Slowest GPU type of each stage (over replicas)."""
    stage_peak_GiB: tuple[float, ...]
    stage_capacity_GiB: tuple[float, ...]

    @property
    def fits(self) -> bool:
        return all(p <= c for p, c in zip(self.stage_peak_GiB, self.stage_capacity_GiB, strict=True))


def rank_layers(layout: Layout, num_layers: int) -> tuple[int, ...]:
    """Layers held by each pipeline rank (its chunks together)."""
    stages = layout.stage_layers(num_layers)
    return tuple(sum(stages[r::layout.pp]) for r in range(layout.pp))


def evaluate(model: ModelSpec, cluster: ClusterSpec, fab: Fabric, layout: Layout, node_order,
             headroom: float = megatron.DEFAULT_HEADROOM, costs: GroupCosts | None = None) -> HeteroResult:
    """Step time and memory of `layout` with node rank k on node `node_order[k]` (module doc).

    `costs` may be passed to reuse memoised primitives across placements of one layout."""
    megatron.require_dense(model)
    costs = costs or GroupCosts(model, cluster, layout)
    views = stage_views(cluster, fab, layout, node_order)
    p, v, m = layout.pp, layout.vp, layout.num_microbatches
    layers = rank_layers(layout, model.num_layers)
    tau, hop, parts = np.zeros((p, layout.dp)), np.zeros((p, layout.dp)), {}
    for s in range(p):
        for r, vw in enumerate(views[s]):
            lt, emb, head = costs.layer(vw.gpu, vw.tpcp)
            ends = (float(emb[0]) if s == 0 else 0.0) + (float(head[0]) if s == p - 1 else 0.0)
            tau[s, r] = layers[s] * float(lt.total_s[0]) + ends
            hop[s, r] = costs.hop(vw.hop)
            parts[s, r] = (lt, ends)
    pipe = m * tau.max(axis=0) + (tau.sum(axis=0) - tau.max(axis=0)) / v
    steady = hop if v > 1 else hop[:-1]  # interleaving also sends from the last rank to rank 0
    fill = 2 * hop[:-1].sum(axis=0)
    p2p = np.where(p > 1, fill + 2 * m * v * steady.max(axis=0, initial=0.0) * megatron.P2P_STEADY_EXPOSED, 0.0)
    crit_r = int(np.argmax(pipe + p2p))
    crit_s = int(np.argmax(tau[:, crit_r]))
    ranks = _stage_ranks(cluster, costs, views, layers, headroom)
    lt, ends = parts[crit_s, crit_r]
    n = layers[crit_s]
    time = TimeBreakdown(
        compute_s=m * (n * float(lt.compute_s[0]) + ends), tp_comm_s=m * n * float(lt.tp_comm_s[0]),
        cp_comm_s=m * n * float(lt.cp_comm_s[0]),
        pp_bubble_s=float(tau[:, crit_r].sum() - tau[crit_s, crit_r]) / v,
        pp_p2p_s=float(p2p[crit_r]), dp_comm_s=max(r.dp_exposed_s for r in ranks),
        optimizer_step_s=max(r.optimizer_step_s for r in ranks))
    est = _estimate(model, cluster, layout, time, ranks, fab.style)
    return HeteroResult(
        estimate=est, critical_replica=crit_r, critical_stage=crit_s,
        stage_time_s=tuple(tuple(map(float, row)) for row in tau),
        hop_s=tuple(tuple(map(float, row)) for row in hop),
        stage_gpu=tuple(slowest_gpu(cluster, [vw.gpu for vw in row], layout.dtype) for row in views),
        stage_peak_GiB=tuple(r.memory.peak_bytes / GiB for r in ranks),
        stage_capacity_GiB=tuple(r.capacity_GiB for r in ranks))


@dataclass(frozen=True, slots=True)
class StageRank:
    """One pipeline stage's DP reduction, optimizer and memory on its slowest GPU."""

    dp_exposed_s: float
    optimizer_step_s: float
    memory: MemoryBreakdown
    capacity_GiB: float
    """Usable memory of the stage's smallest GPU."""


def _stage_ranks(cluster, costs: GroupCosts, views, layers, headroom) -> list[StageRank]:
    """Per stage, on its slowest GPU (the DP reduction is bounded by the stage's DP link;
    memory by its smallest GPU)."""
    out = []
    dtype = costs.layout.dtype
    for s, row in enumerate(views):
        gpu = slowest_gpu(cluster, [vw.gpu for vw in row], dtype)
        rc = costs.rank(gpu, row[0].dp, layers[s], s)
        mem = MemoryBreakdown(**{k: float(v[0]) for k, v in rc.memory.items()})
        cap = min(megatron.capacity_GiB(cluster.gpu_types[vw.gpu], headroom) for vw in row)
        out.append(StageRank(dp_exposed_s=float(rc.dp_exposed_s[0]),
                             optimizer_step_s=float(rc.optimizer_step_s[0]), memory=mem,
                             capacity_GiB=cap))
    return out


def _estimate(model, cluster, layout, time: TimeBreakdown, ranks, style: str) -> Estimate:
    """The Estimate of DESIGN.md: memory of the tightest stage (peak / capacity), MFU against
    the mean dense peak of the GPUs that run the layout."""
    tight = max(range(len(ranks)), key=lambda s: ranks[s].memory.peak_bytes / GiB / ranks[s].capacity_GiB)
    peaks = [cluster.gpu_types[n.gpu].peak_flops(layout.dtype) * n.gpus for n in cluster.nodes]
    gbs = layout.global_batch_size
    hw = flops.hardware_flops_per_step(model, gbs, layout.seq_len, layout.recompute)
    return Estimate(
        layout=layout, time=time, memory=ranks[tight].memory, capacity_GiB=ranks[tight].capacity_GiB,
        model_flops=float(flops.model_flops_per_step(model, gbs, layout.seq_len)),
        hardware_flops=float(hw), peak_flops_per_gpu=sum(peaks) / cluster.world_size,
        cost_model=style)


HETERO_SCHEDULES = ("1f1b", "interleaved")
"""Schedules the heterogeneous models price (Megatron-LM's; the zero-bubble and DualPipe
ones are modelled by the megatron cost model only)."""


def require_megatron_schedule(layout: Layout) -> None:
    """SpecError for a schedule the heterogeneous cost models do not model."""
    if layout.schedule not in HETERO_SCHEDULES:
        raise SpecError(f"the pipette/holmes cost models price the {HETERO_SCHEDULES} schedules "
                        f"only, not {layout.schedule}; use --cost-model megatron or another "
                        "--schedule")


def estimate(model: ModelSpec, cluster: ClusterSpec, layout: Layout,
             headroom: float = megatron.DEFAULT_HEADROOM, node_order=None,
             style: str = "pipette") -> Estimate:
    """Validate and estimate one layout on the cluster's nodes in `node_order` (default: the
    cluster's own order); `style` picks the link model (module docstring)."""
    megatron.require_dense(model)
    layout.validate(model, cluster.world_size)
    require_megatron_schedule(layout)
    fab = fabric(cluster, style)
    order = range(cluster.num_nodes) if node_order is None else node_order
    return evaluate(model, cluster, fab, layout, order, headroom).estimate
