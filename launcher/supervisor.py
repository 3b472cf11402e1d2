"""`meshplan run`'s engine: launch a plan, watch it, and on a fault exclude the node, re-plan
for the remaining nodes and resume from the latest checkpoint.

One attempt = one launch of the plan's torchrun commands (one subprocess per node, started
locally; the commands come from `launcher.artifacts.torchrun_commands`). While it runs the
supervisor polls the ranks' runtime records (`launcher.runtime`) and asks the detectors in
`launcher.monitor`. A hard fault (dead rank, failed node, hang) or a persistent straggler ends
the attempt: the node is excluded, the re-planner picks a layout for the nodes left, and the
next attempt resumes from the trainer's latest complete checkpoint, with MESHPLAN_FAULT_*
removed from the environment. Slow links are reported, not acted on: from the ranks'
collective timings where they localise one (`monitor.find_slow_link`), and from the node
agents' host-pair probes (`launcher.link_probe`) on multi-host launches.

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
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cost_models.specs import ClusterSpec, InfeasibleLayout, SpecError
from planner.fileio import write_atomic
from planner.planfile import Plan, PlanRequest, write_plan

from .collector import COLLECTOR_ENV, Collector
from .link_probe import LinkTable, ProbeConfig, find_slow_pair
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
    stall_s,
)
from .procs import _stat, process_tree, teardown  # noqa: F401  (re-exported)
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
    launcher: str = "local"
    """How node agents start: local | netns | ssh | srun (see `agent_argv`)."""
    hosts: tuple[str, ...] = ()
    """Per node of the first plan (its node order): netns name, ssh host or SLURM node."""
    addresses: tuple[str, ...] = ()
    """Per host: the address other hosts reach it at [default: the host name itself]; node 0's
    of each attempt is the rendezvous endpoint (a netns name is no address)."""
    host_map: tuple[tuple[str, str, str], ...] = ()
    """(plan node name, host, address): set by `supervise` from hosts/addresses."""
    collector_bind: str = "127.0.0.1"
    """Where the record collector listens (0.0.0.0 for remote hosts)."""
    collector_host: str | None = None
    """The address ranks use to reach the collector [default: collector_bind, or this host's
    name when it listens on every interface]."""
    extra_env: tuple[tuple[str, str], ...] = ()
    """Added to every node's environment (e.g. GLOO_SOCKET_IFNAME)."""
    python: str | None = None
    """Python on the nodes [default: this interpreter]."""
    precompute: bool = True
    """Plan for N-1 and N-2 nodes in the background while the job runs."""
    link_probe: ProbeConfig | None = field(default_factory=ProbeConfig)
    """Host-pair link probes between the node agents (netns, ssh and srun launches with 3 or
    more hosts; see `launcher.link_probe`); None: off."""

    @property
    def ckpt(self) -> Path:
        return self.ckpt_dir or self.out_dir / "ckpt"

    @property
    def log_path(self) -> Path:
        return self.incident_log or self.out_dir / "incidents.jsonl"

    @property
    def reach_collector(self) -> str:
        if self.collector_host:
            return self.collector_host
        return socket.gethostname() if self.collector_bind in ("0.0.0.0", "::", "") else self.collector_bind


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """How one launch ended: completed, or stopped by `incident`."""

    attempt: int
    plan_path: Path
    completed: bool
    incident: Incident | None
    exit_codes: dict[str, int | None]
    seconds: float
    started_t: float = 0.0
    """Wall-clock time the node agents were started (time.time())."""
    transport: dict = field(default_factory=dict)
    """The collector's counts for this attempt: received, lost, duplicates, connections."""
    poll_cpu_s: float = 0.0
    """CPU seconds the supervisor's watch loop used (for the overhead per step)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    ok: bool
    attempts: tuple[AttemptResult, ...]
    incidents: tuple[Incident, ...]
    excluded_nodes: tuple[str, ...]
    final_plan: Path | None
    message: str
    recoveries: tuple[dict, ...] = ()
    """Per relaunch: incident kind, re-plan seconds, whether the plan was precomputed, and
    seconds from detection to the next attempt's start."""


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
             strip_faults: bool, collector: str | None = None) -> dict[str, str]:
    """The inherited environment + the launch's + the monitor's. On a relaunch the fault
    injection variables (MESHPLAN_FAULT_*) are removed."""
    env = dict(os.environ)
    env.update(cmd_env)
    env.update(dict(opts.extra_env))
    if strip_faults:
        env = {k: v for k, v in env.items() if not k.startswith(FAULT_PREFIX)}
    env.update({MONITOR_DIR_ENV: str(monitor_dir), NODE_ENV: node,
                HEARTBEAT_ENV: str(opts.heartbeat_s)})
    if collector:
        env[COLLECTOR_ENV] = collector
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM it when the supervisor dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG), so the agent tears torchrun down instead of orphaning it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: teardown() still covers normal exits
        pass


