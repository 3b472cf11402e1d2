"""`meshplan run` on a 4-host x 2-rank network-namespace cluster, faults injected from outside.

The supervisor runs in this (root) namespace; each host is a namespace joined to a bridge by
a tc-shaped veth, and the root namespace is joined to the same bridge, so every rank record
crosses the veth links to the supervisor's TCP collector (no shared monitor directory). Node
agents start with `ip netns exec`. One supervised job (tiny-gpt, DP8 over 4 x 2 gloo ranks,
CPU) serves every check, to keep CI time small; a driver thread in the test injects, by
looking at the records the collector wrote:

  steps 0-49   clean, with a checkpoint save at step 20 made 11 s slow (announced as a
               section; the default hang limit is max(3 x step period, 10 s))
  step 50-     rank 5 (host h2) computes 3x longer (MESHPLAN_FAULT_SLOW, the one fault set
               inside the trainer: see docs/supervisor.md for why a SIGSTOP/SIGCONT duty cycle
               from outside does not make a 3x compute straggler); the straggler is logged
               (--on-straggler log)
  then         the h0<->h3 link rate-limited to 1/10 with tc (both directions): the node
               agents' link probes must name that pair (launcher.link_probe); then restored
  then         rank 3 (host h1) SIGSTOPped: a hang -> h1 excluded, re-planned (precomputed
               N-1 plan), resumed from the checkpoint on 3 hosts
  attempt 1    every process of host h2's namespace SIGKILLed -> h2 excluded, re-planned (N-2
               plan), resumed on 2 hosts, runs to the end
The final loss is compared with an uninterrupted single-process run of the same steps.
Needs root, iproute2 and torchrun; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from netns_cluster import IFNAME, NetnsCluster, kill_namespace, why_not_available

from cost_models.specs import Layout
from launcher.link_probe import ProbeConfig
from launcher.monitor import MonitorConfig, read_new_records
from launcher.supervisor import RunOptions, supervise
from planner.planfile import Plan, write_plan
from planner.specfiles import load_cluster, load_model

pytestmark = [pytest.mark.netns, pytest.mark.torchrun, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_gpt.py"
STEPS = 64
CLEAN_STEPS = 50
CKPT_EVERY = 10
SLOW_CKPT = (11.0, 30)
SLOW_RANK, HANG_RANK, KILL_HOST = 5, 3, 2
SLOW_PAIR = (0, 3)
RATE_MBIT = 1000
PROBE = ProbeConfig(period_s=1.0, nbytes=2_000_000)
"""Probes every 1 s, not the default 2 s: this job's steps take ~0.3 s, real ones seconds."""


MODEL = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 256,
         "vocab_size": 512, "n_positions": 128, "tie_word_embeddings": True}
"""tiny-gpt with 2 layers: FSDP issues one all-gather/reduce-scatter per layer, and 8 gloo ranks
on 2 shared cores are latency-bound, so fewer layers = shorter steps."""


def four_host_plan(work: Path) -> Plan:
    """A 2-layer tiny GPT, DP8 on local-cpu 4 nodes x 2 processes (gbs 24: also fits 6 and 4
    ranks after one and two exclusions)."""
    path = work / "tiny2.json"
    path.write_text(json.dumps(MODEL))
    model = load_model(str(path))
    cluster = load_cluster("local-cpu", nodes=4, gpus_per_node=2)
    layout = Layout(tp=1, pp=1, dp=8, micro_batch_size=3, global_batch_size=24, seq_len=32)
    layout.validate(model, cluster.world_size)
    return Plan(model, cluster, layout, tuple(n.name for n in cluster.nodes), {})


class Records:
    """What the collector wrote for one attempt: rank -> (pid, node, last completed step)."""

    def __init__(self, monitor: Path) -> None:
        self.monitor, self.offsets = monitor, {}
        self.pid, self.node, self.done, self.end_t = {}, {}, {}, {}

    def poll(self) -> None:
        for path in self.monitor.glob("rank*.jsonl"):
            rank = int(path.stem[4:])
            recs, self.offsets[rank], _ = read_new_records(path, self.offsets.get(rank, 0))
            for rec in recs:
                if rec.get("ev") == "start":
                    self.pid[rank], self.node[rank] = rec["pid"], rec["node"]
                elif rec.get("ev") == "end":
                    self.done[rank] = rec["step"]
                    self.end_t.setdefault(rank, {})[rec["step"]] = rec["t"]

    def min_done(self, ranks: int) -> int:
        return min(self.done.values()) if len(self.done) == ranks else -1


