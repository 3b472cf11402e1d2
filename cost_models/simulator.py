"""Event-driven simulation of one training step over a plan's pipeline placement.

A second, independent estimate of the step time next to the analytic cost model: every pp
rank executes its forward/backward operations in the order its pipeline schedule prescribes
(1F1B, or Megatron-LM's interleaved 1F1B when vp > 1); an operation starts once its rank is
free and its inputs have arrived. Activation/gradient transfers occupy the link between two
ranks, not their compute. After its last backward, each rank reduces gradients across data
parallelism (partly hidden behind that backward) and runs the optimizer.

Pure: numpy only, no I/O. Times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from operator import itemgetter
from typing import Literal

import numpy as np

from cost_models import pipeline_orders, schedules
from cost_models.specs import SpecError

EventKind = Literal["fwd", "bwd", "p2p", "dp", "opt"]
EVENT_KINDS: tuple[str, ...] = ("fwd", "bwd", "p2p", "dp", "opt")
SCHEDULES: tuple[str, ...] = schedules.SCHEDULES
"""1f1b and interleaved run Megatron-LM's fixed orders (`rank_order`), dualpipe and dualpipev
DeepSeek's and zb-v PyTorch's (`pipeline_orders`); zb-h1 runs `_run_greedy` (B/W split)."""


@dataclass(frozen=True, slots=True)
class StepTasks:
    """The durations a step is made of, per pipeline rank and virtual stage (seconds).

    Virtual stage k (0 .. pp*vp-1, in model order) lives on pp rank k % pp as its chunk
    k // pp; with vp = 1, virtual stage k is simply pp rank k.
    """

    pp: int
    """Pipeline-parallel ranks (>= 1)."""
    vp: int
    """Model chunks (virtual stages) per pp rank (>= 1); 1 means plain 1F1B."""
    num_microbatches: int
    """Micro-batches m per step per data-parallel replica (>= 1)."""
    fwd_s: tuple[tuple[float, ...], ...]
    """[pp_rank][chunk] forward time of one micro-batch on that virtual stage, seconds."""
    bwd_s: tuple[tuple[float, ...], ...]
    """[pp_rank][chunk] backward time (including any recompute) of one micro-batch, seconds."""
    p2p_s: tuple[float, ...]
    """[k] activation transfer time from virtual stage k to k+1, seconds; len pp*vp - 1.
    The gradient transfer from k+1 back to k is assumed to take the same time."""
    dp_comm_s: tuple[float, ...]
    """[pp_rank] data-parallel gradient reduction time after the rank's last backward, seconds."""
    dp_overlap: float
    """Fraction (0..1) of dp_comm_s that can run hidden under the rank's last micro-batch
    backward (gradient buckets reduced while later layers still compute)."""
    optimizer_s: tuple[float, ...]
    """[pp_rank] optimizer step time, seconds."""
    wgrad_s: tuple[tuple[float, ...], ...] = ()
    """[pp_rank][chunk] the weight-gradient part W of bwd_s (zero-bubble schedules run it as
    its own, deferrable operation); () means none."""
    overlap_s: tuple[tuple[float, ...], ...] = ()
    """[pp_rank][chunk] communication of one micro-batch's forward + backward that a DualPipe
    F&B pair hides under the other micro-batch's compute; () means none."""

    def __post_init__(self) -> None:
        for name in ("pp", "vp", "num_microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"StepTasks.{name} must be a positive integer, got {value!r}")
        for name in ("fwd_s", "bwd_s", "wgrad_s", "overlap_s"):
            table = getattr(self, name)
            if name in ("wgrad_s", "overlap_s") and table == ():
                continue
            if len(table) != self.pp or any(len(row) != self.vp for row in table):
                raise SpecError(f"StepTasks.{name} must be [pp={self.pp}][vp={self.vp}] times")
        expected = {"p2p_s": self.pp * self.vp - 1, "dp_comm_s": self.pp, "optimizer_s": self.pp}
        for name, length in expected.items():
            if len(getattr(self, name)) != length:
                raise SpecError(f"StepTasks.{name} must have {length} entries, "
                                f"got {len(getattr(self, name))}")
        times = [t for row in self.fwd_s + self.bwd_s + self.wgrad_s + self.overlap_s
                 for t in row]
        times += [*self.p2p_s, *self.dp_comm_s, *self.optimizer_s]
        if any(not t >= 0.0 for t in times):  # also rejects NaN
            raise SpecError("StepTasks durations must be non-negative seconds")
        if not 0.0 <= self.dp_overlap <= 1.0:
            raise SpecError(f"StepTasks.dp_overlap must be in [0, 1], got {self.dp_overlap!r}")

    @property
    def num_stages(self) -> int:
        """Virtual stages pp * vp."""
        return self.pp * self.vp


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One interval of the simulated step."""

    rank: int
    """Pipeline rank whose compute (fwd/bwd/opt) or network (p2p send, dp reduction) it uses."""
    kind: EventKind
    """fwd | bwd (compute), p2p (activation or gradient transfer), dp (gradient reduction),
    opt (optimizer step)."""
    microbatch: int
    """Micro-batch index, -1 for dp and opt."""
    chunk: int
    """Model chunk on `rank` (virtual stage chunk*pp + rank); for p2p the sender's chunk;
    -1 for dp and opt."""
    start_s: float
    end_s: float
    peer: int = -1
    """For p2p: the receiving pp rank; -1 otherwise."""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class SimResult:
    """A simulated step: its length, per-rank utilisation and every event."""

    schedule: str
    """1f1b or interleaved (the order that was simulated)."""
    pp: int
    vp: int
    num_microbatches: int
    step_time_s: float
    """From the first forward to the last optimizer step of any rank, seconds."""
    pipeline_s: float
    """End of the last backward on any rank (the forward/backward phase), seconds."""
    busy_s: tuple[float, ...]
    """[pp_rank] compute time (fwd + bwd + optimizer), seconds."""
    idle_s: tuple[float, ...]
    """[pp_rank] step_time_s - busy_s: pipeline bubble plus waiting on exposed DP
    communication, seconds."""
    events: tuple[Event, ...]
    """Every fwd, bwd, p2p (non-zero), dp and opt interval, ordered by rank then start."""

    @property
    def bubble_fraction(self) -> float:
        """Mean idle share of the step over pp ranks (0 = no bubble)."""
        return float(np.mean(self.idle_s)) / self.step_time_s if self.step_time_s > 0 else 0.0

    def summary(self) -> dict:
        """JSON-ready summary (without the event list)."""
        return {
            "schedule": self.schedule, "pp": self.pp, "vp": self.vp,
            "num_microbatches": self.num_microbatches,
            "step_time_s": self.step_time_s, "pipeline_s": self.pipeline_s,
            "busy_s": list(self.busy_s), "idle_s": list(self.idle_s),
            "bubble_fraction": self.bubble_fraction, "num_events": len(self.events),
        }


# --------------------------------------------------------------------------------------------
# Schedules: the order each pp rank runs its forwards and backwards
# --------------------------------------------------------------------------------------------

Op = tuple[bool, int, int]
"""(is_backward, chunk, microbatch)."""


def rank_order(pp: int, vp: int, num_microbatches: int, rank: int) -> list[Op]:
    """The operations of one pp rank in execution order (1F1B if vp == 1, else interleaved).

    1F1B (PipeDream-flush, Narayanan et al. 2021 sec. 2.2; Megatron-LM
    forward_backward_pipelining_without_interleaving): min(pp-rank-1, m) warm-up forwards,
    then alternate one forward, one backward, then the remaining backwards.

    Interleaved 1F1B (Narayanan et al. 2021 sec. 2.2.2; Megatron-LM
    forward_backward_pipelining_with_interleaving with microbatch_group_size_per_vp_stage =
    pp): the m*vp "virtual micro-batches" are taken in groups of pp micro-batches, each group
    going through chunk 0, 1, ..., vp-1; virtual micro-batch i is (mb, chunk) = table[i] for
    a forward and (mb, vp-1-chunk) for a backward. Warm-up runs
    min(2*(pp-rank-1) + (vp-1)*pp, m*vp) forwards, the steady phase alternates forward
    i+warmup with backward i, the cool-down runs the remaining backwards.
    """
    m = num_microbatches
    if vp == 1:
        warmup = min(pp - rank - 1, m)
        fwd = [(False, 0, j) for j in range(m)]
        bwd = [(True, 0, j) for j in range(m)]
    else:
        table = [(j, c) for g in range(0, m, pp) for c in range(vp) for j in range(g, min(g + pp, m))]
        warmup = min(2 * (pp - rank - 1) + (vp - 1) * pp, m * vp)
        fwd = [(False, c, j) for j, c in table]
        bwd = [(True, vp - 1 - c, j) for j, c in table]
    order = fwd[:warmup]
    for i in range(len(fwd) - warmup):  # steady phase: 1 forward then 1 backward
        order += [fwd[warmup + i], bwd[i]]
    return order + bwd[len(fwd) - warmup:]


STALL_PROBE_MICROBATCHES = (3, 5)
"""Micro-batch counts (multiples of pp) past which `interleaved_stall_layers` extrapolates:
both past every rank's warm-up ((v+1)·pp - 2 forwards at most), so the fixed order runs
periodically between them and the stall grows linearly from there."""


@cache
def interleaved_stall_layers(stage_loads: tuple[float, ...], pp: int,
                             num_microbatches: int) -> float:
    """Idle time per step that Megatron-LM's interleaved order adds, beyond the closed-form
    fill and drain, when the virtual stages hold unequal layer counts; in units of one layer's
    forward + backward (F : B = 1 : 2, transfers free). 0 for equal chunks.

    Narayanan et al. 2021 Sec. 2.2.2 prices the interleaved schedule as m·tau_max plus a fill
    and drain of (p-1)·tau/v, which assumes equal chunks. The order is fixed (`rank_order`:
    one forward, one backward, each waiting for its input), so a chunk row that is one layer
    heavier on most ranks (even_split of 126 layers on 16 x 7 chunks: chunk 0 of ranks 1-14
    holds 2 layers, every other chunk 1) stalls every group of pp micro-batches: the period
    per micro-batch exceeds tau_max and the loss grows with m, not with p. The period of such
    a fixed-order (max-plus linear) system is the maximum cycle mean of its dependency graph
    (Baccelli et al. 1992, "Synchronization and Linearity", Sec. 3.7), which has no closed
    form over these orders; so the order is played once on unit layers: exactly up to 5·pp
    micro-batches, and beyond that extrapolated along the period measured between 3·pp and
    5·pp (cached per split and m; ~1-30 ms each). A heavier end chunk alone (equal layer
    chunks plus the LM head) does not stall the order, but with uneven layer chunks the ends
    add to it (the 126-layer split: ~0.25 s without the head, ~0.36 s with it). Never
    negative, so a step priced without it is a lower bound (what `planner.search` relies on
    to compute it lazily).
    """
    vp = len(stage_loads) // pp
    if vp < 2 or pp < 2 or len(set(stage_loads)) == 1:
        return 0.0
    lo, hi = (c * pp for c in STALL_PROBE_MICROBATCHES)
    if num_microbatches <= hi:
        stall = _unit_extra(stage_loads, pp, num_microbatches)
    else:
        at_lo, at_hi = _unit_extra(stage_loads, pp, lo), _unit_extra(stage_loads, pp, hi)
        stall = at_hi + (num_microbatches - hi) * (at_hi - at_lo) / (hi - lo)
    return stall if stall > 1e-9 else 0.0  # equal periods differ by rounding only


@cache
def _unit_extra(stage_loads: tuple[float, ...], pp: int, m: int) -> float:
    """The unit-layer fixed order's pipeline span beyond m·tau_max + (Σ_r tau_r - tau_max)/v."""
    vp = len(stage_loads) // pp
    taus = [sum(stage_loads[r::pp]) for r in range(pp)]
    closed = m * max(taus) + (sum(taus) - max(taus)) / vp
    return _unit_interleaved_span(stage_loads, pp, vp, m) - closed


def _unit_interleaved_span(stage_loads: tuple[float, ...], pp: int, vp: int, m: int) -> float:
    """End of the last backward of `rank_order` on unit layers (forward n/3, backward 2n/3
    for a stage of n layers; no transfers): `_run_pipeline` without events or links."""
    stages = pp * vp
    fwd_end = [[-1.0] * m for _ in range(stages)]
    bwd_end = [[-1.0] * m for _ in range(stages)]
    orders = [[(b, c * pp + r, j) for b, c, j in rank_order(pp, vp, m, r)] for r in range(pp)]
    free = [0.0] * pp
    ptr = [0] * pp
    work = list(range(pp))
    while work:
        r = work.pop()
        order = orders[r]
        while ptr[r] < len(order):
            is_bwd, k, j = order[ptr[r]]
            if is_bwd:
                ready = fwd_end[k][j] if k == stages - 1 else bwd_end[k + 1][j]
            else:
                ready = fwd_end[k - 1][j] if k else 0.0
            if ready < 0.0:
                break
            n = stage_loads[k]
            end = (free[r] if free[r] > ready else ready) + (2 * n / 3 if is_bwd else n / 3)
            free[r] = end
            ptr[r] += 1
            if is_bwd:
                bwd_end[k][j] = end
                if k > 0:
                    work.append((k - 1) % pp)
            else:
                fwd_end[k][j] = end
                if k < stages - 1:
                    work.append((k + 1) % pp)
    return max(free)


def _check_schedule(tasks: StepTasks, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise SpecError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule in schedules.ZERO_BUBBLE:
        # dualpipe's StepTasks carry its two directions as chunks 0 and 1 of each rank
        vp = 1 if schedule == "dualpipe" and tasks.vp == 2 else tasks.vp
        problem = schedules.schedule_problem(schedule, tasks.pp, vp, tasks.num_microbatches)
        if problem:
            raise SpecError(problem)
        if schedule == "dualpipe" and tasks.vp != 2:
            raise SpecError("dualpipe StepTasks need two chunks per rank (one per direction)")
        return
    if schedule == "1f1b" and tasks.vp > 1:
        raise SpecError(f"the 1f1b schedule runs one model chunk per rank but vp={tasks.vp}; "
                        "use schedule 'interleaved' or vp=1")
    if tasks.vp > 1 and tasks.pp == 1:
        raise SpecError("vp > 1 (interleaved schedule) needs pp > 1")
    if tasks.vp > 1 and tasks.num_microbatches % tasks.pp:
        raise SpecError(
            f"the interleaved schedule needs the micro-batch count ({tasks.num_microbatches}) to "
            f"be a multiple of pp = {tasks.pp} (Megatron-LM); change gbs or mbs")


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


def simulate_step(tasks: StepTasks, schedule: str | None = None) -> SimResult:
    """Simulate one training step event by event and return its timeline.

    Each pp rank runs `rank_order` sequentially. A forward of virtual stage k (k > 0) of
    micro-batch j waits for the forward of k-1 of j plus the transfer p2p_s[k-1]; a backward
    of k (k < last) waits for the backward of k+1 plus p2p_s[k]; the last stage's backward
    follows its own forward. A transfer starts when its producer finishes and the directed
    link sender -> receiver is free (transfers on one link are serialised, compute is not
    blocked). After a rank's last backward its DP reduction starts early by
    min(dp_overlap * dp_comm_s, one micro-batch's forward + backward over the rank's chunks);
    the optimizer starts when both the
    backward and the reduction are done. With vp == 1, "interleaved" degenerates to 1F1B
    (as in Megatron-LM); schedule None means "interleaved" if vp > 1 else "1f1b".
    """
    if schedule is None:
        schedule = "interleaved" if tasks.vp > 1 else "1f1b"
    _check_schedule(tasks, schedule)
    pp, vp, m = tasks.pp, tasks.vp, tasks.num_microbatches
    if schedule in ("dualpipe", "dualpipev", "zb-v"):
        raw, last_end, compute = pipeline_orders.run(tasks, schedule)
        busy = np.asarray(compute) + np.asarray(tasks.optimizer_s)
    elif schedule == "zb-h1":
        raw, last_end, compute = _run_greedy(tasks)
        busy = np.asarray(compute) + np.asarray(tasks.optimizer_s)
    else:
        orders = [rank_order(pp, vp, m, r) for r in range(pp)]
        raw, last_end, _ = _run_pipeline(tasks, orders)
        busy = m * (np.sum(tasks.fwd_s, axis=1) + np.sum(tasks.bwd_s, axis=1)) \
            + np.asarray(tasks.optimizer_s)
        schedule = "interleaved" if vp > 1 else "1f1b"
    step_s, tail = _dp_and_optimizer(tasks, last_end)
    raw.extend(tail)
    raw.sort(key=itemgetter(0, 4, 1))  # rank, start, kind: sort plain tuples, then wrap
    events = tuple(Event(*e) for e in raw)
    return SimResult(
        schedule=schedule, pp=pp, vp=vp, num_microbatches=m,
        step_time_s=step_s, pipeline_s=max(last_end),
        busy_s=tuple(float(b) for b in busy), idle_s=tuple(float(step_s - b) for b in busy),
        events=events,
    )


def _run_pipeline(tasks: StepTasks, orders: list[list[Op]]) -> tuple[list[tuple], list[float], list[float]]:
    """List-schedule the fixed per-rank orders; returns raw events, per-rank end of the last
    backward and that backward's duration.

    A worklist of ranks: a rank runs ops until the next one's input has not arrived yet;
    every produced output wakes the consumer's rank. Each op is handled once, so the cost is
    linear in the number of ops (2 * m * pp * vp).
    """
    pp, vp, m = tasks.pp, tasks.vp, tasks.num_microbatches
    stages = pp * vp
    fwd_end = [[None] * m for _ in range(stages)]
    arrive_f = [[None] * m for _ in range(stages)]  # activation of (stage, mb) on its rank
    arrive_b = [[None] * m for _ in range(stages)]  # gradient of (stage, mb) on its rank
    for j in range(m):
        arrive_f[0][j] = 0.0
    link_free: dict[tuple[int, int], float] = {}
    free = [0.0] * pp
    ptr = [0] * pp
    last_dur = [0.0] * pp
    events: list[tuple] = []
    work = list(range(pp))

    def send(src_stage: int, dst_stage: int, j: int, t: float, arrive: list) -> None:
        src, dst = src_stage % pp, dst_stage % pp
        arrive[dst_stage][j] = pipeline_orders.link_transfer(
            link_free, events, src, dst, t, tasks.p2p_s[min(src_stage, dst_stage)], j,
            src_stage // pp)
        work.append(dst)

    while work:
        r = work.pop()
        order = orders[r]
        while ptr[r] < len(order):
            is_bwd, chunk, j = order[ptr[r]]
            k = chunk * pp + r
            if is_bwd:
                ready = fwd_end[k][j] if k == stages - 1 else arrive_b[k][j]
                duration = tasks.bwd_s[r][chunk]
            else:
                ready = arrive_f[k][j]
                duration = tasks.fwd_s[r][chunk]
            if ready is None:
                break  # input not produced yet; the producer's rank will wake us
            start = max(free[r], ready)
            free[r] = end = start + duration
            ptr[r] += 1
            events.append((r, "bwd" if is_bwd else "fwd", j, chunk, start, end))
            if is_bwd:
                last_dur[r] = duration
                if k > 0:
                    send(k, k - 1, j, end, arrive_b)
            else:
                fwd_end[k][j] = end
                if k < stages - 1:
                    send(k, k + 1, j, end, arrive_f)
    stuck = [r for r in range(pp) if ptr[r] < len(orders[r])]
    assert not stuck, f"schedule deadlocked on ranks {stuck}"  # orders are Megatron's: cannot happen
    return events, free, last_dur


def _run_greedy(tasks: StepTasks) -> tuple[list[tuple], list[float], list[float]]:
    """ZB-H1 as event-driven list scheduling with the backward split into B (inputs) and W
    (weights): each rank, when free at time t, runs the next forward/backward of 1F1B's order
    if its input is there, else the oldest pending W (Qi et al. 2024 Sec. 3.1: W fills the
    bubbles; a W runs only if it ends before any input the rank already knows is on its way,
    `_w_fits`), holding at most pp activations (1F1B's peak p·M_B). Stage k is rank k.
    Returns raw events, per-rank end of the last backward (B or W) and per-rank compute
    seconds."""
    import heapq

    pp, m = tasks.pp, tasks.num_microbatches
    wgrad = tasks.wgrad_s or tuple((0.0,) * tasks.vp for _ in range(pp))
    # each rank's 1F1B order of (kind, micro-batch): warm-up of the stages after it
    queues = [[("F", j) if is_bwd is False else ("B", j) for is_bwd, _, j in
               rank_order(pp, 1, m, r)] for r in range(pp)]
    qptr = [0] * pp
    arrive_f = {(0, j): 0.0 for j in range(m)}  # activation of (rank, mb); last rank: its own F
    arrive_b: dict = {}  # gradient of (rank, mb); the last rank's B follows its own F
    pending_w: list[list] = [[] for _ in range(pp)]
    held = [0] * pp  # activations per rank (forwards whose W has not run)
    free, busy, last_end = [0.0] * pp, [0.0] * pp, [0.0] * pp
    link_free: dict = {}
    events: list[tuple] = []
    heap = [(0.0, r) for r in range(pp)]
    remaining = 3 * pp * m

    def times(r):
        w = min(wgrad[r][0], tasks.bwd_s[r][0])
        return tasks.fwd_s[r][0], tasks.bwd_s[r][0] - w, w

    def send(r, r2, j, t, table):
        arrival = pipeline_orders.link_transfer(link_free, events, r, r2, t,
                                                tasks.p2p_s[min(r, r2)], j, 0)
        table[(r2, j)] = arrival
        heapq.heappush(heap, (arrival, r2))

    def input_at(r):
        """(kind, micro-batch, arrival of its input or None) of rank r's next F or B."""
        if qptr[r] >= len(queues[r]):
            return None, None, None
        kind, j = queues[r][qptr[r]]
        last = kind == "B" and r == pp - 1
        table = arrive_f if kind == "F" or last else arrive_b
        return kind, j, table.get(("done", j) if last else (r, j))

    def _w_fits(r, t, f_allowed):
        """Whether rank r's oldest W ends before the next input it already knows is coming
        (its next B's gradient or, when the in-flight cap allows one, its next F's
        activation, from a producer that has started). A W that would delay that pass waits
        for it: W only fills bubbles and never pushes back the B chain (Qi et al. 2024 Sec.
        2-3: the handcrafted and automatic schedules place each W where it fits; a W started
        just before the gradient arrives adds up to W per stage to the drain, which is what
        made the simulated ZB-H1 bubble exceed (p-1)(F+B-W))."""
        end = t + times(r)[2]
        kind, _, a = input_at(r)
        if kind is None or (kind == "F" and not f_allowed):
            return True
        return not (a is not None and t < a < end - 1e-12)

    def run(r, t, j, dur, label):
        nonlocal remaining
        events.append((r, label, j, 0, t, t + dur))
        busy[r] += dur
        remaining -= 1
        return t + dur

    while heap and remaining:
        t, r = heapq.heappop(heap)
        if t < free[r]:
            continue
        t = free[r] if free[r] > t else t
        kind, j, a = input_at(r)
        ready = a is not None and a <= t and (kind == "B" or held[r] < pp)
        f, b, w = times(r)
        if ready and kind == "F":
            end = run(r, t, j, f, "fwd")
            held[r] += 1
            qptr[r] += 1
            if r + 1 < pp:
                send(r, r + 1, j, end, arrive_f)
            else:
                arrive_f[("done", j)] = end
        elif ready:
            end = run(r, t, j, b, "bwd")
            pending_w[r].append(j)
            last_end[r] = max(last_end[r], end)
            qptr[r] += 1
            if r > 0:
                send(r, r - 1, j, end, arrive_b)
        elif pending_w[r] and _w_fits(r, t, held[r] < pp):
            end = run(r, t, pending_w[r].pop(0), w, "bwd")  # W fills what would be idle
            held[r] -= 1
            last_end[r] = max(last_end[r], end)
        else:
            continue  # idle until an input arrives (its sender pushes this rank)
        free[r] = end
        heapq.heappush(heap, (end, r))
    stuck = [r for r in range(pp) if pending_w[r]] if remaining else []
    assert not remaining, f"zb-h1 schedule deadlocked (ranks {stuck})"
    return events, last_end, busy


def _dp_and_optimizer(tasks: StepTasks, last_end: list[float]) -> tuple[float, list[tuple]]:
    """Per rank: DP reduction (partly under the last backward), then the optimizer.

    Returns the step time (latest optimizer end, or latest backward end if there is
    nothing after it) and the dp/opt events.
    """
    events = []
    step_s = max(last_end)
    for r in range(tasks.pp):
        comm = tasks.dp_comm_s[r]
        # Gradient buckets of each chunk are reduced once that chunk's last backward is done
        # and the parameter all-gather overlaps the next step's first forward, so the window
        # is one micro-batch's forward + backward over all of the rank's chunks (the same
        # window as the analytic model; with vp = 1 and no forward it is the last backward).
        window = sum(tasks.fwd_s[r]) + sum(tasks.bwd_s[r])
        hidden = min(tasks.dp_overlap * comm, window)
        dp_start = last_end[r] - hidden
        opt_start = max(last_end[r], dp_start + comm)
        opt_end = opt_start + tasks.optimizer_s[r]
        if comm > 0:
            events.append((r, "dp", -1, -1, dp_start, dp_start + comm))
        if tasks.optimizer_s[r] > 0:
            events.append((r, "opt", -1, -1, opt_start, opt_end))
        step_s = max(step_s, opt_end)
    return step_s, events
