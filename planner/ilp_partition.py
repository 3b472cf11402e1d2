"""ILP for the layer partition across pipeline stages (uneven where it pays).

Model (per micro-batch, per pipeline rank r = 0..pp-1):

    time_r = stage_time_scale[r] * (work of the layers on r) + stage_extra_time_s[r]
    mem_r  = (memory of the layers on r) + stage_fixed_mem_bytes[r]   <= stage_capacity_bytes[r]

With uniform layers "work of the layers on r" is n_r * layer_time_s and their memory
n_r * layer_mem_bytes[r] (layer_mem_bytes is per rank because under 1F1B rank r keeps pp - r
micro-batches of activations in flight [Narayanan et al., SC'21, Sec. 2.2]). The extra time
holds what only the ends run: the embedding on rank 0, the LM head and loss on the last rank.
stage_time_scale is 1/relative speed, so slower GPU types (heterogeneous clusters) get fewer
layers. The objective is the slowest rank's time (the 1F1B steady state runs at its pace);
among optimal splits a more even one is preferred (see the two formulations).

Interleaved schedules (vp > 1) cut the model into pp*vp chunks in model order; chunk k runs on
rank k % pp [Narayanan et al., SC'21, Sec. 2.2.2]. Every chunk holds at least one layer.

Two formulations:
- uniform layers (scalar layer_time_s, per-rank layer_mem_bytes): integer layer counts per
  rank, one continuous max. Time and memory depend only on the rank totals, so the ILP decides
  those (each >= vp) and each rank's total is then spread evenly over its vp chunks (the
  chunk holding the embedding or LM head gets the smaller share). Among optimal splits the
  one whose fastest rank is slowest wins (a weighted term that cannot trade away the max).
  About 10-20 ms.
- per-layer costs (layer_time_s of length num_layers, e.g. MoE models with leading dense
  layers, or layer_mem_bytes of shape (pp, num_layers)): integer "layers of run j in chunks
  <= k" and binary "run j lies wholly in chunks <= k" variables over runs of identical
  consecutive layers keep every chunk contiguous. Solved
  twice: min max time, then, at that time, min the largest chunk. Fast when the layers form a
  few runs (0.1 s for 80 layers = 3 dense + 77 MoE on 8 stages; about 2 s with vp=4); with
  arbitrary per-layer costs every layer is its own run and the model grows to L x pp*vp.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import pulp

from cost_models.specs import GiB, InfeasibleLayout, SpecError
from planner.ilp_solver import SolveOutcome, solve


@dataclass(frozen=True, slots=True)
class Partition:
    """A layer partition and how the solver found it.

    layers_per_stage: layers per (virtual) stage in model order, length pp*vp; chunk k runs on
        pipeline rank k % pp.
    rank_layers: layers per pipeline rank (sum of its chunks), length pp.
    stage_time_s / stage_mem_bytes: per pipeline rank, per micro-batch time and memory.
    max_stage_time_s: the objective, max of stage_time_s, recomputed from the integer answer.
    status / gap / solver / seconds: see `planner.ilp_solver.SolveOutcome`; seconds is the
        wall time of the whole call (model building included).
    """

    layers_per_stage: tuple[int, ...]
    rank_layers: tuple[int, ...]
    stage_time_s: tuple[float, ...]
    stage_mem_bytes: tuple[float, ...]
    max_stage_time_s: float
    status: str
    gap: float | None
    solver: str
    seconds: float

    @property
    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        """Half-open [start, end) layer index range of each (virtual) stage, in model order."""
        ends = np.cumsum(self.layers_per_stage)
        return tuple((int(e - n), int(e)) for e, n in zip(ends, self.layers_per_stage, strict=True))


@dataclass(frozen=True, slots=True)
class _Problem:
    """Validated inputs; layer_time_s has shape (L,), layer_mem_bytes (pp, L)."""

    num_layers: int
    pp: int
    vp: int
    uniform: bool
    layer_time_s: np.ndarray
    scale: np.ndarray
    extra_s: np.ndarray
    layer_mem_bytes: np.ndarray
    fixed_bytes: np.ndarray
    capacity_bytes: np.ndarray

    def rank_of_chunk(self, k: int) -> int:
        return k % self.pp

    def times_and_mem(self, chunks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Per-rank time (s) and memory (bytes) of a chunk split given in model order."""
        owner = np.repeat([self.rank_of_chunk(k) for k in range(len(chunks))], chunks)
        work = np.bincount(owner, self.layer_time_s, minlength=self.pp)
        mem = self.layer_mem_bytes[owner, np.arange(self.num_layers)]
        return (
            self.scale * work + self.extra_s,
            np.bincount(owner, mem, minlength=self.pp) + self.fixed_bytes,
        )


