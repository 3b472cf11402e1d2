"""`meshplan run` end to end on a simulated 2-node x 2-process cluster (localhost, gloo), plus
the supervisor's process-free parts (incident log, policy, environment, teardown).

The torchrun tests share one uninterrupted 50-step run (the no-false-positive check and the
loss reference). Detection times are checked against the acceptance bounds, measured from the
injection time read from the ranks' own records, not tightly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_cluster import why_not_available

from cost_models.specs import Layout, SpecError
from launcher.monitor import Incident, MonitorConfig, RankView, read_new_records
from launcher.supervisor import (
    IncidentLog,
    RunOptions,
    _poll_records,
    decide,
    node_env,
    process_tree,
    reduce_cluster,
    replan_best,
    supervise,
    teardown,
)
from planner.planfile import Plan, read_plan, write_plan
from planner.specfiles import load_cluster, load_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_gpt.py"
FAULTS = ("MESHPLAN_FAULT_KILL", "MESHPLAN_FAULT_HANG", "MESHPLAN_FAULT_SLOW")
CLEAN_STEPS = 50
FAULT_STEPS = 20


def two_node_plan() -> Plan:
    """tiny-gpt, DP4 over local-cpu 2 nodes x 2 processes."""
    model = load_model("tiny-gpt")
    cluster = load_cluster("local-cpu", nodes=2, gpus_per_node=2)
    layout = Layout(tp=1, pp=1, dp=4, micro_batch_size=2, global_batch_size=8, seq_len=32)
    layout.validate(model, cluster.world_size)
    return Plan(model, cluster, layout, tuple(n.name for n in cluster.nodes), {})


def dp_replan(plan: Plan, cluster) -> Plan:
    """A re-planner that needs no search (pure data parallel), for the policy tests."""
    layout = dataclasses.replace(plan.layout, tp=1, pp=1, dp=cluster.world_size)
    return Plan(plan.model, cluster, layout, tuple(n.name for n in cluster.nodes), {})


def default_replanner():
    return replan_best


@contextlib.contextmanager
def fault_env(**faults: str):
    """Set MESHPLAN_FAULT_* for the supervisor (its children inherit it), restore after."""
    saved = {k: os.environ.get(k) for k in FAULTS}
    for k in FAULTS:
        os.environ.pop(k, None)
    os.environ.update({f"MESHPLAN_FAULT_{k.upper()}": v for k, v in faults.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def options(out: Path, steps: int, ckpt_every: int = 5, **kw) -> RunOptions:
    monitor = MonitorConfig(hang_floor_s=5.0, startup_timeout_s=240.0)
    return RunOptions(script=SCRIPT, out_dir=out, steps=steps,
                      script_args=("--ckpt-every", str(ckpt_every),
                                   "--log-file", str(out / "losses.jsonl")),
                      monitor=monitor, poll_s=0.2, **kw)


def losses(out: Path) -> dict[int, float]:
    """Step -> loss from rank 0's log (a resumed run's later line wins)."""
    out_map = {}
    for line in (out / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out_map[rec["step"]] = rec["loss"]
    return out_map


def rank_records(monitor_dir: Path, rank: int) -> list[dict]:
    return read_new_records(monitor_dir / f"rank{rank}.jsonl", 0)[0]


def injection_t(monitor_dir: Path, rank: int, step: int) -> float:
    """Faults fire at the start of `step`, right after the rank's end of step-1 (or the
    checkpoint after it): its last record before the fault."""
    recs = [r for r in rank_records(monitor_dir, rank) if r["ev"] not in ("signal", "close")]
    assert recs[-1]["ev"] in ("end", "leave") and recs[-1]["step"] == step - 1, recs[-3:]
    return recs[-1]["t"]


NETNS_COVERS = pytest.mark.skipif(
    why_not_available() is None,
    reason="the same faults (clean run, host kill + re-plan + resume, straggler, hang) run on the "
           "4-host netns cluster (tests/test_supervisor_netns.py) where namespaces can be built; "
           "the incident log's torn-line handling is also tested process-free below")


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    write_plan(two_node_plan(), path)
    return path


@pytest.fixture(scope="module")
def clean_run(plan_file, tmp_path_factory):
    """One uninterrupted supervised run: the false-positive check and the loss reference."""
    out = tmp_path_factory.mktemp("clean")
    t0 = time.monotonic()
    with fault_env():
        result = supervise(read_plan(plan_file), options(out, CLEAN_STEPS, ckpt_every=25),
                           replan=default_replanner())
    return result, out, time.monotonic() - t0


# -- end to end ------------------------------------------------------------------------------

@pytest.mark.torchrun
@pytest.mark.timeout(400)
@NETNS_COVERS
def test_clean_run_has_no_false_positives(clean_run):
    result, out, seconds = clean_run
    assert result.ok, result.message
    assert result.incidents == () and len(result.attempts) == 1
    assert IncidentLog(out / "incidents.jsonl").read() == []
    assert sorted(losses(out)) == list(range(CLEAN_STEPS))
    ends = [r for r in rank_records(out / "attempt0" / "monitor", 3) if r["ev"] == "end"]
    assert len(ends) == CLEAN_STEPS  # every rank reported every step
    print(f"clean {CLEAN_STEPS}-step supervised run: {seconds:.1f} s")


@pytest.mark.torchrun
@pytest.mark.timeout(500)
@NETNS_COVERS
def test_kill_detected_replanned_and_resumed(plan_file, clean_run, tmp_path):
    out = tmp_path / "kill"
    with fault_env(kill="1:12"):
        result = supervise(read_plan(plan_file), options(out, FAULT_STEPS, max_restarts=2),
                           replan=default_replanner())
    assert result.ok, result.message
    inc = result.incidents[0]
    assert (inc.kind, inc.rank, inc.node) == ("dead", 1, "localnode0")
    latency_s = inc.time_t - injection_t(out / "attempt0" / "monitor", 1, 12)
    print(f"kill detection latency: {latency_s:.2f} s")
    assert 0 <= latency_s <= 10.0
    assert "excluded node localnode0" in inc.action
    assert result.excluded_nodes == ("localnode0",)
    replanned = read_plan(out / "attempt1" / "plan.yaml")
    assert replanned.node_order == ("localnode1",) and replanned.layout.world == 2
    launch = out / "attempt1" / "launch"  # launch files regenerated for the new plan
    assert (launch / "node-0.sh").is_file() and not (launch / "node-1.sh").exists()
    # resumed from the last checkpoint (step_10), not from scratch, and without the fault
    begins = [r["step"] for r in rank_records(out / "attempt1" / "monitor", 0) if r["ev"] == "begin"]
    assert begins == list(range(10, FAULT_STEPS))
    ref = losses(clean_run[1])
    got = losses(out)
    assert sorted(got) == list(range(FAULT_STEPS))
    assert abs(got[FAULT_STEPS - 1] - ref[FAULT_STEPS - 1]) <= 1e-3
    logged = IncidentLog(out / "incidents.jsonl").read()
    assert [(r["kind"], r["rank"], r["node"]) for r in logged] == [("dead", 1, "localnode0")]


@pytest.mark.torchrun
@pytest.mark.timeout(500)
@NETNS_COVERS
def test_straggler_then_hang_then_supervisor_restart(plan_file, clean_run, tmp_path):
    out = tmp_path / "slowhang"
    with fault_env(slow="3:3:5", hang="1:12"):
        result = supervise(read_plan(plan_file),
                           options(out, FAULT_STEPS, max_restarts=0, straggler_action="log"),
                           replan=default_replanner())
    assert not result.ok and "restart budget" in result.message
    kinds = [(i.kind, i.rank) for i in result.incidents]
    assert kinds == [("straggler", 3), ("hang", 1)], kinds
    straggler, hang = result.incidents
    print(f"straggler flagged at step {straggler.step} (slowdown from step 5)")
    assert 5 <= straggler.step <= 5 + 5 and straggler.node == "localnode1"
    mon = out / "attempt0" / "monitor"
    latency_s = hang.time_t - injection_t(mon, 1, 12)
    bound_s = 3 * hang.evidence["median_period_s"] + 10
    print(f"hang detection latency: {latency_s:.2f} s (bound {bound_s:.1f} s)")
    assert hang.node == "localnode0" and latency_s <= bound_s

    # A crashed writer left a torn line; a new supervisor appends, keeps old checkpoints.
    log_path = out / "incidents.jsonl"
    with open(log_path, "ab") as fh:
        fh.write(b'{"kind": "dea')
    ckpts = {p.name: p.stat().st_mtime_ns for p in (out / "ckpt").iterdir()}
    assert "step_10" in ckpts
    env = {k: v for k, v in os.environ.items() if k not in FAULTS}
    cmd = [sys.executable, "-c", "from planner.cli import main; main()", "run", str(plan_file),
           "--script", str(SCRIPT), "--steps", str(FAULT_STEPS), "-o", str(out),
           "--hang-floor", "5", "--startup-timeout", "240", "--",
           "--ckpt-every", "5", "--log-file", str(out / "losses.jsonl")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already holds 2 incident(s)" in proc.stderr
    logged = IncidentLog(log_path).read()
    assert [(r["kind"], r["rank"]) for r in logged] == [("straggler", 3), ("hang", 1)]
    for name, mtime in ckpts.items():  # earlier checkpoints untouched
        assert (out / "ckpt" / name).stat().st_mtime_ns == mtime
    begins = [r["step"] for r in rank_records(out / "attempt1" / "monitor", 0) if r["ev"] == "begin"]
    assert begins == list(range(10, FAULT_STEPS))
    assert sorted(losses(out)) == list(range(FAULT_STEPS))
    summary = json.loads((out / "run.json").read_text())
    assert summary["ok"] and summary["attempts"][0]["attempt"] == 1


# -- process-free parts ----------------------------------------------------------------------

def gone(pid: int, within_s: float) -> bool:
    """True once `pid` no longer runs (absent or a zombie) within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rfind(")") + 2] == "Z":
            return True
        time.sleep(0.05)
    return False