class Driver(threading.Thread):
    """Injects the faults from outside the trainer; `log` holds what it did and when."""

    def __init__(self, cluster: NetnsCluster, out: Path) -> None:
        super().__init__(daemon=True, name="fault-driver")
        self.cluster, self.out, self.log, self.stop = cluster, out, {}, threading.Event()
        self.reference: subprocess.Popen | None = None

    def wait_for(self, cond, timeout_s: float = 240.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.1)
        return False

    def incidents(self) -> list[dict]:
        path = self.out / "incidents.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the test
            self.log["error"] = repr(exc)

    def _run(self) -> None:
        a0 = Records(self.out / "attempt0" / "monitor")

        def at(rec: Records, ranks: int, step: int):
            def cond() -> bool:
                rec.poll()
                return rec.min_done(ranks) >= step
            return cond

        if not self.wait_for(at(a0, 8, SLOW_CKPT[1] - 1)):
            return
        self.reference = start_reference(self.out)  # the CPUs idle during the slow save
        if not self.wait_for(at(a0, 8, CLEAN_STEPS - 1)):
            return
        # rank 5 computes 3x longer from step CLEAN_STEPS on (MESHPLAN_FAULT_SLOW, set below)
        self.log["slow_from_step"] = CLEAN_STEPS
        self.wait_for(lambda: any(i["kind"] == "straggler" and i["rank"] == SLOW_RANK
                                  for i in self.incidents()), 30.0)
        a0.poll()
        self.cluster.set_pair_rate(*SLOW_PAIR, RATE_MBIT / 10)
        self.log["slow_pair_t"], self.log["slow_pair_step"] = time.time(), max(a0.done.values()) + 1
        self.wait_for(lambda: any(i["kind"] == "slow_link" and i["time"] > self.log["slow_pair_t"]
                                  for i in self.incidents()), 40.0)
        self.cluster.set_pair_rate(*SLOW_PAIR, RATE_MBIT)
        a0.poll()
        if not self.wait_for(at(a0, 8, max(a0.done.values()) + 2)):
            return
        os.kill(a0.pid[HANG_RANK], signal.SIGSTOP)
        self.log["hang_t"], self.log["hang_node"] = time.time(), a0.node[HANG_RANK]
        self.log["period_s"] = median_period(a0)
        a1 = Records(self.out / "attempt1" / "monitor")
        if not self.wait_for(lambda: (a1.poll(), len(a1.done) == 6)[1]):
            return
        start = min(a1.done.values())
        if not self.wait_for(at(a1, 6, start + 3)):
            return
        ns = self.cluster.hosts[KILL_HOST].netns
        self.log["kill_t"], self.log["kill_host"] = time.time(), ns
        kill_namespace(ns)  # every process at once, as a dying host


