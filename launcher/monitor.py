"""Fault detection over the runtime hook's records: dead ranks, hangs, stragglers, slow links.

Pure functions and frozen dataclasses over the per-rank JSON lines that `launcher.runtime`
writes (`rank<R>.jsonl`) plus heartbeat times; no processes, so every detector is unit-testable
with synthetic records. The supervisor polls the files, folds new records into `RankView`s with
`fold_records`, and asks the detectors.

The detectors follow C4 (Dong et al., "Boosting Large-scale Parallel Training Efficiency with
C4", 2024): collective work is periodic and homogeneous across ranks, so a rank that stops
(dead), a job that stops progressing (hang), a rank that is consistently slower than its peers
(straggler) and communication that is slow only where one node takes part (slow link) stand out
against the other ranks and the job's own recent period. In a hang the culprit is the rank that
never entered the collective the others wait in, like the "missing ranks" of the NCCL flight
recorder.
"""

from __future__ import annotations

import bisect
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("meshplan.monitor")

HISTORY_STEPS = 64
"""Completed steps kept per rank (bounded memory for long jobs)."""
SCAN_STEPS = 32
"""Straggler/slow-link detectors look at the latest this many common steps per poll."""


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """Detection thresholds. Times in seconds."""

    heartbeat_timeout_s: float = 5.0
    """A rank whose heartbeat is older than this, with no close/signal record, is dead."""
    hang_k: float = 3.0
    """Hang when no rank progressed for max(hang_k x median step period, hang_floor_s)."""
    hang_floor_s: float = 10.0
    """Tight by default: long legitimate pauses are announced as sections (`mon.section`)."""
    section_timeout_s: float = 900.0
    """While a rank is in an announced section (checkpoint save, evaluation) a hang needs this."""
    startup_timeout_s: float = 300.0
    """Before every rank finished 2 steps: the limit for starting up and for progress."""
    straggler_threshold: float = 0.7
    """A rank's relative score (median peer time / own time) below this is slow."""
    straggler_window_steps: int = 3
    """Each step's score uses the median over this many latest steps (rolling median)."""
    straggler_windows: int = 3
    """Consecutive slow steps before a rank is flagged as a persistent straggler."""
    straggler_min_excess_s: float = 0.1
    """Ignore slowness smaller than this in absolute terms (timer and scheduler noise). With
    every collective hooked, compute_s is pure compute, and OS scheduling on a shared CPU moves
    a ~0.1 s compute by 2x for several steps; a real 1.5x+ straggler on a >= 0.2 s compute
    step still exceeds it."""
    slow_link_factor: float = 3.0
    """A rank's collective transfer time above this x the peers' median is an outlier."""
    slow_link_min_s: float = 0.05
    """Ignore a per-step transfer excess below this (summed over every hooked collective of
    the step, a descheduled rank on a shared CPU reaches tens of ms)."""
    slow_link_windows: int = 5
    """Consecutive steps with the same outlier set before a slow link is reported."""

    def __post_init__(self) -> None:
        if not 0.0 < self.straggler_threshold < 1.0:
            raise ValueError(f"straggler threshold {self.straggler_threshold} must be in (0, 1)")
        for name in ("heartbeat_timeout_s", "hang_k", "hang_floor_s", "startup_timeout_s",
                     "section_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if min(self.straggler_window_steps, self.straggler_windows, self.slow_link_windows) < 1:
            raise ValueError("straggler/slow-link windows must be at least 1 step")


@dataclass(frozen=True, slots=True)
class Collective:
    """One pass of a rank through a collective: wall-clock enter/leave (time.time())."""

    name: str
    enter_t: float
    leave_t: float


@dataclass(frozen=True, slots=True)
class StepSample:
    """What one rank reported for one completed step. Seconds; *_t are wall-clock."""

    step: int
    begin_t: float
    end_t: float
    step_s: float
    comm_s: float
    compute_s: float
    collectives: tuple[Collective, ...] = ()
    loss: float | None = None

    @property
    def first_enter_t(self) -> float | None:
        return self.collectives[0].enter_t if self.collectives else None


@dataclass(frozen=True, slots=True)
class RankView:
    """Everything the supervisor knows about one rank, folded from its records."""

    rank: int
    node: str = ""
    pid: int | None = None
    started_t: float | None = None
    last_t: float | None = None
    """Time of the latest record of any kind (progress marker)."""
    current_step: int = -1
    """Step of the latest `begin`."""
    open_comm: tuple[str, int, float] | None = None
    """(name, step, enter_t) of a collective entered and not yet left."""
    terminal: str | None = None
    """'close' (script finished its loop) or 'signal' (stopped from outside), else None."""
    terminal_t: float | None = None
    samples: tuple[StepSample, ...] = ()
    """Latest completed steps, oldest first, at most HISTORY_STEPS."""
    partial: tuple[Collective, ...] = ()
    """Collectives of the step in progress."""
    begin_t: float | None = None
    open_async: tuple[tuple[int, str, int, float], ...] = ()
    """(id, name, step, enter_t) of asynchronous collectives issued and not yet completed."""
    open_section: tuple[str, float] | None = None
    """(name, open time) of an announced section (`mon.section`) not yet closed."""

    @property
    def last_done_step(self) -> int:
        return self.samples[-1].step if self.samples else -1

    @property
    def waiting_in(self) -> tuple[str, int, float] | None:
        """The collective the rank is blocked in: the open synchronous one, else the oldest
        asynchronous one still in flight."""
        if self.open_comm is not None:
            return self.open_comm
        return self.open_async[0][1:] if self.open_async else None


@dataclass(frozen=True, slots=True)
class Incident:
    """One detected fault; `to_json` is the incident-log line."""

    time_t: float
    kind: str
    """dead | hang | straggler | slow_link | exit."""
    rank: int | None
    node: str | None
    step: int | None
    evidence: dict = field(default_factory=dict)
    action: str = ""

    @property
    def hard(self) -> bool:
        """Hard faults stop the job: the node is excluded at once."""
        return self.kind in ("dead", "hang", "exit")

    def to_json(self) -> str:
        return json.dumps({"time": self.time_t, "kind": self.kind, "rank": self.rank,
                           "node": self.node, "step": self.step, "evidence": self.evidence,
                           "action": self.action}, sort_keys=True)


# -- reading -------------------------------------------------------------------------------

def read_new_records(path: Path, offset: int) -> tuple[list[dict], int, int]:
    """Complete JSON-object lines of `path` after byte `offset`.

    Returns (records, new offset, corrupt lines skipped). A trailing line without a newline
    is left for the next call (the writer may be mid-line); a corrupt line is skipped with a
    warning, never raised.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset, 0
    end = data.rfind(b"\n") + 1
    records, bad = [], 0
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("t"), int | float):
            bad += 1
            log.warning("%s: skipping corrupt record %r", path, line[:80])
            continue
        records.append(rec)
    return records, offset + end, bad


def fold_records(view: RankView, records: list[dict]) -> RankView:
    """`view` updated with `records` (in file order). Unknown events are ignored."""
    st = {name: getattr(view, name) for name in RankView.__slots__}
    samples, partial = list(st["samples"]), list(st["partial"])
    st["open_async"] = list(st["open_async"])
    for rec in records:
        ev, t = rec.get("ev"), float(rec["t"])
        st["last_t"] = t if st["last_t"] is None else max(st["last_t"], t)
        try:
            _apply(st, samples, partial, ev, t, rec)
        except (KeyError, TypeError, ValueError):
            log.warning("rank %d: skipping malformed %r record", view.rank, ev)
    st["samples"], st["partial"] = tuple(samples[-HISTORY_STEPS:]), tuple(partial)
    st["open_async"] = tuple(st["open_async"][-HISTORY_STEPS:])
    return RankView(**st)


def _apply(st: dict, samples: list, partial: list, ev: str, t: float, rec: dict) -> None:
    if ev == "start":
        st.update(started_t=t, node=str(rec.get("node", "")), pid=rec.get("pid"))
    elif ev == "begin":
        st.update(current_step=int(rec["step"]), begin_t=t, open_comm=None)
        partial.clear()
    elif ev == "enter" and "id" in rec:  # asynchronous (hooked, async_op=True)
        st["open_async"].append((int(rec["id"]), str(rec["name"]), int(rec["step"]), t))
    elif ev == "enter":
        st["open_comm"] = (str(rec["name"]), int(rec["step"]), t)
    elif ev == "leave" and "id" in rec:
        cid = int(rec["id"])
        opened = [o for o in st["open_async"] if o[0] == cid]
        st["open_async"] = [o for o in st["open_async"] if o[0] != cid]
        enter_t = opened[0][3] if opened else t - float(rec.get("dur_s", 0.0))
        if int(rec["step"]) == st["current_step"]:
            partial.append(Collective(str(rec["name"]), enter_t, t))
    elif ev == "leave":
        opened = st["open_comm"]
        enter_t = opened[2] if opened else t - float(rec.get("dur_s", 0.0))
        partial.append(Collective(str(rec["name"]), enter_t, t))
        st["open_comm"] = None
    elif ev == "section":
        st["open_section"] = (str(rec["name"]), t) if rec.get("open") else None
    elif ev == "end":
        loss = rec.get("loss")
        samples.append(StepSample(
            int(rec["step"]), st["begin_t"] if st["begin_t"] is not None else t - rec["step_s"],
            t, float(rec["step_s"]), float(rec["comm_s"]), float(rec["compute_s"]),
            tuple(partial), None if loss is None else float(loss)))
        partial.clear()
    elif ev in ("close", "signal"):
        if st["terminal"] != "signal":  # a signal outranks the close its handler may cause
            st.update(terminal=ev, terminal_t=t)


# -- dead ranks ------------------------------------------------------------------------------

def find_dead(views: dict[int, RankView], heartbeat_t: dict[int, float | None],
              expected: dict[int, str], launched_t: float, now: float,
              cfg: MonitorConfig) -> Incident | None:
    """A rank whose heartbeat stopped without a close/signal record, or that never started.

    `heartbeat_t`: rank -> last heartbeat (file mtime) or None; `expected`: rank -> node name
    for every rank of the launch. Among several dead ranks the one that went quiet first is
    the culprit (the others usually died of it).
    """
    stale = []
    for rank, node in expected.items():
        view = views.get(rank)
        beat = heartbeat_t.get(rank)
        if view is None or view.started_t is None:
            if now - launched_t > cfg.startup_timeout_s:
                stale.append((launched_t, rank, node, None))
            continue
        if view.terminal is None and beat is not None and now - beat > cfg.heartbeat_timeout_s:
            stale.append((beat, rank, view.node or node, view))
    if not stale:
        return None
    beat, rank, node, view = min(stale, key=lambda item: item[0])
    evidence = {"detected_by": "heartbeat", "heartbeat_age_s": round(now - beat, 3),
                "timeout_s": cfg.heartbeat_timeout_s,
                "silent_ranks": sorted(r for _, r, _, _ in stale)}
    if view is None:
        evidence["detected_by"] = "never started"
    else:
        evidence["last_step"] = view.current_step
    return Incident(now, "dead", rank, node, view.current_step if view else None, evidence)


def attribute_exit(views: dict[int, RankView], exit_codes: dict[str, int | None],
                   expected: dict[int, str], now: float) -> Incident:
    """The culprit when node processes (torchrun agents) exited with an error.

    `exit_codes`: node -> exit status (None while still running). Ranks stopped from outside
    wrote a `signal` record and ranks that finished wrote `close`; of the rest, the one whose
    records stopped first is blamed (peers that failed because of it ran on to the next
    collective before they noticed). A rank that never started on a failed node comes first.
    A quiet rank on a node whose process exited outranks one on a node still running, and a
    node process killed by a signal (negative status: the host or its agent was killed)
    outranks one that exited with an error: record times cross the network and a peer stuck
    in a collective can look quieter than the rank that died.
    """
    failed = {node: code for node, code in exit_codes.items() if code not in (None, 0)}
    candidates = []
    for rank, node in expected.items():
        view = views.get(rank)
        if view is None or view.started_t is None:
            if node in failed:
                candidates.append(((0, float("-inf")), rank, node, None))
            continue
        if view.terminal is None:
            where = view.node or node
            code = failed.get(where)
            tier = 2 if code is None else (0 if code < 0 else 1)
            candidates.append(((tier, view.last_t or view.started_t), rank, where, view))
    evidence = {"detected_by": "process exit", "exit_codes": failed}
    if not candidates:
        # every rank closed or was stopped: the script or an agent failed, not a rank. Blame
        # a node only if it alone failed (a lost agent); a script error fails them all.
        node = next(iter(failed)) if len(failed) == 1 else None
        return Incident(now, "exit", None, node, None, evidence)
    (_, last_t), rank, node, view = min(candidates, key=lambda item: (item[0], item[1]))
    evidence["quiet_ranks"] = sorted(r for _, r, _, _ in candidates)
    if view is not None:
        evidence["last_record_t"] = last_t
        evidence["last_step"] = view.current_step
    return Incident(now, "dead", rank, node, view.current_step if view else None, evidence)


# -- hangs -----------------------------------------------------------------------------------

def median_period_s(views: dict[int, RankView]) -> float | None:
    """Median time between consecutive step ends over all ranks; None before every reporting
    rank has two consecutive completed steps (start-up)."""
    periods = []
    for view in views.values():
        mine = [b.end_t - a.end_t for a, b in zip(view.samples, view.samples[1:], strict=False)
                if b.step == a.step + 1]
        if not mine and view.terminal is None:
            return None
        periods.extend(mine)
    return statistics.median(periods) if periods else None


def stall_s(views: dict[int, RankView], now: float, cfg: MonitorConfig) -> tuple[float, float]:
    """(seconds since any rank last wrote a record, the hang limit outside sections:
    max(hang_k x median period, hang_floor_s), or the start-up timeout before the period is
    known). A stall past the limit is worth a look at the processes' states even inside a
    section (`find_hang`)."""
    stamps = [v.last_t for v in views.values() if v.last_t is not None]
    period = median_period_s(views)
    limit_s = cfg.startup_timeout_s if period is None else max(cfg.hang_k * period,
                                                              cfg.hang_floor_s)
    return (now - max(stamps) if stamps else 0.0), limit_s


def find_hang(views: dict[int, RankView], now: float, cfg: MonitorConfig,
              stopped: frozenset[int] = frozenset()) -> Incident | None:
    """No rank has written a record for max(hang_k x median period, hang_floor_s) seconds
    (the start-up timeout before the period is known; `section_timeout_s` while a rank is in
    an announced section, unless a rank is seen stopped: a process in state T makes no
    progress in any section). The culprit is a rank the supervisor sees stopped (`stopped`:
    process state T, e.g. SIGSTOP), else the live rank missing from the collective most
    waiting ranks are blocked in."""
    live = {r: v for r, v in views.items() if v.terminal is None and v.last_t is not None}
    if not live:
        return None
    stalled_s, limit_s = stall_s(views, now, cfg)
    sections = sorted({v.open_section[0] for v in live.values() if v.open_section})
    if sections and not any(r in live for r in stopped):
        limit_s = max(limit_s, cfg.section_timeout_s)
    if stalled_s < limit_s:
        return None
    waiting: dict[tuple[str, int], list[int]] = {}
    for rank, view in live.items():
        if view.waiting_in is not None:
            waiting.setdefault(view.waiting_in[:2], []).append(rank)
    evidence = {"stalled_s": round(stalled_s, 3), "limit_s": round(limit_s, 3),
                "median_period_s": median_period_s(views),
                "rank_steps": {str(r): v.current_step for r, v in sorted(live.items())}}
    if sections:
        evidence["sections"] = sections
    culprit = None
    frozen = sorted(r for r in stopped if r in live)
    if frozen:
        evidence["stopped_ranks"] = frozen
        culprit = frozen[0]
        if waiting:
            key, ranks = max(waiting.items(), key=lambda kv: (len(kv[1]), kv[0][1]))
            evidence.update(collective=key[0], collective_step=key[1],
                            waiting_ranks=sorted(ranks))
    elif waiting:
        key, ranks = max(waiting.items(), key=lambda kv: (len(kv[1]), kv[0][1]))
        missing = sorted(r for r in live if r not in ranks)
        evidence.update(collective=key[0], collective_step=key[1], waiting_ranks=sorted(ranks),
                        missing_ranks=missing)
        if missing:
            culprit = min(missing, key=lambda r: (live[r].current_step, live[r].last_t, r))
    else:
        steps = {v.current_step for v in live.values()}
        if len(steps) > 1:  # everyone computing, one behind: the one behind holds the rest
            culprit = min(live, key=lambda r: (live[r].current_step, r))
            ahead = max(steps)
            evidence["behind_ranks"] = sorted(r for r, v in live.items() if v.current_step < ahead)
    node = live[culprit].node if culprit is not None else None
    step = live[culprit].current_step if culprit is not None else None
    return Incident(now, "hang", culprit, node, step, evidence)


# -- stragglers ------------------------------------------------------------------------------

def _common_steps(views: dict[int, RankView]) -> tuple[list[int], dict[int, dict[int, StepSample]]]:
    by_rank = {r: {s.step: s for s in v.samples} for r, v in views.items() if v.samples}
    if len(by_rank) < 2:
        return [], by_rank
    common = set.intersection(*(set(d) for d in by_rank.values()))
    return sorted(common), by_rank


def step_scores(by_rank: dict[int, dict[int, StepSample]], steps: list[int],
                groups: dict[int, int]) -> dict[int, tuple[float, float, float]]:
    """Relative score of each rank over `steps` (a window): (score, excess_s, compute_s).

    score = min(compute score, arrival score), both 1.0 for a typical rank:
    compute score = median compute_s of the rank's peers / its own (rolling medians over the
    window); arrival score = peer compute / (peer compute + lateness), lateness being how much
    longer than its peers' median the rank took from step begin to its first collective (the
    rank the others keep waiting for). Peers are the ranks in the same `groups` id (e.g. the same
    pipeline stage: ranks doing the same work).
    """
    compute = {r: statistics.median(d[s].compute_s for s in steps) for r, d in by_rank.items()}
    late: dict[int, list[float]] = {r: [] for r in by_rank}
    for s in steps:
        # time from step begin to the first collective: immune to clock skew across hosts
        enters = {r: d[s].first_enter_t - d[s].begin_t for r, d in by_rank.items()
                  if d[s].first_enter_t is not None}
        for r, peer in peer_medians(enters, groups).items():
            late[r].append(max(enters[r] - peer, 0.0))
    out = {}
    for r, peer_s in peer_medians(compute, groups).items():
        lateness = statistics.median(late[r]) if late[r] else 0.0
        compute_score = peer_s / compute[r] if compute[r] > 0 else 1.0
        arrival_score = peer_s / (peer_s + lateness) if peer_s + lateness > 0 else 1.0
        excess = max(compute[r] - peer_s, lateness)
        out[r] = (min(compute_score, arrival_score), excess, compute[r])
    return out


def peer_medians(values: dict[int, float], groups: dict[int, int]) -> dict[int, float]:
    """For each rank, the median of the other ranks' values in its group (ranks alone in their
    group are left out). O(n log n): one sort per group, then each rank's median without
    itself is read off the sorted list by shifting the middle index past its own slot."""
    members: dict[int, list[int]] = {}
    for r in values:
        members.setdefault(groups.get(r, 0), []).append(r)
    out = {}
    for ranks in members.values():
        if len(ranks) < 2:
            continue
        order = sorted(ranks, key=lambda r: values[r])
        vals = [values[r] for r in order]
        m = len(vals) - 1  # peers of each rank
        for i, r in enumerate(order):
            mid = m // 2
            out[r] = (_kth_without(vals, i, mid) if m % 2 else
                      0.5 * (_kth_without(vals, i, mid - 1) + _kth_without(vals, i, mid)))
    return out


def _kth_without(vals: list[float], i: int, k: int) -> float:
    """The k-th smallest of sorted `vals` once index i is removed."""
    return vals[k] if k < i else vals[k + 1]


def find_straggler(views: dict[int, RankView], cfg: MonitorConfig,
                   groups: dict[int, int] | None = None) -> Incident | None:
    """The first rank whose score stays below the threshold for `straggler_windows`
    consecutive steps (each scored over the last `straggler_window_steps` steps), counting only
    steps every reporting rank completed. Evaluated per step from the records, so the
    detection step does not depend on how often the supervisor polls."""
    live = {r: v for r, v in views.items() if v.terminal is None}
    steps, by_rank = _common_steps(live)
    steps = steps[-SCAN_STEPS:]
    groups = groups or {}
    run: dict[int, list[tuple[int, float]]] = {}
    w = cfg.straggler_window_steps
    for i in range(len(steps)):
        window = steps[max(0, i - w + 1): i + 1]
        scores = step_scores(by_rank, window, groups)
        for rank in by_rank:
            score, excess, _ = scores.get(rank, (1.0, 0.0, 0.0))
            if score < cfg.straggler_threshold and excess >= cfg.straggler_min_excess_s:
                run.setdefault(rank, []).append((steps[i], round(score, 3)))
            else:
                run.pop(rank, None)
            if len(run.get(rank, ())) >= cfg.straggler_windows:
                slow = run[rank]
                peers = [scores[q][2] for q in scores if q != rank]
                evidence = {"scores": [sc for _, sc in slow], "first_slow_step": slow[0][0],
                            "threshold": cfg.straggler_threshold,
                            "compute_s": round(scores[rank][2], 6),
                            "peer_compute_s": round(statistics.median(peers), 6) if peers else None,
                            "window_steps": w}
                return Incident(by_rank[rank][steps[i]].end_t, "straggler", rank,
                                live[rank].node, steps[i], evidence)
    return None


# -- slow links ------------------------------------------------------------------------------

def transfer_s(by_rank: dict[int, dict[int, StepSample]], step: int) -> dict[int, float]:
    """Per rank, the time its collectives of `step` took after the last peer arrived.

    A collective cannot finish before the last member of its group entered, so for each pass
    we subtract the latest enter (of any rank) that precedes its leave: what remains is
    transfer time, not waiting. Groups are not known here, so this is an estimate that can
    only err low."""
    enters = sorted(c.enter_t for d in by_rank.values() for c in d[step].collectives)
    out = {}
    for r, d in by_rank.items():
        total = 0.0
        for c in d[step].collectives:
            i = bisect.bisect_right(enters, c.leave_t)  # latest enter at or before the leave
            last = enters[i - 1] if i else c.enter_t
            total += max(c.leave_t - max(last, c.enter_t), 0.0)
        out[r] = total
    return out


def find_slow_link(views: dict[int, RankView], cfg: MonitorConfig) -> Incident | None:
    """Communication outliers concentrated on one node (or one pair of nodes) for
    `slow_link_windows` consecutive steps. The baseline is the lower quartile of the ranks'
    transfer times, so up to 3/4 of the ranks may be affected. When every rank of a
    synchronous collective is slowed alike (one ring over all ranks) the link cannot be
    localised from timings and nothing is reported."""
    live = {r: v for r, v in views.items() if v.terminal is None}
    steps, by_rank = _common_steps(live)
    steps = steps[-SCAN_STEPS:]
    nodes = {r: live[r].node for r in by_rank}
    suspect, count = None, 0
    for s in steps:
        xfer = transfer_s(by_rank, s)
        ordered = sorted(xfer.values())
        base = ordered[len(ordered) // 4]
        slow = sorted(r for r, x in xfer.items()
                      if x > cfg.slow_link_factor * base and x - base >= cfg.slow_link_min_s)
        where = tuple(sorted({nodes[r] for r in slow}))
        if not slow or len(slow) == len(xfer) or len(where) > 2:
            suspect, count = None, 0
            continue
        count = count + 1 if where == suspect else 1
        suspect = where
        if count >= cfg.slow_link_windows:
            evidence = {"nodes": list(where), "ranks": slow, "transfer_s": {
                str(r): round(x, 6) for r, x in sorted(xfer.items())},
                "baseline_s": round(base, 6), "steps": count}
            node = where[0] if len(where) == 1 else "<->".join(where)
            return Incident(by_rank[slow[0]][s].end_t, "slow_link", None, node, s, evidence)
    return None
