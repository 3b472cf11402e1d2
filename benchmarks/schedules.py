"""Pipeline schedules side by side on two large problems: for each schedule, the planner's
best layout with that schedule (`meshplan plan --schedule S`), its predicted bubble and step
time, and the event simulator's bubble for the same layout (`meshplan simulate`).

  (a) Llama 3.1 405B on 16,384 H100 (2,048 DGX nodes), seq 8192, global batch 2048
  (b) DeepSeek-V3 (671B MoE) on 2,048 H100 (256 nodes), seq 4096, global batch 15360
      (DeepSeek-V3 report Sec. 4.2: batch ramped to 15360 sequences of 4K tokens)

Bubble points: the analytic pp_bubble_s + pp_p2p_s as a share of the predicted step, and the
simulated pipeline phase's idle beyond the busiest rank's compute as a share of the simulated
step. The last line of each case names the fastest schedule by the prediction and by the
simulator, and the largest gap between the two bubbles (the issue asks for <= 2 points).

Run: python benchmarks/schedules.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from cost_models import step_tasks
from cost_models.schedules import SCHEDULES
from cost_models.simulator import simulate_step
from planner.engine import plan
from planner.options import DEFAULT_PLAN_HEADROOM, Problem
from planner.search import NoCandidates, SearchSpace
from planner.specfiles import load_cluster, load_model

CASES = {
    "a": ("llama3.1-405b", "dgx-h100", 2048, 8192, 2048),
    "b": ("deepseek-v3", "dgx-h100", 256, 4096, 15360),
}


def simulated_bubble_points(model, cluster, layout) -> tuple[float, float]:
    """(bubble points, simulated step seconds) of `layout` in the event simulator."""
    sim = simulate_step(step_tasks.uniform(model, cluster, layout), layout.schedule)
    opt = max(ev.duration_s for ev in sim.events if ev.kind == "opt") if any(
        ev.kind == "opt" for ev in sim.events) else 0.0
    compute = max(b - opt for b in sim.busy_s)
    return 100 * (sim.pipeline_s - compute) / sim.step_time_s, sim.step_time_s


def run_case(key: str) -> list[dict]:
    name, cluster_name, nodes, seq, gbs = CASES[key]
    model, cluster = load_model(name), load_cluster(cluster_name, nodes, None)
    prob = Problem(model, cluster, seq, gbs, "bf16", "megatron")
    rows = []
    for schedule in SCHEDULES:
        space = SearchSpace(headroom=DEFAULT_PLAN_HEADROOM, schedule=schedule)
        try:
            best = plan(prob, space, top_k=1).result.plans[0]
        except (NoCandidates, IndexError):
            rows.append({"case": key, "schedule": schedule, "fits": False})
            continue
        lay = best.layout
        sim_points, sim_step = simulated_bubble_points(model, cluster, lay)
        rows.append({
            "case": key, "schedule": schedule, "fits": True,
            "layout": f"tp{lay.tp} pp{lay.pp} cp{lay.cp} dp{lay.dp} ep{lay.ep} vp{lay.vp} "
                      f"mbs{lay.micro_batch_size} {lay.recompute}",
            "step_time_s": best.step_time_s, "bubble_s": best.time.pp_bubble_s,
            "bubble_points": 100 * (best.time.pp_bubble_s + best.time.pp_p2p_s) / best.step_time_s,
            "sim_bubble_points": sim_points, "sim_step_time_s": sim_step,
            "mfu": best.mfu,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    args = ap.parse_args()
    rows = [r for key in (args.case or sorted(CASES)) for r in run_case(key)]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        return
    print(f"{'case':<4} {'schedule':<12} {'layout':<44} {'step s':>7} {'bubble s':>8} "
          f"{'bubble %':>8} {'sim %':>6} {'diff':>5} {'sim step':>8}")
    for key in sorted({r["case"] for r in rows}):
        case = [r for r in rows if r["case"] == key]
        fitting = [r for r in case if r["fits"]]
        winner = min(fitting, key=lambda r: r["step_time_s"])["schedule"] if fitting else None
        for r in case:
            if not r["fits"]:
                print(f"({key}) {r['schedule']:<12} no fitting layout")
                continue
            mark = "  <- fastest" if r["schedule"] == winner else ""
            print(f"({key}) {r['schedule']:<12} {r['layout']:<44} {r['step_time_s']:7.3f} "
                  f"{r['bubble_s']:8.3f} {r['bubble_points']:8.2f} {r['sim_bubble_points']:6.2f} "
                  f"{r['sim_bubble_points'] - r['bubble_points']:+5.2f} "
                  f"{r['sim_step_time_s']:8.3f}{mark}")
        if fitting:
            sim_winner = min(fitting, key=lambda r: r["sim_step_time_s"])["schedule"]
            worst = max(fitting, key=lambda r: abs(r["sim_bubble_points"] - r["bubble_points"]))
            print(f"({key}) fastest predicted: {winner}, simulated: {sim_winner}; largest bubble "
                  f"gap {worst['sim_bubble_points'] - worst['bubble_points']:+.2f} points "
                  f"({worst['schedule']})")


if __name__ == "__main__":
    main()
