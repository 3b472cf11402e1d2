"""ILP for placing pipeline stages and data-parallel replica blocks onto non-uniform nodes.

The rank grid. With G GPUs per node, node rank k holds global ranks [kG, (k+1)G). When a
pipeline stage's ranks (`ParallelDims.stage_size`) are a multiple of G each node rank lies
inside one stage, so node ranks form a grid of pp stages x R replica blocks: node rank
k -> stage k // R, block k % R (`ParallelDims.node_grid`). A placement maps node ranks to physical nodes.

The cost of a placement (`placement_cost`), all per training step, in seconds:

    compute_s    = max_s  stage_work_s[s] / min(node_speed[n] for n in stage s)
    collective_s = max_s  stage_collective_bytes[s] / (1e9 * min(bw[i, j] for i != j in stage s))
    pipeline_s   = max_r  sum_{s < pp-1} hop_bytes[s] / (1e9 * bw[node(s, r), node(s+1, r)])
    objective_s  = compute_s + collective_s + pipeline_s

stage_collective_bytes[s] is what each node of stage s sends over the ring of the stage's R
nodes per step (the DP gradient reduce, plus TP/CP traffic when tp*cp > G; a ring runs at its
slowest link, and as the ring order is not chosen here every pair of the stage counts).
hop_bytes[s] is the point-to-point activation + gradient traffic between stages s and s+1 of
one replica block. bw is a node-pair bandwidth matrix in GB/s (10^9 B/s), measured or derived
from NIC types; it is made symmetric with min(bw, bw.T) and its diagonal is ignored. This is
the communication-aware placement of Holmes [Yang et al., "Holmes: Towards Distributed
Training Across Clusters with Heterogeneous NIC Environment", 2023: keep DP groups inside one
NIC type, let pipeline hops cross] and Pipette [Yim et al., DATE 2024: heavy traffic avoids
the slow links of a real cluster].

Two formulations (`method="auto"` picks exact up to `exact_max_nodes` = 8 nodes):
- exact: binary x[node, slot]; max/min linearised with auxiliary variables. Optimal, and
  equal to brute force over all node permutations; 0.1-2 s at 6-8 nodes, growing fast.
- aggregated: nodes are grouped into classes of interchangeable nodes (`node_classes`: equal
  speed, equal label, and equal bandwidth profile towards every class), and the ILP decides
  how many blocks of each stage each class takes and how many pipeline hops run between each
  pair of classes. Its pipeline term is the sum over hops of the worst class pair used, an
  upper bound of the max over blocks (exact when pp = 2). The counts are expanded into a
  concrete node order (paths through the hop flows, well-connected class members together)
  and improved by swaps inside each class; `objective_s` is the cost of that concrete
  placement. The solve starts from the better of the cluster order and a chain of
  best-linked classes, so the answer is never worse than those. 128 nodes in 4 classes:
  optimal in 0.6-1.2 s for 2-4 stages; with 8-16 stages the time limit (default 5 s) stops
  it with a gap of 0.1-0.3 on the class-level bound.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pulp

from cost_models.specs import InfeasibleLayout, SpecError
from planner.ilp_solver import SolveOutcome, solve

GB = 1e9
# Class sets per stage in the aggregated model; more would make it too big to solve quickly.
MAX_PATTERNS = 64


@dataclass(frozen=True, slots=True)
class PlacementCost:
    """The three terms of the placement objective (module docstring), in seconds."""

    compute_s: float
    collective_s: float
    pipeline_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.collective_s + self.pipeline_s


@dataclass(frozen=True, slots=True)
class Placement:
    """Which physical node holds each node rank, and how the solver found it.

    node_for_rank[k]: physical node index (row of bw_GBps) for node rank k = stage * R + block.
    objective_s: `placement_cost(...).total_s` of this placement; cost holds its three terms.
    method: "exact" or "aggregated"; num_classes: node classes the aggregated model used.
    status / gap / solver: of the MILP solved (for "aggregated", the class-level model; if it
        found nothing in time, status is "not_solved" and the answer is its starting order).
    seconds: wall time of the whole call.
    """

    node_for_rank: tuple[int, ...]
    objective_s: float
    cost: PlacementCost
    method: str
    num_classes: int
    status: str
    gap: float | None
    solver: str
    seconds: float

    def node_order(self, num_nodes: int) -> tuple[int, ...]:
        """Every node once: node_for_rank, then the idle nodes in index order (the form of the
        plan file's placement.node_order, by index)."""
        used = set(self.node_for_rank)
        return (*self.node_for_rank, *(n for n in range(num_nodes) if n not in used))


@dataclass(frozen=True, slots=True)
class _Problem:
    """Validated inputs; bw_GBps symmetric with +inf on the diagonal."""

    bw_GBps: np.ndarray
    speed: np.ndarray
    stages: int
    blocks: int
    collective_bytes: np.ndarray
    hop_bytes: np.ndarray
    work_s: np.ndarray

    @property
    def num_nodes(self) -> int:
        return self.bw_GBps.shape[0]

    def collective_s(self, s: int, bw_GBps: float) -> float:
        return float(self.collective_bytes[s] / (GB * bw_GBps)) if self.blocks > 1 else 0.0

    def hop_s(self, s: int, bw_GBps: float) -> float:
        return float(self.hop_bytes[s] / (GB * bw_GBps))


def placement_cost(
    bw_GBps: np.ndarray,
    node_for_rank: tuple[int, ...] | np.ndarray,
    stages: int,
    blocks: int,
    stage_collective_bytes: np.ndarray,
    hop_bytes: np.ndarray | float,
    stage_work_s: np.ndarray | None = None,
    node_speed: np.ndarray | None = None,
) -> PlacementCost:
    """Cost of one placement (module docstring); the ILPs minimise its total."""
    prob = _validate(bw_GBps, node_speed, stages, blocks, stage_collective_bytes, hop_bytes,
                     stage_work_s)
    nodes = np.asarray(node_for_rank)
    if (nodes.shape != (stages * blocks,) or len(set(nodes.tolist())) != nodes.size
            or nodes.min() < 0 or nodes.max() >= prob.num_nodes):
        raise SpecError(f"placement: node_for_rank must list {stages * blocks} distinct node "
                        f"indices below {prob.num_nodes}, got {nodes.tolist()}")
    return _cost(prob, nodes)


def _cost(prob: _Problem, nodes: np.ndarray) -> PlacementCost:
    grid = nodes.reshape(prob.stages, prob.blocks)
    compute = np.max(prob.work_s / prob.speed[grid].min(axis=1))
    collective = 0.0
    if prob.blocks > 1:
        ring_GBps = prob.bw_GBps[grid[:, :, None], grid[:, None, :]].min(axis=(1, 2))
        collective = np.max(prob.collective_bytes / (GB * ring_GBps))
    hop_GBps = prob.bw_GBps[grid[:-1], grid[1:]]  # [hop, block]
    paths = np.sum(prob.hop_bytes[:, None] / (GB * hop_GBps), axis=0)
    return PlacementCost(float(compute), float(collective), float(paths.max(initial=0.0)))


def place_nodes(
    bw_GBps: np.ndarray,
    stages: int,
    blocks: int,
    stage_collective_bytes: np.ndarray,
    hop_bytes: np.ndarray | float,
    stage_work_s: np.ndarray | None = None,
    node_speed: np.ndarray | None = None,
    node_labels: np.ndarray | None = None,
    method: str = "auto",
    exact_max_nodes: int = 8,
    time_limit_s: float = 5.0,
) -> Placement:
    """Choose the physical node for every node rank (stage-major) to minimise the placement
    cost of the module docstring.

    bw_GBps: (N, N) node-pair bandwidth, N >= stages*blocks (extra nodes stay idle).
    stage_collective_bytes: (stages,); hop_bytes: (stages-1,) or a scalar; stage_work_s:
    (stages,) compute seconds per step on a speed-1.0 node (default 0); node_speed: (N,)
    relative speed (default 1); node_labels: (N,) ints, e.g. NIC or GPU type, that the
    aggregated model never merges. method: "auto" | "exact" | "aggregated".
    """
    start = time.perf_counter()
    prob = _validate(bw_GBps, node_speed, stages, blocks, stage_collective_bytes, hop_bytes,
                     stage_work_s)
    slots = stages * blocks
    if prob.num_nodes < slots:
        raise InfeasibleLayout(
            f"placement: the layout needs {slots} nodes ({stages} stages x {blocks} blocks) "
            f"but the cluster has {prob.num_nodes}; use fewer GPUs or add nodes"
        )
    if method not in ("auto", "exact", "aggregated"):
        raise SpecError(f"placement: method must be auto, exact or aggregated, got {method!r}")
    if method == "exact" or (method == "auto" and prob.num_nodes <= exact_max_nodes):
        nodes, outcome = _solve_exact(prob, time_limit_s)
        kind, classes = "exact", prob.num_nodes
    else:
        labels = node_classes(prob.bw_GBps, prob.speed, node_labels)
        nodes, outcome = _solve_aggregated(prob, labels, time_limit_s, start)
        kind, classes = "aggregated", int(labels.max()) + 1
    cost = _cost(prob, nodes)
    return Placement(
        node_for_rank=tuple(int(n) for n in nodes),
        objective_s=cost.total_s,
        cost=cost,
        method=kind,
        num_classes=classes,
        status=outcome.status,
        gap=outcome.gap,
        solver=outcome.solver,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _validate(bw, speed, stages, blocks, collective, hop, work) -> _Problem:
    for name, value in (("stages", stages), ("blocks", blocks)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise SpecError(f"placement: {name} must be a positive integer, got {value!r}")
    bw = _numbers("bw_GBps", bw)
    if bw.ndim != 2 or bw.shape[0] != bw.shape[1]:
        raise SpecError(f"placement: bw_GBps must be a square node x node matrix, got {bw.shape}")
    n = bw.shape[0]
    off = ~np.eye(n, dtype=bool)
    if np.any(~np.isfinite(bw[off]) | (bw[off] <= 0)):
        raise SpecError("placement: every off-diagonal bw_GBps entry must be a positive "
                        "finite bandwidth in GB/s; measure or derive the missing node pairs")
    bw = np.minimum(bw, bw.T)  # a link is as fast as its slower direction
    np.fill_diagonal(bw, np.inf)
    return _Problem(
        bw_GBps=bw,
        speed=_vector("node_speed", speed, n, default=1.0, positive=True),
        stages=int(stages),
        blocks=int(blocks),
        collective_bytes=_vector("stage_collective_bytes", collective, stages),
        hop_bytes=_vector("hop_bytes", hop, stages - 1, default=0.0 if stages == 1 else None,
                          broadcast=True),
        work_s=_vector("stage_work_s", work, stages, default=0.0),
    )


def _numbers(name: str, value) -> np.ndarray:
    try:
        return np.array(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"placement: {name} must be numbers, got {value!r}") from exc


def _vector(name, value, length, default=None, positive=False, broadcast=False) -> np.ndarray:
    if value is None:
        if default is None:
            raise SpecError(f"placement: {name} is required")
        return np.full(length, default)
    arr = _numbers(name, value)
    if arr.ndim == 0 and broadcast:
        arr = np.full(length, float(arr))
    if arr.shape != (length,):
        raise SpecError(f"placement: {name} needs {length} entries, got shape {arr.shape}")
    if np.any(~np.isfinite(arr) | (arr <= 0 if positive else arr < 0)):
        sign = "positive" if positive else "non-negative"
        raise SpecError(f"placement: {name} must be {sign} and finite, got {arr.tolist()}")
    return arr


# --------------------------------------------------------------------------------------------
# exact node-level model
# --------------------------------------------------------------------------------------------


def _solve_exact(prob: _Problem, time_limit_s: float) -> tuple[np.ndarray, SolveOutcome]:
    """x[n][k] = 1 iff node n holds node rank k. Max terms become variables bounded below by
    every candidate: a pair (i, j) both in stage s forces the collective term up to its cost
    via y_is + y_js - 1; a hop's time is the cost row of the node at one end against the
    node at the other, switched off (big-M) unless that end is chosen, from both ends."""
    n_nodes, stages, blocks = prob.num_nodes, prob.stages, prob.blocks
    model = pulp.LpProblem("placement_exact", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{n}_{k}", cat="Binary") for k in range(stages * blocks)]
         for n in range(n_nodes)]
    for k in range(stages * blocks):
        model += pulp.lpSum(x[n][k] for n in range(n_nodes)) == 1, f"slot_{k}"
    for n in range(n_nodes):
        model += pulp.lpSum(x[n]) <= 1, f"node_{n}"
    in_stage = [[pulp.lpSum(x[n][s * blocks: (s + 1) * blocks]) for s in range(stages)]
                for n in range(n_nodes)]
    for r in range(blocks - 1):  # replica blocks are interchangeable: order them by stage 0
        model += (pulp.lpSum(n * x[n][r] for n in range(n_nodes)) + 1
                  <= pulp.lpSum(n * x[n][r + 1] for n in range(n_nodes))), f"order_{r}"
    compute = pulp.LpVariable("compute_s", 0)
    collective = pulp.LpVariable("collective_s", 0)
    pipeline = pulp.LpVariable("pipeline_s", 0)
    _exact_compute(model, prob, in_stage, compute)
    _exact_collective(model, prob, in_stage, collective)
    _exact_pipeline(model, prob, x, pipeline)
    model += compute + collective + pipeline
    outcome = solve(model, time_limit_s)
    _raise_if_unsolved(outcome)
    nodes = np.array([max(range(n_nodes), key=lambda n, k=k: x[n][k].value())
                      for k in range(stages * blocks)])
    return nodes, outcome


def _exact_compute(model, prob: _Problem, in_stage, compute) -> None:
    for s in range(prob.stages):
        if prob.work_s[s] > 0:
            for n in range(prob.num_nodes):
                model += compute >= float(prob.work_s[s] / prob.speed[n]) * in_stage[n][s]


def _exact_collective(model, prob: _Problem, in_stage, collective) -> None:
    if prob.blocks < 2:
        return
    for s in range(prob.stages):
        for i in range(prob.num_nodes):
            for j in range(i + 1, prob.num_nodes):
                cost = prob.collective_s(s, prob.bw_GBps[i, j])
                if cost > 0:
                    model += collective >= cost * (in_stage[i][s] + in_stage[j][s] - 1)


def _exact_pipeline(model, prob: _Problem, x, pipeline) -> None:
    n_nodes, blocks = prob.num_nodes, prob.blocks
    for r in range(blocks):
        hops = []
        for s in range(prob.stages - 1):
            hop = pulp.LpVariable(f"hop_{s}_{r}", 0)
            here, there = s * blocks + r, (s + 1) * blocks + r
            for i in range(n_nodes):
                row = [prob.hop_s(s, prob.bw_GBps[i, j]) if j != i else 0.0
                       for j in range(n_nodes)]
                big = max(row)
                model += hop >= pulp.lpSum(c * x[j][there] for j, c in enumerate(row)) - big * (
                    1 - x[i][here])
                model += hop >= pulp.lpSum(c * x[j][here] for j, c in enumerate(row)) - big * (
                    1 - x[i][there])
            hops.append(hop)
        if hops:
            model += pipeline >= pulp.lpSum(hops), f"path_{r}"


def _raise_if_unsolved(outcome: SolveOutcome) -> None:
    if outcome.status not in ("optimal", "feasible"):
        raise InfeasibleLayout(
            f"placement: solver {outcome.solver} ended with status {outcome.status} after "
            f"{outcome.seconds:.1f} s; raise time_limit_s or use method='aggregated'"
        )


# --------------------------------------------------------------------------------------------
# node classes
# --------------------------------------------------------------------------------------------


def node_classes(
    bw_GBps: np.ndarray,
    node_speed: np.ndarray | None = None,
    node_labels: np.ndarray | None = None,
    rel_tol: float = 0.1,
    max_classes: int = 8,
) -> np.ndarray:
    """Class index per node: nodes that are interchangeable up to `rel_tol`.

    Bandwidths (and speeds) within rel_tol of each other are treated as equal; classes start
    from (label, speed) and are refined until every node of a class sees the same multiset of
    bandwidths towards every class (colour refinement, as in Weisfeiler-Lehman). If that gives
    more than max_classes, the tolerance is doubled (up to 3 times), then nodes are binned by
    their median bandwidth. Classes are numbered by first appearance.
    """
    bw = np.minimum(bw_GBps, np.asarray(bw_GBps).T).astype(float)
    n = bw.shape[0]
    speed = np.ones(n) if node_speed is None else np.asarray(node_speed, dtype=float)
    labels = np.zeros(n, dtype=int) if node_labels is None else np.asarray(node_labels)
    if labels.shape != (n,):
        raise SpecError(f"placement: node_labels needs {n} entries, got shape {labels.shape}")
    for attempt in range(4):
        tol = rel_tol * 2**attempt
        qbw, qspeed = _quantise(bw, tol), _quantise(speed, tol)
        colours = _renumber([(labels[i], qspeed[i]) for i in range(n)])
        colours = _refine(colours, qbw)
        if colours.max() + 1 <= max_classes:
            return colours
    median = np.nanmedian(np.where(np.eye(n, dtype=bool), np.nan, bw), axis=1) if n > 1 else bw[0]
    edges = np.quantile(median, np.linspace(0, 1, max_classes + 1)[1:-1])
    return _renumber([(labels[i], qspeed[i], int(np.searchsorted(edges, median[i])))
                      for i in range(n)])


def _quantise(values: np.ndarray, rel_tol: float) -> np.ndarray:
    """Map each finite value to the smallest of its group (non-finite ones stay); sorted
    values start a new group when they exceed the group's first value by more than rel_tol."""
    flat = np.unique(values[np.isfinite(values)])
    reps = flat.copy()
    for i in range(1, len(flat)):
        reps[i] = reps[i - 1] if flat[i] <= reps[i - 1] * (1 + rel_tol) else flat[i]
    out = np.array(values, dtype=float)
    finite = np.isfinite(out)
    out[finite] = reps[np.searchsorted(flat, out[finite])]
    return out


def _renumber(keys: list) -> np.ndarray:
    seen: dict = {}
    return np.array([seen.setdefault(k, len(seen)) for k in keys])


def _refine(colours: np.ndarray, qbw: np.ndarray) -> np.ndarray:
    """Split classes until each node of a class sees the same sorted (class, bandwidth) codes
    towards all other nodes."""
    n = len(colours)
    levels, bw_id = np.unique(qbw, return_inverse=True)
    bw_id = bw_id.reshape(n, n)
    off = ~np.eye(n, dtype=bool)
    while True:
        codes = (colours[None, :] * len(levels) + bw_id)[off].reshape(n, n - 1)
        signature = np.column_stack([colours, np.sort(codes, axis=1)])
        refined = _renumber([row.tobytes() for row in signature])
        if refined.max() == colours.max():
            return refined
        colours = refined


# --------------------------------------------------------------------------------------------
# aggregated (class-level) model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Classes:
    """Members, count, slowest speed and worst pair bandwidth per class (pair)."""

    members: tuple[tuple[int, ...], ...]
    speed: np.ndarray
    bw_GBps: np.ndarray  # [c, d]: min over i in c, j in d, i != j (inf for a 1-node class c=d)

    @property
    def count(self) -> int:
        return len(self.members)


def _class_table(prob: _Problem, labels: np.ndarray) -> _Classes:
    members = tuple(tuple(np.flatnonzero(labels == c).tolist()) for c in range(labels.max() + 1))
    k = len(members)
    bw = np.array([[prob.bw_GBps[np.ix_(members[c], members[d])].min() for d in range(k)]
                   for c in range(k)])
    speed = np.array([prob.speed[list(m)].min() for m in members])
    return _Classes(members, speed, bw)


def _solve_aggregated(prob: _Problem, labels: np.ndarray, time_limit_s: float,
                      start: float) -> tuple[np.ndarray, SolveOutcome]:
    """Class-level MILP started from the better of two simple orders, expanded to nodes,
    then improved by swaps; the heuristic start is kept if the expansion comes out worse."""
    table = _class_table(prob, labels)
    guess = min(_chain_order(prob, table), np.arange(prob.stages * prob.blocks),
                key=lambda nodes: _cost(prob, nodes).total_s)
    grid = labels[guess].reshape(prob.stages, prob.blocks)
    patterns = _patterns(prob, table, {tuple(sorted(set(row.tolist()))) for row in grid})
    model, take, flow = _aggregated_model(prob, table, patterns)
    left_s = max(0.2, 0.9 * (time_limit_s - (time.perf_counter() - start)))  # room to expand
    outcome = solve(model, left_s, _start_values(prob, table, grid, patterns))
    nodes = guess  # with no incumbent in time (status not_solved) the start is the answer
    if outcome.status in ("optimal", "feasible"):
        counts = np.array([[round(v.value()) for v in row] for row in take])  # [class, stage]
        hops = np.array([[[round(v.value()) for v in row] for row in per_s] for per_s in flow])
        expanded = _concrete_nodes(prob, table, _class_paths(prob, table, counts, hops))
        if _cost(prob, expanded).total_s <= _cost(prob, guess).total_s:
            nodes = expanded
    left_s = time_limit_s - (time.perf_counter() - start)
    budget_s = float(np.clip(0.5 * left_s, 0.05, 0.5))
    return _improve_by_swaps(prob, labels, nodes, budget_s), outcome


def _chain_order(prob: _Problem, table: _Classes) -> np.ndarray:
    """Stage-major node order: the best-connected class first, then each time the class
    best linked to the previous one; members in fastest-link chains; the tail stays idle."""
    left = set(range(table.count))
    current = max(left, key=lambda c: (table.bw_GBps[c, c] if len(table.members[c]) > 1
                                       else 0.0, table.speed[c]))
    order = []
    while True:
        left.discard(current)
        order.extend(_chain(prob.bw_GBps, table.members[current]))
        if not left:
            break
        current = max(sorted(left), key=lambda d, c=current: table.bw_GBps[c, d])
    return np.array(order[: prob.stages * prob.blocks])


def _start_values(prob: _Problem, table: _Classes, grid: np.ndarray,
                  patterns: list[tuple[int, ...]]) -> dict[str, float]:
    """Values of the aggregated model's integer variables for a placement whose classes
    per (stage, block) are `grid`."""
    values: dict[str, float] = {}
    for s in range(prob.stages):
        used = tuple(sorted(set(grid[s].tolist())))
        for pat in patterns:
            values[f"p_{s}_{'_'.join(map(str, pat))}"] = float(pat == used)
        for c in range(table.count):
            count = int(np.sum(grid[s] == c))
            values[f"a_{c}_{s}"] = float(count)
            values[f"w_{c}_{s}"] = float(count >= 2)
            if s + 1 < prob.stages:
                for d in range(table.count):
                    hops = int(np.sum((grid[s] == c) & (grid[s + 1] == d)))
                    values[f"f_{s}_{c}_{d}"] = float(hops)
                    values[f"g_{s}_{c}_{d}"] = float(hops > 0)
    return values


def _aggregated_model(prob: _Problem, table: _Classes, patterns: list[tuple[int, ...]]):
    """take[c][s]: blocks of stage s on class c. Each stage picks one pattern, the set of
    classes it uses (binary pick[s][S]); a pattern fixes the stage's slowest speed and its
    slowest inter-class link, so the compute and collective maxima are linear in the picks,
    which keeps the LP relaxation tight. A class holding two or more blocks of a stage also
    puts its own inner links into that stage's ring (`shared`)."""
    k, stages, blocks = table.count, prob.stages, prob.blocks
    model = pulp.LpProblem("placement_aggregated", pulp.LpMinimize)
    size = [len(m) for m in table.members]
    take = [[pulp.LpVariable(f"a_{c}_{s}", 0, min(blocks, size[c]), cat="Integer")
             for s in range(stages)] for c in range(k)]
    compute = pulp.LpVariable("compute_s", 0)
    collective = pulp.LpVariable("collective_s", 0)
    for s in range(stages):
        pick = {pat: pulp.LpVariable(f"p_{s}_{'_'.join(map(str, pat))}", cat="Binary")
                for pat in patterns}
        model += pulp.lpSum(pick.values()) == 1, f"pattern_{s}"
        model += pulp.lpSum(take[c][s] for c in range(k)) == blocks, f"blocks_{s}"
        for c in range(k):
            mine = pulp.lpSum(v for pat, v in pick.items() if c in pat)
            model += take[c][s] <= min(blocks, size[c]) * mine
            model += take[c][s] >= mine
        if prob.work_s[s] > 0:
            model += compute >= pulp.lpSum(
                float(prob.work_s[s] / table.speed[list(pat)].min()) * v
                for pat, v in pick.items())
        if blocks > 1:
            model += collective >= pulp.lpSum(
                _pattern_collective_s(prob, table, s, pat) * v for pat, v in pick.items())
            for c in range(k):
                if size[c] > 1:
                    shared = pulp.LpVariable(f"w_{c}_{s}", cat="Binary")
                    model += take[c][s] - 1 <= (blocks - 1) * shared
                    model += collective >= prob.collective_s(s, table.bw_GBps[c, c]) * shared
    for c in range(k):
        model += pulp.lpSum(take[c]) <= size[c], f"class_size_{c}"
    flow, pipeline = _aggregated_pipeline(model, prob, table, take)
    model += compute + collective + pipeline
    return model, take, flow


def _patterns(prob: _Problem, table: _Classes,
              must: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Class sets a stage may use: every set with enough members for its blocks, or, beyond
    MAX_PATTERNS of them, sets of at most one class more than the fewest that can hold a
    stage, best-linked first, cut at MAX_PATTERNS. `must` (the start's sets) always stays."""
    size = np.array([len(m) for m in table.members])
    found = [pat for k in range(1, min(table.count, prob.blocks) + 1)
             for pat in itertools.combinations(range(table.count), k)
             if size[list(pat)].sum() >= prob.blocks]
    if len(found) > MAX_PATTERNS:
        fewest = int(np.searchsorted(np.cumsum(np.sort(size)[::-1]), prob.blocks)) + 1
        found = [pat for pat in found if len(pat) <= fewest + 1]
        found.sort(key=lambda pat: _pattern_rank(table, pat))
        found = found[:MAX_PATTERNS]
    return sorted(set(found) | must)


def _pattern_rank(table: _Classes, pat: tuple[int, ...]) -> tuple[float, float, int]:
    """Sort key: slowest link inside the set (fastest first), then slowest GPU, then size."""
    inner = table.bw_GBps[np.ix_(pat, pat)]
    return (-float(inner.min()), -float(table.speed[list(pat)].min()), len(pat))


def _pattern_collective_s(prob: _Problem, table: _Classes, s: int, pat: tuple[int, ...]):
    worst = min((table.bw_GBps[c, d] for c in pat for d in pat if c < d), default=np.inf)
    return prob.collective_s(s, worst) if np.isfinite(worst) else 0.0


def _aggregated_pipeline(model, prob: _Problem, table: _Classes, take):
    """Flows conserve blocks between consecutive stages; pipeline_s >= sum over hops of the
    slowest class pair carrying any flow (an upper bound of the slowest block's path)."""
    k, blocks = table.count, prob.blocks
    pipeline = pulp.LpVariable("pipeline_s", 0)
    flow, worst = [], []
    for s in range(prob.stages - 1):
        f = [[pulp.LpVariable(f"f_{s}_{c}_{d}", 0, blocks, cat="Integer") for d in range(k)]
             for c in range(k)]
        hop = pulp.LpVariable(f"hop_{s}", 0)
        for c in range(k):
            model += pulp.lpSum(f[c]) == take[c][s]
            model += pulp.lpSum(f[d][c] for d in range(k)) == take[c][s + 1]
            for d in range(k):
                if c == d and len(table.members[c]) == 1:
                    model += f[c][d] == 0  # a single node cannot follow itself
                    continue
                on = pulp.LpVariable(f"g_{s}_{c}_{d}", cat="Binary")
                model += f[c][d] <= blocks * on
                model += hop >= prob.hop_s(s, table.bw_GBps[c, d]) * on
        # the slowest hop is no faster than the mean one: a cut that tightens the relaxation
        model += hop * blocks >= pulp.lpSum(
            prob.hop_s(s, table.bw_GBps[c, d]) * f[c][d] for c in range(k) for d in range(k))
        flow.append(f)
        worst.append(hop)
    model += pipeline >= pulp.lpSum(worst)
    return flow, pipeline


def _class_paths(prob: _Problem, table: _Classes, counts: np.ndarray,
                 hops: np.ndarray) -> np.ndarray:
    """[stage, block] class of every slot: decompose the hop flows into block paths, giving
    the blocks with the slowest path so far the fastest next hop left."""
    classes = np.zeros((prob.stages, prob.blocks), dtype=int)
    classes[0] = np.repeat(np.arange(table.count), counts[:, 0])
    path_s = np.zeros(prob.blocks)
    for s in range(prob.stages - 1):
        left = hops[s].copy()
        for r in np.argsort(-path_s, kind="stable"):
            c = classes[s, r]
            options = [d for d in range(table.count) if left[c, d] > 0]
            d = min(options, key=lambda d, c=c: prob.hop_s(s, table.bw_GBps[c, d]))
            left[c, d] -= 1
            classes[s + 1, r] = d
            path_s[r] += prob.hop_s(s, table.bw_GBps[c, d])
    return classes


def _concrete_nodes(prob: _Problem, table: _Classes, classes: np.ndarray) -> np.ndarray:
    """Physical node per slot: each class's members in a well-connected order (greedy chain
    of fastest links), handed out stage by stage so a stage's nodes of a class sit together."""
    queues = [list(_chain(prob.bw_GBps, m)) for m in table.members]
    nodes = np.zeros(prob.stages * prob.blocks, dtype=int)
    for s in range(prob.stages):
        for r in range(prob.blocks):
            nodes[s * prob.blocks + r] = queues[classes[s, r]].pop(0)
    return nodes


def _chain(bw: np.ndarray, members: tuple[int, ...]) -> list[int]:
    order, rest = [members[0]], set(members[1:])
    while rest:
        nxt = max(sorted(rest), key=lambda j: bw[order[-1], j])
        order.append(nxt)
        rest.remove(nxt)
    return order


def _improve_by_swaps(prob: _Problem, labels: np.ndarray, nodes: np.ndarray,
                      budget_s: float) -> np.ndarray:
    """First-improvement swaps of two nodes of the same class (idle ones included), under a
    time budget; keeps the class counts the ILP chose and never makes the cost worse."""
    deadline = time.perf_counter() + budget_s
    best, best_s = nodes.copy(), _cost(prob, nodes).total_s
    idle = [n for n in range(prob.num_nodes) if n not in set(nodes.tolist())]
    pool = np.concatenate([best, np.array(idle, dtype=int)])  # slots, then idle nodes
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for a in range(len(best)):
            for b in range(a + 1, len(pool)):
                if labels[pool[a]] != labels[pool[b]] or time.perf_counter() > deadline:
                    continue
                pool[[a, b]] = pool[[b, a]]
                trial_s = _cost(prob, pool[: len(best)]).total_s
                if trial_s < best_s * (1 - 1e-12):
                    best, best_s, improved = pool[: len(best)].copy(), trial_s, True
                else:
                    pool[[a, b]] = pool[[b, a]]
    return best
