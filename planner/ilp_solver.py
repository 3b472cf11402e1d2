"""Solver plumbing shared by the ILP models: pick a MILP solver, run it, report how it went.

HiGHS (through the `highspy` bindings that pulp drives in-process) is used when it is
installed; otherwise pulp's bundled CBC. Both are told a wall-clock limit; when the limit
stops the search the best incumbent is returned with status "feasible" and its gap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pulp

# Relative MIP gap at which the solvers may stop. Tight, because our models are small and the
# brute-force tests compare objectives to 1e-6; HiGHS' default (1e-4) would stop too early.
GAP_REL = 1e-7

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


def make_solver(time_limit_s: float) -> pulp.LpSolver:
    """HiGHS when available, else CBC; silent, single-threaded, with a wall-clock limit."""
    if highs_available():
        # threads=1: the planner runs many small solves; HiGHS' thread pool only adds start-up
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=GAP_REL, threads=1)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=GAP_REL, threads=1)


def solve(problem: pulp.LpProblem, time_limit_s: float) -> SolveOutcome:
    """Solve `problem` in place and report solver name, status, relative gap and seconds."""
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s!r}")
    solver = make_solver(time_limit_s)
    start = time.perf_counter()
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
