"""Planning on heterogeneous clusters: layouts, node placement and layer split together.

    from planner.hetero_search import search_hetero
    hs = search_hetero(model, cluster, seq_len=4096, global_batch_size=256, style="pipette")
    hs.result.plans[0], hs.node_orders[0]   # best Estimate and its node order (node names)

1. Candidate layouts come from the vectorised homogeneous search on a *nominal* cluster: the
   slowest GPU type (with the smallest memory) and the median measured link.
2. For each distinct (tp, cp, dp, pp) shape of the leading candidates, the placement ILP
   (`planner.ilp_placement.place_nodes`) picks which node runs each node rank from the
   traffic the layout generates (DP bytes per stage, pipeline hop bytes, stage work) and the
   node-pair bandwidths; a few simple orders (the cluster's own, nodes grouped by type) are
   kept as alternatives.
3. For each candidate and order, the partition ILP (`planner.ilp_partition`) splits the layers
   with stage_time_scale = 1 / the stage's slowest GPU speed, and the Pipette/Holmes model
   (`cost_models.hetero_model.evaluate`) ranks the result. The fastest fitting one wins.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from cost_models import hetero_model, megatron
from cost_models.specs import (
    ClusterSpec,
    GiB,
    InfeasibleLayout,
    Layout,
    LinkSpec,
    ModelSpec,
    NodeSpec,
    SpecError,
)

from .ilp_partition import partition_layers
from .ilp_placement import place_nodes
from .search import SearchResult, SearchSpace, layout_key, search

PLACEMENT_BUDGET_S = 6.0
"""Wall time shared by the placement ILPs (one per layout shape, each given 0.5-5 s)."""
SWAP_BUDGET_S = 1.5
"""Wall time for improving each of the leading plans' node orders by pairwise swaps."""
EXHAUSTIVE_MAX_ORDERS = 800
"""Distinct node orders (up to interchangeable nodes) below which the leading plans' placement
is settled by evaluating every order with the Pipette/Holmes model itself: the placement ILP
optimises a proxy (no TP/CP groups spanning nodes) and swaps can stop in a local optimum."""
MAX_LAYOUTS = 24
"""Candidate layouts that get a placement and a partition (the vectorised search ranks all)."""
PER_SHAPE = 3
"""At most this many candidates per (tp, cp, dp, pp) shape, so the shapes stay diverse."""


@dataclass(frozen=True, slots=True)
class PlacedPlan:
    """One ranked heterogeneous plan: the model's verdict and how the placement was found."""

    result: hetero_model.HeteroResult
    node_order: tuple[int, ...]
    """Physical node index per node rank."""
    placement: str
    """Where the order came from: ilp-exact | ilp-aggregated | cluster-order | grouped."""
    placement_status: str
    """Solver status (optimal / feasible) and gap of the placement ILP, or 'heuristic'."""
    partition_status: str


@dataclass(frozen=True, slots=True)
class HeteroSearch:
    """`result` is a SearchResult (plans best first) for the CLI; `placed` the same plans with
    their node orders and the solver outcomes."""

    result: SearchResult
    placed: tuple[PlacedPlan, ...]
    style: str
    placements_solved: int
    """Placement ILPs run (one per layout shape)."""
    slow_hosts: tuple[str, ...] = ()
    """Where the winner put each slow host (`slow_host_notes`)."""

    @property
    def node_orders(self) -> tuple[tuple[str, ...], ...]:
        names = [n.name for n in self.result.cluster.nodes]
        return tuple(tuple(names[i] for i in p.node_order) for p in self.placed)


# --------------------------------------------------------------------------------------------
# nominal cluster and per-node speeds
# --------------------------------------------------------------------------------------------


