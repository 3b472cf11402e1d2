"""Turning measurements into a ClusterSpec and the printed summary (the file itself is written
by `planner.specfiles.write_cluster_yaml`, the one cluster.yaml module)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from cost_models.specs import ClusterSpec, GpuSpec, LinkSpec, NodeSpec
from planner.specfiles import cluster_presets, gpu_preset, load_cluster
from profiler.p2p import fmt_rate

SLOW_FRACTION = 0.6
"""A node or pair slower than this fraction of the median is flagged."""

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
                  intra_kind: str) -> tuple[ClusterSpec, list[str]]:
    """The ClusterSpec for cluster.yaml, and notes on what fell back to presets."""
    kinds = [n.nic for n in nodes]
    inter_kind = max(set(kinds), key=kinds.count)
    intra_fb, inter_fb = fallback_links(nodes[0].gpu_type)
    intra, note_a = intra_link(collectives, intra_kind, intra_fb)
    inter, note_b = inter_link(p2p_bw, p2p_lat, inter_kind, inter_fb)
    cluster = ClusterSpec(
        name=name,
        nodes=tuple(NodeSpec(n.name, n.gpus, n.gpu_type, n.nic) for n in nodes),
        gpu_types=gpu_types(nodes), intra_node=intra, inter_node=inter,
        bandwidth_GBps=p2p_bw, latency_s=p2p_lat,
    )
    return cluster, [n for n in (note_a, note_b) if n]
