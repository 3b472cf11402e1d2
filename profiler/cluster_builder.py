"""Turning measurements into a ClusterSpec and the printed summary (the file itself is written
by `planner.specfiles.write_cluster_yaml`, the one cluster.yaml module)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from cost_models.specs import ClusterSpec, GpuSpec, LinkSpec, NodeSpec, SpecError
from planner.specfiles import cluster_presets, gpu_preset, load_cluster
from profiler.p2p import fmt_rate

SLOW_FRACTION = 0.6
"""A node or pair slower than this fraction of the median is flagged."""
DOMAIN_GAP = 3.0
"""A block of node pairs is an NVLink domain when its slowest pair is at least this many times
faster than the next slower pair: NVLink 5 through an NVL72's switches (900 GB/s per GPU) vs a
400 Gb/s NIC (50 GB/s) is 18x; 3x is far above run-to-run noise and above the 1/0.6 = 1.7x at
which a pair is merely flagged slow."""

Matrix = tuple[tuple[float, ...], ...]


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """Who is slow, from the node-pair bandwidth matrix."""

    node_mean_GBps: dict[str, float]
    """Per node: mean over its peers of the pair bandwidth (both directions averaged)."""
    median_node_GBps: float
    slow_nodes: tuple[str, ...]
    slow_pairs: tuple[tuple[str, str, float], ...]
    """(a, b, slower direction GB/s) for pairs slow although neither host is."""
    median_pair_GBps: float
    """Median over pairs of unflagged hosts of the slower direction (nan if none)."""
    lines: tuple[str, ...]


def summarize(names: tuple[str, ...], bw: Matrix, fraction: float = SLOW_FRACTION) -> Summary:
    """Flag hosts whose mean bandwidth < fraction x the median host; then, among pairs of
    unflagged hosts, pairs whose slower direction < fraction x their median (a slow host's
    pairs would otherwise drag that median down and hide a degraded pair)."""
    n = len(names)
    pair_mean = {(i, j): (bw[i][j] + bw[j][i]) / 2 for i in range(n) for j in range(i + 1, n)}
    node_mean = {
        names[i]: statistics.fmean(pair_mean[tuple(sorted((i, j)))] for j in range(n) if j != i)
        for i in range(n)
    }
    median_node = statistics.median(node_mean.values())
    slow_nodes = tuple(k for k, v in node_mean.items() if v < fraction * median_node)
    pair_min = {(i, j): min(bw[i][j], bw[j][i]) for (i, j) in pair_mean
                if names[i] not in slow_nodes and names[j] not in slow_nodes}
    median_pair = statistics.median(pair_min.values()) if pair_min else math.nan
    slow_pairs = tuple((names[i], names[j], v) for (i, j), v in pair_min.items()
                       if v < fraction * median_pair)
    lines = [f"slow host: {k} ({fmt_rate(node_mean[k])} vs median {fmt_rate(median_node)})"
             for k in slow_nodes]
    lines += [f"slow pair: {a}<->{b} ({fmt_rate(v)} vs median {fmt_rate(median_pair)})"
              for a, b, v in slow_pairs]
    if not lines:
        lines.append(f"no slow hosts or pairs (threshold {fraction} x median)")
    return Summary(node_mean, median_node, slow_nodes, slow_pairs, median_pair, tuple(lines))


# --------------------------------------------------------------------------------------------
# NVLink domains
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Domains:
    """Blocks of nodes whose pairs are much faster than the pairs between blocks."""

    blocks: tuple[tuple[int, ...], ...]
    """Node indices of each domain (two or more nodes each), in node order."""
    inside: tuple[tuple[int, int], ...]
    """Pairs (i < j) of nodes in one domain."""
    across: tuple[tuple[int, int], ...]
    """Every other pair."""


def _components(n: int, edges: set[tuple[int, int]]) -> list[tuple[int, ...]]:
    """Connected components of the graph on 0..n-1, each sorted, ordered by first node."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in edges:
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted((tuple(g) for g in groups.values()), key=lambda g: g[0])


def _domains_at(n: int, pair: dict[tuple[int, int], float], cut: float) -> Domains | None:
    """Domains when pairs >= cut are the fast ones: every block must be a clique of fast pairs
    (a fabric joins all its members; a chain of fast pairs is not one) and at least one node
    must lie outside each block (else nothing slower was measured to compare with)."""
    fast = {p for p, v in pair.items() if v >= cut}
    parts = _components(n, fast)
    blocks = tuple(c for c in parts if len(c) > 1)
    if len(parts) < 2 or not blocks:
        return None
    inside = tuple((i, j) for c in blocks for a, i in enumerate(c) for j in c[a + 1:])
    if any(p not in fast for p in inside):
        return None
    return Domains(blocks, inside, tuple(p for p in pair if p not in set(inside)))


