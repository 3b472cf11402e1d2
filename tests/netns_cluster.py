"""A real heterogeneous test cluster on one machine: network namespaces as hosts.

Layout (all names carry a per-process prefix, e.g. mp1234):
    <p>br : a namespace holding bridge br0
    <p>h0..h3 : one namespace per host, interface `mpnet0` (veth) with 10.213.X.(i+1)/24,
                the veth's peer enslaved to br0 in <p>br
Both ends of each host's veth get a `tc tbf` rate limit (host egress and bridge egress toward
the host), so traffic in both directions is shaped: a pair of hosts runs at the slower host's
rate. Nothing is created in the root namespace except transiently (the veth before it is
moved), so the machine's own network is untouched. Teardown kills every process left in the
namespaces and deletes them (deleting a namespace destroys its veths).

Use `netns_cluster_or_skip()` from a pytest fixture; `NetnsCluster.torchrun(...)` starts one
torchrun agent per host inside its namespace.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

IFNAME = "mpnet0"
MASTER_PORT = 29500  # free: the master's namespace is brand new
DEFAULT_RATES_MBIT = (400, 400, 400, 40)
DEFAULT_PAIR_RATES_MBIT = {(0, 1): 180}
"""One degraded pair among the fast hosts, still 4.5x faster than h3's pairs: h0..h2 read as
a fast block (an NVLink domain) with one slow pair inside, h3 as a slow host outside it."""


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    """Node name the profile reports (MESHPLAN_NODE_NAME)."""
    netns: str
    ip: str
    rate_mbit: float


@functools.cache
def why_not_available() -> str | None:
    """A skip reason, or None when namespaces can be built here (probed once per process:
    several test modules ask at collection time)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install -y iproute2)"
    if shutil.which("torchrun") is None:
        return "torchrun not found (pip install torch)"
    probe = f"mpprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:  # the tbf qdisc must exist in this kernel; try it on the probe's own loopback
        shaped = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo",
                                 "root", "tbf", "rate", "1mbit", "burst", "64k", "latency",
                                 "100ms"], capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if shaped.returncode != 0:
        return f"tc tbf rate limiting unavailable: {shaped.stderr.strip()}"
    return None


def _sh(*args: str, netns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


def _burst(rate_mbit: float) -> int:
    """Bucket size: >= 4 ms of traffic, and >= 64 KiB so that GSO super-packets pass."""
    return max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.004))


def _shape(dev: str, rate_mbit: float, netns: str) -> None:
    """tbf on egress of `dev`: rate, burst, and a 100 ms queue so TCP is paced, not dropped."""
    _sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
        "burst", str(_burst(rate_mbit)), "latency", "100ms", netns=netns)


def _shape_host(rate_mbit: float, netns: str, slow_peers: dict[str, float]) -> None:
    """htb on the host's egress: everything at the host's rate (class 1:2), and traffic to
    each degraded peer's address in its own class capped at the pair's rate (1:10, 1:11...)."""
    def tc(*args: str) -> None:
        _sh("tc", *args, netns=netns)

    rate = f"{rate_mbit}mbit"
    burst = str(_burst(rate_mbit))
    tc("qdisc", "add", "dev", IFNAME, "root", "handle", "1:", "htb", "default", "2")
    tc("class", "add", "dev", IFNAME, "parent", "1:", "classid", "1:1", "htb", "rate", rate,
       "ceil", rate, "burst", burst, "cburst", burst)
    tc("class", "add", "dev", IFNAME, "parent", "1:1", "classid", "1:2", "htb", "rate", rate,
       "ceil", rate, "burst", burst, "cburst", burst)
    for k, (ip, pair_mbit) in enumerate(sorted(slow_peers.items())):
        pair, pair_burst = f"{pair_mbit}mbit", str(_burst(pair_mbit))
        tc("class", "add", "dev", IFNAME, "parent", "1:1", "classid", f"1:{10 + k}", "htb",
           "rate", pair, "ceil", pair, "burst", pair_burst, "cburst", pair_burst)
        tc("filter", "add", "dev", IFNAME, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
           "match", "ip", "dst", f"{ip}/32", "flowid", f"1:{10 + k}")