LAUNCHERS = ("local", "netns", "ssh", "srun")


def agent_argv(opts: RunOptions, node: str, host: str, argv: tuple[str, ...],
               env: dict[str, str], collector: str | None,
               probe: tuple[str, ...] = ()) -> list[str]:
    """The command that starts node `node`'s agent (running torchrun `argv`) on `host`.

    local: the agent directly; netns: `ip netns exec HOST`; srun: one task on node HOST of
    the current allocation (environment exported by srun); ssh: `ssh HOST` with the node's
    environment written out as `env K=V ...` (ssh carries none) and --stdin-eof-stops, since
    ssh forwards no signals but closes the remote stdin when its client is killed. `probe`:
    the agent's link-probe arguments (`probe_args`)."""
    python = opts.python or sys.executable
    agent = [python, "-m", "launcher.agent", "--node", node, "--grace", str(opts.teardown_grace_s)]
    if collector:
        agent += ["--collector", collector, *probe]
    if opts.launcher == "local":
        return [*agent, "--", *argv]
    if opts.launcher == "netns":
        return ["ip", "netns", "exec", host, *agent, "--", *argv]
    if opts.launcher == "srun":
        # every CPU of the node to the agent's torchrun and its workers (a step task gets one
        # by default); the batch step's own CPUs are not counted against the step
        cpus = os.environ.get("SLURM_CPUS_ON_NODE", "1")
        return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--export=ALL",
                f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1", *agent, "--", *argv]
    inherited = set(os.environ.items())
    words = ["cd", os.getcwd(), "&&", "exec", "env",
             *(f"{k}={v}" for k, v in sorted(env.items()) if (k, v) not in inherited
               or k.startswith(("MESHPLAN_", "TORCH", "GLOO_", "NCCL_", "OMP_", "PYTHONPATH"))),
             *agent, "--stdin-eof-stops", "--", *argv]
    return ["ssh", "-o", "BatchMode=yes", host, " ".join(shlex.quote(w) for w in words)]


PROBE_PORT_BASE = 29600
"""Link-probe sinks listen on PROBE_PORT_BASE + attempt % 100 of each host's address."""


def probe_args(opts: RunOptions, plan: Plan, node: str, addr: dict[str, str],
               attempt: int) -> tuple[str, ...]:
    """The agent arguments that make node `node` probe the plan's other nodes, or () when
    probing is off, the launch is on one machine, or fewer than 3 hosts have addresses (one
    pair has nothing to be compared with)."""
    cfg = opts.link_probe
    nodes = [n for n in plan.node_order if n in addr]
    if (cfg is None or cfg.period_s <= 0 or opts.launcher == "local" or len(nodes) < 3
            or node not in addr):
        return ()
    port = PROBE_PORT_BASE + attempt % 100
    peers = ",".join(f"{n}={addr[n]}:{port}" for n in nodes if n != node)
    return ("--probe-listen", f"{addr[node]}:{port}", "--probe-peers", peers,
            "--probe-every", str(cfg.period_s), "--probe-bytes", str(cfg.nbytes))


