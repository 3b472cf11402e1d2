"""Profiler: schedule, fits, bus bandwidth, summary, parsing, cluster.yaml round trip and
errors, atomic writes, and real runs (one process; two torchrun nodes on loopback)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cost_models.specs import SpecError
from planner.specfiles import load_cluster, write_cluster_yaml
from profiler.cluster_builder import (
    NodeFacts,
    build_cluster,
    domain_lines,
    infer_domains,
    summarize,
)
from profiler.collectives import CollectiveSample, bus_factor
from profiler.context import layout_from_ranks
from profiler.device import cpu_memory_GiB, match_gpu_preset
from profiler.p2p import busy_message_bytes, fit_alpha_beta, tournament_rounds
from profiler.topology import (
    has_nvlink,
    nic_kind,
    parse_rate_Gbps,
    parse_topo_matrix,
    read_ib_ports,
    read_net_ifaces,
)

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                          "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
CLEAN_ENV["OMP_NUM_THREADS"] = "1"


# --------------------------------------------------------------------------------------------
# schedule and fits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(2, 10))
def test_tournament_covers_every_pair_once_in_disjoint_rounds(n):
    rounds = tournament_rounds(n)
    assert len(rounds) == (n - 1 if n % 2 == 0 else n)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))
    for r in rounds:
        busy = [x for p in r for x in p]
        assert len(busy) == len(set(busy)), f"round {r} reuses a node"
        assert len(r) == n // 2  # every node busy except the bye when n is odd


def test_alpha_beta_fit_recovers_line():
    alpha, beta = 3e-4, 5e7  # message+ack latency 0.3 ms, 50 MB/s
    samples = [(n, alpha + n / beta) for n in (4096, 65536, 1 << 20, 4 << 20)]
    fit = fit_alpha_beta(samples)
    assert fit.bandwidth_GBps == pytest.approx(0.05, rel=1e-6)
    assert fit.latency_s == pytest.approx(alpha / 2, rel=1e-6)


def test_alpha_beta_fit_with_token_bucket_burst_keeps_positive_latency():
    # A shaper's burst lets the first 64 KiB through free: negative intercept.
    burst, beta = 65536, 6.25e6
    samples = [(n, max(n - burst, 0) / beta + 2e-4) for n in (4096, 1 << 20, 2 << 20)]
    fit = fit_alpha_beta(samples)
    assert fit.bandwidth_GBps == pytest.approx(0.00625, rel=0.02)
    assert fit.latency_s == pytest.approx(1e-4, rel=1e-6)  # smallest message's time / 2


def test_busy_round_message_size_tracks_slowest_pair():
    bw = ((0, 0.05, 0.00625), (0.05, 0, 0.00625), (0.00625, 0.00625, 0))
    nbytes = busy_message_bytes(bw, 0.3)
    assert nbytes % 4096 == 0 and abs(nbytes - 0.00625e9 * 0.3) < 4096


def test_nccl_tests_bus_bandwidth_definitions():
    assert bus_factor("all_reduce", 8) == pytest.approx(1.75)
    assert bus_factor("all_gather", 8) == pytest.approx(0.875)
    assert bus_factor("reduce_scatter", 4) == pytest.approx(0.75)
    sample = CollectiveSample("all_reduce", 1_000_000_000, 4, 2.0)
    assert sample.algbw_GBps == pytest.approx(0.5)
    assert sample.busbw_GBps == pytest.approx(0.75)
    with pytest.raises(ValueError):
        bus_factor("broadcast", 4)


def test_nodes_follow_torchrun_group_rank_order():
    # (GROUP_RANK, LOCAL_RANK, node name) per global rank, as all_gather_object returns them
    everyone = [(1, 0, "b"), (0, 1, "a"), (0, 0, "a"), (1, 1, "b")]
    ctx = layout_from_ranks("gloo", "cpu", 3, 1, everyone, quick=True)
    assert ctx.node_names == ("a", "b")
    assert ctx.node_ranks == ((2, 1), (0, 3))  # local-rank order: the leader first
    assert ctx.leaders == (2, 0) and ctx.node_index == 1 and not ctx.is_leader


@pytest.mark.parametrize("everyone,message", [
    ([(0, 0, "a"), (1, 0, "a")], "two torchrun nodes share a host name"),
    ([(0, 0, "a"), (0, 1, "b")], "node 0 reports several names"),
])
def test_node_naming_mistakes_are_spec_errors(everyone, message):
    with pytest.raises(SpecError, match=message):
        layout_from_ranks("gloo", "cpu", 0, 0, everyone, quick=True)


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------

FAST, SLOW = 0.05, 0.00625


def _matrix(n, rate):
    return tuple(tuple(0.0 if i == j else rate(i, j) for j in range(n)) for i in range(n))


def test_summary_names_the_slow_host():
    bw = _matrix(4, lambda i, j: SLOW if 3 in (i, j) else FAST)
    s = summarize(("h0", "h1", "h2", "h3"), bw)
    assert s.slow_nodes == ("h3",) and s.slow_pairs == ()
    assert s.node_mean_GBps["h0"] == pytest.approx((FAST * 2 + SLOW) / 3)
    assert s.lines == ("slow host: h3 (6.25 MB/s vs median 35.4 MB/s)",)


def test_summary_names_a_degraded_pair_not_its_hosts():
    bw = _matrix(4, lambda i, j: SLOW if {i, j} == {0, 2} else FAST)
    s = summarize(("a", "b", "c", "d"), bw)
    assert s.slow_nodes == ()
    assert [(a, b) for a, b, _ in s.slow_pairs] == [("a", "c")]
    assert s.lines[0].startswith("slow pair: a<->c (6.25 MB/s")


def test_summary_one_way_degradation_counts():
    bw = _matrix(4, lambda i, j: SLOW if (i, j) == (1, 2) else FAST)
    assert [(a, b) for a, b, _ in summarize(tuple("wxyz"), bw).slow_pairs] == [("x", "y")]


def test_summary_slow_host_does_not_hide_a_degraded_pair():
    # a slow host (h3) and a pair degraded to a quarter (h0<->h1), as in netns_cluster once was
    mid = 0.0125
    bw = _matrix(4, lambda i, j: SLOW if 3 in (i, j) else mid if {i, j} == {0, 1} else FAST)
    s = summarize(("h0", "h1", "h2", "h3"), bw)
    assert s.slow_nodes == ("h3",)
    assert [(a, b) for a, b, _ in s.slow_pairs] == [("h0", "h1")]
    assert s.lines[1] == "slow pair: h0<->h1 (12.5 MB/s vs median 50 MB/s)"


def test_summary_uniform_cluster_flags_nothing():
    s = summarize(("a", "b", "c"), _matrix(3, lambda i, j: FAST))
    assert s.slow_nodes == () and s.slow_pairs == ()
    assert s.lines[0].startswith("no slow hosts or pairs")


# --------------------------------------------------------------------------------------------
# NVLink domains from the pair matrix
# --------------------------------------------------------------------------------------------

NVLINK, NIC = 800.0, 45.0  # GB/s per pair: through an NVL72's switches, through a 400G NIC


def test_two_racks_of_three_are_two_domains_despite_a_degraded_cross_pair():
    rack = [0, 0, 0, 1, 1, 1]
    bw = _matrix(6, lambda i, j: NVLINK if rack[i] == rack[j]
                 else 2.0 if {i, j} == {0, 5} else NIC)
    found = infer_domains(bw)  # the 45/2 jump is larger than 800/45 but leaves one component
    assert found is not None and found.blocks == ((0, 1, 2), (3, 4, 5))
    assert len(found.inside) == 6 and len(found.across) == 9


@pytest.mark.parametrize("case, rate", [
    ("uniform", lambda i, j: NIC),
    ("one degraded pair", lambda i, j: NIC / 8 if {i, j} == {0, 1} else NIC),
    ("chain, not a clique", lambda i, j: NVLINK if abs(i - j) == 1 else NIC),
    ("all nodes fast", lambda i, j: NVLINK if {i, j} != {0, 1} else NVLINK / 2),
    ("jump below the gap", lambda i, j: 2.5 * NIC if max(i, j) < 3 else NIC),
])
def test_no_domain_without_a_fast_clique_and_nodes_outside(case, rate):
    assert infer_domains(_matrix(4, rate)) is None, case


def _built(bw, names=("h0", "h1", "h2", "h3")):
    lat = _matrix(len(names), lambda i, j: 1e-5 if bw[i][j] >= NVLINK / 2 else 1e-4)
    facts = [NodeFacts(n, 4, "GB200", 180.0, "infiniband") for n in names]
    return build_cluster("lab", facts, bw, lat, {}, "nvlink", "nvlink")


def test_fast_block_of_three_becomes_a_domain_listed_first(tmp_path):
    # h1..h3 are the block: they are moved in front of h0 (a domain is one run of nodes)
    bw = _matrix(4, lambda i, j: NIC if 0 in (i, j) else NVLINK)
    cluster, notes = _built(bw)
    assert [(n.name, n.domain) for n in cluster.nodes] == [
        ("h1", "nvl0"), ("h2", "nvl0"), ("h3", "nvl0"), ("h0", "")]
    assert cluster.domain_gpus == 12 and cluster.domain_link.kind == "nvlink"
    assert cluster.domain_link.bandwidth_GBps == NVLINK and cluster.inter_node.bandwidth_GBps == NIC
    assert cluster.domain_link.latency_s == 1e-5 and cluster.inter_node.latency_s == 1e-4
    assert cluster.bandwidth_GBps[3][0] == NIC and cluster.bandwidth_GBps[0][1] == NVLINK
    assert notes == ["intra_node: not measured (one rank per node), preset value",
                     "NVLink domains inferred from the pair matrix: 3 nodes "
                     "(pairs inside >= 3x faster than across)"]
    path = tmp_path / "cluster.yaml"
    write_cluster_yaml(path, cluster, {"notes": notes})
    loaded = load_cluster(str(path))
    assert loaded.nodes == cluster.nodes and loaded.domain_link == cluster.domain_link
    lines = domain_lines(loaded, slow_nodes=("h0",))
    assert lines[0] == "NVLink domain nvl0: h1, h2, h3 (pairs inside 800 GB/s, across domains " \
                       "45 GB/s)"
    assert lines[1].startswith("note: h0 outside the only domain also read as slow host(s)")


def test_domains_of_different_sizes_are_reported_not_written():
    group = [0, 0, 0, 1, 1, 2]  # blocks of 3 and 2 and a lone node: not one domain size
    bw = _matrix(6, lambda i, j: NVLINK if group[i] == group[j] else NIC)
    cluster, notes = _built(bw, tuple(f"h{i}" for i in range(6)))
    assert all(n.domain == "" for n in cluster.nodes) and cluster.domain_link is None
    assert any("NVLink domains seen in the pair matrix but not kept" in n for n in notes), notes


# --------------------------------------------------------------------------------------------
# device names, topology and NIC parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,mem,want", [
    ("NVIDIA H100 80GB HBM3", 79.1, "H100-SXM"),
    ("NVIDIA H100 PCIe", 79.1, None),
    ("NVIDIA H200", 139.8, "H200"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", 39.4, "A100-40GB"),
    ("NVIDIA B200", 178.0, "B200"),
    ("AMD Instinct MI300X", 191.5, "MI300X"),
    ("NVIDIA GeForce RTX 4090", 23.6, None),
])
def test_gpu_preset_matching(name, mem, want):
    assert match_gpu_preset(name, mem) == want


def test_cpu_memory_from_meminfo():
    text = "MemTotal:       24684084 kB\nMemFree:        1000 kB\nMemAvailable:   20971520 kB\n"
    total, free = cpu_memory_GiB(text)
    assert total == pytest.approx(24684084 / 2**20) and free == pytest.approx(20.0)


# Hand-written in the layout `nvidia-smi topo -m` prints (tab-separated, legend below).
TOPO = (
    "\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tNV18\tPIX\t0-55\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tSYS\t0-55\t0\t\tN/A\n"
    "NIC0\tPIX\tSYS\t X \n"
    "\n"
    "Legend:\n\n  X    = Self\n  NV#  = Connection traversing a bonded set of # NVLinks\n\n"
    "NIC Legend:\n\n  NIC0: mlx5_0\n"
)


def test_parse_nvidia_smi_topology():
    topo = parse_topo_matrix(TOPO)
    assert topo["matrix"]["GPU0"]["GPU1"] == "NV18"
    assert topo["matrix"]["GPU1"]["NIC0"] == "SYS"
    assert topo["matrix"]["GPU0"]["CPU Affinity"] == "0-55"
    assert topo["nic_legend"] == {"NIC0": "mlx5_0"}
    assert has_nvlink(topo)
    assert not has_nvlink(parse_topo_matrix(TOPO.replace("NV18", "PHB")))
    assert not has_nvlink(None)


def _fake_sys(root: Path, ib: dict, net: dict) -> Path:
    for (dev, port), attrs in ib.items():
        d = root / "class" / "infiniband" / dev / "ports" / port
        d.mkdir(parents=True)
        for k, v in attrs.items():
            (d / k).write_text(v + "\n")
    for name, attrs in net.items():
        d = root / "class" / "net" / name
        d.mkdir(parents=True)
        for k, v in attrs.items():
            (d / k).write_text(v + "\n")
    return root


def test_sysfs_nics_infiniband_roce_ethernet(tmp_path):
    ib_port = {"link_layer": "InfiniBand", "rate": "400 Gb/sec (4X NDR)", "state": "4: ACTIVE"}
    root = _fake_sys(tmp_path / "ib", {("mlx5_0", "1"): ib_port},
                     {"ib0": {"speed": "400000", "operstate": "up"}, "lo": {"operstate": "unknown"}})
    ports, nets = read_ib_ports(root), read_net_ifaces(root)
    assert ports == [{"device": "mlx5_0", "port": "1", "link_layer": "InfiniBand",
                      "state": "ACTIVE", "rate_Gbps": 400.0}]
    assert {n["name"]: n["speed_Mbps"] for n in nets} == {"ib0": 400000, "lo": None}
    assert nic_kind(ports, nets, None) == "infiniband"
    roce = [{**ports[0], "link_layer": "Ethernet"}]
    assert nic_kind(roce, nets, None) == "roce"
    down = [{**ports[0], "state": "DOWN"}]
    assert nic_kind(down, nets, None) == "ethernet"
    assert nic_kind([], [{"name": "lo", "operstate": "unknown"}], None) == "loopback"
    assert nic_kind([], nets, "lo") == "loopback"
    assert nic_kind([], [], "eth0") == "ethernet"
    assert parse_rate_Gbps("100 Gb/sec (4X EDR)") == 100.0 and parse_rate_Gbps(None) is None


# --------------------------------------------------------------------------------------------
# cluster.yaml: build, round trip, bad files, atomic write
# --------------------------------------------------------------------------------------------


def _profiled_cluster(tmp_path) -> Path:
    """A cluster.yaml as the profiler writes it for 3 hosts, h2 slow (no torch run needed)."""
    names = ("h0", "h1", "h2")
    bw = _matrix(3, lambda i, j: SLOW if 2 in (i, j) else FAST)
    lat = _matrix(3, lambda i, j: 1e-4 * (1 + i + j))
    facts = [NodeFacts(n, 2, "CPU", 11.5, "ethernet") for n in names]
    coll = {"intra_node": {n: [CollectiveSample("all_reduce", 1 << 20, 2, 0.004).to_dict()]
                           for n in names}}
    cluster, notes = build_cluster("lab", facts, bw, lat, coll, "loopback")
    path = tmp_path / "cluster.yaml"
    write_cluster_yaml(path, cluster, {"backend": "gloo", "device": "cpu", "notes": notes})
    return path


def test_built_cluster_round_trips_through_loader(tmp_path):
    spec = load_cluster(str(_profiled_cluster(tmp_path)))
    assert [n.name for n in spec.nodes] == ["h0", "h1", "h2"]
    assert spec.bandwidth_GBps[0][2] == pytest.approx(SLOW)
    assert spec.bandwidth_GBps[1][1] == 0.0 and spec.latency_s[1][2] == pytest.approx(4e-4)
    assert spec.link_between(0, 2).bandwidth_GBps == pytest.approx(SLOW)
    # median over the 6 directed pairs: 2 fast (h0<->h1), 4 touching slow h2
    assert spec.inter_node.bandwidth_GBps == pytest.approx(SLOW)
    assert spec.inter_node.kind == "ethernet" and spec.inter_node.efficiency == 1.0
    # intra: all-reduce busbw of 1 MiB in 4 ms on 2 ranks; latency = time / 2(n-1) steps
    assert spec.intra_node.bandwidth_GBps == pytest.approx((1 << 20) / 0.004 / 1e9, rel=1e-5)
    assert spec.intra_node.latency_s == pytest.approx(0.002)
    assert spec.gpu_types["CPU"].memory_GiB == 11.5


def _mutate(path: Path, change) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


BAD_FILES = {
    "missing matrix row": (lambda d: d["measured"]["bandwidth_GBps"].pop(),
                           "bandwidth_GBps must be a 3x3 matrix"),
    "negative bandwidth": (lambda d: d["measured"]["bandwidth_GBps"][0].__setitem__(1, -0.05),
                           "bandwidth_GBps[0][1] = -0.05 must be a positive number"),
    "unknown GPU on a node": (lambda d: d["nodes"][1].__setitem__("gpu", "H900"),
                              "node h1 uses GPU type 'H900' with no entry in gpu_types"),
    "unknown GPU preset": (lambda d: d["gpu_types"].__setitem__("CPU", {"preset": "H900"}),
                           "unknown GPU type 'H900'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_cluster_yaml_is_one_clear_line(tmp_path, case, run_cli):
    change, message = BAD_FILES[case]
    path = _mutate(_profiled_cluster(tmp_path), change)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_cluster(str(path))
    code, out, err = run_cli(["plan", "--model", "tiny-gpt", "--cluster", str(path),
                              "--seq-len", "128", "--gbs", "8"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_partial_cluster_yaml_is_one_clear_line(tmp_path, run_cli):
    path = _profiled_cluster(tmp_path)
    text = path.read_text()
    path.write_text(text[: text.index("nodes:")])  # cut off mid-file
    code, _, err = run_cli(["plan", "--model", "tiny-gpt", "--cluster", str(path),
                            "--seq-len", "128", "--gbs", "8"])
    assert code == 2 and err.count("\n") == 1 and "missing required key 'nodes'" in err


def test_interrupted_write_leaves_old_file_and_no_temporaries(tmp_path, monkeypatch):
    path = _profiled_cluster(tmp_path)
    before = path.read_text()
    spec = load_cluster(str(path))

    def interrupted(fd):
        raise KeyboardInterrupt  # Ctrl-C after the bytes were written, before the rename

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_cluster_yaml(path, spec, {"notes": ["second run"]})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml"]


# --------------------------------------------------------------------------------------------
# real runs
# --------------------------------------------------------------------------------------------


def _meshplan(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=CLEAN_ENV)


def test_single_process_profile_writes_loadable_cpu_cluster(tmp_path):
    out = tmp_path / "sub" / "one.yaml"
    proc = _meshplan("profile", "-o", str(out), "--quick")
    assert proc.returncode == 0, proc.stderr
    spec = load_cluster(str(out))
    assert len(spec.nodes) == 1 and spec.nodes[0].gpu == "CPU"
    measured = yaml.safe_load(out.read_text())["measured"]
    assert measured["backend"] == "gloo" and measured["device"] == "cpu"
    assert measured["gpus"][0]["matmul_tflops"]["bf16"] > 0
    assert any("CPU/gloo fallback" in n for n in measured["notes"])
    assert "wrote" in proc.stdout and " s" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--gpu-type", "H900"], "unknown GPU type 'H900'"),
    (["--backend", "nccl"], "--backend nccl needs CUDA GPUs"),
])
def test_profile_user_errors_are_one_line(tmp_path, args, message):
    if message.startswith("--backend nccl"):
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA present: nccl is valid here")
    proc = _meshplan("profile", "-o", str(tmp_path / "x.yaml"), *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "x.yaml").exists()


def _torchrun_nodes(tmp_path, nodes: int, nproc: int, port: int, *args: str):
    """One torchrun agent per 'node' on this machine (loopback), each a distinct node name."""
    procs = []
    for rank in range(nodes):
        env = {**CLEAN_ENV, "MESHPLAN_NODE_NAME": f"n{rank}", "GLOO_SOCKET_IFNAME": "lo"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
               "--nproc-per-node", str(nproc), "--node-rank", str(rank), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "planner.cli", "profile", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=tmp_path))
    return procs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.torchrun
@pytest.mark.timeout(180)
def test_two_nodes_two_ranks_each_on_loopback(tmp_path):
    out = tmp_path / "cluster.yaml"
    procs = _torchrun_nodes(tmp_path, 2, 2, _free_port(), "-o", str(out), "--quick")
    logs = [p.communicate(timeout=150)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    spec = load_cluster(str(out))
    assert [(n.name, n.gpus, n.nic) for n in spec.nodes] == [("n0", 2, "loopback"),
                                                               ("n1", 2, "loopback")]
    assert spec.bandwidth_GBps[0][1] > 0 and spec.bandwidth_GBps[1][0] > 0
    coll = yaml.safe_load(out.read_text())["measured"]["collectives"]
    assert set(coll["intra_node"]) == {"n0", "n1"}  # both nodes' own all-reduce sweeps
    for scope in ("inter_node", "world"):
        assert {s["op"] for s in coll[scope]} == {"all_reduce", "all_gather", "reduce_scatter"}
    assert {s["ranks"] for s in coll["world"]} == {4}
    assert "p2p round 1/1 (n0<->n1)" in logs[0] and "wrote" in logs[0]


@pytest.mark.torchrun
@pytest.mark.timeout(180)
def test_profile_interrupted_midway_leaves_no_file(tmp_path):
    """SIGTERM to the torchrun agents once the p2p phase is under way (full mode): no file,
    no temporary left behind."""
    out = tmp_path / "cluster.yaml"
    procs = _torchrun_nodes(tmp_path, 2, 1, _free_port(), "-o", str(out))
    seen = []
    deadline = time.monotonic() + 120
    for line in procs[0].stdout:
        seen.append(line)
        if "p2p round" in line or time.monotonic() > deadline:
            break
    assert any("p2p round" in s for s in seen), "".join(seen)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.communicate(timeout=60)
    assert not out.exists()
    assert list(tmp_path.glob(".cluster.yaml.*")) == []
