"""Fit the Blackwell, FP8 and MoE physics to the published 2025-2026 runs.

Parameters (per GPU generation or global, never per row or per model):
  Blackwell (B200, GB200; B300/GB300 share them): sustained GEMM fraction per dtype (bf16,
      fp8, mxfp8) and the fused-attention fraction;
  Hopper fp8: sustained GEMM fraction (refitted with the fp8 cast traffic now modelled, on
      the 2021-2024 rows too, which hold most of the Hopper fp8 evidence);
  MoE, all GPUs: grouped-GEMM half-efficiency size per expert problem
      (`grouped_gemm_half_gflop`),
      fraction of the expert all-to-all hidden with Megatron's A2A overlap on
      (`ep_comm_overlap`), a fixed cost per MoE layer per pass (`moe_layer_overhead_s`, one
      value for Hopper, one for Blackwell) and the share of it that router/preprocess CUDA
      graphs remove (`megatron.PARTIAL_GRAPH_HOST_SAVED`). Each MoE row runs with the
      overlap, dispatcher and graphs of its Megatron-Bridge preset
      (benchmarks/data/bridge_moe_presets.csv).
Objective: mean |log(predicted / measured step time)|, in two stages: the dense parameters on
every dense row of both files (../shared/data/published_runs_calibration.csv and
published_runs_2025_2026.csv), then the MoE parameters on the MoE rows with those held.
The MoE stage adds a weak Gaussian prior on its five terms (`PRIOR`, `PRIOR_SCALE`, weight
`--prior-weight`, 0.03 shipped): one model's rows (Qwen3-235B-A22B, the only expert groups that
cross nodes) otherwise decide the overlap and the host cost alone, and a fit without them ran
to the bounds (no overlap, 4.9 ms of host per layer).
Leave-one-model-out (--lomo): each MoE model's rows predicted with parameters fitted without
them, to show the fit is physics, not memorised rows.

Run: python benchmarks/calibrate_moe_blackwell.py [--lomo] [--logo] [--moe-only]
     [--prior-weight W]
     (~5 min on 2 cores; --moe-only ~1 min)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published import HELDOUT, Case, load_cases, load_cases_2025  # noqa: E402

from cost_models import megatron  # noqa: E402
from cost_models.megatron import estimate  # noqa: E402
from planner.specfiles import gpu_preset  # noqa: E402

NAMES = ("Blackwell gemm bf16", "Blackwell gemm fp8", "Blackwell gemm mxfp8",
         "Blackwell attention", "Hopper gemm fp8", "grouped-GEMM half GFLOP /10",
         "ep all-to-all hidden", "MoE layer overhead Hopper ms",
         "MoE layer overhead Blackwell ms", "host cost saved by router graphs")
LOW = np.array([0.05, 0.05, 0.05, 0.05, 0.05, 0.001, 0.0, 0.0, 0.0, 0.0])
HIGH = np.array([0.98, 0.98, 0.98, 0.98, 0.98, 4.0, 0.95, 5.0, 5.0, 1.0])
BLACKWELL = ("B200", "GB200", "B300", "GB300")


def shipped() -> np.ndarray:
    """The values in planner/data/gpus.yaml (the starting point of the fit)."""
    b, h = gpu_preset("B200"), gpu_preset("H100-SXM")
    return np.array([b.efficiency["bf16"].max_fraction, b.efficiency["fp8"].max_fraction,
                     b.efficiency["mxfp8"].max_fraction, b.efficiency["bf16"].attention_fraction,
                     h.efficiency["fp8"].max_fraction, h.grouped_gemm_half_gflop / 10,
                     h.ep_comm_overlap, 1000 * h.moe_layer_overhead_s,
                     1000 * b.moe_layer_overhead_s, megatron.PARTIAL_GRAPH_HOST_SAVED])


def with_params(case: Case, x: np.ndarray) -> Case:
    """The case with its GPU's parameters replaced by x."""
    name, gpu = next(iter(case.cluster.gpu_types.items()))
    megatron.PARTIAL_GRAPH_HOST_SAVED = float(x[9])  # a module constant: set for this estimate
    eff = dict(gpu.efficiency)
    common = {"grouped_gemm_half_gflop": 10 * float(x[5]), "ep_comm_overlap": float(x[6])}
    if name in BLACKWELL:
        for i, dtype in enumerate(("bf16", "fp8", "mxfp8")):
            eff[dtype] = replace(eff[dtype], max_fraction=float(x[i]),
                                 attention_fraction=float(x[3]))
        gpu = replace(gpu, efficiency=eff, moe_layer_overhead_s=float(x[8]) / 1000, **common)
    elif name.startswith(("H100", "H200")):
        eff["fp8"] = replace(eff["fp8"], max_fraction=float(x[4]))
        gpu = replace(gpu, efficiency=eff, moe_layer_overhead_s=float(x[7]) / 1000, **common)
    else:
        return case
    return replace(case, cluster=replace(case.cluster, gpu_types={name: gpu}))


