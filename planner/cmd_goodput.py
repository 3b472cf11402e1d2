"""`meshplan goodput PLAN.yaml`: expected effective training time ratio (ETTR) of a plan under
failures, and the checkpoint interval that maximises it.

Example (Llama 3.1 405B on 16,384 H100 with Llama 3's published failure rate, the default):
    meshplan plan --model llama3.1-405b --cluster dgx-h100 --nodes 2048 --seq-len 8192 \
        --global-batch-size 2048 -o plan.yaml
    meshplan goodput plan.yaml

The closed form (Young/Daly) is checked by replaying a Poisson failure trace whose root causes
are drawn from Llama 3's published mix; both figures are printed.
"""

from __future__ import annotations

import math

import click

from cost_models import goodput as gp
from cost_models.flops import parameter_count

from .jsonout import to_json
from .options import finite_range
from .planfile import Plan, read_plan

CHECKPOINT_BYTES_PER_PARAM = 14
"""What a training checkpoint holds per parameter: bf16 weights (2 B), fp32 master weights (4)
and Adam's two fp32 moments (8) — Megatron-LM's distributed checkpoint of a mixed-precision
run (gradients are not saved)."""
DEFAULT_STORAGE_GBps = 2000.0
"""Aggregate checkpoint write bandwidth, 10^9 B/s: Llama 3's Tectonic file system sustains
2 TB/s (Llama 3 paper, section 3.1.2). Measure yours and pass --storage-GBps."""
DEFAULT_RESTART_S = 600.0
"""Failure to training again, seconds: detection, rescheduling, process start, NCCL set-up and
checkpoint load (an assumption: pass --restart-s with your measured figure)."""


@click.command("goodput")
@click.argument("plan_path", metavar="PLAN.yaml", type=click.Path(dir_okay=False))
@click.option("--mtbf-gpu-hours", type=float, default=round(gp.LLAMA3_MTBF_GPU_HOURS),
              show_default=True, callback=finite_range(1.0, 1e9),
              help="Per-GPU mean time between job-stopping failures [default: Llama 3's, "
                   "419 interruptions in 54 days on 16,384 H100].")
@click.option("--checkpoint-s", type=float, default=None, callback=finite_range(0.0, 86400.0),
              help="Seconds a checkpoint blocks training [default: checkpoint bytes / "
                   "--storage-GBps].")
@click.option("--storage-GBps", "storage_GBps", type=float, default=DEFAULT_STORAGE_GBps,
              show_default=True, callback=finite_range(0.001, 1e6),
              help="Aggregate checkpoint write bandwidth, GB/s (Llama 3's Tectonic: 2000).")
@click.option("--restart-s", type=float, default=DEFAULT_RESTART_S, show_default=True,
              callback=finite_range(0.0, 86400.0),
              help="Seconds from a failure to training again (includes the checkpoint load).")
@click.option("--interval-s", type=float, default=None, callback=finite_range(1.0, 1e8),
              help="Evaluate this checkpoint interval (work seconds) [default: Daly's optimum].")
@click.option("--replay-days", type=float, default=540.0, show_default=True,
              callback=finite_range(1.0, 100_000.0),
              help="Training time of the failure-trace replay, days (longer: less noise).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the replayed failure trace.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def goodput(plan_path, mtbf_gpu_hours, checkpoint_s, storage_GBps, restart_s, interval_s,
            replay_days, seed, as_json):
    """Expected ETTR of PLAN.yaml under failures, and the checkpoint interval to use."""
    plan = read_plan(plan_path)
    out = goodput_report(plan, mtbf_gpu_hours, checkpoint_s, storage_GBps, restart_s,
                         interval_s, replay_days, seed)
    click.echo(to_json(out) if as_json else _text(out))


