"""Megatron-Core's MoE runtime switches in the cost model: the expert all-to-all overlap
(--overlap-moe-expert-parallel-comm), the flex dispatcher's node-deduplicating backends
(DeepEP / HybridEP) and per-module CUDA graphs; and the published rows' presets."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cost_models import comm, megatron
from cost_models.specs import Layout, SpecError
from planner.search import SearchSpace, search
from planner.specfiles import load_cluster, load_model

MIXTRAL = load_model("mixtral-8x7b")
FINE = replace(MIXTRAL, name="fine-grained", num_experts=64, experts_top_k=8,
               expert_ffn_hidden_size=1792)  # Mixtral's shape with 64 small experts, top-8
H100x2 = load_cluster("dgx-h100", nodes=2)


def _layout(**kw):
    base = dict(tp=1, pp=1, dp=16, ep=16, micro_batch_size=1, global_batch_size=64,
                seq_len=4096)
    return Layout(**{**base, **kw})


def test_node_dedup_scale_counts_remote_nodes_not_remote_experts():
    # top-8 over 2 nodes: a token hits the other node with probability 1 - 2^-8, against
    # 8 * 1/2 = 4 expected remote copies with a plain all-to-all
    assert float(comm.node_dedup_scale(8, 2)) == pytest.approx((1 - 0.5 ** 8) / 4)
    assert float(comm.node_dedup_scale(8, 1)) == 1.0  # one node: nothing leaves it
    assert float(comm.node_dedup_scale(2, 64)) == pytest.approx(64 * (1 - (63 / 64) ** 2) / 2)
    assert 0.99 < float(comm.node_dedup_scale(1, 8)) <= 1.0  # top-1: one copy either way


def test_a2a_overlap_hides_its_share_and_flex_cuts_the_nic_bytes():
    plain = megatron.estimate(FINE, H100x2, _layout())
    overlap = megatron.estimate(FINE, H100x2, _layout(moe_a2a_overlap=True))
    hidden = H100x2.gpu.ep_comm_overlap
    assert overlap.time.ep_comm_s == pytest.approx(plain.time.ep_comm_s * (1 - hidden))
    flex = megatron.estimate(FINE, H100x2, _layout(moe_dispatcher="deepep"))
    # ep 16 over two nodes, top-8: a token crosses once instead of 4 times on average
    assert flex.time.ep_comm_s < 0.5 * plain.time.ep_comm_s
    inside = megatron.estimate(FINE, H100x2, _layout(ep=8, dp=16))
    inside_flex = megatron.estimate(FINE, H100x2, _layout(ep=8, dp=16, moe_dispatcher="deepep"))
    assert inside_flex.time.ep_comm_s == pytest.approx(inside.time.ep_comm_s)  # one node


def test_router_graphs_remove_most_of_the_moe_host_cost():
    lay = _layout(ep=8)
    none = megatron.estimate(MIXTRAL, H100x2, lay)
    part = megatron.estimate(MIXTRAL, H100x2, replace(
        lay, cuda_graph_modules=("attn", "moe_router", "moe_preprocess")))
    full = megatron.estimate(MIXTRAL, H100x2, replace(lay, cuda_graphs=True))
    host = none.time.compute_s - full.time.compute_s
    assert host > 0
    assert none.time.compute_s - part.time.compute_s == pytest.approx(
        megatron.PARTIAL_GRAPH_HOST_SAVED * host, rel=1e-9)


@pytest.mark.parametrize(("kw", "rule"), [
    (dict(pp=2, dp=8, ep=8), "vp > 1"),
    (dict(ep=1), "ep > 1"),
    (dict(recompute="full"), "full recompute"),
])
def test_a2a_overlap_follows_megatron_rules(kw, rule):
    with pytest.raises(SpecError, match=rule):
        _layout(moe_a2a_overlap=True, **kw).validate(MIXTRAL, 16)


def test_flex_dispatcher_needs_a_megatron_moe():
    dense = load_model("llama3.1-8b")
    lay = Layout(tp=1, pp=1, dp=8, micro_batch_size=1, global_batch_size=8, seq_len=4096,
                 moe_dispatcher="deepep")
    with pytest.raises(SpecError, match="flex dispatcher"):
        lay.validate(dense, 8)
    with pytest.raises(SpecError, match="flex dispatcher"):
        replace(_layout(moe_dispatcher="hybridep"), framework="torchtitan").validate(MIXTRAL, 16)


def test_graph_modules_are_checked():
    with pytest.raises(SpecError, match="unknown CUDA graph module"):
        _layout(cuda_graph_modules=("router",)).validate(MIXTRAL, 16)
    with pytest.raises(SpecError, match="full_iteration"):
        _layout(cuda_graph_modules=("attn",), cuda_graphs=True).validate(MIXTRAL, 16)


def test_plan_turns_the_overlap_on_where_megatron_allows_it():
    space = SearchSpace(refine_top=0, ep=8)
    best = search(MIXTRAL, H100x2, 4096, 64, space, top_k=20).plans
    assert best
    for est in best:
        lay = est.layout
        allowed = lay.ep > 1 and (lay.pp == 1 or lay.vp > 1) and lay.recompute != "full"
        assert lay.moe_a2a_overlap == allowed, lay
    off = search(MIXTRAL, H100x2, 4096, 64, replace(space, moe_a2a_overlap=False), top_k=5)
    assert not any(e.layout.moe_a2a_overlap for e in off.plans)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_graph_module_is_one_line():
    proc = _cli("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "2",
                "--seq-len", "4096", "--gbs", "64", "--tp", "1", "--pp", "1", "--ep", "8",
                "--mbs", "1", "--cuda-graph-modules", "attn,routr")
    assert proc.returncode == 2
    assert "unknown module 'routr'" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_cli_estimate_prices_the_dispatcher_and_overlap():
    base = ("estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "2",
            "--seq-len", "4096", "--gbs", "64", "--tp", "1", "--pp", "2", "--vp", "2",
            "--cp", "2", "--ep", "8", "--mbs", "1", "--json")
    plain = json.loads(_cli(*base).stdout)
    tuned = json.loads(_cli(*base, "--moe-dispatcher", "deepep", "--moe-a2a-overlap").stdout)
    assert tuned["layout"]["moe_dispatcher"] == "deepep" and tuned["layout"]["moe_a2a_overlap"]
    assert tuned["step_time_s"] < plain["step_time_s"]


def test_published_moe_rows_run_their_presets():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from published import load_cases_2025, preset_facts

    facts = preset_facts()
    assert facts[2]["cuda_graph_impl"] == "full_iteration" and facts[2]["moe_a2a_overlap"] == "True"
    cases = {c.label.split()[0]: c for c in load_cases_2025()[0]}
    row2, row15 = cases["2"].layouts[0], cases["15"].layouts[0]
    assert row2.cuda_graphs and row2.moe_a2a_overlap and row2.moe_dispatcher == "hybridep"
    assert row15.cuda_graph_modules == ("attn", "moe_router", "moe_preprocess")
    assert not row15.moe_a2a_overlap
    assert all(c.layouts for c in cases.values())
