"""`meshplan run`'s engine: launch a plan, watch it, and on a fault exclude the node, re-plan
for the remaining nodes and resume from the latest checkpoint.

One attempt = one launch of the plan's torchrun commands (one subprocess per node, started
locally; the commands come from `launcher.artifacts.torchrun_commands`). While it runs the
supervisor polls the ranks' runtime records (`launcher.runtime`) and asks the detectors in
`launcher.monitor`. A hard fault (dead rank, failed node, hang) or a persistent straggler ends
the attempt: the node is excluded, the re-planner picks a layout for the nodes left, and the
next attempt resumes from the trainer's latest complete checkpoint, with MESHPLAN_FAULT_*
removed from the environment. Slow links are reported, not acted on.

Layout of the output directory (`-o DIR`; a second `meshplan run` with the same DIR keeps
appending to the same incident log and never touches the checkpoints):

    DIR/incidents.jsonl        one JSON line per incident (append, flush, fsync)
    DIR/ckpt/                  the trainer's --ckpt-dir (unless --ckpt-dir is given)
    DIR/attempt<K>/plan.yaml   the plan this attempt ran
    DIR/attempt<K>/launch/     its launch files (`meshplan launch` output, regenerated)
    DIR/attempt<K>/node<i>.log the node's torchrun output
    DIR/attempt<K>/monitor/    rank<R>.jsonl records and rank<R>.hb heartbeats
    DIR/run.json               summary of the run (written atomically at the end)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cost_models.specs import ClusterSpec, InfeasibleLayout, SpecError
from planner.fileio import write_atomic
from planner.planfile import Plan, PlanRequest, write_plan

from .monitor import (
    Incident,
    MonitorConfig,
    RankView,
    attribute_exit,
    find_dead,
    find_hang,
    find_slow_link,
    find_straggler,
    fold_records,
    read_new_records,
)
from .runtime import HEARTBEAT_ENV, MONITOR_DIR_ENV, NODE_ENV, heartbeat_path

log = logging.getLogger("meshplan.supervisor")

FAULT_PREFIX = "MESHPLAN_FAULT_"

Replanner = Callable[[Plan, ClusterSpec], Plan]
"""(previous plan, reduced cluster) -> new plan for the reduced cluster."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything `meshplan run` was asked to do besides the plan."""

    script: Path
    out_dir: Path
    script_args: tuple[str, ...] = ()
    steps: int | None = None
    ckpt_dir: Path | None = None
    """Default: out_dir/ckpt."""
    incident_log: Path | None = None
    """Default: out_dir/incidents.jsonl."""
    max_restarts: int = 3
    """Relaunches allowed after incidents; 0 stops at the first incident that needs one."""
    straggler_action: str = "exclude"
    """exclude: treat a persistent straggler like a failed node; log: report and go on."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    poll_s: float = 0.25
    heartbeat_s: float = 1.0
    exit_grace_s: float = 1.0
    """After a node process fails, keep reading records this long before blaming a rank."""
    teardown_grace_s: float = 5.0
    """SIGTERM, then SIGKILL after this long."""

    @property
    def ckpt(self) -> Path:
        return self.ckpt_dir or self.out_dir / "ckpt"

    @property
    def log_path(self) -> Path:
        return self.incident_log or self.out_dir / "incidents.jsonl"


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """How one launch ended: completed, or stopped by `incident`."""

    attempt: int
    plan_path: Path
    completed: bool
    incident: Incident | None
    exit_codes: dict[str, int | None]
    seconds: float


@dataclass(frozen=True, slots=True)
class RunResult:
    ok: bool
    attempts: tuple[AttemptResult, ...]
    incidents: tuple[Incident, ...]
    excluded_nodes: tuple[str, ...]
    final_plan: Path | None
    message: str


# -- incident log ----------------------------------------------------------------------------

class IncidentLog:
    """Append-only JSON-lines incident log, durable per line (flush + fsync)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, incident: Incident) -> None:
        with open(self.path, "ab") as fh:
            # a line cut short by a crash must not swallow the next one
            if fh.tell() > 0 and not _ends_with_newline(self.path):
                fh.write(b"\n")
            fh.write(incident.to_json().encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict]:
        """All readable incidents; corrupt lines are skipped with a warning."""
        out = []
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return out
        for i, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if isinstance(rec, dict) and "kind" in rec:
                out.append(rec)
            elif line.strip():
                log.warning("%s:%d: skipping corrupt incident line", self.path, i)
        return out


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


