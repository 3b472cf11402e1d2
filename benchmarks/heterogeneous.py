"""Heterogeneous clusters: meshplan's plan vs the Megatron default vs brute force.

    python benchmarks/heterogeneous.py [--quick]

Clusters (examples/clusters/):
  holmes-ib-roce   4 InfiniBand + 4 RoCE nodes (8 x H100 each); mixed groups fall back to TCP
  pipette-16       16 H100 nodes with a measured pair-bandwidth matrix, ~20% of links slow
  mixed-a100-h100  4 A100 nodes + 4 H100 nodes

For each: meshplan (`planner.engine.plan`, cost model as `--cost-model auto` picks);
the Megatron default (tp = GPUs per node, pp/dp/vp/mbs/recompute as a topology-blind planner
picks them for the nominal uniform cluster, pipeline across nodes in node order, even layer
split); and brute force over every distinct node order (nodes of one kind are
interchangeable) for every layout meshplan shortlists (up to 24) and the default's, each order with its own
partition-ILP layer split — where that is tractable (not for a 16-node measured matrix:
16! orders; there, the best of random orders is shown instead). Every plan is scored by the
analytic model it was ranked with and by the event simulator. Finally: planning time of a
128-node measured cluster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from baselines import brute_force, uniform_plan  # noqa: E402

from cost_models import hetero_model, step_tasks  # noqa: E402
from planner import engine  # noqa: E402
from planner.hetero_search import PlacedPlan, candidate_layouts  # noqa: E402
from planner.options import Problem  # noqa: E402
from planner.report import layout_label  # noqa: E402
from planner.search import SearchSpace  # noqa: E402
from planner.specfiles import cluster_from_dict, load_cluster, load_model  # noqa: E402

CASES = (  # cluster file, model, seq, global batch
    ("holmes-ib-roce", "llama3.1-70b", 4096, 256),
    ("pipette-16", "llama3.1-70b", 4096, 256),
    ("mixed-a100-h100", "llama3.1-70b", 4096, 256),
)
RANDOM_ORDERS = 300


def _row(name: str, placed: PlacedPlan, model, cluster, fab, names) -> dict:
    est = placed.result.estimate
    sim, _, _ = step_tasks.simulate_placed(model, cluster, fab, est.layout, placed.node_order)
    return {"plan": name, "layout": layout_label(est.layout), "analytic_s": est.step_time_s,
            "simulated_s": sim, "order": placed.placement,
            "nodes": " ".join(names[i] for i in placed.node_order[:8])
            + (" ..." if len(placed.node_order) > 8 else "")}


def default_plan(model, cluster, fab, seq: int, gbs: int) -> PlacedPlan:
    """Megatron default: tp = GPUs per node, node order, even split (module docstring)."""
    lay = uniform_plan(model, cluster, seq, gbs, tp=cluster.gpus_per_node)
    res = hetero_model.evaluate(model, cluster, fab, lay, range(cluster.num_nodes), 0.05)
    return PlacedPlan(res, tuple(range(cluster.num_nodes)), "node order", "-", "even split")


def random_best(model, cluster, fab, placed: PlacedPlan, count: int, seed: int = 0):
    """Best of `count` random node orders for the plan's layout (same layer split)."""
    rng = np.random.default_rng(seed)
    lay = placed.result.estimate.layout
    costs = hetero_model.GroupCosts(model, cluster, lay)
    best = None
    for _ in range(count):
        order = tuple(int(i) for i in rng.permutation(cluster.num_nodes))
        res = hetero_model.evaluate(model, cluster, fab, lay, order, 0.05, costs)
        if res.fits and (best is None or res.estimate.step_time_s < best.result.estimate.step_time_s):
            best = PlacedPlan(res, order, f"best of {count} random", "-", "same split")
    return best


def run_case(path: Path, model_name: str, seq: int, gbs: int) -> list[dict]:
    cluster, model = load_cluster(str(path)), load_model(model_name)
    style = engine.resolve_cost_model("auto", cluster)
    fab = hetero_model.fabric(cluster, style)
    names = [n.name for n in cluster.nodes]
    start = time.perf_counter()
    hs = engine.plan(Problem(model, cluster, seq, gbs, "bf16", "auto"), top_k=5).hetero
    seconds = time.perf_counter() - start
    ours, default = hs.placed[0], default_plan(model, cluster, fab, seq, gbs)
    rows = [_row("meshplan", ours, model, cluster, fab, names),
            _row("megatron default", default, model, cluster, fab, names)]
    _, shortlist = candidate_layouts(model, cluster, fab, seq, gbs, SearchSpace())
    layouts = list(dict.fromkeys([*shortlist, default.result.estimate.layout]))
    start_bf = time.perf_counter()
    brute, tried = brute_force(model, cluster, fab, layouts, headroom=0.05)
    if brute is not None:
        rows.append(_row(f"brute force ({tried} placements)", brute, model, cluster, fab, names))
    else:
        rows.append(_row("random orders (brute force intractable)",
                         random_best(model, cluster, fab, ours, RANDOM_ORDERS), model, cluster, fab, names))
    print(f"\n== {cluster.name}: {model.name}, seq {seq}, gbs {gbs}, cost model {style}; "
          f"meshplan planned in {seconds:.1f} s ({hs.result.candidates:,} layouts, "
          f"{hs.placements_solved} placement ILPs, solver {hs.result.solver}); baseline search "
          f"{time.perf_counter() - start_bf:.1f} s")
    _print(rows)
    return rows


def _print(rows: list[dict]) -> None:
    base = rows[1]["simulated_s"]
    print(f"{'plan':42s} {'layout':30s} {'analytic s':>10s} {'simulated s':>11s} "
          f"{'vs default':>10s}  order")
    for r in rows:
        print(f"{r['plan']:42s} {r['layout']:30s} {r['analytic_s']:10.3f} {r['simulated_s']:11.3f} "
              f"{base / r['simulated_s']:9.2f}x  {r['order']}: {r['nodes']}")
    ours, ref = rows[0], rows[2]
    gap = 100 * (ours["analytic_s"] / ref["analytic_s"] - 1)
    print(f"meshplan vs default (simulated): {base / ours['simulated_s']:.2f}x faster; "
          f"vs {ref['plan'].split(' (')[0]}: {gap:+.2f}% (analytic), "
          f"{100 * (ours['simulated_s'] / ref['simulated_s'] - 1):+.2f}% (simulated)")


def time_128() -> float:
    from hetero_clusters import measured_cluster_dict

    cluster = cluster_from_dict(measured_cluster_dict(128), "pipette-128")
    start = time.perf_counter()
    prob = Problem(load_model("llama3.1-70b"), cluster, 4096, 1024, "bf16", "auto")
    hs = engine.plan(prob).hetero  # auto: pipette (measured links)
    seconds = time.perf_counter() - start
    best = hs.placed[0]
    print(f"\n== 128-node measured cluster (1024 H100, 20% slow pairs): planned in {seconds:.1f} s; "
          f"best {layout_label(best.result.estimate.layout)} {best.result.estimate.step_time_s:.3f} s, "
          f"placement {best.placement} ({best.placement_status})")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 128-node timing")
    args = parser.parse_args()
    for name, model, seq, gbs in CASES:
        run_case(ROOT / "examples" / "clusters" / f"{name}.yaml", model, seq, gbs)
    if not args.quick:
        time_128()


if __name__ == "__main__":
    main()