def _incident(node: str | None = "localnode0", rank: int | None = 1) -> Incident:
    return Incident(1.0, "dead", rank, node, 3, {"detected_by": "test"})


def test_incident_log_appends_after_torn_line_and_skips_corrupt(tmp_path, caplog):
    path = tmp_path / "incidents.jsonl"
    log = IncidentLog(path)
    log.append(_incident())
    with open(path, "ab") as fh:
        fh.write(b"\xff\x00not json\n{\"kind\": \"hang\", \"ra")  # garbage + a torn line
    log.append(_incident(rank=0))
    read = IncidentLog(path).read()
    assert [r["rank"] for r in read] == [1, 0]
    assert "corrupt" in caplog.text


def test_corrupt_rank_file_is_skipped_by_the_poller(tmp_path, caplog):
    (tmp_path / "rank0.jsonl").write_bytes(b'{"ev":"start","t":1.0,"node":"a"}\n{{{{\n'
                                           b'{"ev":"begin","step":4,"t":2.0}\n')
    (tmp_path / "rankX.jsonl").write_text("ignored\n")
    views: dict[int, RankView] = {}
    offsets: dict[int, int] = {}
    _poll_records(tmp_path, views, offsets)
    assert list(views) == [0] and views[0].current_step == 4 and views[0].node == "a"
    assert "corrupt" in caplog.text


