"""One way to plan: `meshplan plan`, the explanations and the supervisor's re-plan after a fault
all go through `planner.engine.plan` with the user's options, so they agree.

The supervisor's re-plan of a mixed A100+H100 cluster and of a measured 16-node cluster (each
minus one node) must use the same cost model, search and placement as `meshplan plan` on the
reduced cluster, and keep the cost model, recompute, headroom and fixed degrees the plan was
made with.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cost_models.specs import InfeasibleLayout
from launcher.supervisor import reduce_cluster, replan_best
from planner.cli import cli
from planner.explain import advise
from planner.options import Problem
from planner.planfile import read_plan
from planner.report import layout_label
from planner.search import SearchSpace
from planner.specfiles import cluster_to_dict, dump_yaml, load_cluster, load_model

CLUSTERS = Path(__file__).resolve().parents[1] / "examples" / "clusters"


def plan_cli(tmp_path: Path, name: str, cluster: str, *options: str):
    """`meshplan plan ... -o name.yaml` in-process; the plan file it wrote."""
    out = tmp_path / f"{name}.yaml"
    res = CliRunner().invoke(cli, ["plan", "--model", "llama3.1-8b", "--cluster", cluster,
                                   "--seq-len", "4096", "--global-batch-size", "64",
                                   "-o", str(out), *options])
    assert res.exit_code == 0, res.output
    return read_plan(out)


def write_cluster(tmp_path: Path, cluster) -> str:
    path = tmp_path / f"{cluster.name}-reduced.yaml"
    path.write_text(dump_yaml(cluster_to_dict(cluster)))
    return str(path)


@pytest.mark.parametrize(("name", "style"), [("mixed-a100-h100", "holmes"), ("pipette-16", "pipette")])
def test_supervisor_replans_like_plan_on_the_reduced_cluster(tmp_path, name, style):
    options = ("--recompute", "none", "--recompute", "selective", "--mem-headroom", "0.08")
    first = plan_cli(tmp_path, "first", str(CLUSTERS / f"{name}.yaml"), *options)
    assert first.estimate["cost_model"] == style
    lost = first.node_order[0]
    reduced = reduce_cluster(first.cluster, {lost})
    new = replan_best(first, reduced)
    ref = plan_cli(tmp_path, "ref", write_cluster(tmp_path, reduced), *options)
    assert new.estimate["cost_model"] == ref.estimate["cost_model"] == style
    # Same layout and (up to the placement ILP's time limit, which a loaded machine can hit)
    # the same predicted step; equally good node orders may differ.
    assert new.layout == ref.layout
    assert new.estimate["step_time_s"] == pytest.approx(ref.estimate["step_time_s"], rel=0.01)
    assert lost not in new.node_order
    assert new.request == ref.request == first.request  # the user's options, passed through
    assert new.request.space.headroom == 0.08 and new.layout.recompute in ("none", "selective")


def test_replan_keeps_fixed_degrees_and_cost_model(tmp_path):
    first = plan_cli(tmp_path, "first", "dgx-h100", "--nodes", "4", "--tp", "2",
                     "--cost-model", "holmes", "--dp", "4")
    assert first.layout.tp == 2 and first.estimate["cost_model"] == "holmes"
    new = replan_best(first, reduce_cluster(first.cluster, {first.node_order[-1]}))
    assert new.layout.tp == 2 and new.estimate["cost_model"] == "holmes"  # dp re-derived
    assert new.layout.world == 24


def test_replan_without_a_recorded_request_uses_the_defaults(tmp_path):
    first = plan_cli(tmp_path, "first", "dgx-h100", "--nodes", "3")
    bare = type(first)(first.model, first.cluster, first.layout, first.node_order, {})
    reduced = reduce_cluster(first.cluster, {first.node_order[-1]})
    assert replan_best(bare, reduced).layout == plan_cli(
        tmp_path, "ref", write_cluster(tmp_path, reduced)).layout


def test_replan_that_fits_nothing_is_infeasible(tmp_path):
    first = plan_cli(tmp_path, "first", "dgx-h100", "--nodes", "2")
    tiny = reduce_cluster(first.cluster, {first.node_order[-1]})
    big = type(first)(load_model("llama3.1-405b"), first.cluster, first.layout, first.node_order,
                      {}, first.request)
    with pytest.raises(InfeasibleLayout, match="no layout of llama3.1-405b fits"):
        replan_best(big, tiny)


def test_plan_advise_and_supervisor_agree_on_one_problem(tmp_path):
    """advise's "2x the GPUs" variant, `plan` on that cluster and the supervisor's re-plan onto
    it (from one more node) give one layout."""
    model, options = load_model("llama3.1-70b"), ("--recompute", "none")
    prob = Problem(model, load_cluster("dgx-h100", 2, None), 8192, 64, "bf16", "auto")
    lines = advise(prob, SearchSpace(recompute=("none",)), ())
    advised = next(re.match(r"with 2x the GPUs \(32\): (.*) fits", x) for x in lines if "2x" in x)
    runner = CliRunner()
    out = tmp_path / "p.yaml"
    for nodes, name in ((4, "four"), (5, "five")):
        res = runner.invoke(cli, ["plan", "--model", "llama3.1-70b", "--cluster", "dgx-h100",
                                  "--nodes", str(nodes), "--seq-len", "8192",
                                  "--global-batch-size", "64", *options, "-o", str(out)])
        assert res.exit_code == 0, res.output
        out.rename(tmp_path / f"{name}.yaml")
    planned = read_plan(tmp_path / "four.yaml")
    five = read_plan(tmp_path / "five.yaml")
    replanned = replan_best(five, reduce_cluster(five.cluster, {five.node_order[-1]}))
    assert advised.group(1) == layout_label(planned.layout) == layout_label(replanned.layout)