def median_period(rec: Records) -> float:
    periods = sorted(b - a for ends in rec.end_t.values()
                     for s, a in ends.items() if (b := ends.get(s + 1)) is not None)
    return periods[len(periods) // 2]


@pytest.fixture(scope="module")
def cluster():
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    net = NetnsCluster(rates_mbit=(RATE_MBIT,) * 4, pair_rates_mbit={})
    try:
        net.setup()
        net.link_root()
        yield net
    finally:
        net.teardown()


@pytest.fixture(scope="module")
def faulty_run(cluster, tmp_path_factory):
    """The supervised job with every fault, and the driver's log; (result, out, driver, s)."""
    out = tmp_path_factory.mktemp("netns_run")
    plan = four_host_plan(out)
    opts = RunOptions(
        script=SCRIPT, out_dir=out, steps=STEPS,
        script_args=("--ckpt-every", str(CKPT_EVERY), "--log-file", str(out / "losses.jsonl")),
        # default options but the straggler threshold, 0.5 (2x slower) not 0.7: with 8 ranks
        # time-sharing 2 cores a clean rank's rolling compute median strays to ~1.5-2x
        monitor=MonitorConfig(startup_timeout_s=90.0, straggler_threshold=0.5),
        straggler_action="log", teardown_grace_s=2.0,
        launcher="netns", hosts=tuple(h.netns for h in cluster.hosts),
        addresses=tuple(h.ip for h in cluster.hosts), collector_bind=cluster.root_ip,
        extra_env=(("GLOO_SOCKET_IFNAME", IFNAME),
                   ("MESHPLAN_FAULT_SLOW_CKPT", f"{SLOW_CKPT[0]}:{SLOW_CKPT[1]}"),
                   ("MESHPLAN_FAULT_SLOW", f"{SLOW_RANK}:3:{CLEAN_STEPS}")),
        max_restarts=3, link_probe=PROBE)
    driver = Driver(cluster, out)
    driver.start()
    t0 = time.monotonic()
    try:
        result = supervise(plan, opts, echo=print)
    finally:
        driver.stop.set()
        driver.join(timeout=10)
    return result, out, driver, time.monotonic() - t0


def start_reference(out: Path) -> subprocess.Popen:
    """An uninterrupted single-process run of the same plan and steps (the parallel layouts
    match it), started in the background; its losses go to out/reference.jsonl."""
    plan = out / "reference_plan.yaml"
    write_plan(four_host_plan(out), plan)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env = {k: v for k, v in env.items() if not k.startswith("MESHPLAN_")}
    return subprocess.Popen([sys.executable, str(SCRIPT), "--plan", str(plan), "--single-process",
                             "--steps", str(STEPS), "--log-file", str(out / "reference.jsonl")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def reference_loss(faulty_run):
    """Final loss of the reference run (started during the faulty run)."""
    _, out, driver, _ = faulty_run
    ref = driver.reference or start_reference(out)
    _, err = ref.communicate(timeout=180)
    assert ref.returncode == 0, err.decode()[-2000:]
    log = out / "reference.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines() if "loss" in x][-1]["loss"]


def incidents_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "incidents.jsonl").read_text().splitlines()]


def test_run_completes_with_records_over_the_network(faulty_run):
    result, out, driver, seconds = faulty_run
    assert "error" not in driver.log, driver.log
    assert result.ok, result.message
    summary = json.loads((out / "run.json").read_text())
    for att in summary["attempts"]:
        assert att["records"]["received"] > 0 and att["records"]["lost"] == 0, att
    steps = sum(1 for x in (out / "losses.jsonl").read_text().splitlines() if '"loss"' in x)
    cpu = sum(a["supervisor_cpu_s"] for a in summary["attempts"])
    print(f"netns faulty run: {seconds:.1f} s wall, {len(summary['attempts'])} attempts, "
          f"supervisor CPU {cpu:.2f} s over {steps} steps = {1e3 * cpu / steps:.1f} ms/step")


def test_clean_phase_and_slow_checkpoint_raise_nothing(faulty_run):
    _, out, driver, _ = faulty_run
    early = [i for i in incidents_of(out) if i["step"] is not None and i["step"] < CLEAN_STEPS]
    assert early == [], early
    ends = [r for r in read_new_records(out / "attempt0" / "monitor" / "rank7.jsonl", 0)[0]
            if r["ev"] == "section" and not r["open"]]
    assert any(r["dur_s"] >= SLOW_CKPT[0] for r in ends), ends  # the slow save happened


def test_slow_rank_flagged_within_five_steps(faulty_run):
    _, out, driver, _ = faulty_run
    flagged = [i for i in incidents_of(out) if i["kind"] == "straggler"
               and i["step"] >= driver.log["slow_from_step"]]
    assert flagged and flagged[0]["rank"] == SLOW_RANK, flagged
    print(f"3x slow rank: flagged at step {flagged[0]['step']}, onset "
          f"{driver.log['slow_from_step']}")
    assert flagged[0]["step"] - driver.log["slow_from_step"] <= 5, (flagged[0], driver.log)


def test_degraded_pair_named_by_link_probes_within_ten_steps(faulty_run):
    _, out, driver, _ = faulty_run
    want = f"localnode{SLOW_PAIR[0]}<->localnode{SLOW_PAIR[1]}"
    links = [i for i in incidents_of(out) if i["kind"] == "slow_link"]
    probed = [i for i in links if i["evidence"].get("detected_by") == "link probes"]
    assert probed and all(i["node"] == want for i in probed), links  # no other pair, no host
    first = probed[0]
    delay = first["time"] - driver.log["slow_pair_t"]
    steps = first["step"] - driver.log["slow_pair_step"]
    print(f"tc 1/10 link {want}: named after {delay:.2f} s, {steps} step(s); pair rates "
          f"{first['evidence']['pair_MBps']} MB/s")
    assert 0 < delay and steps <= 10, (first, driver.log)
    assert first["evidence"]["rate_MBps"] < 0.35 * first["evidence"]["healthy_MBps"]


def test_sigstop_hang_detected_right_rank_in_bound(faulty_run):
    _, out, driver, _ = faulty_run
    hang = [i for i in incidents_of(out) if i["kind"] == "hang"]
    assert hang and hang[0]["rank"] == HANG_RANK, hang
    delay = hang[0]["time"] - driver.log["hang_t"]
    bound = 3 * driver.log["period_s"] + 10.0
    print(f"SIGSTOP hang: detected after {delay:.2f} s (bound {bound:.2f} s)")
    assert delay <= bound, (delay, bound)
    assert "excluded node" in hang[0]["action"], hang[0]
    assert hang[0]["evidence"]["replan_cached"] is True
    assert hang[0]["evidence"]["replan_s"] < 1.0


def test_killed_host_detected_excluded_and_resumed(faulty_run, reference_loss):
    result, out, driver, _ = faulty_run
    dead = [i for i in incidents_of(out) if i["kind"] == "dead"]
    assert dead and dead[0]["node"] == f"localnode{KILL_HOST}", dead
    delay = dead[0]["time"] - driver.log["kill_t"]
    print(f"host kill: detected after {delay:.2f} s; recoveries {result.recoveries}")
    assert delay <= 5.0
    assert result.excluded_nodes == (driver.log["hang_node"], f"localnode{KILL_HOST}")
    assert dead[0]["evidence"]["replan_cached"] is True and dead[0]["evidence"]["replan_s"] < 1.0
    final = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()
             if '"loss"' in x][-1]
    assert final["step"] == STEPS - 1
    assert abs(final["loss"] - reference_loss) <= 1e-3, (final, reference_loss)
