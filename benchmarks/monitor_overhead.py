"""How much the `meshplan run` runtime hook (launcher.runtime.StepMonitor) adds to a step.

Two measurements:

1. hook cost: the calls one training step makes (step_begin, N x comm(), step_end), timed in a
   tight loop with the monitor writing to a real directory, against the same loop with the
   monitor disabled. Gives microseconds per step, independent of the model.
2. trainer steps (--trainer): examples/train_gpt.py --single-process on tiny-gpt, run with and
   without MESHPLAN_MONITOR_DIR; median step time from the trainer's own log. Shows the hook
   cost as a fraction of a real (small, CPU) step; timing noise on a shared machine is larger
   than the effect, so trust (1) for the number and (2) for the scale.

Usage: python benchmarks/monitor_overhead.py [--steps 20000] [--comms 3] [--trainer]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.runtime import StepMonitor  # noqa: E402


def hook_loop_s(mon: StepMonitor, steps: int, comms: int) -> float:
    """Seconds per step spent in the hook calls of one step (no work in between)."""
    t0 = time.perf_counter()
    for step in range(steps):
        mon.step_begin(step)
        for _ in range(comms):
            with mon.comm("allreduce"):
                pass
        mon.step_end(step, loss=1.0)
    return (time.perf_counter() - t0) / steps


def hook_cost_us(steps: int, comms: int, repeats: int = 5) -> dict:
    """Best-of-`repeats` per-step hook time, enabled vs disabled, in microseconds."""
    with tempfile.TemporaryDirectory() as tmp:
        on = StepMonitor(tmp, rank=0, install_signal_handler=False)
        enabled = min(hook_loop_s(on, steps, comms) for _ in range(repeats))
        on.close()
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    off = StepMonitor(None)
    disabled = min(hook_loop_s(off, steps, comms) for _ in range(repeats))
    return {"hook_us_per_step": round(enabled * 1e6, 2),
            "disabled_us_per_step": round(disabled * 1e6, 3),
            "bytes_per_step": round(size / (steps * repeats), 1), "comms_per_step": comms}


def trainer_median_step_s(plan: Path, steps: int, monitor_dir: str | None) -> float:
    """Median step time_s of a --single-process trainer run (first 3 steps dropped: warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "losses.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPLAN_")}
        env["OMP_NUM_THREADS"] = "1"
        if monitor_dir:
            env["MESHPLAN_MONITOR_DIR"] = monitor_dir
        subprocess.run([sys.executable, str(ROOT / "examples" / "train_gpt.py"), "--plan",
                        str(plan), "--steps", str(steps), "--single-process", "--log-file",
                        str(log)], env=env, check=True, capture_output=True, timeout=600)
        times = [json.loads(x)["time_s"] for x in log.read_text().splitlines()]
    return statistics.median(times[3:])


def trainer_overhead(steps: int) -> dict:
    from cost_models.specs import Layout
    from planner.planfile import Plan, write_plan
    from planner.specfiles import load_cluster, load_model

    model = load_model("tiny-gpt")
    cluster = load_cluster("local-cpu", nodes=1, gpus_per_node=1)
    layout = Layout(tp=1, pp=1, dp=1, micro_batch_size=2, global_batch_size=8, seq_len=32)
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan.yaml"
        write_plan(Plan(model, cluster, layout, (cluster.nodes[0].name,), {}), plan)
        off = trainer_median_step_s(plan, steps, None)
        on = trainer_median_step_s(plan, steps, str(Path(tmp) / "mon"))
    return {"trainer_median_step_s_off": round(off, 6), "trainer_median_step_s_on": round(on, 6),
            "trainer_delta_pct": round(100 * (on - off) / off, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20000, help="hook-loop steps per repeat")
    ap.add_argument("--comms", type=int, default=3, help="comm() blocks per step")
    ap.add_argument("--trainer", action="store_true", help="also time real tiny-gpt steps")
    ap.add_argument("--trainer-steps", type=int, default=30)
    args = ap.parse_args()
    out = hook_cost_us(args.steps, args.comms)
    if args.trainer:
        out.update(trainer_overhead(args.trainer_steps))
        out["hook_pct_of_trainer_step"] = round(
            100 * out["hook_us_per_step"] * 1e-6 / out["trainer_median_step_s_off"], 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