def infer_domains(bw: Matrix, gap: float = DOMAIN_GAP) -> Domains | None:
    """NVLink domains from the node-pair bandwidth matrix, or None.

    Each pair's speed is its slower direction. Sorted, the speeds of a rack-scale cluster fall
    in two tiers (NVLink inside a rack, NICs between racks); the cut is placed at a jump of at
    least `gap` between consecutive speeds, trying the largest jump first (a degraded pair can
    make a larger jump lower down), and kept when the fast pairs form cliques of two or more
    nodes with other nodes outside (`_domains_at`). By bandwidth alone a lone node outside one
    block reads the same as a slow host; the summary says so (`domain_lines`)."""
    n = len(bw)
    pair = {(i, j): min(bw[i][j], bw[j][i]) for i in range(n) for j in range(i + 1, n)}
    speeds = sorted(set(pair.values()))
    jumps = sorted(((hi / lo, hi) for lo, hi in zip(speeds, speeds[1:], strict=False)
                    if lo > 0 and hi / lo >= gap), reverse=True)
    for _, cut in jumps:
        found = _domains_at(n, pair, cut)
        if found is not None:
            return found
    return None


def domain_link(bw: Matrix, lat: Matrix, pairs: tuple[tuple[int, int], ...],
                kind: str) -> LinkSpec:
    """Median bandwidth (slower direction) and latency of the given node pairs."""
    return LinkSpec(kind, statistics.median(min(bw[i][j], bw[j][i]) for i, j in pairs),
                    statistics.median((lat[i][j] + lat[j][i]) / 2 for i, j in pairs), 1.0)


