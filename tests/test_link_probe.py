"""Host-pair link probes: the verdict on synthetic rates, the sink and probe over real
sockets, the agents' arguments. The probes on a real tc-shaped link are checked in
tests/test_supervisor_netns.py."""

from __future__ import annotations

import socket

import pytest

from launcher.agent import parse_args
from launcher.link_probe import (
    LinkTable,
    ProbeConfig,
    find_slow_pair,
    peer_order,
    probe_once,
    serve_sink,
)

MB = 1e6
FACTOR = ProbeConfig().factor


def table_of(rates_MBps: dict[tuple[str, str], float], window: int = 4) -> LinkTable:
    """Each pair probed `window` times in each direction at its rate (2% jitter)."""
    table = LinkTable(window)
    for (a, b), rate in rates_MBps.items():
        for k in range(window):
            jitter = 1.0 + 0.02 * (k % 3 - 1)
            for src, dst in ((a, b), (b, a)):
                table.add({"ev": "link", "src": src, "dst": dst, "bytes": 4 * MB,
                           "s": 4.0 / (rate * jitter)})
    return table


def full_mesh(hosts: list[str], rate: float = 100.0) -> dict[tuple[str, str], float]:
    return {(a, b): rate for i, a in enumerate(hosts) for b in hosts[i + 1:]}


HOSTS4 = ["h0", "h1", "h2", "h3"]


def test_one_slow_pair_is_named():
    rates = full_mesh(HOSTS4)
    rates[("h0", "h3")] = 10.0
    verdict = find_slow_pair(table_of(rates), FACTOR)
    assert verdict is not None and verdict.where == "h0<->h3"
    assert verdict.pairs == (("h0", "h3"),)
    assert verdict.rate_Bps == pytest.approx(10 * MB, rel=0.05)
    assert verdict.healthy_Bps == pytest.approx(100 * MB, rel=0.05)


def test_slow_host_is_named_not_a_pair():
    rates = full_mesh(HOSTS4)
    for other in ("h0", "h1", "h2"):
        rates[(other, "h3")] = 12.0
    assert find_slow_pair(table_of(rates), FACTOR).where == "h3"
    three = full_mesh(HOSTS4[:3])  # 2 of 3 pairs slow: a median over pairs would miss it
    three[("h0", "h2")] = three[("h1", "h2")] = 10.0
    assert find_slow_pair(table_of(three), FACTOR).where == "h2"


def test_healthy_mesh_noise_and_two_hosts_report_nothing():
    rates = full_mesh(HOSTS4)
    rates[("h1", "h2")] = 55.0  # contention, not a broken link
    assert find_slow_pair(table_of(rates), FACTOR) is None
    assert find_slow_pair(table_of({("h0", "h1"): 1.0}), FACTOR) is None


def test_verdict_waits_for_a_full_window_and_noisy_probes_are_outvoted():
    rates = full_mesh(HOSTS4)
    table = table_of(rates)
    for _ in range(3):  # three probes starved by CPU load: one good probe in 4 keeps it healthy
        table.add({"ev": "link", "src": "h0", "dst": "h1", "bytes": 4 * MB, "s": 4.0})
    assert find_slow_pair(table, FACTOR) is None
    table.add({"ev": "link", "src": "h1", "dst": "h0", "bytes": 4 * MB, "s": 4.0})
    assert find_slow_pair(table, FACTOR).where == "h0<->h1"  # four in a row: slow
    partial = LinkTable(4)
    for _ in range(3):
        partial.add({"ev": "link", "src": "h0", "dst": "h1", "bytes": 4 * MB, "s": 4.0})
    assert partial.capacities() == {}
    partial.add({"ev": "exit", "node": "h0", "code": 0})  # not a link record: ignored
    assert sum(len(r) for r in partial.rates.values()) == 3


def test_peer_rotation_reaches_every_peer():
    peers = [f"n{i}" for i in range(10)]
    seen = set()
    for rnd in range(3):
        got = peer_order(peers, "n4", rnd, fanout=3)
        assert len(got) == 3 and "n4" not in got
        seen.update(got)
    assert seen == set(peers) - {"n4"}
    assert peer_order(["a", "b"], "a", 7, fanout=3) == ["b"]
    assert peer_order(["a"], "a", 0, fanout=3) == []


def test_probe_over_real_sockets():
    sink = serve_sink("127.0.0.1", 0)
    try:
        port = sink.getsockname()[1]
        seconds = probe_once("127.0.0.1", port, 2_000_000, timeout_s=5.0)
        assert 0 < seconds < 5.0
    finally:
        sink.close()
    with socket.socket() as s:  # a port nobody listens on: a failed probe, not a slow one
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    assert probe_once("127.0.0.1", dead_port, 1000, timeout_s=0.5) is None
    table = LinkTable(1)
    table.add({"ev": "link", "src": "h0", "dst": "h1", "bytes": 1000, "s": None})
    assert table.rates == {}
    silent = socket.socket()  # listens, never reads or answers: the probe times out
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        assert probe_once("127.0.0.1", silent.getsockname()[1], 20_000_000, timeout_s=0.5) == 0.5
    finally:
        silent.close()


def test_agent_probe_arguments():
    args = parse_args(["--node", "n0", "--probe-listen", "10.0.0.1:29600", "--probe-peers",
                       "n1=10.0.0.2:29600,n2=10.0.0.3:29600", "--", "torchrun", "x.py"])
    assert args.probe_listen == ("10.0.0.1", 29600)
    assert args.probe_peers == {"n1": ("10.0.0.2", 29600), "n2": ("10.0.0.3", 29600)}
    for bad in (["--probe-listen", "10.0.0.1"], ["--probe-peers", "n1=10.0.0.2:99999"],
                ["--probe-every", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--node", "n0", *bad, "--", "torchrun"])