# -- re-planning -------------------------------------------------------------------------------

def reduce_cluster(cluster: ClusterSpec, excluded: set[str]) -> ClusterSpec:
    """`cluster` without the `excluded` nodes (measured link matrices shrunk to match)."""
    keep = [i for i, n in enumerate(cluster.nodes) if n.name not in excluded]
    if not keep:
        raise SpecError("every node has been excluded; nothing left to run on")

    def shrink(m: tuple[tuple[float, ...], ...] | None) -> tuple[tuple[float, ...], ...] | None:
        return None if m is None else tuple(tuple(m[i][j] for j in keep) for i in keep)

    return dataclasses.replace(cluster, nodes=tuple(cluster.nodes[i] for i in keep),
                               bandwidth_GBps=shrink(cluster.bandwidth_GBps),
                               latency_s=shrink(cluster.latency_s))


def replan_best(plan: Plan, cluster: ClusterSpec) -> Plan:
    """Default re-planner: `meshplan plan`'s answer for the reduced cluster — same model,
    sequence length, global batch size, dtype and the options the plan was made with (cost
    model, fixed degrees, recompute, headroom; defaults for a plan file without them). A
    fixed dp is dropped: it is derived from the GPU count, which just shrank.
    InfeasibleLayout when nothing fits."""
    # lazy: the planner is only needed after a fault
    from planner import engine
    from planner.options import Problem
    from planner.search import SearchSpace

    lay = plan.layout
    request = plan.request or PlanRequest("auto", SearchSpace(dtype=lay.dtype))
    prob = Problem(plan.model, cluster, lay.seq_len, lay.global_batch_size, lay.dtype,
                   request.cost_model)
    planned = engine.plan(prob, dataclasses.replace(request.space, dp=None), top_k=1)
    if not planned.result.plans:
        res = planned.result
        raise InfeasibleLayout(
            f"no layout of {plan.model.name} fits on {res.cluster.world_size} GPUs "
            f"(closest needs {res.nearest[0].peak_GiB:.1f} GiB)" if res.nearest else
            f"no layout of {plan.model.name} fits")
    return planned.plans[0]


# -- processes -------------------------------------------------------------------------------

def free_port() -> int:
    """An unused TCP port on localhost for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time in clock ticks, state) of a live process, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "(comm) ": state, ppid, ...
    return int(fields[1]), int(fields[19]), fields[0]


def process_tree(pid: int) -> dict[int, int]:
    """`pid` and its live descendants -> their start times. torchrun starts its workers in
    their own sessions, so killing torchrun's process group alone would orphan them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        info = _stat(int(entry.name)) if entry.name.isdigit() else None
        if info is not None:
            children.setdefault(info[0], []).append(int(entry.name))
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        info = _stat(p)
        if info is None or p in out:
            continue
        out[p] = info[1]
        todo.extend(children.get(p, []))
    return out


