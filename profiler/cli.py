"""`meshplan profile`: measure this cluster under torchrun and write cluster.yaml.

Run one torchrun agent per node, e.g.
    torchrun --nnodes 4 --nproc-per-node 8 --node-rank R --master-addr HOST0 --master-port 29500 \\
        --no-python meshplan profile -o cluster.yaml
Rank 0 writes the file (atomically) and prints the summary; progress goes to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import torch
import torch.distributed as dist

from cost_models.specs import NIC_KINDS, SpecError
from planner.specfiles import gpu_preset, write_cluster_yaml
from profiler.cluster_builder import NodeFacts, Summary, build_cluster, domain_lines, summarize
from profiler.collectives import measure_collectives
from profiler.context import (
    BACKENDS,
    ProfileContext,
    Progress,
    agree_or_raise,
    gather,
    init_context,
    make_progress,
)
from profiler.device import DeviceReport, match_gpu_preset, measure_device
from profiler.p2p import FULL_LADDER, QUICK_LADDER, P2PResult, fmt_rate, measure_p2p
from profiler.topology import has_nvlink, nic_report, nvidia_topology


def resolve_gpu_type(ctx: ProfileContext, override: str | None) -> str:
    """This rank's GPU preset name (all ranks agree on errors before anything is measured)."""
    error, gpu = None, ""
    try:
        if override:
            gpu = gpu_preset(override).name
        elif not ctx.on_cuda:
            gpu = "CPU"
        else:
            name = torch.cuda.get_device_name(ctx.device)
            memory = torch.cuda.get_device_properties(ctx.device).total_memory / (1 << 30)
            gpu = match_gpu_preset(name, memory) or ""
            if not gpu:
                raise SpecError(f"GPU {name!r} matches no preset; pass --gpu-type NAME with the "
                                "closest type from planner/data/gpus.yaml")
    except SpecError as exc:
        error = str(exc)
    agree_or_raise(error)
    return gpu


def check_output(ctx: ProfileContext, output: Path) -> None:
    """Fail before measuring if rank 0 cannot write the output's directory."""
    error = None
    if ctx.is_root:
        parent = output.resolve().parent
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        if output.is_dir() or not existing.is_dir() or not os.access(existing, os.W_OK):
            error = f"cannot write -o {output}: choose a file path in a writable directory"
    agree_or_raise(error)


def node_facts(ctx: ProfileContext, gpu_types: list[str], devices: list[DeviceReport],
               nics: list[dict | None], nic_override: str | None) -> list[NodeFacts]:
    """One NodeFacts per node from the gathered per-rank results."""
    facts = []
    for i, ranks in enumerate(ctx.node_ranks):
        types = {gpu_types[r] for r in ranks}
        if len(types) != 1:
            raise SpecError(f"node {ctx.node_names[i]} mixes GPU types {sorted(types)}; "
                            "profile it with --gpu-type or one type per node")
        mems = [devices[r].memory_total_GiB for r in ranks]
        # CPU ranks share the host's memory; a GPU owns its own.
        memory = min(mems) / len(ranks) if devices[ranks[0]].kind == "cpu" else min(mems)
        nic = nic_override or nics[ranks[0]]["kind"]
        facts.append(NodeFacts(ctx.node_names[i], len(ranks), types.pop(), memory, nic))
    return facts


def summary_text(ctx: ProfileContext, facts: list[NodeFacts], devices: list[DeviceReport],
                 summary: Summary | None) -> str:
    """Plain table: one row per node, then the slow host/pair lines."""
    rows = [f"{'node':<16} {'ranks':>5} {'gpu':<10} {'nic':<10} {'bf16 TFLOP/s':>12} "
            f"{'mean p2p':>12}"]
    for i, node in enumerate(facts):
        tflops = min(devices[r].tflops["bf16"] for r in ctx.node_ranks[i])
        mean = fmt_rate(summary.node_mean_GBps[node.name]) if summary else "-"
        rows.append(f"{node.name:<16} {node.gpus:>5} {node.gpu_type:<10} {node.nic:<10} "
                    f"{tflops:>12.3g} {mean:>12}")
    if summary:
        rows.extend(summary.lines)
    return "\n".join(rows)


def contention_line(p2p: P2PResult | None) -> str:
    """'\nall pairs busy: ...' comparing the busy round with the isolated rounds, or ''."""
    if p2p is None or p2p.busy_bandwidth_GBps is None:
        return ""
    n = len(p2p.bandwidth_GBps)
    off = [(i, j) for i in range(n) for j in range(n) if i != j]
    alone = sum(p2p.bandwidth_GBps[i][j] for i, j in off) / len(off)
    busy = sum(p2p.busy_bandwidth_GBps[i][j] for i, j in off) / len(off)
    return (f"\nall pairs busy: mean pair {fmt_rate(busy)} vs {fmt_rate(alone)} one pair at a "
            f"time ({busy / alone:.0%})")