def start_nodes(plan: Plan, plan_path: Path, attempt_dir: Path, opts: RunOptions,
                strip_faults: bool, collector: str | None = None,
                ) -> tuple[list[subprocess.Popen], list[str]]:
    """Start every node's agent (which runs its torchrun), each in its own session, with the
    run's launcher; returns (procs, names)."""
    dumps = attempt_dir / "dumps"
    dumps.mkdir(parents=True, exist_ok=True)
    from .artifacts import torchrun_commands  # lazy: only a launch needs it

    hosts = {node: host for node, host, _ in opts.host_map}
    addr = {node: a for node, _, a in opts.host_map}
    rdzv = addr.get(plan.node_order[0], "127.0.0.1") if opts.launcher != "local" else "127.0.0.1"
    # a remote rendezvous port cannot be probed from here: one per attempt, away from 29500
    attempt = int(attempt_dir.name[7:] or 0)
    port = free_port() if opts.launcher == "local" else 29400 + attempt % 100
    cmds = torchrun_commands(
        plan, str(opts.script), script_args=script_args_for(plan_path, opts),
        rdzv_endpoint=f"{rdzv}:{port}", run_id=f"meshplan-{os.getpid()}-{attempt_dir.name}",
        max_restarts=0, dump_dir=str(dumps), python=opts.python or sys.executable)
    procs, names = [], []
    try:
        for cmd in cmds:
            env = node_env(cmd.env, cmd.node_name, attempt_dir / "monitor", opts, strip_faults,
                           collector)
            host = hosts.get(cmd.node_name, cmd.host or cmd.node_name)
            torchrun = list(cmd.argv)
            if cmd.node_name in addr:  # c10d rendezvous: peers reach this node here, not at the
                torchrun[1:1] = ["--local-addr", addr[cmd.node_name]]  # hostname (netns share it)
            probe = probe_args(opts, plan, cmd.node_name, addr, attempt)
            argv = agent_argv(opts, cmd.node_name, host, tuple(torchrun), env, collector, probe)
            with open(attempt_dir / f"node{cmd.node_rank}.log", "wb") as out:
                procs.append(subprocess.Popen(
                    argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.PIPE if opts.launcher == "ssh" else subprocess.DEVNULL,
                    start_new_session=True, preexec_fn=_term_with_parent))
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


def stopped_ranks(views: dict[int, RankView], known: dict[int, int]) -> frozenset[int]:
    """Ranks whose process we started and see stopped (state T: SIGSTOP, a debugger)."""
    out = set()
    for rank, view in views.items():
        pid = view.pid
        if isinstance(pid, int) and pid in known:
            info = _stat(pid)
            if info is not None and info[1] == known[pid] and info[2] in ("T", "t"):
                out.add(rank)
    return frozenset(out)


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
    links = LinkTable(opts.link_probe.window) if opts.link_probe else None
    launched_t, failed_t, tree_t, scored_through = time.time(), None, 0.0, -1
    while True:
        _poll_records(monitor_dir, views, offsets)
        if links is not None and _poll_links(monitor_dir, links):
            _report_slow_pair(links, views, opts.link_probe, reported, report)
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
            inc = find_dead(views, beats, expected, launched_t, now, cfg)
            stalled, limit = stall_s(views, now, cfg)
            if inc is None and views and stalled >= limit:
                # stalled past the step limit (a section may still excuse it): only now look
                # at process states (a /proc read per rank); a stopped rank is a hang at once
                inc = find_hang(views, now, cfg, stopped_ranks(views, known))
            if inc is not None:
                return inc, codes
        done = min((v.last_done_step for v in views.values()), default=-1)
        if done != scored_through:  # score only when every rank completed another step
            scored_through = done
            stop = _soft_incidents(views, opts, groups, reported, now, report)
            if stop is not None:
                return stop, codes
        time.sleep(opts.poll_s)


def _poll_links(monitor_dir: Path, links: LinkTable) -> bool:
    """Fold new agent `link` records into `links` (which remembers how far it has read);
    True when there were any."""
    recs, links.offset, _ = read_new_records(monitor_dir / "agents.jsonl", links.offset)
    new = [r for r in recs if r.get("ev") == "link"]
    for rec in new:
        links.add(rec)
    return bool(new)


