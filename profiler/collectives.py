"""Collective bus bandwidth (all-reduce, all-gather, reduce-scatter) inside and across nodes.

Definitions follow nccl-tests (doc/PERFORMANCE.md): for a buffer of S bytes (the full
all-reduce buffer, the all-gather output, the reduce-scatter input) taking t seconds on
n ranks, algbw = S / t and busbw = algbw * factor, with factor 2(n-1)/n for all-reduce and
(n-1)/n for all-gather and reduce-scatter. busbw is comparable to the link's peak whatever n.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from profiler.context import ProfileContext, Progress, gather
from profiler.p2p import ELEMENT_BYTES, KiB, MiB, fmt_bytes, fmt_rate

OPS = ("all_reduce", "all_gather", "reduce_scatter")
QUICK_SIZES = (1 * MiB,)
FULL_SIZES = (64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB)


def bus_factor(op: str, ranks: int) -> float:
    """nccl-tests busbw / algbw factor for `op` on `ranks` ranks."""
    if op == "all_reduce":
        return 2 * (ranks - 1) / ranks
    if op in ("all_gather", "reduce_scatter"):
        return (ranks - 1) / ranks
    raise ValueError(f"unknown collective {op!r}")


@dataclass(frozen=True, slots=True)
class CollectiveSample:
    op: str
    bytes: int
    """Full buffer size S (nccl-tests convention, see module docstring)."""
    ranks: int
    seconds: float
    """Slowest rank's mean time per call."""

    @property
    def algbw_GBps(self) -> float:
        return self.bytes / self.seconds / 1e9

    @property
    def busbw_GBps(self) -> float:
        return self.algbw_GBps * bus_factor(self.op, self.ranks)

    def to_dict(self) -> dict:
        return {**asdict(self), "algbw_GBps": self.algbw_GBps, "busbw_GBps": self.busbw_GBps}


def _call(op: str, ctx: ProfileContext, nbytes: int, ranks: int, group) -> callable:
    """A zero-argument closure running one collective on preallocated buffers."""
    full = torch.ones(nbytes // ELEMENT_BYTES, device=ctx.device)
    shard = torch.ones(nbytes // ELEMENT_BYTES // ranks, device=ctx.device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    # *_single are the torch >= 2.13 names of all_gather_into_tensor / reduce_scatter_tensor.
    if op == "all_gather":
        gather_op = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: gather_op(full, shard, group=group)
    scatter_op = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return lambda: scatter_op(shard, full, group=group)


def _slowest(ctx: ProfileContext, seconds: float, group) -> float:
    """The group's maximum of a per-rank time, so that every rank takes the same decisions."""
    value = torch.tensor([seconds], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return float(value.item())


def time_collective(ctx: ProfileContext, op: str, nbytes: int, ranks: int, group,
                    budget_s: float, max_iters: int) -> CollectiveSample:
    """Mean seconds per call (the group's slowest rank). One timed warm-up call sizes the
    repetitions to about `budget_s` (1..max_iters)."""
    run = _call(op, ctx, nbytes, ranks, group)
    dist.barrier(group=group)
    ctx.sync()
    start = time.perf_counter()
    run()
    ctx.sync()
    warm = _slowest(ctx, time.perf_counter() - start, group)
    iters = max(1, min(max_iters, int(budget_s / max(warm, 1e-6))))
    dist.barrier(group=group)
    ctx.sync()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    ctx.sync()
    seconds = _slowest(ctx, (time.perf_counter() - start) / iters, group)
    return CollectiveSample(op, nbytes, ranks, seconds)


def sweep(ctx: ProfileContext, ranks: int, group, label: str, progress: Progress) -> list[dict]:
    """All three collectives over the size ladder; stops a ladder once one call is slow."""
    sizes, budget_s, max_iters, stop_s = (
        (QUICK_SIZES, 0.2, 5, 0.3) if ctx.quick else (FULL_SIZES, 1.0, 20, 1.0))
    out = []
    for op in OPS:
        for size in sizes:
            nbytes = size - size % (ELEMENT_BYTES * ranks)  # shards must be whole elements
            sample = time_collective(ctx, op, nbytes, ranks, group, budget_s, max_iters)
            out.append(sample.to_dict())
            progress(f"{label} {op} {fmt_bytes(nbytes)} on {ranks} ranks: "
                     f"busbw {fmt_rate(sample.busbw_GBps)}")
            if sample.seconds > stop_s:
                break
    return out


def measure_collectives(ctx: ProfileContext, progress: Progress) -> dict:
    """{'intra_node': {node: [samples]}, 'inter_node': [...], 'world': [...]} where measurable.

    intra_node: all ranks of each node (nodes run concurrently, as in training);
    inter_node: one rank per node (what one GPU's NIC path achieves);
    world: every rank (only when it differs from both of the above).
    """
    out: dict = {}
    # new_group must be called by every rank for every group, in the same order.
    node_groups = [dist.new_group(list(r)) if len(r) > 1 else None for r in ctx.node_ranks]
    leaders_group = dist.new_group(list(ctx.leaders)) if ctx.num_nodes > 1 else None
    if any(len(r) > 1 for r in ctx.node_ranks):
        per_node = len(ctx.node_ranks[ctx.node_index])
        mine = None
        if per_node > 1:
            mine = sweep(ctx, per_node, node_groups[ctx.node_index], "intra-node", progress)
        by_rank = gather(mine if ctx.is_leader else None)
        out["intra_node"] = {name: by_rank[ranks[0]]
                             for name, ranks in zip(ctx.node_names, ctx.node_ranks, strict=True)
                             if by_rank[ranks[0]] is not None}
    if leaders_group is not None:
        mine = sweep(ctx, ctx.num_nodes, leaders_group, "inter-node", progress) \
            if ctx.is_leader else None
        out["inter_node"] = gather(mine)[0]  # rank 0 is node 0's leader
    if ctx.num_nodes > 1 and ctx.world_size > ctx.num_nodes:
        out["world"] = sweep(ctx, ctx.world_size, None, "world", progress)
    return out
