"""Solver plumbing shared by the ILP models: pick a MILP solver, run it, report how it went.

HiGHS (through the `highspy` bindings that pulp drives in-process) is used when it is
installed; otherwise pulp's bundled CBC. Both are told a wall-clock limit; when the limit
stops the search the best incumbent is returned with status "feasible" and its gap.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pulp

# Relative MIP gap at which the solvers may stop. Tight, because splits that differ by a
# nanosecond per stage must still be told apart; HiGHS' default (1e-4) would stop too early.
GAP_REL = 1e-9

_SOLUTION_STATUS = {
    pulp.LpSolutionOptimal: "optimal",
    pulp.LpSolutionIntegerFeasible: "feasible",
    pulp.LpSolutionInfeasible: "infeasible",
    pulp.LpSolutionUnbounded: "unbounded",
    pulp.LpSolutionNoSolutionFound: "not_solved",
}


@dataclass(frozen=True, slots=True)
class SolveOutcome:
    """How one MILP solve went.

    status: "optimal" (proved within GAP_REL), "feasible" (stopped by the time limit with an
    incumbent), "infeasible", "unbounded" or "not_solved" (time limit without incumbent).
    gap: relative MIP gap |incumbent - bound| / |incumbent| as the solver reports it; 0.0 for a
    proved optimum; None where the solver does not tell (CBC stopped by its time limit).
    """

    solver: str
    status: str
    gap: float | None
    seconds: float


def highs_available() -> bool:
    """True when pulp can drive HiGHS in-process (the `highspy` package is importable)."""
    return bool(pulp.HiGHS().available())


class _StartedHiGHS(pulp.HiGHS):
    """pulp's in-process HiGHS, handed a (partial) starting solution before it runs; HiGHS
    completes a partial one by a sub-MIP and keeps it as the first incumbent."""

    def __init__(self, start: dict[str, float], **options):
        super().__init__(**options)
        self.start = start

    def callSolver(self, lp):  # noqa: N802 - pulp's name
        index = {var.name: var.index for var in lp.variables()}
        names = [name for name in self.start if name in index]
        lp.solverModel.setSolution(
            len(names),
            np.array([index[name] for name in names], dtype=np.int32),
            np.array([self.start[name] for name in names], dtype=float),
        )
        super().callSolver(lp)


def make_solver(time_limit_s: float, start: dict[str, float] | None = None,
                tiny: bool = False) -> pulp.LpSolver:
    """HiGHS when available, else CBC; silent, single-threaded, with a wall-clock limit.

    start: optional values for some variables (by name), a known feasible point to begin from.
    tiny: a model of a handful of integers, solved in the planner's inner loop: skip HiGHS'
    feasibility-jump heuristic, whose set-up dominates such solves (about 30 -> 20 ms).
    """
    # threads=1: the planner runs many small solves; HiGHS' thread pool only adds start-up
    options = dict(msg=False, timeLimit=time_limit_s, gapRel=GAP_REL, threads=1)
    if highs_available():
        # integrality and row tolerances well below HiGHS' defaults (1e-6, 1e-7): with ~100
        # time units per layer a 1e-6 fractional layer would hide a 1e-4 unit difference
        options.update(mip_feasibility_tolerance=1e-9, primal_feasibility_tolerance=1e-9)
        if tiny:
            options["mip_heuristic_run_feasibility_jump"] = False
        return _StartedHiGHS(start, **options) if start else pulp.HiGHS(**options)
    return pulp.PULP_CBC_CMD(warmStart=bool(start), **options)


def solve(problem: pulp.LpProblem, time_limit_s: float,
          start: dict[str, float] | None = None, tiny: bool = False) -> SolveOutcome:
    """Solve `problem` in place and report solver name, status, relative gap and seconds.

    start / tiny: see make_solver.
    """
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s!r}")
    solver = make_solver(time_limit_s, start, tiny)
    if start and not highs_available():  # CBC reads the start from the variables themselves
        for var in problem.variables():
            if var.name in start:
                var.setInitialValue(start[var.name])
    start = time.perf_counter()
    with quiet_stdout():
        problem.solve(solver)
    seconds = time.perf_counter() - start
    status = _SOLUTION_STATUS.get(problem.sol_status, "not_solved")
    return SolveOutcome(solver.name, status, _relative_gap(problem, status), seconds)


def _relative_gap(problem: pulp.LpProblem, status: str) -> float | None:
    if status not in ("optimal", "feasible"):
        return None
    model = getattr(problem, "solverModel", None)
    if model is not None and hasattr(model, "getInfo"):  # HiGHS: read the gap it computed
        gap = float(model.getInfo().mip_gap)
        return gap if math.isfinite(gap) else 0.0  # an LP (no integers) has no MIP gap
    return 0.0 if status == "optimal" else None


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send whatever C code writes to file descriptor 1 (HiGHS' banner, CBC's log) to
    /dev/null while the block runs, so `--json` output stays one JSON object.

    Python-level buffers are flushed before and C stdio buffers after, so nothing written
    inside leaks out when the descriptor is restored, and nothing written before is lost.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (closed stdout): nothing to protect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        _flush_c_stdio()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _flush_c_stdio() -> None:
    """fflush(NULL): push out C stdio buffers (HiGHS prints through printf)."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