def log_errors(cases: list[Case], x: np.ndarray) -> np.ndarray:
    out = []
    for case in cases:
        c = with_params(case, x)
        ests = [estimate(c.model, c.cluster, lay) for lay in c.layouts]
        best = min(ests, key=lambda e: e.step_time_s)  # memory is judged elsewhere (issue 14)
        out.append(np.log(best.step_time_s / c.measured_step_s))
    return np.array(out)


DENSE, MOE = np.arange(1, 5), np.arange(5, 10)
"""Blackwell bf16 (index 0) is not fitted: no dense bf16 Blackwell row exists, so it stays at
its prior, Hopper's fitted bf16 fraction (planner/data/gpus.yaml)."""


PRIOR = np.array([np.nan] * 5 + [2.0, 0.5, 1.0, 1.0, 0.8])
"""Prior centres of the MoE terms (indices 5-9; the dense fractions have none), set from
what they are, not from the rows: a grouped-GEMM problem pays ~10-20 us of prologue and tail,
about 20 GFLOP at a PFLOP/s (2.0 in units of 10 GFLOP); nothing known of the all-to-all
overlap (0.5); the host cost per MoE layer and pass is CPU-side launches and one token-count
sync, some 100 kernels at 5-10 us, so the same 1 ms for Hopper and Blackwell; router and
preprocess graphs capture most of those launches but not the dispatch (0.8)."""
PRIOR_SCALE = np.array([np.nan] * 5 + [2.0, 0.3, 1.0, 1.0, 0.2])
"""One standard deviation of each prior: wide (a factor ~2 on the GEMM and host terms)."""
PRIOR_WEIGHT = 0.03
"""Weight of the mean squared prior deviation against the mean |log error|: the largest
weight whose in-sample MoE MAPE stays within half a point of the unregularised fit's 15.8%
(refits from the unregularised values: 15.9%, 15.8%, 16.1%, 16.6% in-sample and a worst
leave-one-model-out of 35.9%, 24.6%, 22.7%, 24.5% at 0.01, 0.02, 0.03, 0.05; 44.8% without).
The rule uses the in-sample and leave-one-model-out figures only (the held-out totals of
0.02 and 0.05 had been seen; no constant is fitted on the held-out rows)."""


def prior_penalty(x: np.ndarray, free: np.ndarray) -> float:
    """Mean squared deviation, in prior standard deviations, of the free MoE terms of x
    from `PRIOR` (0 when no MoE term is free)."""
    moe = np.intersect1d(free, MOE)
    return float(np.mean(((x[moe] - PRIOR[moe]) / PRIOR_SCALE[moe]) ** 2)) if moe.size else 0.0


def fit_subset(cases: list[Case], x0: np.ndarray, free: np.ndarray, maxiter: int,
               prior_weight: float = PRIOR_WEIGHT) -> np.ndarray:
    """Fit only the parameters `free` (indices), the others held at x0: mean |log error|
    plus `prior_weight` x `prior_penalty`."""
    def to_x(z):
        x = x0.copy()
        x[free] = LOW[free] + (HIGH[free] - LOW[free]) / (1 + np.exp(-z))
        return x

    def loss(z):
        x = to_x(z)
        return float(np.mean(np.abs(log_errors(cases, x)))) + prior_weight * prior_penalty(x, free)

    start = np.clip(x0[free], LOW[free] + 0.02 * (HIGH[free] - LOW[free]),
                    HIGH[free] - 0.02 * (HIGH[free] - LOW[free]))
    z0 = -np.log((HIGH[free] - LOW[free]) / (start - LOW[free]) - 1)
    res = minimize(loss, z0, method="Nelder-Mead",
                   options={"maxiter": maxiter, "xatol": 1e-3, "fatol": 1e-5})
    return to_x(res.x)