def partition_layers(
    num_layers: int,
    num_stages: int,
    layer_time_s: float | np.ndarray,
    stage_time_scale: np.ndarray,
    stage_extra_time_s: np.ndarray,
    layer_mem_bytes: np.ndarray,
    stage_fixed_mem_bytes: np.ndarray,
    stage_capacity_bytes: np.ndarray,
    vp: int = 1,
    time_limit_s: float = 10.0,
) -> Partition:
    """Split `num_layers` layers over `num_stages` pipeline ranks (x vp chunks) by ILP.

    Per-rank arrays have length num_stages. layer_time_s: seconds per layer per micro-batch on
    a scale-1.0 GPU, a scalar (uniform layers) or an array of length num_layers.
    layer_mem_bytes: bytes per layer on each rank, shape (num_stages,) or (num_stages,
    num_layers). stage_capacity_bytes may be inf. Minimises the slowest rank's time (see the
    module docstring); raises InfeasibleLayout naming the binding limit when no split fits,
    SpecError for malformed inputs.
    """
    start = time.perf_counter()
    prob = _validate(
        num_layers, num_stages, vp, layer_time_s, stage_time_scale, stage_extra_time_s,
        layer_mem_bytes, stage_fixed_mem_bytes, stage_capacity_bytes,
    )
    _check_capacity(prob)
    scaled = _in_model_units(prob)
    if prob.uniform:
        chunks, outcome = _solve_uniform(scaled, time_limit_s)
    else:
        chunks, outcome = _solve_per_layer(scaled, time_limit_s)
    times, mem = prob.times_and_mem(chunks)
    ranks = np.bincount([prob.rank_of_chunk(k) for k in range(len(chunks))], chunks, prob.pp)
    return Partition(
        layers_per_stage=chunks,
        rank_layers=tuple(int(n) for n in ranks),
        stage_time_s=tuple(float(t) for t in times),
        stage_mem_bytes=tuple(float(m) for m in mem),
        max_stage_time_s=float(times.max()),
        status=outcome.status,
        gap=outcome.gap,
        solver=outcome.solver,
        seconds=time.perf_counter() - start,
    )