def domain_lines(cluster: ClusterSpec, slow_nodes: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Summary lines naming each NVLink domain of a (profiled) cluster and its links."""
    names: dict[str, list[str]] = {}
    for node in cluster.nodes:
        if node.domain:
            names.setdefault(node.domain, []).append(node.name)
    if not names:
        return ()
    inside = fmt_rate(cluster.domain_link_spec.bandwidth_GBps)
    across = fmt_rate(cluster.inter_node.bandwidth_GBps)
    lines = [f"NVLink domain {d}: {', '.join(members)} (pairs inside {inside}, "
             f"across domains {across})" for d, members in names.items()]
    alone = [n.name for n in cluster.nodes if not n.domain]
    if alone and len(names) == 1 and set(alone) <= set(slow_nodes):
        lines.append(f"note: {', '.join(alone)} outside the only domain also read as slow "
                     "host(s): bandwidth alone cannot tell a lone node from a slow one; if "
                     "there is no such fabric, delete `domain` from the nodes in cluster.yaml")
    return tuple(lines)


def with_domains(nodes: list[NodeFacts], bw: Matrix, lat: Matrix, found: Domains
                 ) -> tuple[list[NodeFacts], Matrix, Matrix, list[str], Domains]:
    """Nodes reordered so that each domain's nodes are consecutive, largest domain first
    (ClusterSpec lists a domain as one run, as racks are listed), the matrices permuted alike,
    the domain names nvl0, nvl1... per node, and `found` in the new indices."""
    blocks = sorted(found.blocks, key=len, reverse=True)
    order = [i for block in blocks for i in block]
    order += [i for i in range(len(nodes)) if i not in set(order)]
    new = {old: k for k, old in enumerate(order)}
    label = {new[i]: f"nvl{k}" for k, block in enumerate(blocks) for i in block}

    def permute(m: Matrix) -> Matrix:
        return tuple(tuple(m[a][b] for b in order) for a in order)

    def renumber(pairs: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(sorted((new[i], new[j]))) for i, j in pairs)

    moved = Domains(tuple(tuple(new[i] for i in b) for b in blocks), renumber(found.inside),
                    renumber(found.across))
    return ([nodes[i] for i in order], permute(bw), permute(lat),
            [label.get(k, "") for k in range(len(order))], moved)


# --------------------------------------------------------------------------------------------
# ClusterSpec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the profile learned about one node."""

    name: str
    gpus: int
    """Ranks (GPUs, or processes on CPU) torchrun started on it."""
    gpu_type: str
    """A planner/data/gpus.yaml preset name."""
    memory_GiB: float
    """Smallest total device memory among its ranks (CPU: host memory / ranks)."""
    nic: str


def fallback_links(gpu_type: str) -> tuple[LinkSpec, LinkSpec]:
    """Preset (intra, inter) links for what could not be measured (1 rank per node, 1 node)."""
    for name in cluster_presets():
        preset = load_cluster(name)
        if preset.gpu.name == gpu_type:
            return preset.intra_node, preset.inter_node
    preset = load_cluster("dgx-h100")
    return preset.intra_node, preset.inter_node


def _largest_busbw(samples: list[dict], op: str = "all_reduce") -> tuple[float, float] | None:
    """(best busbw GB/s, per-step latency s) of one all-reduce sweep; None if empty."""
    mine = [s for s in samples if s["op"] == op]
    if not mine:
        return None
    smallest = min(mine, key=lambda s: s["bytes"])
    steps = 2 * (smallest["ranks"] - 1)  # ring all-reduce: 2(n-1) sequential steps
    return max(s["busbw_GBps"] for s in mine), smallest["seconds"] / steps


def intra_link(collectives: dict, kind: str, fallback: LinkSpec) -> tuple[LinkSpec, str | None]:
    """Intra-node link from the per-node all-reduce sweeps (median over nodes)."""
    per_node = [_largest_busbw(s) for s in collectives.get("intra_node", {}).values()]
    per_node = [x for x in per_node if x is not None]
    if not per_node:
        return fallback, "intra_node: not measured (one rank per node), preset value"
    bw = statistics.median(x[0] for x in per_node)
    lat = statistics.median(x[1] for x in per_node)
    return LinkSpec(kind, bw, lat, 1.0), None


def inter_link(bw: Matrix | None, lat: Matrix | None, kind: str,
               fallback: LinkSpec) -> tuple[LinkSpec, str | None]:
    """Inter-node link: median of the measured pair bandwidths and latencies."""
    if bw is None or lat is None:
        return fallback, "inter_node: not measured (one node), preset value"
    off = [(bw[i][j], lat[i][j]) for i in range(len(bw)) for j in range(len(bw)) if i != j]
    return LinkSpec(kind, statistics.median(b for b, _ in off),
                    statistics.median(t for _, t in off), 1.0), None


def gpu_types(nodes: list[NodeFacts]) -> dict[str, GpuSpec]:
    """Preset specs with the measured memory (the smallest among nodes of that type)."""
    out: dict[str, GpuSpec] = {}
    for gpu in sorted({n.gpu_type for n in nodes}):
        memory = min(n.memory_GiB for n in nodes if n.gpu_type == gpu)
        out[gpu] = replace(gpu_preset(gpu), name=gpu, memory_GiB=round(memory, 2))
    return out


def build_cluster(name: str, nodes: list[NodeFacts], p2p_bw: Matrix | None,
                  p2p_lat: Matrix | None, collectives: dict,
                  intra_kind: str, domain_kind: str | None = None) -> tuple[ClusterSpec, list[str]]:
    """The ClusterSpec for cluster.yaml, and notes on what fell back to presets or was
    inferred. NVLink domains found in the pair matrix (`infer_domains`) set each member's
    `domain` and `domain_link` (median of the in-domain pairs, kind `domain_kind`, default
    the NIC kind: what carried the measured traffic); `inter_node` is then the median of the
    pairs across domains."""
    kinds = [n.nic for n in nodes]
    inter_kind = max(set(kinds), key=kinds.count)
    intra_fb, inter_fb = fallback_links(nodes[0].gpu_type)
    intra, note_a = intra_link(collectives, intra_kind, intra_fb)
    found = infer_domains(p2p_bw) if p2p_bw is not None and p2p_lat is not None else None
    if found is not None:
        try:
            return _cluster_with_domains(name, nodes, p2p_bw, p2p_lat, found, intra, inter_kind,
                                         domain_kind or inter_kind, [n for n in (note_a,) if n])
        except SpecError as err:  # e.g. domains of different sizes
            note_a = "; ".join(n for n in (note_a, f"NVLink domains seen in the pair matrix "
                                           f"but not kept: {err}") if n)
    inter, note_b = inter_link(p2p_bw, p2p_lat, inter_kind, inter_fb)
    cluster = ClusterSpec(
        name=name,
        nodes=tuple(NodeSpec(n.name, n.gpus, n.gpu_type, n.nic) for n in nodes),
        gpu_types=gpu_types(nodes), intra_node=intra, inter_node=inter,
        bandwidth_GBps=p2p_bw, latency_s=p2p_lat,
    )
    return cluster, [n for n in (note_a, note_b) if n]


def _cluster_with_domains(name: str, nodes: list[NodeFacts], bw: Matrix, lat: Matrix,
                          found: Domains, intra: LinkSpec, inter_kind: str, domain_kind: str,
                          notes: list[str]) -> tuple[ClusterSpec, list[str]]:
    """build_cluster's ClusterSpec when the pair matrix shows NVLink domains."""
    nodes, bw, lat, labels, found = with_domains(nodes, bw, lat, found)
    cluster = ClusterSpec(
        name=name,
        nodes=tuple(NodeSpec(n.name, n.gpus, n.gpu_type, n.nic, domain=d)
                    for n, d in zip(nodes, labels, strict=True)),
        gpu_types=gpu_types(nodes), intra_node=intra,
        inter_node=domain_link(bw, lat, found.across, inter_kind),
        bandwidth_GBps=bw, latency_s=lat,
        domain_link=domain_link(bw, lat, found.inside, domain_kind),
    )
    sizes = "/".join(str(len(b)) for b in found.blocks)
    return cluster, notes + [f"NVLink domains inferred from the pair matrix: {sizes} nodes "
                             f"(pairs inside >= {DOMAIN_GAP:g}x faster than across)"]
