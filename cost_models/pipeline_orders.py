"""The published fixed per-rank orders of the V and DualPipe schedules, played out:
DeepSeek's DualPipe and DualPipeV, and PyTorch's ZBVZeroBubble (what torchtitan runs for
zb-v; `zbv_phase_ops`).

DualPipe(V) source: deepseek-ai/DualPipe@3da1bbea53606543d7f5f232338fc58096db30e3, `DualPipeV.step`
(dualpipe/dualpipev.py) and `DualPipe.step` (dualpipe/dualpipe.py). Both run the same eight
steps on every rank; DualPipe is DualPipeV mirrored onto twice the ranks ("cut-in-half" in
the repository's README), so one order serves both (`phase_ops`):

  1 nF0      2 nF0F1    3 nB1W1F1 (B1 defers its W)    4 nF0B1F1B0 (main: two F&B pairs)
  5 nB1F1B0  6 nB1B0 (second half defers W)   7 nWB0 (B0 defers W)   8 nW

Phase 0 is the chunk running toward the turn, phase 1 the chunk running back from it. In
DualPipeV (p ranks, 2p stages in a V) rank r holds stage r (phase 0) and stage 2p-1-r
(phase 1; rank 0's is the loss stage), and the turn is on rank p-1. In DualPipe (p ranks,
two pipelines of m/2 micro-batches in opposite directions) a rank of the first half holds
stage r of direction 0 (phase 0) and stage p-1-r of direction 1 (phase 1), a rank of the
second half the other way round, and the turn is the hop between the two middle ranks; the
order is DualPipeV's for half-rank min(r, p-1-r) of p/2 with m/2 micro-batches.

An F&B pair (`DualPipe._forward_backward_chunk`) waits for both inputs, runs the full
backward (W included) and hides each pass's communication under the other's compute
(DeepSeek-V3 report Sec. 3.2.1). PyTorch's `ScheduleDualPipeV` (torch 2.13,
torch/distributed/pipelining/schedules.py) ports the same eight steps.

ZB-V: `ScheduleZBVZeroBubble._calculate_single_rank_operations` (torch 2.13; Qi et al. 2024
Sec. 6): a warm-up of chunk-0 forwards, then chunk-1 and chunk-0 forwards in turn, then
chunk-1 F, I, W triples, a steady phase of F I W on each chunk, and a cool-down of I's then
the deferred W's; the same V placement as
DualPipeV, every backward split into I (inputs) and W (weights), no F&B pairs.
Times are seconds; pure Python, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .simulator import StepTasks

PhaseOp = tuple
"""("F", phase) | ("B", phase, defers_w) | ("W",) (the rank's oldest deferred W) |
("W", phase) (that phase's oldest) | ("FB", forward phase, backward phase)."""


def phase_ops(num_ranks: int, num_microbatches: int, rank: int) -> list[PhaseOp]:
    """DualPipeV's order on `rank` of `num_ranks` with `num_microbatches` (DualPipeV.step;
    DualPipe's half-rank order with half the micro-batches)."""
    n, m, r = num_ranks, num_microbatches, rank
    last = r == n - 1
    ops: list[PhaseOp] = [("F", 0)] * (2 * (n - r - 1))                  # 1: nF0
    ops += [("F", 0), ("F", 1)] * (r + 1)                                # 2: nF0F1
    ops += [("B", 1, True), ("W",), ("F", 1)] * (n - r - 1)              # 3: nB1W1F1
    for i in range(m - 2 * n + r + 1):                                   # 4: nF0B1F1B0
        # the turn rank runs its first F0 and B1 apart, "to further reduce bubble size"
        ops += [("F", 0), ("B", 1, False)] if i == 0 and last else [("FB", 0, 1)]
        ops.append(("FB", 1, 0))
    ops += [("B", 1, False), ("FB", 1, 0)] * (n - r - 1)                 # 5: nB1F1B0
    defer = False
    for i in range(r + 1):                                               # 6: nB1B0
        defer = defer or (i == (r + 1) // 2 and r % 2 == 1)
        ops.append(("B", 1, defer))
        defer = defer or (i == (r + 1) // 2 and r % 2 == 0)
        ops.append(("B", 0, defer))
    ops += [("W",), ("B", 0, True)] * (n - r - 1)                        # 7: nWB0
    return ops + [("W",)] * (r + 1)                                      # 8: nW


def zbv_phase_ops(pp: int, num_microbatches: int, rank: int) -> list[PhaseOp]:
    """PyTorch's ZBVZeroBubble order on `rank` (chunk 0 = phase 0, chunk 1 = phase 1): it
    plans for max(2p-1, m) micro-batches and drops the actions of those beyond m."""
    n_micro = max(2 * pp - 1, num_microbatches)
    ops: list[tuple] = []  # (kind, phase, micro-batch)
    f, b = [0, 0], [0, 0]

    def add(kind, phase, mb_index):
        ops.append((kind, phase, mb_index))

    for _ in range(2 * (pp - rank) - 1):  # warm-up 1: chunk-0 forwards
        add("F", 0, f[0])
        f[0] += 1
    for _ in range(rank):  # warm-up 2: chunk 1 and chunk 0 forwards in turn
        add("F", 1, f[1])
        f[1] += 1
        add("F", 0, f[0])
        f[0] += 1
    for _ in range(pp - rank):  # warm-up 3: chunk-1 F, I, W
        add("F", 1, f[1])
        f[1] += 1
        add("B", 1, b[1])
        add("W", 1, b[1])
        b[1] += 1
    while f[1] < f[0] or f[0] < n_micro:  # steady: F I W on chunk 0, then on chunk 1
        if f[0] < n_micro:
            add("F", 0, f[0])
            f[0] += 1
        add("B", 0, b[0])
        add("W", 0, b[0])
        b[0] += 1
        add("F", 1, f[1])
        f[1] += 1
        add("B", 1, b[1])
        add("W", 1, b[1])
        b[1] += 1
    w = list(b)
    for _ in range(rank):  # cool-down: input gradients of both chunks
        add("B", 0, b[0])
        b[0] += 1
        add("B", 1, b[1])
        b[1] += 1
    for _ in range(pp - rank):  # ... then chunk 0's with its W
        add("B", 0, b[0])
        b[0] += 1
        add("W", 0, w[0])
        w[0] += 1
    ops += [("W", 1, j) for j in range(w[1], b[1])] + [("W", 0, j) for j in range(w[0], b[0])]
    return [(kind, phase, True) if kind == "B" else (kind, phase)
            for kind, phase, j in ops if j < num_microbatches]


def stage_places(schedule: str, pp: int, num_microbatches: int):
    """(pipes, phases): each pipe's stages as (rank, chunk) with its micro-batches, and per
    rank the (pipe, stage) of its phase 0 and phase 1 (the module docstring's placement)."""
    m = num_microbatches
    if schedule in ("dualpipev", "zb-v"):
        stages = [(k, 0) for k in range(pp)] + [(pp - 1 - k, 1) for k in range(pp)]
        return [(stages, list(range(m)))], [((0, r), (0, 2 * pp - 1 - r)) for r in range(pp)]
    half = m // 2
    pipes = [([(k, 0) for k in range(pp)], list(range(half))),
             ([(pp - 1 - k, 1) for k in range(pp)], list(range(half, m)))]
    phases = [((0, r), (1, pp - 1 - r)) if r < pp // 2 else ((1, pp - 1 - r), (0, r))
              for r in range(pp)]
    return pipes, phases


def rank_orders(schedule: str, pp: int, num_microbatches: int) -> list[list[PhaseOp]]:
    """Every rank's order: `phase_ops` for dualpipe or dualpipev, `zbv_phase_ops` for zb-v."""
    if schedule == "zb-v":
        return [zbv_phase_ops(pp, num_microbatches, r) for r in range(pp)]
    if schedule == "dualpipev":
        return [phase_ops(pp, num_microbatches, r) for r in range(pp)]
    return [phase_ops(pp // 2, num_microbatches // 2, min(r, pp - 1 - r)) for r in range(pp)]


def link_transfer(link_free: dict, events: list, src: int, dst: int, t: float, dur: float,
                  microbatch: int, chunk: int) -> float:
    """One activation or gradient transfer from rank `src` to `dst` produced at `t`: it waits
    for the directed link to be free (transfers on a link are serialised, compute is not
    blocked), is logged as a p2p event when it takes time, and returns its arrival."""
    start = max(t, link_free.get((src, dst), 0.0))
    link_free[(src, dst)] = start + dur
    if dur > 0:
        events.append((src, "p2p", microbatch, chunk, start, start + dur, dst))
    return start + dur


def pair_saving_s(first_s: float, first_hide_s: float, second_s: float,
                  second_hide_s: float) -> float:
    """Seconds an F&B pair saves: each pass's hideable communication (at most its own
    length) runs under the other pass's compute (its length less its own communication)."""
    h1, h2 = min(first_hide_s, first_s), min(second_hide_s, second_s)
    return min(h1, second_s - h2) + min(h2, first_s - h1)


def run(tasks: StepTasks, schedule: str) -> tuple[list[tuple], list[float], list[float]]:
    """Play the schedule's fixed order: each rank runs its ops in sequence, an op starting
    once the rank is free and its inputs have arrived (activations and gradients over the
    link between stage ranks, `link_transfer`; none between stages on one rank).
    Returns raw events, per-rank end of the last backward (B or W) and compute seconds."""
    pp, m = tasks.pp, tasks.num_microbatches
    pipes, phases = stage_places(schedule, pp, m)
    orders = rank_orders(schedule, pp, m)
    wgrad = tasks.wgrad_s or tuple((0.0,) * tasks.vp for _ in range(pp))
    hide = tasks.overlap_s or tuple((0.0,) * tasks.vp for _ in range(pp))
    arrive_f = {(d, 0, j): 0.0 for d, (_, mbs) in enumerate(pipes) for j in mbs}
    arrive_b: dict = {}
    nf = {(d, k): 0 for d, (st, _) in enumerate(pipes) for k in range(len(st))}
    nb = dict(nf)
    pending_w: list[list] = [[] for _ in range(pp)]
    free, busy, last_end = [0.0] * pp, [0.0] * pp, [0.0] * pp
    ptr = [0] * pp
    link_free: dict = {}
    events: list[tuple] = []
    work = list(range(pp))

    def durations(d, k):
        """(F, full backward, W, hideable communication) of stage k of pipe d."""
        r, c = pipes[d][0][k]
        return (tasks.fwd_s[r][c], tasks.bwd_s[r][c], min(wgrad[r][c], tasks.bwd_s[r][c]),
                hide[r][c])

    def send(d, k, k2, j, t, table):
        src, dst = pipes[d][0][k][0], pipes[d][0][k2][0]
        dur = 0.0 if src == dst else tasks.p2p_s[min(k, k2) % len(tasks.p2p_s)]
        table[(d, k2, j)] = link_transfer(link_free, events, src, dst, t, dur, j,
                                          pipes[d][0][k][1])
        work.append(dst)

    def forward_input(r, phase):
        d, k = phases[r][phase]
        j = pipes[d][1][nf[(d, k)]]
        return d, k, j, arrive_f.get((d, k, j))

    def backward_input(r, phase):
        d, k = phases[r][phase]
        j = pipes[d][1][nb[(d, k)]]
        last = k == len(pipes[d][0]) - 1
        return d, k, j, arrive_f.get(("done", d, k, j)) if last else arrive_b.get((d, k, j))

    def finish_f(d, k, j, end):
        nf[(d, k)] += 1
        if k + 1 < len(pipes[d][0]):
            send(d, k, k + 1, j, end, arrive_f)
        else:
            arrive_f[("done", d, k, j)] = end

    def finish_b(r, d, k, j, end, defers):
        nb[(d, k)] += 1
        if defers:
            pending_w[r].append((d, k, j))
        if k > 0:
            send(d, k, k - 1, j, end, arrive_b)

    while work:
        r = work.pop()
        while ptr[r] < len(orders[r]):
            op = orders[r][ptr[r]]
            if op[0] == "W":
                mine = [i for i, (d, k, _) in enumerate(pending_w[r])
                        if len(op) == 1 or (d, k) == phases[r][op[1]]]
                d, k, j = pending_w[r].pop(mine[0])  # FIFO (of its phase), as DeepSeek's
                # WeightGradStore and torch's per-stage W order
                start = free[r]
                end = start + durations(d, k)[2]
                events.append((r, "bwd", j, pipes[d][0][k][1], start, end))
            elif op[0] == "F":
                d, k, j, ready = forward_input(r, op[1])
                if ready is None:
                    break  # the producer's rank wakes this one
                start = max(free[r], ready)
                end = start + durations(d, k)[0]
                events.append((r, "fwd", j, pipes[d][0][k][1], start, end))
                finish_f(d, k, j, end)
            elif op[0] == "B":
                d, k, j, ready = backward_input(r, op[1])
                if ready is None:
                    break
                _, full, w, _ = durations(d, k)
                start = max(free[r], ready)
                end = start + (full - w if op[2] else full)
                events.append((r, "bwd", j, pipes[d][0][k][1], start, end))
                finish_b(r, d, k, j, end, op[2])
            else:  # F&B pair: both inputs first, then the overlapped passes
                df, kf, jf, ready_f = forward_input(r, op[1])
                db, kb, jb, ready_b = backward_input(r, op[2])
                if ready_f is None or ready_b is None:
                    break
                f, _, _, hide_f = durations(df, kf)
                _, full, _, hide_b = durations(db, kb)
                saving = pair_saving_s(f, hide_f / 2, full, hide_b / 2)
                start = max(free[r], ready_f, ready_b)
                mid = start + f - saving * f / (f + full) if f + full > 0 else start
                end = start + f + full - saving
                events.append((r, "fwd", jf, pipes[df][0][kf][1], start, mid))
                events.append((r, "bwd", jb, pipes[db][0][kb][1], mid, end))
                finish_f(df, kf, jf, end)  # both outputs are sent after the pair
                finish_b(r, db, kb, jb, end, False)
            busy[r] += end - start
            free[r] = end
            if op[0] != "F":
                last_end[r] = end
            ptr[r] += 1
    stuck = [r for r in range(pp) if ptr[r] < len(orders[r])]
    assert not stuck, f"{schedule} order deadlocked on ranks {stuck}"  # DeepSeek's: cannot
    return events, last_end, busy