def nominal_links(fab: hetero_model.Fabric) -> list[tuple[float, float]]:
    """(bytes/s, latency s) stand-ins for the inter-node link: the slowest, median and fastest
    off-diagonal pair (distinct values only), so that layouts suited to each regime are ranked."""
    n = fab.num_nodes
    if n == 1:
        return [(float(fab.bw_Bps[0, 0]), float(fab.latency_s[0, 0]))]
    off = ~np.eye(n, dtype=bool)
    bw, lat = fab.bw_Bps[off], fab.latency_s[off]
    order = np.argsort(bw, kind="stable")
    picks = [order[0], order[len(order) // 2], order[-1]]
    out: list[tuple[float, float]] = []
    for i in picks:
        link = (float(bw[i]), float(lat[i]))
        if not any(abs(link[0] - o[0]) <= 0.02 * o[0] for o in out):
            out.append(link)
    return out


def nominal_cluster(cluster: ClusterSpec, fab: hetero_model.Fabric, dtype: str,
                    link: tuple[float, float]) -> ClusterSpec:
    """A uniform stand-in to rank layouts: slowest GPU type (with the smallest memory of any
    type) and the inter-node `link` (bytes/s, latency s)."""
    slow = hetero_model.slowest_gpu(cluster, fab.gpu, dtype)
    memory = min(cluster.gpu_types[g].memory_GiB for g in set(fab.gpu))
    gpu = replace(cluster.gpu_types[slow], memory_GiB=memory)
    inter = LinkSpec("nominal", link[0] / 1e9, link[1], 1.0)
    nodes = tuple(NodeSpec(x.name, x.gpus, slow, "infiniband", x.rack) for x in cluster.nodes)
    return ClusterSpec(f"{cluster.name}-nominal", nodes, {slow: gpu}, cluster.intra_node, inter)


def node_speeds(model: ModelSpec, cluster: ClusterSpec, fab: hetero_model.Fabric, layout: Layout) -> np.ndarray:
    """Relative speed per node (1.0 = the fastest GPU type): ratio of one layer's time."""
    costs = hetero_model.GroupCosts(model, cluster, layout)
    intra = (fab.bw_Bps[0, 0], fab.latency_s[0, 0])
    layer = {g: float(costs.layer(g, intra)[0].total_s[0]) for g in set(fab.gpu)}
    fastest = min(layer.values())
    return np.array([fastest / layer[g] for g in fab.gpu])


# --------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------


def _traffic(model, cluster, fab, layout: Layout):
    """(stage DP bytes, hop bytes, stage work s) of `layout` for the placement ILP: times at a
    1 GB/s, zero-latency link, times 1e9, so that the ILP's bytes/bandwidth is those times."""
    costs = hetero_model.GroupCosts(model, cluster, layout)
    unit = (1e9, 0.0)
    fast = min(set(fab.gpu), key=lambda g: -cluster.gpu_types[g].peak_flops(layout.dtype))
    layers = hetero_model.rank_layers(layout, model.num_layers)
    p, m, v = layout.pp, layout.num_microbatches, layout.vp
    coll, work = np.zeros(p), np.zeros(p)
    lt, emb, head = costs.layer(fast, (fab.bw_Bps[0, 0], fab.latency_s[0, 0]))
    for s in range(p):
        rc = costs.rank(fast, unit, layers[s], s)
        comm = float(rc.dp_comm_s[0])
        exposed = 1 - cluster.gpu_types[fast].dp_comm_overlap  # the part a slow link exposes
        coll[s] = comm * exposed * 1e9
        ends = (float(emb[0]) if s == 0 else 0.0) + (float(head[0]) if s == p - 1 else 0.0)
        work[s] = m * (layers[s] * float(lt.total_s[0]) + ends)
    # fill + drain cross each hop twice; the steady state adds ~m*v exposed sends per path
    weight = 2 + (m * v * 2 * megatron.P2P_STEADY_EXPOSED / (p - 1) if p > 1 else 0.0)
    hop = costs.hop(unit) * 1e9 * weight
    return coll, hop, work


def _labels(cluster: ClusterSpec) -> np.ndarray:
    """Integer label per node that the placement never merges: (GPU type, NIC kind)."""
    keys = [(n.gpu, n.nic) for n in cluster.nodes]
    index = {k: i for i, k in enumerate(sorted(set(keys)))}
    return np.array([index[k] for k in keys])


def candidate_orders(model, cluster, fab, layout: Layout, time_limit_s: float = 5.0):
    """[(node order, source, status)]: the placement ILP's order (when the layout's nodes each
    hold one stage), the cluster's own order, and nodes grouped by (GPU, NIC) kind."""
    n = fab.num_nodes
    own = tuple(range(n))
    grouped = tuple(int(i) for i in np.argsort(_labels(cluster), kind="stable"))
    out = [(own, "cluster-order", "heuristic")]
    if grouped != own:
        out.append((grouped, "grouped", "heuristic"))
    try:
        stages, blocks = layout.dims.node_grid(fab.gpus_per_node)
    except SpecError:
        return out  # a node holds several stages: no node-level placement to choose
    if n == 1:
        return out
    coll, hop, work = _traffic(model, cluster, fab, layout)
    speed = node_speeds(model, cluster, fab, layout)
    bw = fab.bw_GBps()
    np.fill_diagonal(bw, 1.0)  # ignored by the ILP; must be finite
    try:
        pl = place_nodes(bw, stages, blocks, coll, hop, work, speed, _labels(cluster),
                         time_limit_s=time_limit_s)
    except InfeasibleLayout:
        return out
    gap = "" if pl.gap is None else f", gap {pl.gap:.2g}"
    out.insert(0, (pl.node_for_rank, f"ilp-{pl.method}", f"{pl.status}{gap} ({pl.solver})"))
    return out


# --------------------------------------------------------------------------------------------
# partition and evaluation of one (layout, order)
# --------------------------------------------------------------------------------------------


def partition_for(model, cluster, fab, layout: Layout, order, speed: dict, headroom: float):
    """(layout with its layers split by the partition ILP for this order's stage speeds, status),
    or (layout, reason) when the even split is kept. `speed`: GPU type -> relative speed."""
    if layout.pp == 1:
        return layout, "single stage"
    views = hetero_model.stage_views(cluster, fab, layout, order)
    gpus = [hetero_model.slowest_gpu(cluster, [vw.gpu for vw in row], layout.dtype) for row in views]
    scale = np.array([1.0 / speed[g] for g in gpus])
    fastest = max(speed, key=lambda g: (speed[g], g))
    ref = hetero_model.view_cluster(cluster, fastest, views[0][0].tpcp)
    costs = megatron.stage_costs(model, ref, replace(layout, layers_per_stage=None), headroom)
    cap = np.array([min(megatron.capacity_GiB(cluster.gpu_types[vw.gpu], headroom) for vw in row)
                    for row in views]) * GiB
    try:
        part = partition_layers(model.num_layers, layout.pp, costs.layer_time_s, scale,
                                costs.extra_time_s * scale, costs.layer_mem_bytes,
                                costs.fixed_mem_bytes, cap, vp=layout.vp, time_limit_s=5.0)
    except InfeasibleLayout as exc:
        return layout, f"even split kept ({exc})"
    gap = "" if part.gap is None else f", gap {part.gap:.2g}"
    return replace(layout, layers_per_stage=part.layers_per_stage), f"{part.status}{gap} ({part.solver})"


def best_of(model, cluster, fab, layout: Layout, orders, headroom: float) -> PlacedPlan | None:
    """The fastest fitting (order, split) of `layout` over `orders`; None when none fits.
    Each order is tried with its partition-ILP split and with the even split."""
    best = None
    costs, splits = {}, {}
    speeds = node_speeds(model, cluster, fab, layout)
    speed = {g: float(speeds[fab.gpu.index(g)]) for g in set(fab.gpu)}
    for order, source, status in orders:
        # the split depends on the order only through each stage's GPU types
        where = hetero_model.rank_nodes(layout, fab.gpus_per_node, order)
        kinds = tuple(tuple(sorted({fab.gpu[n] for n in np.unique(where[s])})) for s in range(layout.pp))
        if kinds not in splits:
            splits[kinds] = partition_for(model, cluster, fab, layout, order, speed, headroom)
        split, pstatus = splits[kinds]
        for lay, why in ((split, pstatus), (layout, "even split")):
            key = lay.layers_per_stage
            costs.setdefault(key, hetero_model.GroupCosts(model, cluster, lay))
            res = hetero_model.evaluate(model, cluster, fab, lay, order, headroom, costs[key])
            if not res.fits:
                continue
            if best is None or res.estimate.step_time_s < best.result.estimate.step_time_s - 1e-12:
                best = PlacedPlan(res, tuple(int(i) for i in order), source, status, why)
    return best


def improve_by_swaps(model, cluster, fab, placed: PlacedPlan, headroom: float,
                     budget_s: float = SWAP_BUDGET_S, seed: int = 0) -> PlacedPlan:
    """First-improvement swaps of two node ranks, scored by the Pipette/Holmes model itself
    (the placement ILP optimises a proxy of it), under a wall-time budget; the layer split is
    kept. Never returns a slower plan."""
    deadline = time.perf_counter() + budget_s
    lay = placed.result.estimate.layout
    costs = hetero_model.GroupCosts(model, cluster, lay)
    order, best = list(placed.node_order), placed.result
    pairs = [(a, b) for a in range(len(order)) for b in range(a + 1, len(order))]
    np.random.default_rng(seed).shuffle(pairs)  # no systematic bias towards the first ranks
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for a, b in pairs:
            if time.perf_counter() > deadline:
                break
            if fab.gpu[order[a]] == fab.gpu[order[b]] and _same_links(fab, order[a], order[b]):
                continue  # interchangeable nodes: the swap cannot change anything
            order[a], order[b] = order[b], order[a]
            res = hetero_model.evaluate(model, cluster, fab, lay, order, headroom, costs)
            if res.fits and res.estimate.step_time_s < best.estimate.step_time_s * (1 - 1e-9):
                best, improved = res, True
            else:
                order[a], order[b] = order[b], order[a]
    if best is placed.result:
        return placed
    return replace(placed, result=best, node_order=tuple(order), placement=f"{placed.placement}+swaps")


def _exhaustive(model, cluster, fab, placed: PlacedPlan, orders, headroom: float) -> PlacedPlan:
    """The best of every node order for `placed`'s layout (each with its partition-ILP split);
    never slower than `placed`."""
    lay = replace(placed.result.estimate.layout, layers_per_stage=None)
    found = best_of(model, cluster, fab, lay,
                    [(o, "exhaustive", f"all {len(orders)} orders") for o in orders], headroom)
    if found is None or found.result.estimate.step_time_s >= placed.result.estimate.step_time_s:
        return placed
    return found


def _same_links(fab: hetero_model.Fabric, i: int, j: int) -> bool:
    """Nodes i and j see identical links to every other node (and to each other both ways)."""
    rows = np.delete(fab.bw_Bps[[i, j]], [i, j], axis=1)
    return bool(np.array_equal(rows[0], rows[1]) and fab.bw_Bps[i, j] == fab.bw_Bps[j, i])


# --------------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------------


def _shortlist(plans, limit: int = MAX_LAYOUTS, per_shape: int = PER_SHAPE) -> list[Layout]:
    """Leading layouts, at most `per_shape` per (tp, cp, dp, pp), even layer split."""
    seen, count, out = set(), {}, []
    for est in plans:
        lay = replace(est.layout, layers_per_stage=None)
        shape = lay.dims.mesh_key
        if layout_key(lay) in seen or count.get(shape, 0) >= per_shape:
            continue
        seen.add(layout_key(lay))
        count[shape] = count.get(shape, 0) + 1
        out.append(lay)
        if len(out) == limit:
            break
    return out


def candidate_layouts(model: ModelSpec, cluster: ClusterSpec, fab: hetero_model.Fabric, seq_len: int,
                      global_batch_size: int, space: SearchSpace) -> tuple[SearchResult, list[Layout]]:
    """(the first nominal search's result, the shortlist): the leaders of the vectorised
    search on each nominal cluster, taken in turn, at most PER_SHAPE per shape."""
    bases = [search(model, nominal_cluster(cluster, fab, space.dtype, link), seq_len,
                    global_batch_size, replace(space, refine_top=0), top_k=MAX_LAYOUTS * PER_SHAPE)
             for link in nominal_links(fab)]
    mixed = [e for rank in itertools.zip_longest(*(b.plans for b in bases)) for e in rank if e]
    return bases[0], _shortlist(mixed)


def search_hetero(model: ModelSpec, cluster: ClusterSpec, seq_len: int, global_batch_size: int,
                  space: SearchSpace | None = None, top_k: int = 5, style: str = "pipette",
                  placement_budget_s: float = PLACEMENT_BUDGET_S) -> HeteroSearch:
    """Rank layouts *and* node placements on a heterogeneous cluster (module docstring)."""
    space = space or SearchSpace()
    start = time.perf_counter()
    megatron.require_dense(model)
    fab = hetero_model.fabric(cluster, style)
    base, layouts = candidate_layouts(model, cluster, fab, seq_len, global_batch_size, space)
    shapes = {lay.dims.mesh_key for lay in layouts}
    time_limit_s = min(5.0, max(0.5, placement_budget_s / max(1, len(shapes))))
    orders_by_shape, placed = {}, []
    for lay in layouts:
        shape = lay.dims.mesh_key
        if shape not in orders_by_shape:
            orders_by_shape[shape] = candidate_orders(model, cluster, fab, lay, time_limit_s)
        found = best_of(model, cluster, fab, lay, orders_by_shape[shape], space.headroom)
        if found is not None:
            placed.append(found)
    placed.sort(key=lambda p: p.result.estimate.step_time_s)
    lead = [improve_by_swaps(model, cluster, fab, p, space.headroom) for p in placed[:2]]
    orders = distinct_orders(cluster, fab, limit=EXHAUSTIVE_MAX_ORDERS)
    if orders is not None:
        lead = [_exhaustive(model, cluster, fab, p, orders, space.headroom) for p in lead]
    placed = sorted(lead + placed[2:], key=lambda p: p.result.estimate.step_time_s)[:top_k]
    solvers = sorted({status.split("(")[-1].rstrip(")") for p in placed
                      for status in (p.placement_status, p.partition_status) if "(" in status})
    result = replace(
        base, plans=tuple(p.result.estimate for p in placed), feasible=base.feasible,
        seconds=time.perf_counter() - start, solver=", ".join(solvers) or "heuristic",
        partitions=(), cluster=cluster, alternatives=(),
        nearest=base.nearest if not placed else ())
    notes = slow_host_notes(cluster, fab, placed[0]) if placed else []
    return HeteroSearch(result, tuple(placed), style,
                        sum(1 for o in orders_by_shape.values() if o[0][1].startswith("ilp")),
                        tuple(notes))


def slow_host_notes(cluster: ClusterSpec, fab: hetero_model.Fabric, placed: PlacedPlan,
                    ratio: float = 0.5) -> list[str]:
    """One line per slow host (median link below `ratio` x the cluster's median): where the
    plan put it — alone in its stage (no DP ring through its links) or, if not, why."""
    n = fab.num_nodes
    if n < 3:
        return []
    off = ~np.eye(n, dtype=bool)
    median = np.median(fab.bw_Bps[off])
    own = np.array([np.median(np.delete(fab.bw_Bps[i], i)) for i in range(n)])
    lay = placed.result.estimate.layout
    where = hetero_model.rank_nodes(lay, fab.gpus_per_node, placed.node_order)
    notes = []
    for i in np.flatnonzero(own < ratio * median):
        stages = sorted({int(s) for s in np.argwhere(where == i)[:, 0]})
        peers = {int(x) for s in stages for x in np.unique(where[s])} - {int(i)}
        hops = sum((s > 0) + (s < lay.pp - 1) for s in stages)
        head = (f"slow host {cluster.nodes[i].name} (median link {own[i] / 1e9:.1f} GB/s vs "
                f"{median / 1e9:.1f} GB/s): stage {', '.join(map(str, stages))}, {hops} pipeline hop(s)")
        if not peers:
            notes.append(f"{head}; alone in its stage, so no DP ring runs over its links")
        else:
            worst = min(min(fab.bw_Bps[i, j], fab.bw_Bps[j, i]) for j in peers) / 1e9
            notes.append(f"{head}; shares its stage's DP ring with {len(peers)} node(s) over "
                         f"links of >= {worst:.1f} GB/s: every stage of this layout spans "
                         f"{len(peers) + 1} nodes, and the layouts that would isolate it ranked slower")
    return notes


def plan_node_indices(plan) -> tuple[int, ...]:
    """Physical node index (row of the plan's cluster node list) for each node rank."""
    index = {n.name: i for i, n in enumerate(plan.cluster.nodes)}
    return tuple(index[name] for name in plan.node_order)


def plan_step_tasks(plan):
    """StepTasks of a pipette/holmes plan's slowest replica (per-stage views, actual hop
    links), for `cost_models.simulator.simulate_step` / `meshplan simulate`."""
    from cost_models import step_tasks

    style = plan.estimate.get("cost_model") if isinstance(plan.estimate, dict) else None
    fab = hetero_model.fabric(plan.cluster, style if style in hetero_model.STYLES else "pipette")
    order = plan_node_indices(plan)
    _, _, replica = step_tasks.simulate_placed(plan.model, plan.cluster, fab, plan.layout, order)
    return step_tasks.placed(plan.model, plan.cluster, fab, plan.layout, order, replica)


def distinct_orders(cluster: ClusterSpec, fab: hetero_model.Fabric, limit: int = 2_000):
    """Every node order up to swapping interchangeable nodes, or None when there are more than
    `limit` (brute force intractable). Nodes are interchangeable when they share (GPU type, NIC
    kind) and every link depends only on the two nodes' kinds (NIC-kind fabrics); with a
    measured matrix every node is its own class."""
    n = fab.num_nodes
    label = _labels(cluster)
    kinds = label.max() + 1
    table = np.full((kinds, kinds), np.nan)
    symmetric = True
    for i in range(n):
        for j in range(n):
            if i != j:
                seen = table[label[i], label[j]]
                symmetric &= bool(np.isnan(seen) or seen == fab.bw_Bps[i, j])
                table[label[i], label[j]] = fab.bw_Bps[i, j]
    if not symmetric:
        label = np.arange(n)
    counts = np.bincount(label)
    total = math.factorial(n) // math.prod(math.factorial(int(c)) for c in counts)
    if total > limit:
        return None
    members = [list(np.flatnonzero(label == c)) for c in range(len(counts))]
    out = []
    for seq in _multiset_permutations([int(c) for c in counts]):
        queues = [list(m) for m in members]
        out.append(tuple(int(queues[c].pop(0)) for c in seq))
    return out


def _multiset_permutations(counts: list[int]):
    """Every distinct sequence with counts[c] copies of c, in lexicographic order."""
    if not any(counts):
        yield ()
        return
    for c, left in enumerate(counts):
        if left:
            counts[c] -= 1
            for rest in _multiset_permutations(counts):
                yield (c, *rest)
            counts[c] += 1