def test_reduce_cluster_drops_node_and_link_matrix_rows():
    cluster = load_cluster("local-cpu", nodes=3, gpus_per_node=2)
    cluster = dataclasses.replace(cluster, bandwidth_GBps=((0, 1, 2), (1, 0, 3), (2, 3, 0)))
    reduced = reduce_cluster(cluster, {"localnode1"})
    assert [n.name for n in reduced.nodes] == ["localnode0", "localnode2"]
    assert reduced.bandwidth_GBps == ((0, 2), (2, 0))
    with pytest.raises(SpecError, match="every node"):
        reduce_cluster(cluster, {n.name for n in cluster.nodes})


def test_policy_excludes_node_within_budget_and_stops_after(tmp_path):
    plan = two_node_plan()
    opts = options(tmp_path, 10, max_restarts=1)
    seen = []

    def replan(p, cluster):
        seen.append([n.name for n in cluster.nodes])
        return dp_replan(p, cluster)

    action, nxt = decide(_incident(), plan, 0, opts, replan)
    assert seen == [["localnode1"]] and nxt.node_order == ("localnode1",)
    assert "excluded node localnode0" in action and "dp2" in action
    action, nxt = decide(_incident(), plan, 1, opts, replan)
    assert nxt is None and "budget" in action
    action, nxt = decide(_incident(node=None, rank=None), plan, 0, opts, replan)
    assert nxt is plan and "same plan" in action

    def infeasible(p, cluster):
        raise SpecError("global batch 8 does not divide")

    action, nxt = decide(_incident(), plan, 0, opts, infeasible)
    assert nxt is None and "re-plan without localnode0 failed" in action