def goodput_report(plan: Plan, mtbf_gpu_hours: float, checkpoint_s: float | None,
                   storage_GBps: float, restart_s: float, interval_s: float | None,
                   replay_days: float, seed: int = 0) -> dict:
    """The figures `meshplan goodput` prints, as a dict (seconds, bytes, ratios)."""
    gpus = plan.layout.world
    step_s = float(plan.estimate.get("step_time_s") or math.nan)
    ckpt_bytes = CHECKPOINT_BYTES_PER_PARAM * parameter_count(plan.model)
    if checkpoint_s is None:
        checkpoint_s = ckpt_bytes / (storage_GBps * 1e9)
    mtbf_s = gp.job_mtbf_s(mtbf_gpu_hours, gpus)
    best_s = gp.daly_interval_s(checkpoint_s, mtbf_s)
    tau = interval_s if interval_s is not None else best_s
    work_s = replay_days * 86400.0
    expected = gp.expected_ettr(tau, checkpoint_s, restart_s, mtbf_s)
    trace = gp.poisson_trace(mtbf_s, work_s / max(expected, 0.05) * 2 + 10 * restart_s, seed)
    played = gp.replay(trace, work_s, tau, checkpoint_s, restart_s)
    return {
        "gpus": gpus, "step_time_s": step_s, "mtbf_gpu_hours": mtbf_gpu_hours,
        "job_mtbf_s": mtbf_s, "checkpoint_bytes": ckpt_bytes, "checkpoint_s": checkpoint_s,
        "restart_s": restart_s,
        "interval_s": tau, "interval_steps": _steps(tau, step_s),
        "optimal_interval_s": best_s, "optimal_interval_steps": _steps(best_s, step_s),
        "young_interval_s": gp.young_interval_s(checkpoint_s, mtbf_s),
        "ettr": expected, "ettr_at_optimum": gp.expected_ettr(best_s, checkpoint_s, restart_s, mtbf_s),
        "replay": {"ettr": played.ettr, "work_days": played.work_s / 86400,
                   "wall_days": played.wall_s / 86400, "failures": played.failures,
                   "lost_work_s": played.lost_work_s, "checkpoint_time_s": played.checkpoint_time_s,
                   "restart_time_s": played.restart_time_s, "seed": seed,
                   "causes": gp.trace_causes(played.failures, seed)},
    }


def _steps(interval_s: float, step_s: float) -> int | None:
    return max(1, round(interval_s / step_s)) if math.isfinite(step_s) and step_s > 0 else None


def _text(r: dict) -> str:
    rp = r["replay"]
    causes = ", ".join(f"{k} {v}" for k, v in sorted(rp["causes"].items(), key=lambda kv: -kv[1])[:4])
    every = (f" = every {r['interval_steps']} steps of {r['step_time_s']:.2f} s"
             if r["interval_steps"] else "")
    best = (f"{r['optimal_interval_s']:.0f} s" + (f" ({r['optimal_interval_steps']} steps)"
                                                   if r["optimal_interval_steps"] else ""))
    return "\n".join([
        f"{r['gpus']:,} GPUs, per-GPU MTBF {r['mtbf_gpu_hours']:,.0f} h: the job fails every "
        f"{r['job_mtbf_s'] / 3600:.2f} h on average",
        f"checkpoint {r['checkpoint_bytes'] / 1e12:.2f} TB in {r['checkpoint_s']:.1f} s; restart "
        f"{r['restart_s']:.0f} s",
        f"checkpoint every {r['interval_s']:.0f} s of training{every} "
        f"(Daly optimum {best}; Young {r['young_interval_s']:.0f} s)",
        f"expected ETTR {100 * r['ettr']:.1f}% (at the optimum {100 * r['ettr_at_optimum']:.1f}%)",
        f"replay of {rp['work_days']:.0f} training days, {rp['failures']:,} failures "
        f"({causes}, ...): ETTR {100 * rp['ettr']:.1f}% "
        f"({100 * (rp['ettr'] - r['ettr']):+.1f} points vs the closed form)",
    ])
