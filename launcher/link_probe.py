"""Host-pair link probes: the node agents time bulk transfers to each other, the supervisor
names the pair (or host) whose links run far below the rest.

Why probes: a rank's collective timings cannot localise one slow host pair when the job's
collectives are rings over every rank (data-parallel all-reduce, FSDP all-gather): every
member waits for the slowest hop alike (`monitor.find_slow_link` says so and reports
nothing). C4 (Dong et al., 2024, Sec. 4) and Minder localise links from per-connection
counters that torch does not expose for gloo or NCCL, so the agents measure the links
themselves, out of band: each agent serves a sink on its host's address, and every
`period_s` sends `nbytes` to up to `fanout` peers (rotating, so with more peers than that
every pair is covered every ceil((N-1)/fanout) rounds) and times it until the peer's one-byte
acknowledgement. Each measurement becomes an agent record
`{"ev": "link", "src", "dst", "bytes", "s", "t"}` in `ATTEMPT/monitor/agents.jsonl`.

The supervisor keeps the last `window` rates of every unordered pair (both directions pool:
a degraded link is usually degraded both ways) and takes the best rate of that window as the
pair's capacity: contention and CPU scheduling only ever make a probe slower, so one good probe
in the window shows the link is healthy, while a degraded link caps every probe. A pair is slow
when that is below `factor` x the fastest pair's (the healthy rate; a median over pairs
would read a slow host's pairs as the norm when they are the majority, e.g. 2 of 3 pairs on 3
hosts). Slow pairs that are every pair of one host are that host's link; otherwise the slowest
pair is named `A<->B`. With two hosts there is one pair and nothing to compare: nothing is
reported. Pairs that are legitimately slower by more than 1/factor (mixed NIC types across
the pair) would read as slow: lower `factor` there.

A probe costs nbytes x min(fanout, N-1) / period_s of each host's bandwidth (4 MB x 3 / 2 s =
6 MB/s by default, ~1% of a 400 Gbit/s NIC and 5% of the 1 Gbit/s test links).
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """How agents probe and how the supervisor judges the results."""

    period_s: float = 2.0
    """Seconds between an agent's probe rounds; 0 disables probing."""
    nbytes: int = 4_000_000
    """Bytes per probe: well above a shaper's burst and TCP's slow start, so the time is the
    link's rate, not its latency."""
    fanout: int = 3
    """Peers each agent probes per round."""
    window: int = 4
    """Rates per pair the verdict takes the best of (all must be slow to call a pair slow)."""
    factor: float = 0.35
    """A pair is slow below this fraction of the healthy pair rate (a link at 1/10 reads
    ~0.1-0.2 after probe overheads; a healthy one under CPU contention rarely below 0.5)."""
    timeout_s: float = 10.0
    """A probe that takes longer counts as a rate of nbytes / timeout_s."""


# -- the agent's side ------------------------------------------------------------------------

