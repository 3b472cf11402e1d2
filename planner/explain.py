"""Why the winner wins: where its time goes, what each runner-up loses on, and — when nothing
fits — what would (with numbers)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cost_models.dims import Group, ParallelDims
from cost_models.megatron import Links
from cost_models.specs import ClusterSpec, Estimate, Layout, SpecError

from . import engine
from .options import Problem
from .report import layout_label
from .search import SearchSpace, scaled_cluster

PART_NAMES = {"compute": "compute", "tp_comm": "TP comm", "cp_comm": "CP comm", "ep_comm": "EP all-to-all",
              "pp_bubble": "pipeline bubble", "pp_p2p": "pipeline p2p", "dp_comm": "DP comm",
              "optimizer": "optimizer"}


def _shares(est: Estimate) -> dict[str, float]:
    return {k.removesuffix("_s"): v / est.step_time_s for k, v in est.time.to_dict().items()}


def where_time_goes(est: Estimate) -> str:
    shares = sorted(_shares(est).items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{PART_NAMES[k]} {100 * v:.1f}%" for k, v in shares if v >= 0.005)
    return (f"{layout_label(est.layout)}: {est.step_time_s:.3f} s/step, MFU {100 * est.mfu:.1f}%, "
            f"{est.peak_GiB:.1f} GiB/GPU; time goes to {top}")


def why_slower(winner: Estimate, other: Estimate) -> str:
    """One line: how much slower `other` is and the part that costs it most."""
    w, o = winner.time.to_dict(), other.time.to_dict()
    part = max(o, key=lambda k: o[k] - w[k])
    ws, os_ = _shares(winner), _shares(other)
    name = part.removesuffix("_s")
    slower = 100 * (other.step_time_s / winner.step_time_s - 1)
    return (f"{layout_label(other.layout)}: +{slower:.1f}% — {PART_NAMES[name]} "
            f"{o[part]:.3g} s vs {w[part]:.3g} s ({100 * os_[name]:.1f}% vs "
            f"{100 * ws[name]:.1f}% of the step)")


def explain(plans: tuple[Estimate, ...], alternatives: tuple[Estimate, ...]) -> list[str]:
    """The winner's breakdown, then why each runner-up (other degrees first) loses."""
    if not plans:
        return []
    best = plans[0]
    lines = ["winner " + where_time_goes(best)]
    seen = set()
    for other in alternatives + plans[1:]:
        key = (other.layout.tp, other.layout.pp, other.layout.cp, other.layout.vp,
               other.layout.micro_batch_size, other.layout.recompute)
        if other is best or key in seen or len(seen) >= 4:
            continue
        seen.add(key)
        lines.append("  vs " + why_slower(best, other))
    return lines


# --------------------------------------------------------------------------------------------
# which links each group spans
# --------------------------------------------------------------------------------------------

SPAN_LEVELS = ("node", "domain", "cross_domain")
"""Where a group's members sit: one node (tray), one NVLink domain (rack), several domains."""
SPAN_GROUPS = ("tp", "cp", "ep", "dp", "pp")


@dataclass(frozen=True, slots=True)
class GroupSpan:
    """Where the instances of one communication group of a layout sit, and the bandwidth the
    cost model charges it (the slowest instance's; the pp entry counts pipeline hops)."""

    name: str
    size: int
    stride: int
    counts: tuple[int, int, int]
    """Instances (pp: hops between neighbouring stages) inside one node, inside one NVLink
    domain but over several nodes, over several domains (`SPAN_LEVELS`)."""
    bandwidth_GBps: float
    """Bus bandwidth of the group's collectives as `cost_models.megatron.Links` costs it
    (pp: the slowest hop's point-to-point bandwidth; ep: the rate a rank's all-to-all share
    leaves it, `all_to_all_rate_Bps`)."""
    costed_level: str
    """The level the cost model charges: the slowest instance's (an instance straddling a
    domain boundary makes the group cross domains; `Links._straddle`)."""

    @property
    def level(self) -> str:
        """The widest level any instance spans."""
        return SPAN_LEVELS[max(i for i, c in enumerate(self.counts) if c)]

    def to_dict(self) -> dict:
        return {"group": self.name, "size": self.size, "stride": self.stride,
                "level": self.level, **dict(zip(SPAN_LEVELS, self.counts, strict=True)),
                "bandwidth_GBps": round(self.bandwidth_GBps, 3), "costed_as": self.costed_level}