def run_profile(ctx: ProfileContext, output: Path, gpu_override: str | None,
                nic_override: str | None, name: str | None, progress: Progress) -> str | None:
    """All measurements; rank 0 writes `output` and returns the summary text."""
    start = time.perf_counter()
    check_output(ctx, output)
    gpu_types = gather(resolve_gpu_type(ctx, gpu_override))
    progress(f"{ctx.world_size} ranks on {ctx.num_nodes} nodes, backend {ctx.backend}, "
             f"device {'cuda' if ctx.on_cuda else 'cpu'}{' (quick)' if ctx.quick else ''}")
    devices = gather(measure_device(ctx))
    progress(f"device: {devices[0].name}, bf16 matmul {devices[0].tflops['bf16']:.3g} TFLOP/s")
    topo = nvidia_topology() if ctx.is_leader and ctx.on_cuda else None
    nics = gather(nic_report() if ctx.is_leader else None)
    topos = gather(topo)
    p2p = measure_p2p(ctx, QUICK_LADDER if ctx.quick else FULL_LADDER, progress,
                      busy_target_s=0.3 if ctx.quick else 1.0)
    collectives = measure_collectives(ctx, progress)
    if not ctx.is_root:
        return None
    facts = node_facts(ctx, gpu_types, devices, nics, nic_override)
    intra_kind = "nvlink" if has_nvlink(topos[0]) else ("pcie" if ctx.on_cuda else "loopback")
    cluster, notes = build_cluster(name or output.stem, facts, p2p and p2p.bandwidth_GBps,
                                   p2p and p2p.latency_s, collectives, intra_kind,
                                   "nvlink" if ctx.on_cuda else None)
    measured = measured_section(ctx, devices, nics, topos, p2p, collectives, notes,
                                time.perf_counter() - start)
    write_cluster_yaml(output, cluster, measured)
    summary = summarize(ctx.node_names, p2p.bandwidth_GBps) if p2p else None
    domains = domain_lines(cluster, summary.slow_nodes if summary else ())
    return summary_text(ctx, facts, devices, summary) + "".join(f"\n{d}" for d in domains) \
        + contention_line(p2p) + (
        f"\nwrote {output} ({ctx.num_nodes} nodes, {ctx.world_size} ranks) in "
        f"{time.perf_counter() - start:.1f} s")


def measured_section(ctx: ProfileContext, devices: list[DeviceReport], nics: list,
                     topos: list, p2p: P2PResult | None, collectives: dict, notes: list[str],
                     seconds: float) -> dict:
    """cluster.yaml's `measured:` block (the matrices are added from the ClusterSpec)."""
    leaders = ctx.leaders
    coll = dict(collectives)
    if p2p is not None:
        coll["p2p"] = {"method": "round-robin rounds of disjoint node pairs, both directions, "
                                 "message + 4-byte ack, t = alpha + n/beta least squares",
                       "samples_bytes_seconds": p2p.samples, "seconds": p2p.seconds}
        if p2p.busy_bandwidth_GBps is not None:
            coll["all_pairs_busy"] = {"bytes": p2p.busy_bytes,
                                      "bandwidth_GBps": p2p.busy_bandwidth_GBps}
    node_of = {r: ctx.node_names[i] for i, ranks in enumerate(ctx.node_ranks) for r in ranks}
    on_cpu = not ctx.on_cuda
    return {
        "backend": ctx.backend,
        "device": "cpu" if on_cpu else "cuda",
        "seconds": seconds,
        "gpus": [{"node": node_of[r], "rank": r, "name": d.name, "kind": d.kind,
                  "memory_total_GiB": d.memory_total_GiB, "memory_free_GiB": d.memory_free_GiB,
                  "matmul_tflops": d.tflops, "matmul_size": d.matmul_size}
                 for r, d in enumerate(devices)],
        "nics": {ctx.node_names[i]: nics[r] for i, r in enumerate(leaders)},
        "topology": {ctx.node_names[i]: topos[r] for i, r in enumerate(leaders)
                     if topos[r] is not None},
        "collectives": coll,
        "notes": notes + sorted({n for d in devices for n in d.notes})
                 + (["CPU/gloo fallback: no GPU measured"] if on_cpu else [])
                 + (["quick mode: fewer and smaller messages"] if ctx.quick else []),
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="cluster.yaml to write (rank 0 writes it atomically).")
@click.option("--quick", is_flag=True, help="Fewer, smaller messages: a 4-node profile in < 1 min.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: nccl with CUDA, else gloo (CPU fallback).")
@click.option("--gpu-type", default=None, help="GPU preset name when the device name matches none.")
@click.option("--nic", type=click.Choice([k for k in NIC_KINDS if k != "nvlink"]), default=None,
              help="Override the NIC kind read from /sys.")
@click.option("--name", default=None, help="Cluster name (default: the output file's stem).")
def profile(output: Path, quick: bool, backend: str, gpu_type: str | None, nic: str | None,
            name: str | None) -> None:
    """Measure this cluster (run under torchrun on every node) into cluster.yaml."""
    ctx = init_context(backend, quick)
    try:
        text = run_profile(ctx, output, gpu_type, nic, name, make_progress(ctx, sys.stderr))
        if text is not None:
            click.echo(text)
    finally:
        dist.destroy_process_group()