def serve_sink(bind: str, port: int) -> socket.socket:
    """Listen on (bind, port) and drain every probe connection in a thread: read the 8-byte
    length, then that many bytes, then answer one byte. Returns the listening socket (close it
    to stop accepting)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(16)

    def drain(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30.0)
            try:
                left = int.from_bytes(_read_exact(conn, 8), "big")
                while left > 0:
                    got = conn.recv(min(left, 1 << 20))
                    if not got:
                        return
                    left -= len(got)
                conn.sendall(b"k")
            except OSError:
                return

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:  # closed
                return
            threading.Thread(target=drain, args=(conn,), daemon=True,
                             name="meshplan-probe-sink").start()

    threading.Thread(target=accept, daemon=True, name="meshplan-probe-accept").start()
    return srv


def _read_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = conn.recv(n - len(buf))
        if not got:
            raise ConnectionError("peer closed")
        buf += got
    return buf


def probe_once(host: str, port: int, nbytes: int, timeout_s: float) -> float | None:
    """Seconds to send `nbytes` to the sink at host:port and get its acknowledgement (the
    connection set-up is not counted); `timeout_s` when it takes longer; None when the peer
    cannot be reached or drops the connection (a dead host is the dead-rank detector's
    business, not a slow link)."""
    payload = memoryview(bytes(CHUNK_BYTES))
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            t0 = time.perf_counter()
            conn.sendall(nbytes.to_bytes(8, "big"))
            left = nbytes
            while left > 0:
                n = min(left, CHUNK_BYTES)
                conn.sendall(payload[:n])
                left -= n
            _read_exact(conn, 1)
            return min(time.perf_counter() - t0, timeout_s)
    except TimeoutError:
        return timeout_s
    except OSError:
        return None


def peer_order(peers: list[str], me: str, round_index: int, fanout: int) -> list[str]:
    """The peers to probe in round `round_index`: `fanout` of them, starting at an offset that
    rotates each round so every peer is reached (peers sorted; `me` left out)."""
    others = sorted(p for p in peers if p != me)
    if not others:
        return []
    k = min(fanout, len(others))
    start = (round_index * k) % len(others)
    return [others[(start + i) % len(others)] for i in range(k)]


def run_prober(node: str, peers: dict[str, tuple[str, int]], cfg: ProbeConfig,
               send: Callable[[dict], None], stop: threading.Event) -> threading.Thread:
    """Start the probe loop of agent `node` in a daemon thread: every `cfg.period_s`, probe
    this round's peers and `send` one link record per probe, until `stop` is set."""
    def loop() -> None:
        names = sorted(peers)
        rnd = 0
        while not stop.wait(cfg.period_s):
            for peer in peer_order(names, node, rnd, cfg.fanout):
                host, port = peers[peer]
                sec = probe_once(host, port, cfg.nbytes, cfg.timeout_s)
                if stop.is_set():
                    return
                send({"ev": "link", "src": node, "dst": peer, "bytes": cfg.nbytes,
                      "s": None if sec is None else round(sec, 6), "t": time.time()})
            rnd += 1

    thread = threading.Thread(target=loop, daemon=True, name="meshplan-link-probe")
    thread.start()
    return thread


# -- the supervisor's side -------------------------------------------------------------------

@dataclass(slots=True)
class LinkTable:
    """The last `window` probe rates (bytes/s) of every unordered host pair."""

    window: int = 4
    rates: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    offset: int = 0
    """Bytes of the agents' record file already read (the supervisor's reading position)."""

    def add(self, rec: dict) -> None:
        """Fold one `link` record in (others, and failed probes, are ignored)."""
        sec = rec.get("s")
        if rec.get("ev") != "link" or not isinstance(sec, (int, float)) or not sec > 0:
            return
        src, dst = str(rec.get("src")), str(rec.get("dst"))
        if src == dst:
            return
        pair = (min(src, dst), max(src, dst))
        mine = self.rates.setdefault(pair, [])
        mine.append(float(rec["bytes"]) / float(sec))
        del mine[:-self.window]

    def capacities(self) -> dict[tuple[str, str], float]:
        """Pair -> best rate of its window (its capacity estimate), for pairs whose window is
        full."""
        return {p: max(r) for p, r in self.rates.items() if len(r) >= self.window}


@dataclass(frozen=True, slots=True)
class LinkVerdict:
    """A slow link: `where` is `A<->B` or a host name; rates in bytes/s."""

    where: str
    pairs: tuple[tuple[str, str], ...]
    rate_Bps: float
    healthy_Bps: float


def find_slow_pair(table: LinkTable, factor: float) -> LinkVerdict | None:
    """The slow host pair (or host) among the probed pairs, or None (see the module doc)."""
    caps = table.capacities()
    if len(caps) < 2:
        return None
    healthy = max(caps.values())
    slow = {p: r for p, r in caps.items() if r < factor * healthy}
    if not slow:
        return None
    hosts = {h for p in caps for h in p}
    for host in sorted(hosts):
        mine = {p for p in caps if host in p}
        if len(mine) >= 2 and mine <= set(slow):  # every probed pair of this host is slow
            rate = statistics.median(slow[p] for p in mine)
            return LinkVerdict(host, tuple(sorted(mine)), rate, healthy)
    pair = min(slow, key=lambda p: (slow[p], p))
    return LinkVerdict("<->".join(pair), (pair,), slow[pair], healthy)
