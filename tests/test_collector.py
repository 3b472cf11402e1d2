"""Records over the network (collector + sender), the node agent, the collective interception
(on a stand-in torch.distributed module), sections and stopped-rank hang attribution. No torch,
no network namespaces: localhost TCP and small subprocesses only (~3 s)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from launcher.collector import Collector, Endpoint, Sender
from launcher.monitor import MonitorConfig, RankView, find_hang, fold_records
from launcher.runtime import StepMonitor

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_records_and_heartbeats_arrive(tmp_path):
    col = Collector(tmp_path)
    try:
        snd = Sender(col.endpoint("127.0.0.1", "attempt0"), {"rank": 3}, heartbeat_s=0.05)
        for i in range(50):
            snd.send({"ev": "begin", "step": i, "t": float(i)})
        snd.close()
        path = tmp_path / "attempt0" / "monitor" / "rank3.jsonl"
        assert _wait(lambda: len(_lines(path)) == 50)
        assert [r["step"] for r in _lines(path)] == list(range(50))
        assert (tmp_path / "attempt0" / "monitor" / "rank3.hb").exists()
        st = col.stats("attempt0")
        assert (st["received"], st["lost"], st["duplicates"]) == (50, 0, 0)
    finally:
        col.close()


def test_buffer_is_bounded_and_loss_is_counted_after_reconnect(tmp_path):
    port = _free_port()
    snd = Sender(Endpoint("127.0.0.1", port, "attempt1"), {"rank": 0}, buffer_records=5)
    for i in range(20):  # nobody listens yet: only the newest 5 are kept
        snd.send({"ev": "begin", "step": i, "t": 0.0})
    assert snd.dropped == 15
    col = Collector(tmp_path, port=port)  # the supervisor comes (back) up
    try:
        path = tmp_path / "attempt1" / "monitor" / "rank0.jsonl"
        assert _wait(lambda: len(_lines(path)) == 5, 10.0)
        assert [r["step"] for r in _lines(path)] == [15, 16, 17, 18, 19]
        assert col.stats("attempt1")["lost"] == 15
        snd.close()
    finally:
        col.close()


def test_duplicates_dropped_and_bad_hello_refused(tmp_path):
    col = Collector(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", col.port)) as s:
            s.sendall(b'{"hello":1,"attempt":"attempt0","rank":2}\n'
                      b'{"ev":"begin","step":0,"t":1,"seq":0}\n'
                      b'{"ev":"begin","step":0,"t":1,"seq":0}\nnot json\n'
                      b'{"ev":"begin","step":1,"t":2,"seq":3}\n')
        with socket.create_connection(("127.0.0.1", col.port)) as s:
            s.sendall(b'{"hello":1,"attempt":"../../etc","rank":2}\n{"ev":"x","t":1}\n')
        path = tmp_path / "attempt0" / "monitor" / "rank2.jsonl"
        assert _wait(lambda: len(_lines(path)) == 2)
        st = col.stats("attempt0")
        assert (st["received"], st["duplicates"], st["lost"]) == (2, 1, 2)
        assert not (tmp_path.parent / "etc").exists()
    finally:
        col.close()


def test_endpoint_parse_rejects_bad_forms():
    assert str(Endpoint.parse("10.0.0.1:4000/attempt2")) == "10.0.0.1:4000/attempt2"
    for bad in ("10.0.0.1/attempt0", "h:0/attempt0", "h:12/../x", "h:x/attempt0"):
        with pytest.raises(ValueError, match="HOST:PORT/attempt"):
            Endpoint.parse(bad)


def test_step_monitor_streams_over_tcp(tmp_path):
    col = Collector(tmp_path)
    try:
        env = {"MESHPLAN_COLLECTOR": f"127.0.0.1:{col.port}/attempt0", "RANK": "1",
               "WORLD_SIZE": "2", "MESHPLAN_NODE": "n0"}
        mon = StepMonitor.from_env(env)
        mon.step_begin(0)
        with mon.comm("ar"):
            pass
        with mon.section("checkpoint"):
            pass
        mon.step_end(0, loss=1.5)
        mon.close()
        path = tmp_path / "attempt0" / "monitor" / "rank1.jsonl"
        assert _wait(lambda: len(_lines(path)) == 8)
        evs = [r["ev"] for r in _lines(path)]
        assert evs == ["start", "begin", "enter", "leave", "section", "section", "end", "close"]
        assert not (tmp_path / "rank1.jsonl").exists()
    finally:
        col.close()


class _Work:
    def __init__(self) -> None:
        self.callbacks = []

    def get_future(self):
        return self

    def then(self, cb):
        self.callbacks.append(cb)


def test_collective_hooks_time_calls_the_script_did_not_wrap(tmp_path, monkeypatch):
    works: list[_Work] = []

    def all_reduce(t, async_op=False):
        if async_op:
            works.append(_Work())
            return works[-1]
        return None

    fake = types.ModuleType("torch.distributed")
    fake.all_reduce = all_reduce
    c10d = types.ModuleType("torch.distributed.distributed_c10d")
    c10d.all_reduce = all_reduce
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    monkeypatch.setitem(sys.modules, "torch.distributed.distributed_c10d", c10d)
    mon = StepMonitor(tmp_path, rank=0, install_signal_handler=False)
    assert mon.hook_collectives()
    assert c10d.all_reduce is fake.all_reduce is not all_reduce
    mon.step_begin(0)
    fake.all_reduce(None)  # synchronous: enter/leave around the call
    work = fake.all_reduce(None, async_op=True)  # async: leave when the future completes
    with mon.comm("outer"):
        fake.all_reduce(None)  # inside a wrapped block: recorded once, as "outer"
    view = fold_records(RankView(0), [json.loads(x) for x in
                                      (tmp_path / "rank0.jsonl").read_text().splitlines()])
    assert view.waiting_in[0] == "all_reduce" and view.open_async
    for cb in work.callbacks:
        cb(None)
    mon.step_end(0)
    mon.close()
    assert fake.all_reduce is all_reduce and c10d.all_reduce is all_reduce  # restored
    recs = [json.loads(x) for x in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    names = [(r["ev"], r["name"], "id" in r) for r in recs if r["ev"] in ("enter", "leave")]
    assert names == [("enter", "all_reduce", False), ("leave", "all_reduce", False),
                     ("enter", "all_reduce", True), ("enter", "outer", False),
                     ("leave", "outer", False), ("leave", "all_reduce", True)]
    view = fold_records(RankView(0), recs)
    assert view.open_async == () and len(view.samples[-1].collectives) == 3


def _stalled_views(section: bool) -> dict[int, RankView]:
    views = {}
    for r in range(2):
        recs = [{"ev": "start", "t": 0.0, "node": f"n{r}", "pid": 10 + r}]
        for s in range(4):
            recs += [{"ev": "begin", "step": s, "t": s * 1.0},
                     {"ev": "end", "step": s, "step_s": 1.0, "comm_s": 0.1, "compute_s": 0.9,
                      "t": s * 1.0 + 1.0}]
        recs.append({"ev": "begin", "step": 4, "t": 4.0})
        if section:
            recs.append({"ev": "section", "name": "checkpoint", "open": True, "t": 4.0})
        elif r == 1:
            recs.append({"ev": "enter", "step": 4, "name": "ar", "t": 4.0})
        views[r] = fold_records(RankView(r), recs)
    return views


def test_section_suspends_the_tight_default_hang_limit():
    cfg = MonitorConfig()
    assert cfg.hang_floor_s == 10.0
    assert find_hang(_stalled_views(False), 4.0 + 10.5, cfg) is not None
    assert find_hang(_stalled_views(True), 4.0 + 10.5, cfg) is None
    inc = find_hang(_stalled_views(True), 4.0 + cfg.section_timeout_s + 1, cfg)
    assert inc is not None and inc.evidence["sections"] == ["checkpoint"]


def test_stopped_rank_inside_a_section_is_a_hang_at_the_step_limit():
    # a SIGSTOP that lands while the ranks save a checkpoint: state T makes no progress in
    # any section, so the section's long allowance does not apply
    cfg = MonitorConfig()
    assert find_hang(_stalled_views(True), 4.0 + 10.5, cfg, stopped=frozenset()) is None
    inc = find_hang(_stalled_views(True), 4.0 + 10.5, cfg, stopped=frozenset({1}))
    assert inc is not None and inc.rank == 1 and inc.evidence["sections"] == ["checkpoint"]


def test_stopped_rank_is_the_hang_culprit():
    views = _stalled_views(False)
    assert find_hang(views, 15.0, MonitorConfig()).rank == 0  # missing from rank 1's "ar"
    inc = find_hang(views, 15.0, MonitorConfig(), stopped=frozenset({1}))
    assert inc.rank == 1 and inc.evidence["stopped_ranks"] == [1]


def _agent(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher.agent", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_agent_passes_exit_status_and_reports_it(tmp_path):
    col = Collector(tmp_path)
    try:
        proc = _agent("--node", "n1", "--collector", f"127.0.0.1:{col.port}/attempt0", "--",
                      sys.executable, "-c", "raise SystemExit(3)")
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 3, out
        agents = tmp_path / "attempt0" / "monitor" / "agents.jsonl"
        assert _wait(lambda: any(r.get("ev") == "exit" for r in _lines(agents)))
        assert [r["code"] for r in _lines(agents) if r.get("ev") == "exit"] == [3]
    finally:
        col.close()


def test_agent_forwards_sigterm_and_stops_on_stdin_eof():
    proc = _agent("--node", "n0", "--grace", "1", "--", sys.executable, "-c",
                  "import time; time.sleep(60)")
    assert "started" in proc.stdout.readline()  # printed once the handlers are in place
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert "got signal 15" in out and proc.returncode == 128 + signal.SIGTERM, out
    proc = _agent("--node", "n0", "--grace", "1", "--stdin-eof-stops", "--", sys.executable,
                  "-c", "import time; time.sleep(60)", stdin=subprocess.PIPE)
    assert "started" in proc.stdout.readline()
    proc.stdin.close()
    proc.wait(timeout=15)
    out = proc.stdout.read()
    assert "standard input closed" in out, out


def test_agent_needs_a_command():
    proc = _agent("--node", "n0")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "give the command to run after --" in out


def test_cli_remote_launcher_needs_hosts(tmp_path):
    from cost_models.specs import Layout
    from planner.planfile import Plan, write_plan
    from planner.specfiles import load_cluster, load_model

    model, cluster = load_model("tiny-gpt"), load_cluster("local-cpu", nodes=2, gpus_per_node=1)
    layout = Layout(tp=1, pp=1, dp=2, micro_batch_size=1, global_batch_size=2, seq_len=32)
    write_plan(Plan(model, cluster, layout, tuple(n.name for n in cluster.nodes), {}),
               tmp_path / "plan.yaml")
    script = tmp_path / "train.py"
    script.write_text("")
    for extra, want in ((["--launcher", "ssh"], "--launcher ssh needs --hosts H1,H2,..."),
                        (["--launcher", "ssh", "--hosts", "a,,b"], "--hosts 'a,,b' has an empty"),
                        (["--launcher", "netns", "--hosts", "a"], "--hosts names 1 host(s) but")):
        proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(tmp_path / "plan.yaml"),
                               "--script", str(script), "-o", str(tmp_path / "out"), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0] and "Traceback" not in proc.stderr, proc.stderr