def test_relaunch_env_strips_fault_injection(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPLAN_FAULT_KILL", "1:3")
    opts = options(tmp_path, 5)
    first = node_env({"A": "1"}, "n0", tmp_path / "m", opts, strip_faults=False)
    again = node_env({"A": "1"}, "n0", tmp_path / "m", opts, strip_faults=True)
    assert first["MESHPLAN_FAULT_KILL"] == "1:3" and "MESHPLAN_FAULT_KILL" not in again
    assert again["MESHPLAN_MONITOR_DIR"] == str(tmp_path / "m") and again["MESHPLAN_NODE"] == "n0"
    assert again["A"] == "1"


def test_teardown_kills_children_in_their_own_sessions():
    # like torchrun: a parent whose child runs in a new session (not in the parent's group)
    code = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
            " start_new_session=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 20
    tree = process_tree(parent.pid)
    while len(tree) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        tree = process_tree(parent.pid)
    assert len(tree) == 2
    (child,) = set(tree) - {parent.pid}
    teardown([parent], tree, grace_s=2.0)
    assert parent.poll() is not None
    assert gone(child, within_s=5)


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        supervise(two_node_plan(), RunOptions(script=tmp_path / "missing.py", out_dir=tmp_path))
    with pytest.raises(SpecError, match="dead-after"):
        supervise(two_node_plan(), RunOptions(script=SCRIPT, out_dir=tmp_path,
                                              monitor=MonitorConfig(heartbeat_timeout_s=1.5)))


def test_node_processes_die_with_a_killed_supervisor():
    code = ("import subprocess, sys, time\n"
            "from launcher.supervisor import _term_with_parent\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
            " start_new_session=True, preexec_fn=_term_with_parent)\n"
            "print(p.pid, flush=True)\ntime.sleep(60)\n")
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(sup.stdout.readline())
    sup.kill()  # SIGKILL: no teardown code runs in the supervisor
    sup.wait(timeout=10)
    assert gone(child, within_s=10)


def test_output_path_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpecError, match="not a directory"):
        supervise(two_node_plan(), RunOptions(script=SCRIPT, out_dir=tmp_path / "f"))


def test_launch_env_keeps_nccl_watchdog_and_flight_recorder(tmp_path):
    from launcher.artifacts import torchrun_commands

    cmds = torchrun_commands(two_node_plan(), str(SCRIPT), dump_dir=str(tmp_path / "dumps"))
    env = node_env(cmds[1].env, cmds[1].node_name, tmp_path / "m", options(tmp_path, 5), True)
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(env["TORCH_FR_BUFFER_SIZE"]) > 0
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["MESHPLAN_NODE"] == "localnode1"


def test_a_visible_live_process_counts_as_a_heartbeat(tmp_path):
    from launcher.supervisor import _heartbeats

    me = process_tree(os.getpid())
    views = {0: RankView(0, pid=os.getpid()), 1: RankView(1, pid=os.getpid())}
    (tmp_path / "rank1.hb").write_text("")
    os.utime(tmp_path / "rank1.hb", (100.0, 100.0))
    beats = _heartbeats(tmp_path, {0: "a", 1: "a", 2: "b"}, views, me, now=5000.0)
    assert beats[0] == 5000.0 and beats[1] == 5000.0  # our own running process
    assert beats[2] is None  # no process, no heartbeat file
    stale = _heartbeats(tmp_path, {1: "a"}, views, {}, now=5000.0)  # not a process we know
    assert stale[1] == 100.0
