"""Validate meshplan's Megatron-style cost model against published training runs.

For every usable row of ../shared/data/published_runs_calibration.csv (2021-2024, dense),
../shared/data/published_runs_2025_2026.csv (MoE, Blackwell, FSDP) and the held-out runs
benchmarks/data/heldout_moe_runs.csv (nothing was fitted on them), predict the step time of
the published layout and compare with what was measured: the iteration time where published,
else tokens/s/GPU, else the per-GPU TFLOP/s in the source's own FLOP convention. Prints per
row, then the mean absolute percentage error (MAPE) per source, and for the files of the
2025-2026 schema per model, GPU, kind and sharding.

With --write-bands it also writes planner/data/validation.yaml: per GPU type and model kind,
the runs and their mean and largest step-time error over all three files, which `estimate` and
`plan` print beside each prediction (planner/validation.py).

Run: python benchmarks/validate_published.py [--csv PATH] [--quiet] [--write-bands]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published import CSV, CSV_2025, HELDOUT, Case, load_cases, load_cases_2025  # noqa: E402

from cost_models.megatron import estimate  # noqa: E402
from cost_models.specs import Estimate  # noqa: E402
from planner.fileio import write_atomic  # noqa: E402
from planner.validation import BANDS_FILE, Band, bands_yaml, kind_of  # noqa: E402


def best_estimate(case: Case) -> Estimate | None:
    """The fastest fitting estimate among the case's candidate layouts (tuned unknowns)."""
    ests = [estimate(case.model, case.cluster, lay) for lay in case.layouts]
    fitting = [e for e in ests if e.fits] or ests  # report the smallest overflow if none fits
    key = (lambda e: e.step_time_s) if any(e.fits for e in ests) else (lambda e: e.over_GiB)
    return min(fitting, key=key) if fitting else None


def step_error(case: Case, est: Estimate) -> float:
    """Signed relative step-time error: predicted / measured - 1."""
    return (est.step_time_s - case.measured_step_s) / case.measured_step_s


def bands(paths: list[Path]) -> list[Band]:
    """Per GPU type and model kind: the runs of these files and their mean and largest
    |step-time error| (planner/data/validation.yaml)."""
    errors: dict[tuple[str, str], list[float]] = defaultdict(list)
    for path in paths:
        for case in cases_of(path)[0]:
            err = abs(step_error(case, best_estimate(case)))
            errors[(case.cluster.gpu.name, kind_of(case.model.is_moe))].append(err)
    return [Band(gpu, kind, len(errs), float(np.mean(errs)), float(np.max(errs)))
            for (gpu, kind), errs in errors.items()]


def short_source(source: str) -> str:
    return source.split(" via ")[0].split(" docs")[0].split(" (")[0][:34]


def is_2025_schema(path: Path) -> bool:
    """The 2025-2026 file's schema (also the held-out runs'), told apart by its columns."""
    with open(path) as fh:
        return "source_url" in fh.readline()


def cases_of(path: Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """The cases of either published file (or the held-out runs)."""
    return load_cases_2025(path) if is_2025_schema(path) else load_cases(path)


def grouped_mape(cases: list[Case], errors: list[float], key) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for case, err in zip(cases, errors, strict=True):
        out[key(case)].append(err)
    return out


def run(path: Path, quiet: bool = False) -> float:
    cases, skipped = cases_of(path)
    per_source: dict[str, list[float]] = defaultdict(list)
    errors = []
    if not quiet:
        print(f"{'row':<52} {'metric':<14} {'measured':>9} {'predicted':>9} {'err%':>7}  layout")
    for case in cases:
        est = best_estimate(case)
        err = step_error(case, est)
        errors.append(abs(err))
        per_source[short_source(case.source)].append(abs(err))
        lay = est.layout
        desc = (f"tp{lay.tp} pp{lay.pp} dp{lay.dp} cp{lay.cp} vp{lay.vp} mbs{lay.micro_batch_size} "
                f"{lay.recompute}{'' if est.fits else ' (does not fit)'}")
        if quiet:
            continue
        if case.metric == "iter_time_s":
            meas, pred = case.measured_step_s, est.step_time_s
            unit = "s/step"
        elif case.metric == "tokens_per_s_per_gpu":
            per_gpu = lay.global_batch_size * lay.seq_len / lay.world
            meas, pred = per_gpu / case.measured_step_s, per_gpu / est.step_time_s
            unit = "tok/s/GPU"
        else:  # TFLOP/s per GPU in the source's convention
            gpus = lay.world
            meas = case.source_flops / case.measured_step_s / gpus / 1e12
            pred = case.source_flops / est.step_time_s / gpus / 1e12
            unit = "TFLOP/s/GPU"
        print(f"{case.label:<52} {unit:<14} {meas:>9.2f} {pred:>9.2f} {100 * err:>+7.1f}  {desc}")
    print(f"\nMAPE per source (step time; {len(cases)} rows used, {len(skipped)} skipped):")
    for src, errs in sorted(per_source.items()):
        print(f"  {src:<36} rows {len(errs):>3}  MAPE {100 * np.mean(errs):5.1f}%  "
              f"max {100 * np.max(errs):5.1f}%")
    overall = float(np.mean(errors))
    print(f"  {'OVERALL':<36} rows {len(errors):>3}  MAPE {100 * overall:5.1f}%")
    if is_2025_schema(path):
        for title, key in (("model", lambda c: Path(c.model.name).stem),
                           ("GPU", lambda c: c.cluster.gpu.name),
                           ("kind", lambda c: "MoE" if c.model.is_moe else "dense"),
                           ("sharding", lambda c: "FSDP (torchtitan FSDP2, Megatron-FSDP)"
                            if c.layouts[0].fsdp else "DP / distributed optimizer")):
            print(f"MAPE per {title}:")
            for name, errs in sorted(grouped_mape(cases, errors, key).items()):
                print(f"  {name:<36} rows {len(errs):>3}  MAPE {100 * np.mean(errs):5.1f}%  "
                      f"max {100 * np.max(errs):5.1f}%")
    if not quiet:
        print("\nSkipped rows:")
        for label, reason in skipped:
            print(f"  {label:<52} {reason}")
    return overall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, action="append",
                    help="a published runs CSV (repeatable) [default: both shared files]")
    ap.add_argument("--quiet", action="store_true", help="only the MAPE summary")
    ap.add_argument("--write-bands", action="store_true",
                    help=f"also write {BANDS_FILE.name} from all three files")
    args = ap.parse_args()
    for path in args.csv or [CSV, CSV_2025, HELDOUT]:
        if not path.exists():
            sys.exit(f"error: {path} not found; pass --csv PATH to the published runs CSV")
        print(f"== {path.name}")
        run(path, args.quiet)
    if args.write_bands:
        write_atomic(BANDS_FILE, bands_yaml(bands([CSV, CSV_2025, HELDOUT])))
        print(f"wrote {BANDS_FILE}")


if __name__ == "__main__":
    main()
