"""DualPipe and DualPipeV: predicted against simulated steps over a sweep of MoE layouts.

The analytic DualPipe(V) step (`cost_models.megatron.evaluate`: per-rank work less what the
F&B pairs hide, plus the fill of `schedules.bubble_factor`) is compared with the event
simulator playing DeepSeek's order (`cost_models.pipeline_orders`) for DeepSeek-V3,
Qwen3-235B-A22B and Kimi-K2 on 2,048 H100 (256 DGX nodes), seq 4096, fp8, selective
recompute: pp 4-32, ep 8-64 (inside a node and across the NICs), tp 1-2, m = 2p and 4p
micro-batches; every valid combination. Prints the mean signed and absolute error per
schedule and model, and the worst rows.

Run: python benchmarks/dualpipe_sweep.py  (~1-2 min on 2 cores)
"""

from __future__ import annotations

import itertools

import numpy as np

from cost_models import megatron, step_tasks
from cost_models.simulator import simulate_step
from cost_models.specs import Layout, SpecError
from planner.specfiles import load_cluster, load_model

MODELS = ("deepseek-v3", "qwen3-235b-a22b", "kimi-k2")
SCHEDULES = ("dualpipe", "dualpipev")
GPUS = 2048


def layouts(model):
    """Every valid (schedule, layout) of the sweep for `model`."""
    for sched, pp, ep, tp, mult in itertools.product(SCHEDULES, (4, 8, 16, 32), (8, 32, 64),
                                                     (1, 2), (2, 4)):
        dp = GPUS // (tp * pp)
        lay = Layout(tp=tp, pp=pp, cp=1, dp=dp, ep=ep, vp=2 if sched == "dualpipev" else 1,
                     micro_batch_size=1, global_batch_size=mult * pp * dp, seq_len=4096,
                     recompute="selective", sequence_parallel=tp > 1,
                     distributed_optimizer=True, pipeline_schedule=sched, dtype="fp8")
        try:
            lay.validate(model, GPUS)
        except SpecError:
            continue
        yield sched, lay


def main() -> None:
    cluster = load_cluster("dgx-h100", GPUS // 8, None)
    rows = []
    for name in MODELS:
        model = load_model(name)
        for sched, lay in layouts(model):
            predicted = megatron.estimate(model, cluster, lay).step_time_s
            simulated = simulate_step(step_tasks.uniform(model, cluster, lay), sched).step_time_s
            rows.append((name, sched, lay, predicted / simulated - 1))
    errs = np.array([r[3] for r in rows])
    print(f"{len(rows)} layouts: mean |predicted/simulated - 1| {100 * np.abs(errs).mean():.2f}%, "
          f"largest {100 * np.abs(errs).max():.2f}%")
    for sched in SCHEDULES:
        for name in MODELS:
            sel = np.array([r[0] == name and r[1] == sched for r in rows])
            if sel.any():
                print(f"  {sched:<10} {name:<16} {int(sel.sum()):>3} layouts  mean "
                      f"{100 * errs[sel].mean():+6.2f}%  mean |err| "
                      f"{100 * np.abs(errs[sel]).mean():5.2f}%")
    print("largest errors:")
    for name, sched, lay, err in sorted(rows, key=lambda r: -abs(r[3]))[:5]:
        m = lay.global_batch_size // (lay.dp * lay.micro_batch_size)
        print(f"  {name:<16} {sched:<10} tp{lay.tp} pp{lay.pp} ep{lay.ep} m{m:<4} "
              f"{100 * err:+6.2f}%")


if __name__ == "__main__":
    main()
