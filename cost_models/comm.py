"""Alpha-beta costs of collectives and point-to-point transfers (seconds).

Bus-bandwidth conventions follow nccl-tests (doc/PERFORMANCE.md): for n ranks and S bytes per
rank, a ring all-reduce moves 2·(n-1)/n·S per rank, all-gather and reduce-scatter (n-1)/n·S
(S = the full, unsharded buffer). Time = bytes_on_wire / bus_bandwidth + latency terms.

A group is (size, rank stride), as `cost_models.dims.ParallelDims.group` gives it; a group with
rank stride `stride` has min(size, gpus_per_node // stride) members per node (at least 1).
A group inside one node uses NVLink; a group spanning nodes is limited by the NICs its members
on one node drive together (one NIC per GPU, rail-optimised), capped by NVLink.
All functions broadcast over numpy arrays.
"""

from __future__ import annotations

import numpy as np


def members_per_node(size, stride, gpus_per_node):
    """Ranks of a (size, stride) group that share one node (>= 1)."""
    return np.clip(gpus_per_node // np.maximum(stride, 1), 1, size)


def spans_nodes(size, stride, gpus_per_node):
    """True where the group's ranks do not all fit in one node."""
    return size * stride > gpus_per_node


def group_bandwidth_Bps(size, stride, gpus_per_node, intra_Bps, inter_Bps):
    """Achieved bus bandwidth (bytes/s) of a group's collectives.

    Inside a node: NVLink. Across nodes: k members per node drive k NICs in parallel
    (NCCL runs one ring channel per NIC), so bus bandwidth = min(NVLink, k · NIC) — e.g.
    DGX A100, k = 8: 8 x 25 GB/s x efficiency ~ 180-190 GB/s, as nccl-tests report.
    """
    k = members_per_node(size, stride, gpus_per_node)
    cross = np.minimum(intra_Bps, k * inter_Bps)
    return np.where(spans_nodes(size, stride, gpus_per_node), cross, intra_Bps)


def group_latency_s(size, stride, gpus_per_node, intra_latency_s, inter_latency_s):
    """Per-message latency (alpha) of the group's slowest hop."""
    return np.where(spans_nodes(size, stride, gpus_per_node), inter_latency_s, intra_latency_s)


def all_reduce_time(nbytes, size, bandwidth_Bps, latency_s):
    """Ring all-reduce of `nbytes` per rank: 2(n-1)/n·S/busbw + 2·log2(n)·alpha
    (bandwidth term of the ring; latency of NCCL's tree/ring pipeline at large n)."""
    n = np.maximum(size, 1)
    bw = 2 * (n - 1) / n * nbytes / bandwidth_Bps
    return np.where(n > 1, bw + 2 * np.log2(n) * latency_s, 0.0)


def all_gather_time(nbytes, size, bandwidth_Bps, latency_s):
    """Ring all-gather producing `nbytes` (full buffer) per rank: (n-1)/n·S/busbw + log2(n)·alpha."""
    n = np.maximum(size, 1)
    bw = (n - 1) / n * nbytes / bandwidth_Bps
    return np.where(n > 1, bw + np.log2(n) * latency_s, 0.0)


def reduce_scatter_time(nbytes, size, bandwidth_Bps, latency_s):
    """Ring reduce-scatter of a full `nbytes` buffer per rank: same cost as all-gather."""
    return all_gather_time(nbytes, size, bandwidth_Bps, latency_s)


def p2p_time(nbytes, bandwidth_Bps, latency_s):
    """One point-to-point message: alpha + S/beta."""
    return latency_s + nbytes / bandwidth_Bps


def overlapped(comm_s, window_s, fraction):
    """Exposed part of `comm_s` that may overlap compute of `window_s` seconds.

    At most `fraction` of the communication can be hidden (the rest is serialised: the first
    bucket, synchronisation, contention), and never more than the window.
    """
    hidden = np.minimum(comm_s * fraction, window_s)
    return comm_s - hidden


def node_dedup_scale(top_k, islands):
    """Inter-node bytes of a node-deduplicating MoE dispatch (DeepEP / HybridEP: a token goes
    once to each remote node holding one of its experts, then NVLink forwards it; DeepSeek-V3
    Sec. 3.2.2) over those of a plain all-to-all (one copy per remote expert), for routing
    uniform over `islands` nodes: E[remote nodes hit] / E[remote copies]
    = (I-1)(1-(1-1/I)^k) / (k(I-1)/I) = I(1-(1-1/I)^k)/k; 1 for one island."""
    islands = np.maximum(np.asarray(islands, dtype=float), 1.0)
    scale = islands * (1 - (1 - 1 / islands) ** top_k) / top_k
    return np.where(islands > 1, np.minimum(scale, 1.0), 1.0)


def all_to_all_time(nbytes, size, stride, gpus_per_node, intra_Bps, inter_Bps, intra_latency_s,
                    inter_latency_s, dedup_top_k=None):
    """All-to-all where each of `size` ranks sends `nbytes` split evenly over the group
    (MoE token dispatch/combine): the (size - k)/size share leaving the node goes through the
    rank's own NIC, the (k - 1)/size share to node-mates over NVLink (k = ranks per node),
    plus log2(size) latencies of the pipelined exchange. `dedup_top_k`: a node-deduplicating
    dispatcher of top-k routing (`node_dedup_scale` of the NIC share)."""
    n = np.maximum(size, 1)
    k = members_per_node(n, stride, gpus_per_node)
    nic = 1.0 if dedup_top_k is None else node_dedup_scale(dedup_top_k, n / k)
    wire = nbytes / n * ((n - k) * nic / inter_Bps + (k - 1) / intra_Bps)
    alpha = group_latency_s(n, stride, gpus_per_node, intra_latency_s, inter_latency_s)
    return np.where(n > 1, wire + np.log2(n) * alpha, 0.0)
