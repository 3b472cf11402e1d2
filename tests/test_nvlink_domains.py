"""NVLink domains larger than a node on the planning side: links a group is costed on, where
the winner's groups run (`planner.explain.group_spans`), the default tp bound, and the
acceptance command on a GB200 NVL72 cluster run as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cost_models.dims import Group
from cost_models.megatron import Links
from cost_models.specs import Layout
from planner.explain import group_members, group_spans, spans_lines
from planner.search import degree_combos, with_default_max_tp
from planner.specfiles import load_cluster, load_model

ROOT = Path(__file__).resolve().parent.parent
PLAN_405B_NVL72 = ["plan", "--model", "llama3.1-405b", "--cluster", "gb200-nvl72", "--nodes",
                   "72", "--seq-len", "8192", "--global-batch-size", "288"]


def _racks_of(trays_per_domain: int, trays: int):
    """The gb200-nvl72 preset with its trays regrouped into NVLink domains of the given size."""
    base = load_cluster("gb200-nvl72", nodes=trays)
    nodes = tuple(replace(n, domain=f"nvl{i // trays_per_domain}") for i, n in enumerate(base.nodes))
    return replace(base, nodes=nodes)


def test_tp_ep_group_of_16_is_nvlink_in_one_rack_and_nic_across_two():
    """A TP x EP group of 16 consecutive GPUs: 4 trays of one NVL72 rack -> the rack's NVLink
    (900 GB/s x 0.75); the same group over two domains of 2 trays (8 GPUs) -> the NICs: the 8
    members in each domain drive 8 NICs in parallel, 8 x 50 GB/s x 0.9 = 360 GB/s."""
    rack = load_cluster("gb200-nvl72", nodes=18)
    tp_ep = Group(16, 1)
    nvlink = rack.domain_link_spec.effective_Bps
    assert float(Links.of(rack).bandwidth_Bps(tp_ep)) == pytest.approx(nvlink) == 675e9
    two = _racks_of(2, 18)
    assert two.nodes_per_domain == 2 and two.domain_gpus == 8
    nic = two.inter_node.effective_Bps
    assert float(Links.of(two).bandwidth_Bps(tp_ep)) == pytest.approx(8 * nic) == 360e9
    assert float(Links.of(two).latency_s(tp_ep)) == two.inter_node.latency_s
    # and inside one tray it is the tray's NVLink, as before
    assert float(Links.of(two).bandwidth_Bps(Group(4, 1))) == rack.intra_node.effective_Bps


def test_group_members_follow_the_mesh_order():
    lay = Layout(tp=2, pp=2, dp=2, micro_batch_size=1, global_batch_size=2, seq_len=128, cp=2)
    dims = lay.dims  # rank = tp + 2 (cp + 2 (dp + 2 pp))
    assert group_members(16, dims.group("tp"))[:2].tolist() == [[0, 1], [2, 3]]
    assert group_members(16, dims.group("cp"))[:3].tolist() == [[0, 2], [1, 3], [4, 6]]
    assert group_members(16, dims.group("dp"))[:2].tolist() == [[0, 4], [1, 5]]
    assert group_members(16, dims.group("pp")).tolist()[0] == [0, 8]
    for name in ("tp", "cp", "dp", "pp"):  # every rank in exactly one instance
        assert sorted(group_members(16, dims.group(name)).ravel().tolist()) == list(range(16))


def test_spans_of_tp4_ep4_in_a_rack_and_across_racks():
    # 16 trays of one rack (64 GPUs): tp4 x ep4 groups of 16 GPUs = 4 trays each
    lay = Layout(tp=4, pp=1, dp=16, micro_batch_size=1, global_batch_size=16, seq_len=4096, ep=4)
    spans = {s.name: s for s in group_spans(lay, load_cluster("gb200-nvl72", nodes=16))}
    assert (spans["tp"].level, spans["ep"].level, spans["dp"].level) == (
        "node", "domain", "domain")
    assert spans["ep"].counts == (0, 16, 0)
    assert spans["ep"].bandwidth_GBps == pytest.approx(675)
    two = {s.name: s for s in group_spans(lay, _racks_of(2, 16))}
    # each ep group has one member per tray, 2 per 2-tray domain: a rank's all-to-all sends
    # 2 of its 4 shares through its own NIC (45 GB/s) and 1 over NVLink (675 GB/s), so its 3
    # outgoing shares leave at 3 / (2/45 + 1/675) = 65.3 GB/s (the dp ring drives 2 NICs: 90)
    assert two["ep"].counts == (0, 0, 16)
    assert two["ep"].bandwidth_GBps == pytest.approx(3 / (2 / 45 + 1 / 675))
    assert two["dp"].bandwidth_GBps == 90
    assert two["ep"].costed_level == "cross_domain" and two["tp"].level == "node"


def test_spans_count_groups_that_straddle_a_rack_boundary():
    """tp4 cp4 on 4 racks of 72: a cp group's block is 16 ranks, and 72 = 4.5 x 16, so the
    blocks [64, 80) and [208, 224) straddle racks (144 = 9 x 16 does not): 2 blocks x 4 cp
    groups = 8 of the 72 cross; the cost model charges the slowest instance: 2 members on
    each side of the boundary drive 2 NICs (2 x 45 GB/s)."""
    lay = Layout(tp=4, pp=6, dp=3, cp=4, micro_batch_size=1, global_batch_size=288, seq_len=8192)
    cluster = load_cluster("gb200-nvl72", nodes=72)
    cp = next(s for s in group_spans(lay, cluster) if s.name == "cp")
    assert cp.counts == (0, 64, 8) and cp.level == "cross_domain"
    assert cp.costed_level == "cross_domain" and cp.bandwidth_GBps == 90
    lines = spans_lines(lay, cluster)
    assert lines[0] == ("groups (4 GPUs per node, 18 nodes = 72 GPUs per NVLink domain, "
                        "4 domains):")
    assert lines[2] == ("  cp4 (stride 4): 64 of 72 groups inside an NVLink domain; 8 of 72 "
                        "groups across NVLink domains, costed at 90 GB/s")


def test_one_node_domains_have_two_levels():
    lay = Layout(tp=8, pp=2, dp=2, micro_batch_size=1, global_batch_size=2, seq_len=4096)
    cluster = load_cluster("dgx-h100", nodes=4)
    lines = spans_lines(lay, cluster)
    assert lines[0] == "groups (8 GPUs per node, NVLink inside a node only):"
    assert lines[1].startswith("  tp8 (stride 1): inside a node, costed at ")
    assert lines[2].startswith("  dp2 (stride 8): across nodes, costed at 45 GB/s")
    assert lines[3].startswith("  pp2 hops (stride 16): across nodes")


def test_default_max_tp_reaches_two_trays_of_an_nvl72_but_not_further():
    model = load_model("llama3.1-405b")
    for cluster, want in ((load_cluster("gb200-nvl72", nodes=36), 8),
                          (load_cluster("dgx-h100", nodes=4), 8),
                          (_racks_of(1, 8), 4)):  # domains of one tray: tp stays in the tray
        space = with_default_max_tp(None, cluster)
        tps = set(degree_combos(model, cluster.world_size, cluster.gpus_per_node, 8192,
                                space)["tp"].tolist())
        assert max(tps) == want, cluster.name
    assert with_default_max_tp(None, load_cluster("gb200-nvl72", nodes=36)).max_tp == 8
    space = with_default_max_tp(with_default_max_tp(None, _racks_of(18, 36)), _racks_of(1, 36))
    assert space.max_tp == 8  # an explicit bound (--max-tp) is kept


def test_plan_405b_on_nvl72_explains_which_groups_stay_in_a_rack():
    """The acceptance command as a process: 288 GPUs in 4 racks and one line per group."""
    proc = subprocess.run([sys.executable, "-m", "planner.cli", *PLAN_405B_NVL72],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "on 288 x GB200 (72 nodes)" in out
    assert "groups (4 GPUs per node, 18 nodes = 72 GPUs per NVLink domain, 4 domains):" in out
    rows = out[out.index("groups (4 GPUs"):].splitlines()[1:]
    named = [r.split()[0] for r in rows if r.startswith("  ")]
    assert named[0].startswith("tp") and any(n.startswith("pp") for n in named), out
    for row in rows:
        if row.startswith("  "):
            assert "inside a node" in row or "NVLink domain" in row, row


def test_plan_json_has_groups_per_plan(run_cli):
    code, out, _ = run_cli([*PLAN_405B_NVL72, "--top-k", "2", "--json"])
    assert code == 0
    plans = json.loads(out)["plans"]
    assert len(plans) == 2
    for plan in plans:
        groups = {g["group"]: g for g in plan["groups"]}
        lay = plan["layout"]
        assert groups["tp"]["size"] == lay["tp"] and groups["tp"]["level"] in ("node", "domain")
        for g in groups.values():
            total = g["node"] + g["domain"] + g["cross_domain"]
            hops = g["size"] - 1 if g["group"] == "pp" else 1  # pp counts hops per pipeline
            assert total == 288 // g["size"] * hops, g
            assert g["bandwidth_GBps"] > 0 and g["costed_as"] in ("node", "domain", "cross_domain")


def test_ep_across_dgx_nodes_is_shown_at_the_nic_rate_it_is_costed_at():
    """ep16 over two DGX H100 nodes: each rank sends 8 of its 16 shares through its own NIC
    (45 GB/s) and 7 over NVLink (337.5 GB/s), so its 15 outgoing shares leave at
    15 / (8/45 + 7/337.5) = 75.6 GB/s; a dp ring of the same 16 GPUs drives 8 NICs."""
    lay = Layout(tp=1, pp=2, dp=16, micro_batch_size=1, global_batch_size=16, seq_len=4096, ep=16)
    spans = {s.name: s for s in group_spans(lay, load_cluster("dgx-h100", nodes=4))}
    assert spans["ep"].bandwidth_GBps == pytest.approx(15 / (8 / 45 + 7 / 337.5))
    assert spans["dp"].bandwidth_GBps == pytest.approx(337.5)
    assert spans["ep"].costed_level == spans["dp"].costed_level == "cross_domain"
