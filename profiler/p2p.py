"""Node-pair point-to-point bandwidth and latency.

One representative rank per node (local rank 0) measures; the others wait on a barrier.
Pairs are scheduled as a round-robin tournament (circle method) so that every round runs
disjoint pairs concurrently and each pair is measured once; both directions are measured
separately (the matrices need not be symmetric). Each direction sends a ladder of message
sizes, each message answered by a 4-byte acknowledgement, and fits t(n) = alpha + n / beta
by least squares (Hockney's alpha-beta model). A final round keeps all pairs busy at once to
show contention (shared NIC egress, oversubscribed switch).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from profiler.context import ProfileContext, Progress, gather

KiB, MiB = 1 << 10, 1 << 20
ELEMENT_BYTES = 4  # float32 payload: every backend supports it


@dataclass(frozen=True, slots=True)
class Ladder:
    """Which message sizes to send and how long to spend on each."""

    sizes: tuple[int, ...]
    """Message sizes in bytes, ascending (multiples of 4)."""
    per_size_s: float
    """Target seconds of repetitions per size."""
    stop_s: float
    """Stop climbing once one message takes longer than this (slow links stay short)."""
    max_reps: int


QUICK_LADDER = Ladder((4 * KiB, 64 * KiB, 512 * KiB, 2 * MiB, 8 * MiB, 16 * MiB), 0.08, 0.15, 10)
FULL_LADDER = Ladder((4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB), 0.5, 1.5, 30)


@dataclass(frozen=True, slots=True)
class AlphaBeta:
    """Hockney model of one direction of one pair: t(n) = latency_s + n / (bandwidth_GBps * 1e9)."""

    bandwidth_GBps: float
    latency_s: float


@dataclass(frozen=True, slots=True)
class P2PResult:
    bandwidth_GBps: tuple[tuple[float, ...], ...]
    """[i][j]: node i -> node j, 10^9 bytes/s, diagonal 0."""
    latency_s: tuple[tuple[float, ...], ...]
    """[i][j]: one-way latency node i -> node j, seconds, diagonal 0."""
    samples: dict[str, list[list[float]]]
    """'i->j' -> [[bytes, seconds per message incl. ack], ...] as measured."""
    busy_bandwidth_GBps: tuple[tuple[float, ...], ...] | None
    """[i][j] with all pairs sending at once (contention round); None for < 3 nodes."""
    busy_bytes: int
    seconds: float


def tournament_rounds(n: int) -> list[list[tuple[int, int]]]:
    """Round-robin schedule (circle method): n-1 rounds (n even) or n rounds (n odd) of
    disjoint pairs covering every unordered pair exactly once. Node n is a bye when n is odd."""
    players = list(range(n)) + ([None] if n % 2 else [])
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        pairs = [(players[k], players[m - 1 - k]) for k in range(m // 2)]
        rounds.append([tuple(sorted(p)) for p in pairs if None not in p])
        players = [players[0], players[-1], *players[1:-1]]  # rotate all but the first
    return rounds


def fit_alpha_beta(samples: list[tuple[int, float]]) -> AlphaBeta:
    """Fit t = alpha + n / beta to (bytes, seconds of message + ack) samples.

    beta: least-squares slope over the bandwidth-dominated samples (t >= 4 x the smallest
    message's time; all samples if fewer than two qualify). Rate shapers with a token-bucket
    burst let small messages pass faster than the line, which would bias a fit over all
    sizes. alpha: the fitted line anchored at the smallest message (t_min - n_min / beta);
    it covers the message's and the ack's latency, so one-way latency is alpha / 2 (t_min / 2
    when the burst makes alpha come out <= 0).
    """
    if not samples:
        raise ValueError("no samples to fit")
    n = np.array([s[0] for s in samples], dtype=float)
    t = np.array([s[1] for s in samples], dtype=float)
    t_min, n_min = float(t[np.argmin(n)]), float(n.min())
    big = t >= 4 * t_min
    if big.sum() < 2:
        big = np.ones_like(big)
    slope = np.polyfit(n[big], t[big], 1)[0] if np.ptp(n[big]) > 0 else 0.0
    if slope <= 0:  # too noisy to fit: the largest message's plain rate
        slope = t[np.argmax(n)] / n.max()
    alpha = t_min - n_min * slope
    latency = alpha / 2 if alpha > 0 else t_min / 2
    return AlphaBeta(bandwidth_GBps=float(1.0 / slope / 1e9), latency_s=float(latency))


# --------------------------------------------------------------------------------------------
# one direction of one pair (only the two leaders involved call these)
# --------------------------------------------------------------------------------------------


def _send_ladder(ctx: ProfileContext, peer: int, ladder: Ladder) -> list[tuple[int, float]]:
    """Sender side: per size a header [bytes, reps], then reps (>= 2) x (message, wait for
    ack); the fastest repetition counts."""
    buf = torch.ones(max(ladder.sizes) // ELEMENT_BYTES, device=ctx.device)
    header = torch.zeros(2, dtype=torch.int64, device=ctx.device)
    ack = torch.zeros(1, device=ctx.device)
    samples: list[tuple[int, float]] = []
    for nbytes in ladder.sizes:
        if samples:  # predict this size's time from the last one (bandwidth-bound: linear)
            guess = samples[-1][1] * nbytes / samples[-1][0]
            reps = max(2, min(ladder.max_reps, int(ladder.per_size_s / guess)))
        else:
            reps = ladder.max_reps
        warmup = 0 if samples else 1  # the very first message pays for buffer set-up
        header[0], header[1] = nbytes, reps + warmup
        dist.send(header, peer)
        times = []
        for _ in range(reps + warmup):
            ctx.sync()
            start = time.perf_counter()
            dist.send(buf[: nbytes // ELEMENT_BYTES], peer)
            dist.recv(ack, peer)
            ctx.sync()
            times.append(time.perf_counter() - start)
        # Interference (a descheduled receiver, other traffic) only ever adds time: keep the min.
        samples.append((nbytes, min(times[warmup:])))
        if samples[-1][1] > ladder.stop_s:
            break
    header.zero_()
    dist.send(header, peer)  # bytes 0: done
    return samples


def _recv_ladder(ctx: ProfileContext, peer: int, ladder: Ladder) -> None:
    """Receiver side: follow the sender's headers until it sends bytes == 0."""
    buf = torch.empty(max(ladder.sizes) // ELEMENT_BYTES, device=ctx.device)
    header = torch.zeros(2, dtype=torch.int64, device=ctx.device)
    ack = torch.zeros(1, device=ctx.device)
    while True:
        dist.recv(header, peer)
        nbytes, reps = (int(x) for x in header.tolist())
        if nbytes == 0:
            return
        for _ in range(reps):
            dist.recv(buf[: nbytes // ELEMENT_BYTES], peer)
            dist.send(ack, peer)


def _measure_pair(ctx: ProfileContext, pair: tuple[int, int], ladder: Ladder) -> dict:
    """Both directions of one node pair; returns {'i->j': samples} on the measuring side."""
    i, j = pair
    leader_i, leader_j = ctx.leaders[i], ctx.leaders[j]
    out = {}
    if ctx.node_index == i:
        out[f"{i}->{j}"] = _send_ladder(ctx, leader_j, ladder)
        _recv_ladder(ctx, leader_j, ladder)
    elif ctx.node_index == j:
        _recv_ladder(ctx, leader_i, ladder)
        out[f"{j}->{i}"] = _send_ladder(ctx, leader_i, ladder)
    return out


# --------------------------------------------------------------------------------------------
# all pairs
# --------------------------------------------------------------------------------------------


def measure_p2p(ctx: ProfileContext, ladder: Ladder, progress: Progress,
                busy_target_s: float) -> P2PResult | None:
    """Tournament rounds over node leaders, then the all-pairs-busy round; None for one node."""
    n = ctx.num_nodes
    if n < 2:
        return None
    start = time.perf_counter()
    rounds = tournament_rounds(n)
    mine: dict[str, list[tuple[int, float]]] = {}
    for r, pairs in enumerate(rounds):
        round_start = time.perf_counter()
        if ctx.is_leader:
            for pair in pairs:
                mine.update(_measure_pair(ctx, pair, ladder))
        dist.barrier()
        names = ", ".join(f"{ctx.node_names[a]}<->{ctx.node_names[b]}" for a, b in pairs)
        progress(f"p2p round {r + 1}/{len(rounds)} ({names}): "
                 f"{time.perf_counter() - round_start:.1f} s")
    samples: dict[str, list[tuple[int, float]]] = {}
    for part in gather(mine):
        samples.update(part)
    fits = {key: fit_alpha_beta(s) for key, s in samples.items()}
    bw = _matrix(n, {k: f.bandwidth_GBps for k, f in fits.items()})
    lat = _matrix(n, {k: f.latency_s for k, f in fits.items()})
    busy, busy_bytes = None, 0
    if n >= 3:  # with two nodes the tournament round already is "all pairs busy"
        busy_bytes = busy_message_bytes(bw, busy_target_s)
        busy = measure_all_pairs_busy(ctx, busy_bytes)
        progress(f"p2p all pairs busy ({fmt_bytes(busy_bytes)} each way): done")
    return P2PResult(bw, lat, {k: [list(s) for s in v] for k, v in samples.items()}, busy,
                     busy_bytes, time.perf_counter() - start)


def _matrix(n: int, values: dict[str, float]) -> tuple[tuple[float, ...], ...]:
    """{'i->j': x} -> n x n tuple matrix with a zero diagonal."""
    rows = [[0.0] * n for _ in range(n)]
    for key, value in values.items():
        i, j = (int(x) for x in key.split("->"))
        rows[i][j] = float(value)
    return tuple(tuple(r) for r in rows)


def busy_message_bytes(bw: tuple[tuple[float, ...], ...], target_s: float) -> int:
    """Message size for the contention round: the slowest pair needs about `target_s` alone.

    Every rank computes this from the same gathered matrix, so all agree without a message.
    """
    slowest = min(x for i, row in enumerate(bw) for j, x in enumerate(row) if i != j)
    nbytes = int(slowest * 1e9 * target_s)
    nbytes = min(max(nbytes, 64 * KiB), 64 * MiB)
    return nbytes - nbytes % (4 * KiB)


def measure_all_pairs_busy(ctx: ProfileContext, nbytes: int) -> tuple[tuple[float, ...], ...]:
    """Every leader sends `nbytes` to every other leader at once; [i][j] = bytes / time until
    node j had node i's message. (NCCL completes a batched group together, so there the
    per-pair value is the whole group's time: a lower bound.)"""
    n = ctx.num_nodes
    arrival: dict[str, float] = {}
    if ctx.is_leader:
        me = ctx.node_index
        peers = [k for k in range(n) if k != me]
        send = torch.ones(nbytes // ELEMENT_BYTES, device=ctx.device)
        recv = {k: torch.empty(nbytes // ELEMENT_BYTES, device=ctx.device) for k in peers}
        ops = [dist.P2POp(dist.isend, send, ctx.leaders[k]) for k in peers]
        ops += [dist.P2POp(dist.irecv, recv[k], ctx.leaders[k]) for k in peers]
    dist.barrier()
    if ctx.is_leader:
        start = time.perf_counter()
        works = dist.batch_isend_irecv(ops)

        def wait_for(k: int, work) -> None:  # gloo works only complete inside wait()
            if ctx.on_cuda:  # a new thread starts on cuda:0; wait() acts on the current device
                torch.cuda.set_device(ctx.device)
            work.wait()
            ctx.sync()
            arrival[f"{k}->{me}"] = nbytes / (time.perf_counter() - start) / 1e9

        threads = [threading.Thread(target=wait_for, args=(k, w))
                   for k, w in zip(peers, works[len(peers):], strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for work in works[: len(peers)]:
            work.wait()
    merged: dict[str, float] = {}
    for part in gather(arrival):
        merged.update(part)
    return _matrix(n, merged)


def fmt_bytes(nbytes: float) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def fmt_rate(gbps: float) -> str:
    """10^9 B/s -> 'x GB/s' or 'x MB/s' for display."""
    if not math.isfinite(gbps):
        return "n/a"
    return f"{gbps:.3g} GB/s" if gbps >= 1 else f"{gbps * 1e3:.3g} MB/s"