def group_members(world: int, group: Group) -> np.ndarray:
    """Global ranks of every instance of `group`, one row each: instances are blocks of
    size x stride consecutive ranks, a member every `stride` ranks (the mesh order of
    `cost_models.dims`, and its expert mesh etp-ep-edp-pp for ep)."""
    size, stride = int(group.size), int(group.stride)
    blocks = np.arange(world).reshape(world // (size * stride), size, stride)
    return blocks.transpose(0, 2, 1).reshape(-1, size)


def _levels(members: np.ndarray, gpus_per_node: int, domain_gpus: int) -> tuple[int, int, int]:
    """Rows of `members` inside one node, inside one domain only, across domains (rank r sits
    on node r // gpus_per_node: ranks fill nodes in order, domains are runs of nodes)."""
    one_node = (members // gpus_per_node == members[:, :1] // gpus_per_node).all(axis=1)
    one_domain = (members // domain_gpus == members[:, :1] // domain_gpus).all(axis=1)
    node = int(one_node.sum())
    domain = int(one_domain.sum()) - node
    return node, domain, len(members) - node - domain


def all_to_all_rate_Bps(links: Links, group: Group) -> float:
    """Bytes/s at which a rank's share for the other members leaves it in the group's plain
    all-to-all ((n-1)/n of the buffer over `Links.all_to_all_s`'s time per byte): on a DGX,
    ep16 over two nodes sends half its buffer through its one NIC, so about a NIC's rate, not
    the 8 NICs a ring of that group drives."""
    n = int(group.size)
    slope_s = float(links.all_to_all_s(2e9, group) - links.all_to_all_s(1e9, group)) / 1e9
    return (n - 1) / n / slope_s  # the slope of time in bytes: the latency terms cancel


def group_spans(layout: Layout, cluster: ClusterSpec) -> tuple[GroupSpan, ...]:
    """For each group of the layout with more than one member (tp, cp, ep, dp, pp hops): how
    many instances stay in a node, in an NVLink domain, or cross domains, with rank r on node
    r // gpus_per_node (the uniform placement `meshplan launch` uses) and the bandwidth the
    cost model gives it. Empty for a cluster whose nodes differ in GPU count."""
    try:
        gpn, domain_gpus = cluster.gpus_per_node, cluster.domain_gpus
    except SpecError:
        return ()
    dims: ParallelDims = layout.dims
    world = int(dims.world)
    links = Links.of(cluster)
    out = []
    for name in SPAN_GROUPS:
        group = dims.group(name)
        size = int(group.size)
        if size < 2 or world % (size * int(group.stride)):
            continue  # a group that does not tile the ranks in blocks (none in valid layouts)
        members = group_members(world, group)
        stride = int(group.stride)
        if name == "pp":  # each hop is a pair of neighbouring stages (as Links.hop_Bps tests)
            members = np.stack([members[:, :-1].ravel(), members[:, 1:].ravel()], axis=1)
            bw = links.hop_Bps(dims.stage_size, dims.pp)
            costed = (0 if stride < gpn else
                      1 if domain_gpus > gpn and stride * size <= domain_gpus else 2)
        elif name == "ep":  # an all-to-all: each rank's own links, not a ring's bus bandwidth
            bw = all_to_all_rate_Bps(links, group)
            costed = (0 if size * stride <= gpn else 2 if domain_gpus <= gpn
                      else 2 if bool(links._straddle(group)[0]) else 1)
        else:
            bw = links.bandwidth_Bps(group)
            costed = (0 if size * stride <= gpn else 2 if domain_gpus <= gpn
                      else 2 if bool(links._straddle(group)[0]) else 1)
        out.append(GroupSpan(name, size, int(group.stride), _levels(members, gpn, domain_gpus),
                             float(bw) / 1e9, SPAN_LEVELS[costed]))
    return tuple(out)


def spans_lines(layout: Layout, cluster: ClusterSpec) -> list[str]:
    """The explanation's lines on where the winner's groups run (see `group_spans`)."""
    spans = group_spans(layout, cluster)
    if not spans:
        return []
    gpn, per_domain = cluster.gpus_per_node, cluster.nodes_per_domain
    domains = -(-cluster.num_nodes // per_domain)
    if per_domain > 1:
        words = {"node": "inside a node", "domain": "inside an NVLink domain",
                 "cross_domain": "across NVLink domains"}
        head = (f"groups ({gpn} GPUs per node, {per_domain} nodes = {cluster.domain_gpus} GPUs "
                f"per NVLink domain, {domains} domains):")
    else:
        words = {"node": "inside a node", "domain": "inside a node",
                 "cross_domain": "across nodes"}
        head = f"groups ({gpn} GPUs per node, NVLink inside a node only):"
    lines = [head]
    for sp in spans:
        unit = "hops" if sp.name == "pp" else "groups"
        total = sum(sp.counts)
        parts = [f"{c} of {total} {unit} {words[lvl]}" for lvl, c in zip(SPAN_LEVELS, sp.counts,
                                                                          strict=True) if c]
        where = words[sp.level] if len(parts) == 1 else "; ".join(parts)
        label = f"{sp.name}{sp.size}" + (" hops" if sp.name == "pp" else "")
        note = (f" as if all stayed {words[sp.costed_level]}"
                if SPAN_LEVELS.index(sp.costed_level) < SPAN_LEVELS.index(sp.level) else "")
        lines.append(f"  {label} (stride {sp.stride}): {where}, costed at "
                     f"{sp.bandwidth_GBps:,.0f} GB/s{note}")
    return lines


def advise(prob: Problem, space: SearchSpace, nearest: tuple[Estimate, ...]) -> list[str]:
    """When nothing fits: the closest miss, and variations of `prob` that would fit (each
    planned by `engine.plan` with the same options)."""
    cluster, seq_len = prob.cluster, prob.seq_len
    lines = []
    if nearest:
        n = nearest[0]
        lines.append(f"closest: {layout_label(n.layout)} needs {n.peak_GiB:.1f} GiB of "
                     f"{n.capacity_GiB:.1f} GiB (over by {n.over_GiB:.1f} GiB)")
    tries = []
    if "full" not in space.recompute:
        tries.append(("with --recompute full", prob,
                      replace(space, recompute=("none", "selective", "full"))))
    for factor in (2, 4, 8, 16, 32, 64):
        tries.append((f"with {factor}x the GPUs ({factor * cluster.world_size})",
                      replace(prob, cluster=scaled_cluster(cluster, factor)), space))
    for div in (2, 4):
        if seq_len % div == 0:
            tries.append((f"with --seq-len {seq_len // div}", replace(prob, seq_len=seq_len // div),
                          space))
    gpu = next(iter(cluster.gpu_types.values()))
    if prob.dtype == "bf16" and "fp8" in gpu.peak_tflops:
        tries.append(("with --dtype fp8", replace(prob, dtype="fp8"), space))
    found, more_gpus = 0, False
    for label, variant, sp in tries:
        if more_gpus and "GPUs" in label:
            continue  # the smallest sufficient scale-up is enough
        try:
            res = engine.plan(variant, sp, top_k=1).result
        except SpecError:
            continue
        if res.plans:
            e = res.plans[0]
            lines.append(f"{label}: {layout_label(e.layout)} fits at {e.peak_GiB:.1f} GiB, "
                         f"{e.step_time_s:.2f} s/step")
            found += 1
            more_gpus = more_gpus or "GPUs" in label
        if found >= 3:
            break
    if not found:
        lines.append("no nearby variation fits either: use a smaller model or many more GPUs")
    return lines