def _report_slow_pair(links: LinkTable, views: dict[int, RankView], cfg: ProbeConfig,
                      reported: set, report: Callable[[Incident], None]) -> None:
    """Report the probes' slow pair (or host) once per attempt; step = the furthest step a
    rank has begun."""
    verdict = find_slow_pair(links, cfg.factor)
    if verdict is None or ("slow_link", None, verdict.where) in reported:
        return
    reported.add(("slow_link", None, verdict.where))
    step = max((v.current_step for v in views.values() if v.current_step is not None), default=None)
    evidence = {"detected_by": "link probes", "pairs": ["<->".join(p) for p in verdict.pairs],
                "rate_MBps": round(verdict.rate_Bps / 1e6, 3),
                "healthy_MBps": round(verdict.healthy_Bps / 1e6, 3),
                "pair_MBps": {"<->".join(p): round(r / 1e6, 3)
                              for p, r in sorted(links.capacities().items())}}
    report(Incident(time.time(), "slow_link", None, verdict.where, step, evidence,
                    action="logged; no action"))


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
                report: Callable[[Incident], None],
                collector: Collector | None = None) -> AttemptResult:
    """Write the plan, launch it, watch it, tear it down (always)."""
    from .artifacts import write_launch

    plan_path = attempt_dir / "plan.yaml"
    write_plan(plan, plan_path)
    # the launch files of this attempt's plan, for the record and for manual relaunches
    write_launch(plan, str(opts.script), attempt_dir / "launch",
                 script_args=script_args_for(plan_path, opts)[2:])
    endpoint = (str(collector.endpoint(opts.reach_collector, attempt_dir.name))
                if collector is not None else None)
    t0, started_t = time.monotonic(), time.time()
    procs, names = start_nodes(plan, plan_path, attempt_dir, opts, strip_faults, endpoint)
    known: dict[int, int] = {}
    cpu0 = time.thread_time()
    try:
        incident, codes = watch(procs, names, plan, attempt_dir / "monitor", opts, report, known)
    finally:
        poll_cpu_s = time.thread_time() - cpu0
        teardown(procs, known, opts.teardown_grace_s)
    transport = {}
    if collector is not None:
        transport = collector.stats(attempt_dir.name)
        write_atomic(attempt_dir / "monitor" / "collector.json",
                     json.dumps(transport, indent=2) + "\n")
        transport = {k: v for k, v in transport.items() if k != "ranks"}
    attempt = int(attempt_dir.name.removeprefix("attempt"))
    return AttemptResult(attempt, plan_path, incident is None, incident, codes,
                         time.monotonic() - t0, started_t, transport, poll_cpu_s)


class PlanCache:
    """Plans for the job without any 1 or 2 of its nodes, computed ahead while the job runs, so
    a re-plan after an exclusion is a look-up.

    The planning runs in a forked child process at nice 19 (a thread would hold the GIL for
    seconds of search and stall the supervisor's watch loop) that sends each result back over
    a pipe; a reader thread files them. Keys are the sets of excluded node names (relative to
    the first plan); N-1 sets first. Without fork (not Linux/macOS) nothing is precomputed."""

    def __init__(self, plan: Plan, replan: Replanner, depth: int = 2) -> None:
        import multiprocessing

        self._plan, self._replan = plan, replan
        names = list(plan.node_order)
        self._keys = [frozenset({a}) for a in names]
        if depth >= 2 and len(names) > 2:
            self._keys += [frozenset({a, b}) for i, a in enumerate(names) for b in names[i + 1:]]
        self._done: dict[frozenset[str], tuple[Plan | None, BaseException | None, float]] = {}
        self._lock = threading.Lock()
        self._proc = None
        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:
            return
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=self._work, args=(send,), daemon=True,
                                 name="meshplan-precompute")
        self._proc.start()
        send.close()
        threading.Thread(target=self._collect, daemon=True, name="meshplan-precompute-rx").start()

    def _work(self, send) -> None:
        """In the child: plan every key, send (key, plan, error, seconds) each."""
        try:
            os.nice(19)
        except OSError:
            pass
        for key in self._keys:
            t0 = time.perf_counter()
            try:
                res: tuple = (self._replan(self._plan, reduce_cluster(self._plan.cluster, set(key))),
                              None)
            except Exception as exc:  # kept and raised again on use (e.g. InfeasibleLayout)
                res = (None, exc)
            try:
                send.send((key, *res, time.perf_counter() - t0))
            except Exception:  # an unpicklable result or error: that key is planned on demand
                pass
        send.close()

    def _collect(self) -> None:
        while True:
            try:
                key, plan, exc, seconds = self._recv.recv()
            except (EOFError, OSError):
                return
            with self._lock:
                self._done[key] = (plan, exc, seconds)

    def get(self, excluded: frozenset[str]) -> tuple[Plan, float] | None:
        """(plan, seconds it took to compute) if precomputed; raises what the re-plan raised."""
        with self._lock:
            hit = self._done.get(excluded)
        if hit is None:
            return None
        if hit[1] is not None:
            raise hit[1]
        return hit[0], hit[2]

    @property
    def ready(self) -> int:
        with self._lock:
            return len(self._done)

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=2.0)