def kill_namespace(ns: str) -> None:
    """Kill every process in network namespace `ns` as a host that dies would: all are
    frozen (SIGSTOP) before any is killed, so none can react to another's death. Killed one
    by one, a rank whose agent died first caught the agent's death signal (SIGTERM) and wrote
    a `signal` record before its own SIGKILL came, on a loaded machine."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids.split():
            try:
                os.kill(int(pid), sig)
            except (ProcessLookupError, ValueError):
                pass


@dataclass
class NetnsCluster:
    """Namespaces, bridge, shaped veths; `teardown()` is idempotent."""

    rates_mbit: tuple[float, ...] = DEFAULT_RATES_MBIT
    pair_rates_mbit: dict[tuple[int, int], float] = field(
        default_factory=lambda: dict(DEFAULT_PAIR_RATES_MBIT))
    """Degraded pairs (i < j) -> Mbit/s cap in both directions."""
    prefix: str = field(default_factory=lambda: f"mp{os.getpid() % 100000}")
    hosts: list[Host] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _runtime_pairs: set[tuple[int, int]] = field(default_factory=set)

    @property
    def subnet(self) -> str:
        return f"10.213.{os.getpid() % 200 + 20}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}br"

    def setup(self) -> NetnsCluster:
        atexit.register(self.teardown)  # even if the test process dies between set-up and finally
        try:
            self._add_ns(self.bridge_ns)
            _sh("ip", "link", "add", "br0", "type", "bridge", netns=self.bridge_ns)
            _sh("ip", "link", "set", "br0", "up", netns=self.bridge_ns)
            for i, rate in enumerate(self.rates_mbit):
                self.hosts.append(self._add_host(i, rate))
            for i, host in enumerate(self.hosts):
                slow = {self.hosts[j].ip: self.pair_rate_mbit(i, j)
                        for j in range(len(self.hosts)) if (min(i, j), max(i, j)) in
                        self.pair_rates_mbit}
                _shape_host(host.rate_mbit, host.netns, slow)  # host -> bridge
                _shape(f"{self.prefix}v{i}b", host.rate_mbit, self.bridge_ns)  # bridge -> host
        except BaseException:
            self.teardown()
            raise
        return self

    @property
    def root_ip(self) -> str:
        """The root namespace's address on the cluster network (after `link_root()`)."""
        return f"{self.subnet}.254"

    def link_root(self) -> str:
        """Join the root namespace to the bridge (veth <p>rt in the root namespace, unshaped),
        so a process here (the supervisor) reaches every host; returns its address. Deleting
        the bridge namespace at teardown destroys the pair."""
        outer, inner = f"{self.prefix}rt", f"{self.prefix}rb"
        _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        try:
            _sh("ip", "link", "set", inner, "netns", self.bridge_ns)
        except RuntimeError:
            subprocess.run(["ip", "link", "del", outer], capture_output=True)
            raise
        _sh("ip", "link", "set", inner, "master", "br0", netns=self.bridge_ns)
        _sh("ip", "link", "set", inner, "up", netns=self.bridge_ns)
        _sh("ip", "addr", "add", f"{self.root_ip}/24", "dev", outer)
        _sh("ip", "link", "set", outer, "up")
        return self.root_ip

    def set_pair_rate(self, i: int, j: int, rate_mbit: float) -> None:
        """Degrade (or restore) the link between hosts i and j at run time: both hosts' egress
        to the other goes through an htb class capped at `rate_mbit` (`tc class change` when
        the pair already has one, else a new class and u32 filter)."""
        for a, b in ((i, j), (j, i)):
            ns, peer = self.hosts[a].netns, self.hosts[b].ip
            classid = f"1:{100 + b}"
            rate, burst = f"{rate_mbit}mbit", str(_burst(rate_mbit))
            verb = "change" if (a, b) in self._runtime_pairs else "add"
            _sh("tc", "class", verb, "dev", IFNAME, "parent", "1:1", "classid", classid, "htb",
                "rate", rate, "ceil", rate, "burst", burst, "cburst", burst, netns=ns)
            if verb == "add":
                _sh("tc", "filter", "add", "dev", IFNAME, "parent", "1:", "protocol", "ip",
                    "prio", "1", "u32", "match", "ip", "dst", f"{peer}/32", "flowid", classid,
                    netns=ns)
                self._runtime_pairs.add((a, b))

    def pair_rate_mbit(self, i: int, j: int) -> float:
        """What hosts i and j get between them: the slower host, or the degraded pair's cap."""
        cap = self.pair_rates_mbit.get((min(i, j), max(i, j)), float("inf"))
        return min(self.rates_mbit[i], self.rates_mbit[j], cap)

    def _add_ns(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self._namespaces.append(name)
        _sh("ip", "link", "set", "lo", "up", netns=name)

    def _add_host(self, i: int, rate_mbit: float) -> Host:
        ns, outer, inner = f"{self.prefix}h{i}", f"{self.prefix}v{i}b", f"{self.prefix}v{i}h"
        self._add_ns(ns)
        _sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        try:
            _sh("ip", "link", "set", inner, "netns", ns)
            _sh("ip", "link", "set", outer, "netns", self.bridge_ns)
        except RuntimeError:
            subprocess.run(["ip", "link", "del", inner], capture_output=True)  # left in root ns
            raise
        ip = f"{self.subnet}.{i + 1}"
        _sh("ip", "link", "set", inner, "name", IFNAME, netns=ns)
        _sh("ip", "addr", "add", f"{ip}/24", "dev", IFNAME, netns=ns)
        _sh("ip", "link", "set", IFNAME, "up", netns=ns)
        _sh("ip", "link", "set", outer, "master", "br0", netns=self.bridge_ns)
        _sh("ip", "link", "set", outer, "up", netns=self.bridge_ns)
        return Host(f"h{i}", ns, ip, rate_mbit)

    def teardown(self) -> None:
        """Kill what runs in our namespaces, delete them. Safe to call twice."""
        subprocess.run(["ip", "link", "del", f"{self.prefix}rt"], capture_output=True)
        for ns in reversed(self._namespaces):
            kill_namespace(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()

    def torchrun(self, args: list[str], timeout_s: float, log_dir: Path,
                 env: dict | None = None) -> list[tuple[int | None, str]]:
        """One torchrun agent per host (--nproc-per-node 1) running `args`, all started at
        once; returns (exit code or None if killed at the timeout, output) per host."""
        procs, logs = [], []
        for rank, host in enumerate(self.hosts):
            host_env = {**os.environ, **(env or {}), "MESHPLAN_NODE_NAME": host.name,
                        "GLOO_SOCKET_IFNAME": IFNAME, "OMP_NUM_THREADS": "1"}
            cmd = ["ip", "netns", "exec", host.netns, "torchrun", "--nnodes",
                   str(len(self.hosts)), "--nproc-per-node", "1", "--node-rank", str(rank),
                   "--master-addr", self.hosts[0].ip, "--master-port", str(MASTER_PORT), *args]
            logs.append(log_dir / f"{host.name}.log")
            with logs[-1].open("w") as log:
                procs.append(subprocess.Popen(cmd, env=host_env, stdout=log,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        codes: list[int | None] = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return [(code, log.read_text()) for code, log in zip(codes, logs, strict=True)]