def fit_staged(old: list[Case], new: list[Case], x0: np.ndarray, maxiter: int,
               prior_weight: float = PRIOR_WEIGHT) -> np.ndarray:
    """Dense physics first (GEMM/attention fractions on every dense row), then the MoE terms
    on the MoE rows with those held: a MoE misfit cannot bend the dense fractions."""
    dense = old + [c for c in new if not c.model.is_moe]
    moe = [c for c in new if c.model.is_moe]
    x = fit_subset(dense, x0, DENSE, maxiter) if dense else x0
    return fit_subset(moe, x, MOE, maxiter, prior_weight) if moe else x


def mape(cases: list[Case], x: np.ndarray) -> float:
    return float(np.mean(np.abs(np.expm1(log_errors(cases, x))))) if cases else float("nan")


def report(label: str, cases: list[Case], x: np.ndarray) -> None:
    print(f"  {label:<40} rows {len(cases):>3}  MAPE {100 * mape(cases, x):5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lomo", action="store_true", help="also leave-one-MoE-model-out")
    ap.add_argument("--logo", action="store_true",
                    help="also leave-one-Blackwell-GPU-out on the dense rows")
    ap.add_argument("--maxiter", type=int, default=400)
    ap.add_argument("--prior-weight", type=float, default=PRIOR_WEIGHT,
                    help="weight of the MoE terms' prior (0: none; default %(default)s)")
    ap.add_argument("--moe-only", action="store_true",
                    help="hold the dense parameters at their shipped values; fit the MoE terms")
    args = ap.parse_args()
    old, _ = load_cases()
    new, _ = load_cases_2025()
    start = shipped()
    w = args.prior_weight
    x = fit_subset([c for c in new if c.model.is_moe], start, MOE, args.maxiter, w) \
        if args.moe_only else fit_staged(old, new, start, args.maxiter, w)
    print("fitted parameters:")
    for name, s, v in zip(NAMES, start, x, strict=True):
        print(f"  {name:<34} {v:.4f}   (shipped {s:.4f})")
    moe = [c for c in new if c.model.is_moe]
    heldout, _ = load_cases_2025(HELDOUT)
    for label, xs in (("shipped", start), ("fitted", x)):
        print(f"with {label} parameters:")
        report("2021-2024 rows", old, xs)
        report("2025-2026 rows (not FSDP)", new, xs)
        report("2025-2026 MoE rows", moe, xs)
        report("2025-2026 Blackwell rows", [c for c in new if c.cluster.gpu.name in BLACKWELL], xs)
        report("held-out MoE rows (never fitted)", heldout, xs)
    if args.logo:
        print("leave-one-GPU-out, dense rows (Blackwell fractions fitted on the other part):")
        dense_new = [c for c in new if not c.model.is_moe]
        for gpu in ("B200", "GB200"):
            held = [c for c in dense_new if c.cluster.gpu.name == gpu]
            rest = old + [c for c in dense_new if c.cluster.gpu.name != gpu]
            report(gpu, held, fit_subset(rest, x, DENSE, args.maxiter))
    if args.lomo:
        print("leave-one-model-out (fit without the model's rows, predict them):")
        for name in sorted({c.model.name for c in moe}):
            held = [c for c in new if c.model.name == name]
            rest = old + [c for c in new if c.model.name != name]
            moe_rest = [c for c in rest[len(old):] if c.model.is_moe]
            refit = fit_subset(moe_rest, x, MOE, args.maxiter // 2, w) if args.moe_only \
                else fit_staged(old, rest[len(old):], x, args.maxiter // 2, w)
            report(Path(name).stem, held, refit)
            print("    refit MoE terms:", ", ".join(f"{NAMES[i]} {refit[i]:.3f}" for i in MOE))


if __name__ == "__main__":
    main()
