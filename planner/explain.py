"""Why the winner wins: where its time goes, what each runner-up loses on, and — when nothing
fits — what would (with numbers)."""

from __future__ import annotations

from dataclasses import replace

from cost_models.specs import Estimate, SpecError

from . import engine
from .options import Problem
from .report import layout_label
from .search import SearchSpace, scaled_cluster

PART_NAMES = {"compute": "compute", "tp_comm": "TP comm", "cp_comm": "CP comm", "ep_comm": "EP all-to-all",
              "pp_bubble": "pipeline bubble", "pp_p2p": "pipeline p2p", "dp_comm": "DP comm",
              "optimizer": "optimizer"}


def _shares(est: Estimate) -> dict[str, float]:
    return {k.removesuffix("_s"): v / est.step_time_s for k, v in est.time.to_dict().items()}


def where_time_goes(est: Estimate) -> str:
    shares = sorted(_shares(est).items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{PART_NAMES[k]} {100 * v:.1f}%" for k, v in shares if v >= 0.005)
    return (f"{layout_label(est.layout)}: {est.step_time_s:.3f} s/step, MFU {100 * est.mfu:.1f}%, "
            f"{est.peak_GiB:.1f} GiB/GPU; time goes to {top}")


def why_slower(winner: Estimate, other: Estimate) -> str:
    """One line: how much slower `other` is and the part that costs it most."""
    w, o = winner.time.to_dict(), other.time.to_dict()
    part = max(o, key=lambda k: o[k] - w[k])
    ws, os_ = _shares(winner), _shares(other)
    name = part.removesuffix("_s")
    slower = 100 * (other.step_time_s / winner.step_time_s - 1)
    return (f"{layout_label(other.layout)}: +{slower:.1f}% — {PART_NAMES[name]} "
            f"{o[part]:.3g} s vs {w[part]:.3g} s ({100 * os_[name]:.1f}% vs "
            f"{100 * ws[name]:.1f}% of the step)")


def explain(plans: tuple[Estimate, ...], alternatives: tuple[Estimate, ...]) -> list[str]:
    """The winner's breakdown, then why each runner-up (other degrees first) loses."""
    if not plans:
        return []
    best = plans[0]
    lines = ["winner " + where_time_goes(best)]
    seen = set()
    for other in alternatives + plans[1:]:
        key = (other.layout.tp, other.layout.pp, other.layout.cp, other.layout.vp,
               other.layout.micro_batch_size, other.layout.recompute)
        if other is best or key in seen or len(seen) >= 4:
            continue
        seen.add(key)
        lines.append("  vs " + why_slower(best, other))
    return lines


def advise(prob: Problem, space: SearchSpace, nearest: tuple[Estimate, ...]) -> list[str]:
    """When nothing fits: the closest miss, and variations of `prob` that would fit (each
    planned by `engine.plan` with the same options)."""
    cluster, seq_len = prob.cluster, prob.seq_len
    lines = []
    if nearest:
        n = nearest[0]
        lines.append(f"closest: {layout_label(n.layout)} needs {n.peak_GiB:.1f} GiB of "
                     f"{n.capacity_GiB:.1f} GiB (over by {n.over_GiB:.1f} GiB)")
    tries = []
    if "full" not in space.recompute:
        tries.append(("with --recompute full", prob,
                      replace(space, recompute=("none", "selective", "full"))))
    for factor in (2, 4, 8, 16, 32, 64):
        tries.append((f"with {factor}x the GPUs ({factor * cluster.world_size})",
                      replace(prob, cluster=scaled_cluster(cluster, factor)), space))
    for div in (2, 4):
        if seq_len % div == 0:
            tries.append((f"with --seq-len {seq_len // div}", replace(prob, seq_len=seq_len // div),
                          space))
    gpu = next(iter(cluster.gpu_types.values()))
    if prob.dtype == "bf16" and "fp8" in gpu.peak_tflops:
        tries.append(("with --dtype fp8", replace(prob, dtype="fp8"), space))
    found, more_gpus = 0, False
    for label, variant, sp in tries:
        if more_gpus and "GPUs" in label:
            continue  # the smallest sufficient scale-up is enough
        try:
            res = engine.plan(variant, sp, top_k=1).result
        except SpecError:
            continue
        if res.plans:
            e = res.plans[0]
            lines.append(f"{label}: {layout_label(e.layout)} fits at {e.peak_GiB:.1f} GiB, "
                         f"{e.step_time_s:.2f} s/step")
            found += 1
            more_gpus = more_gpus or "GPUs" in label
        if found >= 3:
            break
    if not found:
        lines.append("no nearby variation fits either: use a smaller model or many more GPUs")
    return lines