def cached_replanner(cache: PlanCache | None, original: Plan, replan: Replanner,
                     stats: dict) -> Replanner:
    """`replan`, answered from `cache` when the reduced cluster's exclusions were precomputed;
    `stats` gets replan_s and replan_cached of the latest call."""
    names = frozenset(original.node_order)

    def answer(plan: Plan, cluster: ClusterSpec) -> Plan:
        t0 = time.perf_counter()
        key = names - {n.name for n in cluster.nodes}
        hit = cache.get(key) if cache is not None else None
        stats["replan_cached"] = hit is not None
        try:
            return hit[0] if hit is not None else replan(plan, cluster)
        finally:
            stats["replan_s"] = round(time.perf_counter() - t0, 6)

    return answer


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
    if opts.launcher not in LAUNCHERS:
        raise SpecError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {opts.launcher!r}")
    if opts.launcher != "local" and not opts.hosts:
        raise SpecError(f"--launcher {opts.launcher} needs --hosts (one per plan node)")
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
    if opts.hosts:
        if len(opts.hosts) != plan.nnodes:
            raise SpecError(f"--hosts names {len(opts.hosts)} host(s) but the plan has "
                            f"{plan.nnodes} node(s); give one per node, in the plan's node order")
        if opts.addresses and len(opts.addresses) != len(opts.hosts):
            raise SpecError("give one address per host (or none)")
        addrs = opts.addresses or opts.hosts
        opts = dataclasses.replace(opts, host_map=tuple(zip(plan.node_order, opts.hosts, addrs,
                                                            strict=True)))
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

    collector = Collector(opts.out_dir, bind_host=opts.collector_bind)
    cache = PlanCache(plan, replan) if opts.precompute and plan.nnodes > 1 else None
    stats: dict = {}
    answer = cached_replanner(cache, plan, replan, stats)
    recoveries: list[dict] = []
    current, message = plan, ""
    try:
        while True:
            attempt_dir = opts.out_dir / f"attempt{first + len(attempts)}"
            echo(f"attempt {attempt_dir.name}: {describe(current)}")
            result = run_attempt(current, attempt_dir, opts, strip_faults=bool(attempts),
                                 report=report, collector=collector)
            if recoveries and "relaunch_s" not in recoveries[-1]:
                recoveries[-1]["relaunch_s"] = round(result.started_t - recoveries[-1]["detected_t"], 3)
            attempts.append(result)
            if result.completed:
                message = f"completed after {len(attempts)} attempt(s), {len(incidents)} incident(s)"
                break
            stats.clear()
            action, nxt = decide(result.incident, current, len(attempts) - 1, opts, answer)
            report(dataclasses.replace(result.incident, action=action,
                                       evidence={**result.incident.evidence, **stats}))
            if nxt is None:
                message = f"{action} (see {attempt_dir}/node*.log and {opts.log_path})"
                break
            recoveries.append({"incident": result.incident.kind, "node": result.incident.node,
                               "detected_t": result.incident.time_t, **stats})
            if nxt is not current:
                excluded.append(result.incident.node)
            current = nxt
    finally:
        if cache is not None:
            cache.close()
        collector.close()
    ok = attempts[-1].completed
    run = RunResult(ok, tuple(attempts), tuple(incidents), tuple(excluded),
                    attempts[-1].plan_path, message, tuple(recoveries))
    write_atomic(opts.out_dir / "run.json", json.dumps(run_summary(run), indent=2) + "\n")
    return run


def run_summary(run: RunResult) -> dict:
    """The run.json object."""
    return {
        "ok": run.ok, "message": run.message, "excluded_nodes": list(run.excluded_nodes),
        "final_plan": str(run.final_plan) if run.final_plan else None,
        "attempts": [{"attempt": a.attempt, "plan": str(a.plan_path), "completed": a.completed,
                      "incident": a.incident.kind if a.incident else None,
                      "exit_codes": a.exit_codes, "seconds": round(a.seconds, 3),
                      "records": a.transport, "supervisor_cpu_s": round(a.poll_cpu_s, 3)}
                     for a in run.attempts],
        "recoveries": list(run.recoveries),
        "incidents": [json.loads(i.to_json()) for i in run.incidents],
    }