def _signal_known(known: dict[int, int], sig: int) -> None:
    """Signal each process we started (same pid *and* start time, so a recycled pid is never
    hit), and the process group it leads."""
    own_group = os.getpgrp()
    for pid, started in known.items():
        info = _stat(pid)
        if info is None or info[1] != started or info[2] == "Z":
            continue
        try:
            if os.getpgid(pid) == pid != own_group:  # a session/group leader: its whole group
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def teardown(procs: list[subprocess.Popen], known: dict[int, int], grace_s: float) -> None:
    """SIGTERM every node process (torchrun forwards it to its workers) and every process we
    saw under them, then SIGKILL whatever is left after `grace_s`: no orphans."""
    known = dict(known)
    for proc in procs:
        known.update(process_tree(proc.pid))
    _signal_known(known, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    _signal_known(known, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("node process %d did not exit after SIGKILL", proc.pid)


# -- one attempt -----------------------------------------------------------------------------

def expected_ranks(plan: Plan) -> dict[int, str]:
    """Global rank -> node name, as the plan places them (rank // gpus_per_node)."""
    gpn = plan.gpus_per_node
    return {r: plan.node_order[r // gpn] for r in range(plan.layout.world)}


def peer_groups(plan: Plan) -> dict[int, int]:
    """Ranks doing the same work (same pipeline stage) share a group id."""
    return {r: plan.coords(r).pp for r in range(plan.layout.world)}


def script_args_for(plan_path: Path, opts: RunOptions) -> tuple[str, ...]:
    """The trainer contract: --plan, --ckpt-dir and (if given) --steps, then the user's args."""
    args = ["--plan", str(plan_path), "--ckpt-dir", str(opts.ckpt)]
    if opts.steps is not None:
        args += ["--steps", str(opts.steps)]
    return (*args, *opts.script_args)


def node_env(cmd_env: dict[str, str], node: str, monitor_dir: Path, opts: RunOptions,
             strip_faults: bool) -> dict[str, str]:
    """The inherited environment + the launch's + the monitor's. On a relaunch the fault
    injection variables (MESHPLAN_FAULT_*) are removed."""
    env = dict(os.environ)
    env.update(cmd_env)
    if strip_faults:
        env = {k: v for k, v in env.items() if not k.startswith(FAULT_PREFIX)}
    env.update({MONITOR_DIR_ENV: str(monitor_dir), NODE_ENV: node,
                HEARTBEAT_ENV: str(opts.heartbeat_s)})
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM it when the supervisor dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG), so torchrun tears its workers down instead of orphaning them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: teardown() still covers normal exits
        pass


def start_nodes(plan: Plan, plan_path: Path, attempt_dir: Path, opts: RunOptions,
                strip_faults: bool) -> tuple[list[subprocess.Popen], list[str]]:
    """Start every node's torchrun locally, each in its own session; returns (procs, names)."""
    import sys

    dumps = attempt_dir / "dumps"
    dumps.mkdir(parents=True, exist_ok=True)
    from .artifacts import torchrun_commands  # lazy: only a launch needs it

    cmds = torchrun_commands(
        plan, str(opts.script), script_args=script_args_for(plan_path, opts),
        rdzv_endpoint=f"127.0.0.1:{free_port()}", run_id=f"meshplan-{os.getpid()}-{attempt_dir.name}",
        max_restarts=0, dump_dir=str(dumps), python=sys.executable)
    procs, names = [], []
    try:
        for cmd in cmds:
            env = node_env(cmd.env, cmd.node_name, attempt_dir / "monitor", opts, strip_faults)
            with open(attempt_dir / f"node{cmd.node_rank}.log", "wb") as out:
                procs.append(subprocess.Popen(list(cmd.argv), env=env, stdout=out,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True,
                                              preexec_fn=_term_with_parent))
            names.append(cmd.node_name)
    except BaseException:
        teardown(procs, {}, opts.teardown_grace_s)
        raise
    return procs, names


def _poll_records(monitor_dir: Path, views: dict[int, RankView], offsets: dict[int, int]) -> None:
    for path in monitor_dir.glob("rank*.jsonl"):
        digits = path.stem[4:]
        if not digits.isdigit():
            continue
        rank = int(digits)
        recs, offsets[rank], _ = read_new_records(path, offsets.get(rank, 0))
        if recs or rank not in views:
            views[rank] = fold_records(views.get(rank, RankView(rank)), recs)


def _heartbeats(monitor_dir: Path, ranks: dict[int, str], views: dict[int, RankView],
                known: dict[int, int], now: float) -> dict[int, float | None]:
    """Rank -> last sign of life: the heartbeat file's mtime, or `now` for a rank whose process
    we started and can see running (a GIL-holding C call can starve the heartbeat thread of a
    live rank for seconds; a process we can see needs no heartbeat)."""
    out: dict[int, float | None] = {}
    for rank in ranks:
        view = views.get(rank)
        pid = view.pid if view is not None else None
        if isinstance(pid, int) and pid in known and _running(pid, known[pid]):
            out[rank] = now
            continue
        try:
            out[rank] = heartbeat_path(monitor_dir, rank).stat().st_mtime
        except OSError:
            out[rank] = None
    return out


def _running(pid: int, started: int) -> bool:
    info = _stat(pid)
    return info is not None and info[1] == started and info[2] != "Z"


def watch(procs: list[subprocess.Popen], names: list[str], plan: Plan, monitor_dir: Path,
          opts: RunOptions, report: Callable[[Incident], None],
          known: dict[int, int]) -> tuple[Incident | None, dict[str, int | None]]:
    """Poll until the job completes (None) or an incident needs a relaunch (that incident).
    Incidents that need no action are passed to `report`. `known` collects the processes
    seen under the node processes (for teardown)."""
    expected, groups = expected_ranks(plan), peer_groups(plan)
    views: dict[int, RankView] = {}
    offsets: dict[int, int] = {}
    reported: set[tuple[str, object]] = set()
    launched_t, failed_t, tree_t, scored_through = time.time(), None, 0.0, -1
    while True:
        _poll_records(monitor_dir, views, offsets)
        codes = {name: p.poll() for name, p in zip(names, procs, strict=True)}
        now = time.time()
        if now - tree_t > 2.0:  # remember the workers, in case torchrun dies before them
            for p in procs:
                known.update(process_tree(p.pid))
            tree_t = now
        if all(c == 0 for c in codes.values()):
            return None, codes
        if any(c not in (None, 0) for c in codes.values()):
            failed_t = failed_t or now
            if now - failed_t >= opts.exit_grace_s or None not in codes.values():
                _poll_records(monitor_dir, views, offsets)
                return attribute_exit(views, codes, expected, time.time()), codes
        else:
            cfg = opts.monitor
            beats = _heartbeats(monitor_dir, expected, views, known, now)
            inc = (find_dead(views, beats, expected, launched_t, now, cfg)
                   or find_hang(views, now, cfg))
            if inc is not None:
                return inc, codes
        done = min((v.last_done_step for v in views.values()), default=-1)
        if done != scored_through:  # score only when every rank completed another step
            scored_through = done
            stop = _soft_incidents(views, opts, groups, reported, now, report)
            if stop is not None:
                return stop, codes
        time.sleep(opts.poll_s)


def _soft_incidents(views: dict[int, RankView], opts: RunOptions, groups: dict[int, int],
                    reported: set, now: float, report: Callable[[Incident], None]) -> Incident | None:
    """Stragglers and slow links, each reported once; returns a straggler that must stop the
    attempt (--on-straggler exclude), else None."""
    for inc in (find_straggler(views, opts.monitor, groups), find_slow_link(views, opts.monitor)):
        if inc is None or (inc.kind, inc.rank, inc.node) in reported:
            continue
        reported.add((inc.kind, inc.rank, inc.node))
        # detection time is now; the step's own end time stays as evidence
        inc = dataclasses.replace(inc, time_t=now, evidence={**inc.evidence, "step_end_t": inc.time_t})
        if inc.kind == "straggler" and opts.straggler_action == "exclude":
            return inc
        report(dataclasses.replace(inc, action="logged; no action"))
    return None


def run_attempt(plan: Plan, attempt_dir: Path, opts: RunOptions, strip_faults: bool,
                report: Callable[[Incident], None]) -> AttemptResult:
    """Write the plan, launch it, watch it, tear it down (always)."""
    from .artifacts import write_launch

    plan_path = attempt_dir / "plan.yaml"
    write_plan(plan, plan_path)
    # the launch files of this attempt's plan, for the record and for manual relaunches
    write_launch(plan, str(opts.script), attempt_dir / "launch",
                 script_args=script_args_for(plan_path, opts)[2:])
    t0 = time.monotonic()
    procs, names = start_nodes(plan, plan_path, attempt_dir, opts, strip_faults)
    known: dict[int, int] = {}
    try:
        incident, codes = watch(procs, names, plan, attempt_dir / "monitor", opts, report, known)
    finally:
        teardown(procs, known, opts.teardown_grace_s)
    attempt = int(attempt_dir.name.removeprefix("attempt"))
    return AttemptResult(attempt, plan_path, incident is None, incident, codes,
                         time.monotonic() - t0)


# -- the run ---------------------------------------------------------------------------------

def next_attempt_index(out_dir: Path) -> int:
    """Attempts of earlier `meshplan run`s in the same directory are kept; number on."""
    used = [int(p.name[7:]) for p in out_dir.glob("attempt*") if p.name[7:].isdigit()]
    return max(used, default=-1) + 1


def describe(plan: Plan) -> str:
    lay = plan.layout
    return (f"tp{lay.tp} pp{lay.pp} dp{lay.dp} cp{lay.cp} on {plan.nnodes} node(s) "
            f"({', '.join(plan.node_order)})")


def decide(incident: Incident, plan: Plan, restarts: int, opts: RunOptions,
           replan: Replanner) -> tuple[str, Plan | None]:
    """Policy: (action text, plan of the next attempt or None to stop).

    Within the restart budget, exclude the incident's node and re-plan for the nodes left;
    an incident not tied to a node relaunches the same plan."""
    if restarts >= opts.max_restarts:
        return f"stopped: restart budget ({opts.max_restarts}) spent", None
    if incident.node is None or incident.node not in plan.node_order:
        return "relaunch the same plan (no node to blame); resume from latest checkpoint", plan
    if plan.nnodes == 1:
        return f"stopped: {incident.node} was the last node", None
    try:
        new = replan(plan, reduce_cluster(plan.cluster, {incident.node}))
    except (SpecError, ValueError) as exc:
        return f"stopped: re-plan without {incident.node} failed: {exc}", None
    except Exception as exc:  # InfeasibleLayout and friends: a stop, never a traceback
        return f"stopped: no layout fits without {incident.node}: {exc}", None
    return (f"excluded node {incident.node}; re-planned to {describe(new)}; "
            f"resuming from the latest checkpoint"), new


def validate_options(opts: RunOptions) -> None:
    """SpecError (one actionable line) on bad options."""
    if not opts.script.is_file():
        raise SpecError(f"training script {opts.script} not found; pass --script PATH")
    if opts.out_dir.exists() and not opts.out_dir.is_dir():
        raise SpecError(f"output {opts.out_dir} exists and is not a directory; choose another -o DIR")
    if opts.max_restarts < 0:
        raise SpecError(f"--max-restarts must be >= 0, got {opts.max_restarts}")
    if opts.steps is not None and opts.steps < 1:
        raise SpecError(f"--steps must be >= 1, got {opts.steps}")
    if opts.straggler_action not in ("exclude", "log"):
        raise SpecError(f"--on-straggler must be exclude or log, got {opts.straggler_action!r}")
    if opts.poll_s <= 0 or opts.heartbeat_s <= 0:
        raise SpecError("--poll and --heartbeat must be positive seconds")
    if opts.monitor.heartbeat_timeout_s <= 2 * opts.heartbeat_s:
        raise SpecError(
            f"--dead-after {opts.monitor.heartbeat_timeout_s}s must exceed twice the heartbeat "
            f"interval ({opts.heartbeat_s}s), or live ranks look dead"
        )


def supervise(plan: Plan, opts: RunOptions, replan: Replanner = replan_best,
              echo: Callable[[str], None] = log.info) -> RunResult:
    """Run `plan` to completion through faults: launch, watch, exclude, re-plan, resume."""
    validate_options(opts)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    incident_log = IncidentLog(opts.log_path)
    earlier = incident_log.read()  # a restarted supervisor appends; corrupt lines only warn
    if earlier:
        echo(f"incident log {opts.log_path} already holds {len(earlier)} incident(s); appending")
    first = next_attempt_index(opts.out_dir)
    attempts: list[AttemptResult] = []
    incidents: list[Incident] = []
    excluded: list[str] = []

    def report(inc: Incident) -> None:
        incident_log.append(inc)
        incidents.append(inc)
        echo(f"incident: {inc.kind} rank {inc.rank} node {inc.node} step {inc.step}: {inc.action}")

    current, message = plan, ""
    while True:
        attempt_dir = opts.out_dir / f"attempt{first + len(attempts)}"
        echo(f"attempt {attempt_dir.name}: {describe(current)}")
        result = run_attempt(current, attempt_dir, opts, strip_faults=bool(attempts), report=report)
        attempts.append(result)
        if result.completed:
            message = f"completed after {len(attempts)} attempt(s), {len(incidents)} incident(s)"
            break
        action, nxt = decide(result.incident, current, len(attempts) - 1, opts, replan)
        report(dataclasses.replace(result.incident, action=action))
        if nxt is None:
            message = f"{action} (see {attempt_dir}/node*.log and {opts.log_path})"
            break
        if nxt is not current:
            excluded.append(result.incident.node)
        current = nxt
    ok = attempts[-1].completed
    run = RunResult(ok, tuple(attempts), tuple(incidents), tuple(excluded),
                    attempts[-1].plan_path, message)
    write_atomic(opts.out_dir / "run.json", json.dumps(run_summary(run), indent=2) + "\n")
    return run


def run_summary(run: RunResult) -> dict:
    """The run.json object."""
    return {
        "ok": run.ok, "message": run.message, "excluded_nodes": list(run.excluded_nodes),
        "final_plan": str(run.final_plan) if run.final_plan else None,
        "attempts": [{"attempt": a.attempt, "plan": str(a.plan_path), "completed": a.completed,
                      "incident": a.incident.kind if a.incident else None,
                      "exit_codes": a.exit_codes, "seconds": round(a.seconds, 3)}
                     for a in run.attempts],
        "incidents": [json.loads(i.to_json()) for i in run.incidents],
    }