def _in_model_units(prob: _Problem) -> _Problem:
    """Times rescaled so the slowest conceivable stage is 1000 units: the solvers' absolute
    feasibility tolerance (1e-7) then cannot hide sub-microsecond differences between splits."""
    worst = float(prob.extra_s.max() + prob.scale.max() * prob.layer_time_s.sum())
    unit = worst / 1000.0 if worst > 0 else 1.0
    return replace(prob, layer_time_s=prob.layer_time_s / unit, extra_s=prob.extra_s / unit)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _validate(num_layers, pp, vp, layer_time_s, scale, extra, layer_mem, fixed, cap) -> _Problem:
    for name, value in (("num_layers", num_layers), ("num_stages", pp), ("vp", vp)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise SpecError(f"partition: {name} must be a positive integer, got {value!r}")
    num_layers, pp, vp = int(num_layers), int(pp), int(vp)
    uniform = np.ndim(layer_time_s) == 0 and np.ndim(layer_mem) == 1
    times = _array("layer_time_s", layer_time_s, (num_layers,), allow_inf=False)
    if np.ndim(layer_time_s) == 0:
        times = np.full(num_layers, float(layer_time_s))
    per_rank = {
        name: _array(name, value, (pp,), allow_inf=name == "stage_capacity_bytes")
        for name, value in (
            ("stage_time_scale", scale), ("stage_extra_time_s", extra),
            ("stage_fixed_mem_bytes", fixed), ("stage_capacity_bytes", cap),
        )
    }
    if np.any(per_rank["stage_time_scale"] <= 0):
        raise SpecError("partition: stage_time_scale must be > 0 (1 / relative GPU speed)")
    mem = _array("layer_mem_bytes", layer_mem, (pp, num_layers), allow_inf=False)
    if mem.ndim == 1:
        if mem.shape != (pp,):
            raise SpecError(f"partition: layer_mem_bytes needs {pp} entries (one per stage) "
                            f"or shape ({pp}, {num_layers}), got shape {mem.shape}")
        mem = np.repeat(mem[:, None], num_layers, axis=1)
    return _Problem(
        num_layers, pp, vp, uniform, times, per_rank["stage_time_scale"],
        per_rank["stage_extra_time_s"], mem, per_rank["stage_fixed_mem_bytes"],
        per_rank["stage_capacity_bytes"],
    )


def _array(name: str, value, shape: tuple[int, ...], allow_inf: bool) -> np.ndarray:
    """`value` as a float array, non-negative and finite (or +inf if allowed); 1-D values must
    have length shape[0] unless the full `shape` is given (checked by the caller)."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"partition: {name} must be numbers, got {value!r}") from exc
    if arr.ndim == 0:
        return arr
    if arr.shape != shape and not (arr.ndim == 1 and len(shape) == 2):
        raise SpecError(f"partition: {name} needs shape {shape}, got {arr.shape}")
    bad = np.isnan(arr) | (arr < 0) | (np.isinf(arr) & (not allow_inf))
    if bad.any():
        raise SpecError(f"partition: {name} must be non-negative and finite, got {arr[bad][0]}")
    return arr


def _max_layers_by_memory(prob: _Problem) -> np.ndarray:
    """Upper bound on the layers each rank can hold: its cheapest layers against its room."""
    room = prob.capacity_bytes - prob.fixed_bytes
    cheapest = np.sort(prob.layer_mem_bytes, axis=1)
    fits = np.cumsum(cheapest, axis=1) <= room[:, None]
    return fits.sum(axis=1)


def _check_capacity(prob: _Problem) -> None:
    """Raise InfeasibleLayout naming the limit when no split can exist (necessary checks)."""
    chunks = prob.pp * prob.vp
    if prob.num_layers < chunks:
        raise InfeasibleLayout(
            f"{prob.num_layers} layers cannot give each of the {chunks} pipeline chunks "
            f"(pp={prob.pp} x vp={prob.vp}) at least one layer; lower pp or vp"
        )
    most = _max_layers_by_memory(prob)
    for r in np.flatnonzero(most < prob.vp):
        need = prob.fixed_bytes[r] + np.sort(prob.layer_mem_bytes[r])[: prob.vp].sum()
        raise InfeasibleLayout(
            f"pipeline stage {r} does not fit: fixed {prob.fixed_bytes[r] / GiB:.2f} GiB + "
            f"{prob.vp} layer(s) = {need / GiB:.2f} GiB > capacity "
            f"{prob.capacity_bytes[r] / GiB:.2f} GiB; use recompute, more tp, or bigger GPUs"
        )
    if most.sum() < prob.num_layers:
        raise InfeasibleLayout(
            f"memory: the {prob.pp} pipeline stages hold at most {int(most.sum())} of the "
            f"{prob.num_layers} layers (per stage {most.tolist()}); add pipeline stages, "
            f"recompute activations, or use GPUs with more memory"
        )


# --------------------------------------------------------------------------------------------
# uniform layers: integer counts per rank
# --------------------------------------------------------------------------------------------


def _solve_uniform(prob: _Problem, time_limit_s: float) -> tuple[tuple[int, ...], SolveOutcome]:
    pp, vp, total = prob.pp, prob.vp, prob.num_layers
    per_layer = prob.scale * prob.layer_time_s[0]  # seconds per layer on each rank
    upper = np.minimum(_max_layers_by_memory(prob), total - vp * (pp - 1))
    model = pulp.LpProblem("layer_partition", pulp.LpMinimize)
    counts = [pulp.LpVariable(f"n{r}", vp, int(upper[r]), cat="Integer") for r in range(pp)]
    t_max = pulp.LpVariable("t_max", 0)
    t_min = pulp.LpVariable("t_min", 0)
    model += t_max - _tie_weight(per_layer, prob.extra_s, vp, total) * t_min
    for r in range(pp):
        stage_time = float(per_layer[r]) * counts[r] + float(prob.extra_s[r])
        model += stage_time <= t_max, f"time_{r}"
        model += t_min <= stage_time, f"even_{r}"
    model += pulp.lpSum(counts) == total, "all_layers"
    outcome = solve(model, time_limit_s, tiny=True)
    _raise_if_unsolved(outcome, prob)
    totals = [round(v.value()) for v in counts]
    return _spread_chunks(totals, pp, vp), outcome


def _tie_weight(per_layer: np.ndarray, extra: np.ndarray, vp: int, total: int) -> float:
    """Weight of the evenness term small enough never to trade away slowest-stage time.

    Every achievable max time is some rank's per_layer*n + extra; two distinct ones differ by
    at least `delta`, while the evenness term moves the objective by at most weight * t_hi.
    """
    counts = np.arange(vp, total + 1)
    values = np.unique((per_layer[:, None] * counts[None, :] + extra[:, None]).ravel())
    t_hi = float(values[-1])
    steps = np.diff(values)
    steps = steps[steps > 1e-12 * t_hi]  # float noise is not a distinct time
    delta = float(steps.min()) if steps.size else t_hi
    return min(1e-3, 0.25 * delta / t_hi) if t_hi > 0 else 0.0


def _spread_chunks(totals: list[int], pp: int, vp: int) -> tuple[int, ...]:
    """Chunk sizes in model order: rank r's total spread evenly over its vp chunks, the
    remainder going first to chunks that do not hold the embedding (chunk 0) or the LM head
    (the last chunk)."""
    chunks = [0] * (pp * vp)
    for r, n in enumerate(totals):
        ks = [j * pp + r for j in range(vp)]
        ends = {0, pp * vp - 1}
        order = [k for k in reversed(ks) if k not in ends] + [k for k in ks if k in ends]
        base, extra = divmod(n, vp)
        for i, k in enumerate(order):
            chunks[k] = base + (1 if i < extra else 0)
    return tuple(chunks)


def _raise_if_unsolved(outcome: SolveOutcome, prob: _Problem) -> None:
    if outcome.status in ("optimal", "feasible"):
        return
    if outcome.status == "infeasible":
        raise InfeasibleLayout(
            f"memory: no contiguous split of {prob.num_layers} layers over {prob.pp} stages "
            f"(vp={prob.vp}) keeps every stage within its capacity "
            f"({[round(c / GiB, 2) for c in prob.capacity_bytes]} GiB); add pipeline stages, "
            f"recompute activations, or use GPUs with more memory"
        )
    raise InfeasibleLayout(
        f"layer partition: solver {outcome.solver} ended with status {outcome.status} "
        f"after {outcome.seconds:.1f} s; raise time_limit_s"
    )


# --------------------------------------------------------------------------------------------
# per-layer costs: contiguous chunks over runs of identical layers
# --------------------------------------------------------------------------------------------


def _layer_runs(prob: _Problem) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of consecutive layers with identical time and memory."""
    cost = np.vstack([prob.layer_time_s, prob.layer_mem_bytes])
    change = np.flatnonzero(np.any(cost[:, 1:] != cost[:, :-1], axis=0)) + 1
    bounds = [0, *change.tolist(), prob.num_layers]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _solve_per_layer(prob: _Problem, time_limit_s: float) -> tuple[tuple[int, ...], SolveOutcome]:
    """Two solves: min slowest rank time; then, with that time kept, min the largest chunk
    (so the chunks of an interleaved schedule come out even, not 1-layer slivers)."""
    if prob.pp * prob.vp == 1:
        return (prob.num_layers,), SolveOutcome("none (single stage)", "optimal", 0.0, 0.0)
    deadline = time.perf_counter() + time_limit_s
    model, upto, t_max, spread = _runs_model(prob)
    model.setObjective(t_max)
    first = solve(model, time_limit_s)
    _raise_if_unsolved(first, prob)
    chunks = _chunks_from_cumulative(upto, prob)
    best_s = float(prob.times_and_mem(chunks)[0].max())
    left_s = deadline - time.perf_counter()
    if first.status != "optimal" or left_s <= 0.05:
        return chunks, first
    model += t_max <= best_s * (1 + 1e-9), "keep_best_max"
    model.setObjective(spread)
    second = solve(model, min(left_s, 0.5 * time_limit_s))  # a tie-break: cap its time
    if second.status in ("optimal", "feasible"):
        even = _chunks_from_cumulative(upto, prob)
        if prob.times_and_mem(even)[0].max() <= best_s * (1 + 1e-9):
            chunks = even
    # the reported gap is that of the min-max solve, which the second one cannot worsen
    return chunks, SolveOutcome(first.solver, first.status, first.gap,
                                first.seconds + second.seconds)


def _runs_model(prob: _Problem):
    """MILP over runs j of identical layers and chunks k (model order).

    upto[k][j] (integer): layers of run j in chunks <= k; full[k][j] (binary): run j lies
    wholly in chunks <= k. Contiguity: run j+1 may start only after run j is full. Chunk k
    holds upto[k][j] - upto[k-1][j] layers of run j. With one run per layer this is the usual
    "layer l in chunk <= k" staircase; real models (dense layers, then MoE) have two or three.
    Returns the model, upto, t_max and the evenness objective of the second solve.
    """
    runs, chunks, pp = _layer_runs(prob), prob.pp * prob.vp, prob.pp
    size = [b - a for a, b in runs]
    model = pulp.LpProblem("layer_partition_per_layer", pulp.LpMinimize)
    upto = [[pulp.LpVariable(f"y_{k}_{j}", 0, size[j], cat="Integer") for j in range(len(runs))]
            for k in range(chunks - 1)]
    upto.append(size)  # the last chunk closes every run
    for k in range(chunks - 1):
        for j in range(len(runs) - 1):
            if size[j] == 1:  # upto[k][j] is itself the "run j is complete" flag
                model += upto[k][j + 1] <= size[j + 1] * upto[k][j]  # contiguity
                continue
            whole = pulp.LpVariable(f"z_{k}_{j}", cat="Binary")
            model += upto[k][j] >= size[j] * whole
            model += upto[k][j + 1] <= size[j + 1] * whole  # contiguity
        for j in range(len(runs)):
            model += upto[k][j] <= upto[k + 1][j]

    def count(k: int, j: int):  # layers of run j in chunk k
        return upto[k][j] - (upto[k - 1][j] if k > 0 else 0)

    t_max, t_min = pulp.LpVariable("t_max", 0), pulp.LpVariable("t_min", 0)
    c_hi = pulp.LpVariable("chunk_hi", 0)
    chunk_work = []
    for k in range(chunks):
        model += pulp.lpSum(count(k, j) for j in range(len(runs))) >= 1, f"nonempty_{k}"
        work = pulp.lpSum(float(prob.layer_time_s[a]) * count(k, j) for j, (a, _) in enumerate(runs))
        chunk_work.append(work)
        model += float(prob.scale[k % pp]) * work <= c_hi, f"chunk_hi_{k}"
    for r in range(pp):
        mine = range(r, chunks, pp)
        stage_time = float(prob.scale[r]) * pulp.lpSum(chunk_work[k] for k in mine) + float(
            prob.extra_s[r])
        model += stage_time <= t_max, f"time_{r}"
        model += t_min <= stage_time, f"even_{r}"
        if math.isfinite(prob.capacity_bytes[r]):  # in GiB to keep coefficients near 1
            mem = pulp.lpSum(float(prob.layer_mem_bytes[r, a]) / GiB * count(k, j)
                             for k in mine for j, (a, _) in enumerate(runs))
            room = (prob.capacity_bytes[r] - prob.fixed_bytes[r]) / GiB
            model += mem <= room, f"mem_{r}"
    return model, upto, t_max, c_hi


def _chunks_from_cumulative(upto, prob: _Problem) -> tuple[int, ...]:
    cumulative = [sum(round(pulp.value(y)) for y in row) for row in upto]
    return tuple(int(n) for n in np.diff([0, *cumulative]))
