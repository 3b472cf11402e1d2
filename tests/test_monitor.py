"""Unit tests of the runtime hook (no torch) and the detectors (synthetic records)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from launcher.monitor import (
    MonitorConfig,
    RankView,
    attribute_exit,
    find_dead,
    find_hang,
    find_slow_link,
    find_straggler,
    fold_records,
    median_period_s,
    read_new_records,
)
from launcher.runtime import StepMonitor, heartbeat_path, rank_log_path

NODES = {0: "n0", 1: "n0", 2: "n1", 3: "n1"}


def records(rank: int, steps: range, t0: float = 1000.0, compute_s: float = 0.1,
            comm_s: float = 0.02, slow_from: int | None = None, factor: float = 1.0,
            extra: dict | None = None) -> list[dict]:
    """Records of a synchronous job: every rank's step s starts at the same time; the slow rank
    computes `factor` x longer and the others wait for it in the collective."""
    out = [{"ev": "start", "t": t0, "node": NODES[rank], "pid": 100 + rank}]
    t = t0
    for s in steps:
        slow = slow_from is not None and s >= slow_from
        mine = compute_s * (factor if (slow and extra and extra.get("rank") == rank) else 1.0)
        longest = compute_s * (factor if slow else 1.0)
        out.append({"ev": "begin", "step": s, "t": t})
        out.append({"ev": "enter", "step": s, "name": "allreduce", "t": t + mine})
        leave = t + longest + comm_s
        wait_s = leave - (t + mine)
        out.append({"ev": "leave", "step": s, "name": "allreduce", "t": leave, "dur_s": wait_s})
        out.append({"ev": "end", "step": s, "t": leave, "step_s": leave - t, "comm_s": wait_s,
                    "compute_s": mine, "loss": 1.0})
        t = leave
    return out


def views_of(recs: dict[int, list[dict]]) -> dict[int, RankView]:
    return {r: fold_records(RankView(r), rs) for r, rs in recs.items()}


# -- runtime hook --------------------------------------------------------------------------

def test_runtime_noop_without_env(tmp_path):
    mon = StepMonitor.from_env({})
    assert not mon.enabled
    mon.step_begin(0)
    with mon.comm("x"):
        pass
    mon.step_end(0, 1.0)
    mon.close()
    assert list(tmp_path.iterdir()) == []


def test_runtime_records_steps_and_collectives(tmp_path):
    env = {"MESHPLAN_MONITOR_DIR": str(tmp_path), "RANK": "3", "LOCAL_RANK": "1",
           "WORLD_SIZE": "4", "MESHPLAN_NODE": "nodeB", "MESHPLAN_HEARTBEAT_S": "0.05"}
    mon = StepMonitor.from_env(env)
    for step in range(2):
        mon.step_begin(step)
        with mon.comm("grad"):
            with mon.comm("inner"):  # nested: counted once
                pass
        mon.step_end(step, loss=2.5)
    recs, offset, bad = read_new_records(rank_log_path(tmp_path, 3), 0)
    mon.close()
    assert bad == 0 and offset > 0
    assert recs[0]["ev"] == "start" and recs[0]["node"] == "nodeB" and recs[0]["world"] == 4
    assert [r["ev"] for r in recs[1:6]] == ["begin", "enter", "leave", "end", "begin"]
    assert recs[2]["name"] == "grad" and recs[2]["step"] == 0
    end = recs[4]
    assert end["compute_s"] == pytest.approx(end["step_s"] - end["comm_s"])
    assert end["loss"] == 2.5
    assert heartbeat_path(tmp_path, 3).exists()
    view = fold_records(RankView(3), recs)
    assert view.node == "nodeB" and view.last_done_step == 1 and view.open_comm is None
    assert view.samples[0].collectives[0].name == "grad"


def test_runtime_enter_marker_is_on_disk_before_blocking(tmp_path):
    mon = StepMonitor(tmp_path, rank=0, install_signal_handler=False)
    mon.step_begin(7)
    with mon.comm("allreduce"):
        # another process reading now sees the marker (line buffered, no close needed)
        recs, _, _ = read_new_records(rank_log_path(tmp_path, 0), 0)
    mon.close()
    assert recs[-1]["ev"] == "enter" and recs[-1]["step"] == 7
    view = fold_records(RankView(0), recs)
    assert view.open_comm[:2] == ("allreduce", 7)


def test_heartbeat_thread_beats_while_main_thread_blocks(tmp_path):
    import time

    mon = StepMonitor(tmp_path, rank=0, heartbeat_s=0.05, install_signal_handler=False)
    hb = heartbeat_path(tmp_path, 0)
    first = hb.stat().st_mtime_ns
    time.sleep(0.3)  # a "blocked" main thread
    later = hb.stat().st_mtime_ns
    mon.close()
    assert later > first


def test_sigterm_writes_signal_record(tmp_path):
    import subprocess

    code = ("import os, signal, time\n"
            "from launcher.runtime import StepMonitor\n"
            "m = StepMonitor.from_env()\nm.step_begin(4)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)\n")
    env = dict(os.environ, MESHPLAN_MONITOR_DIR=str(tmp_path), RANK="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == -15  # the original disposition still terminates
    recs, _, _ = read_new_records(rank_log_path(tmp_path, 2), 0)
    assert recs[-1]["ev"] == "signal" and recs[-1]["step"] == 4
    assert fold_records(RankView(2), recs).terminal == "signal"


# -- reading -------------------------------------------------------------------------------

def test_corrupt_and_partial_lines_are_skipped(tmp_path, caplog):
    path = tmp_path / "rank0.jsonl"
    path.write_bytes(b'{"ev":"begin","step":0,"t":1.0}\n\x00\xffgarbage\n[1,2]\n'
                     b'{"ev":"end","step":0,"t":2.0,"step_s":1,"comm_s":0,"compute_s":1}\n'
                     b'{"ev":"begin","st')
    recs, offset, bad = read_new_records(path, 0)
    assert [r["ev"] for r in recs] == ["begin", "end"] and bad == 2
    assert "corrupt" in caplog.text
    with open(path, "ab") as fh:  # the writer finishes its line
        fh.write(b'ep":1,"t":3.0}\n')
    more, offset2, bad2 = read_new_records(path, offset)
    assert more == [{"ev": "begin", "step": 1, "t": 3.0}] and bad2 == 0
    assert offset2 == path.stat().st_size


def test_malformed_record_fields_do_not_crash_fold():
    view = fold_records(RankView(0), [{"ev": "end", "t": 1.0, "step": "x"},
                                      {"ev": "begin", "t": 2.0, "step": 3}])
    assert view.current_step == 3 and view.samples == ()


# -- detectors -----------------------------------------------------------------------------

CFG = MonitorConfig(hang_floor_s=1.0, heartbeat_timeout_s=2.0, startup_timeout_s=30.0)


def test_no_false_positives_on_clean_homogeneous_run():
    import random

    rng = random.Random(0)
    recs = {r: records(r, range(50)) for r in range(4)}
    for rs in recs.values():  # +-20% jitter on every duration field
        for rec in rs:
            for key in ("step_s", "comm_s", "compute_s"):
                if key in rec:
                    rec[key] *= 1 + rng.uniform(-0.2, 0.2)
    views = views_of(recs)
    now = max(v.last_t for v in views.values()) + 0.1
    assert find_straggler(views, CFG) is None
    assert find_hang(views, now, CFG) is None
    assert find_slow_link(views, CFG) is None
    beats = {r: now - 0.5 for r in range(4)}
    assert find_dead(views, beats, NODES, 0.0, now, CFG) is None


def test_straggler_flagged_within_window_and_right_rank():
    recs = {r: records(r, range(30), slow_from=10, factor=3.0, extra={"rank": 2})
            for r in range(4)}
    inc = find_straggler(views_of(recs), CFG)
    assert inc is not None and inc.kind == "straggler"
    assert inc.rank == 2 and inc.node == "n1"
    assert 10 <= inc.step <= 10 + 5
    assert inc.evidence["first_slow_step"] >= 10
    assert all(s < 0.7 for s in inc.evidence["scores"])


def test_straggler_in_a_two_rank_job_uses_peer_median():
    recs = {r: records(r, range(12), slow_from=3, factor=3.0, extra={"rank": 1})
            for r in range(2)}
    inc = find_straggler(views_of(recs), CFG)
    assert inc is not None and inc.rank == 1


def test_short_slowdown_is_not_persistent():
    recs = {r: records(r, range(20), slow_from=10, factor=3.0, extra={"rank": 1})
            for r in range(4)}
    views = views_of({r: [x for x in rs if x.get("step", -1) < 12] for r, rs in recs.items()})
    assert find_straggler(views, CFG) is None  # only 2 slow steps so far


def test_pipeline_stages_compared_within_group():
    # ranks 2,3 (last stage) compute 1.6x longer by design: no straggler with groups
    recs = {r: records(r, range(10), compute_s=0.1 * (1.6 if r >= 2 else 1.0)) for r in range(4)}
    views = views_of(recs)
    assert find_straggler(views, CFG, groups={0: 0, 1: 0, 2: 1, 3: 1}) is None


def test_hang_attributed_to_rank_that_never_entered():
    recs = {r: records(r, range(8)) for r in range(4)}
    t = recs[0][-1]["t"]
    for r in range(4):
        recs[r].append({"ev": "begin", "step": 8, "t": t})
        if r != 1:  # rank 1 hangs in compute; the others block in the all-reduce
            recs[r].append({"ev": "enter", "step": 8, "name": "allreduce", "t": t + 0.1})
    views = views_of(recs)
    period = median_period_s(views)
    assert period == pytest.approx(0.12)
    assert find_hang(views, t + 0.5, CFG) is None  # below the floor
    inc = find_hang(views, t + 0.1 + 1.2, CFG)
    assert inc is not None and inc.kind == "hang" and inc.rank == 1 and inc.node == "n0"
    assert inc.evidence["missing_ranks"] == [1] and inc.evidence["waiting_ranks"] == [0, 2, 3]
    assert inc.step == 8


def test_hang_limit_scales_with_step_period():
    recs = {r: records(r, range(5), compute_s=2.0) for r in range(2)}
    views = views_of(recs)
    last = max(v.last_t for v in views.values())
    assert find_hang(views, last + 5.0, CFG) is None  # 3 x 2.02 s not yet passed
    assert find_hang(views, last + 6.2, CFG) is not None


def test_startup_uses_startup_timeout():
    views = views_of({r: records(r, range(0)) for r in range(2)})
    start = views[0].last_t
    assert find_hang(views, start + 10, CFG) is None
    assert find_hang(views, start + 31, CFG) is not None


def test_dead_rank_by_heartbeat_ignores_signalled_victims():
    recs = {r: records(r, range(5)) for r in range(4)}
    t = recs[0][-1]["t"]
    recs[0].append({"ev": "signal", "t": t + 0.5, "sig": 15, "step": 5})
    views = views_of(recs)
    beats = {0: t + 0.5, 1: t + 0.1, 2: t + 9.0, 3: t + 9.0}
    inc = find_dead(views, beats, NODES, 0.0, t + 10.0, CFG)
    assert inc is not None and inc.kind == "dead" and inc.rank == 1 and inc.node == "n0"
    assert inc.evidence["silent_ranks"] == [1]


def test_rank_that_never_started_is_dead_after_startup_timeout():
    views = views_of({r: records(r, range(2)) for r in (0, 2, 3)})
    beats = {r: 1000.5 for r in (0, 2, 3)}
    assert find_dead(views, beats, NODES, 999.0, 1001.0, CFG) is None
    inc = find_dead(views, {r: 1030.5 for r in beats}, NODES, 999.0, 1000.0 + 31, CFG)
    assert inc.rank == 1 and inc.evidence["detected_by"] == "never started"


def test_exit_attribution_blames_rank_that_went_quiet_first():
    recs = {r: records(r, range(5)) for r in range(4)}
    t = recs[0][-1]["t"]
    for r in range(4):
        recs[r].append({"ev": "begin", "step": 5, "t": t})
        if r != 3:  # rank 3 was SIGKILLed at the start of step 5
            recs[r].append({"ev": "enter", "step": 5, "name": "allreduce", "t": t + 0.1})
    recs[2].append({"ev": "signal", "t": t + 0.3, "sig": 15, "step": 5})  # torchrun teardown
    inc = attribute_exit(views_of(recs), {"n0": 1, "n1": 1}, NODES, t + 1)
    assert inc.rank == 3 and inc.node == "n1" and inc.kind == "dead"
    assert inc.evidence["exit_codes"] == {"n0": 1, "n1": 1}
    assert json.loads(inc.to_json())["rank"] == 3


def test_exit_attribution_prefers_killed_node_over_quieter_peer():
    # rank 0 (n0) is waiting in a collective and looks quietest; n1's whole host was
    # SIGKILLed (status -9) after its ranks wrote later records (seen in a 4-host netns run)
    recs = {r: records(r, range(5)) for r in range(4)}
    t = recs[0][-1]["t"]
    for r in (1, 2, 3):
        recs[r].append({"ev": "begin", "step": 5, "t": t + 0.2})
    running = attribute_exit(views_of(recs), {"n0": None, "n1": -9}, NODES, t + 1)
    assert (running.kind, running.node) == ("dead", "n1") and running.rank in (2, 3)
    both = attribute_exit(views_of(recs), {"n0": 1, "n1": -9}, NODES, t + 1)
    assert both.node == "n1"  # a signal kill outranks an error exit that followed it
    errors = attribute_exit(views_of(recs), {"n0": 1, "n1": 1}, NODES, t + 1)
    assert errors.rank == 0  # no signal: the rank that went quiet first


def _with_link_delay(recs: dict[int, list[dict]], slow_ranks: set[int], delay_s: float) -> None:
    """Delay the leave of `slow_ranks`' collectives (their group's link is slow)."""
    for r in slow_ranks:
        shift = 0.0
        for rec in recs[r]:
            if rec["ev"] == "leave":
                shift += delay_s
            rec["t"] += shift if rec["ev"] != "start" else 0.0
            if rec["ev"] in ("leave", "end"):
                rec["comm_s"] = rec.get("comm_s", 0) + (delay_s if rec["ev"] == "end" else 0)


def test_slow_link_localised_to_node():
    # two DP groups {n0: 0,1} and {n1: 2,3}; n1's link is slow, compute is normal
    recs = {r: records(r, range(10)) for r in range(4)}
    _with_link_delay(recs, {2, 3}, 0.2)
    inc = find_slow_link(views_of(recs), CFG)
    assert inc is not None and inc.kind == "slow_link" and inc.node == "n1"
    assert inc.evidence["ranks"] == [2, 3]
    assert find_straggler(views_of(recs), CFG) is None


def test_config_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        MonitorConfig(straggler_threshold=1.5)


def test_hang_without_open_collective_blames_rank_a_step_behind():
    # collectives hidden inside the model (e.g. FSDP): nobody has an open comm() marker
    recs = {r: records(r, range(6)) for r in range(4)}
    t = recs[0][-1]["t"]
    for r in (0, 1, 3):  # rank 2 never begins step 6
        recs[r].append({"ev": "begin", "step": 6, "t": t})
    inc = find_hang(views_of(recs), t + 2.0, CFG)
    assert inc.rank == 2 and inc.node == "n1" and inc.evidence["behind_ranks"] == [2]


def test_peer_medians_match_brute_force():
    import random
    import statistics

    from launcher.monitor import peer_medians

    rng = random.Random(1)
    for n in (2, 3, 4, 7, 10):
        values = {r: rng.choice([rng.random(), 0.5]) for r in range(n)}  # with ties
        groups = {r: r % 2 for r in range(n)} if n > 3 else {}
        got = peer_medians(values, groups)
        for r in values:
            peers = [values[q] for q in values if q != r and groups.get(q, 0) == groups.get(r, 0)]
            if peers:
                assert got[r] == pytest.approx(statistics.median(peers))
            else:
                assert r not in got


def test_detectors_scale_to_a_thousand_ranks():
    import time

    nodes = {r: f"n{r // 8}" for r in range(1024)}
    views = {}
    for r in range(1024):
        recs = records(0, range(40), slow_from=20, factor=3.0, extra={"rank": 0 if r == 517 else -1})
        recs[0]["node"] = nodes[r]
        views[r] = fold_records(RankView(r), recs)
    t0 = time.perf_counter()
    inc = find_straggler(views, CFG)
    find_slow_link(views, CFG)
    elapsed = time.perf_counter() - t0
    assert inc is not None and inc.rank == 517 and inc.node == "n64"
    assert elapsed < 10.0  # one poll's work; quadratic code took minutes here


def test_unwritable_monitor_dir_disables_instead_of_breaking_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    mon = StepMonitor.from_env({"MESHPLAN_MONITOR_DIR": str(tmp_path / "file" / "mon")})
    assert not mon.enabled and "monitor disabled" in capsys.readouterr().err
    mon.step_begin(0)
    mon.step_end(0)
    mon.close()


def test_exit_with_no_rank_to_blame():
    recs = {r: records(r, range(3)) + [{"ev": "close", "t": 2000.0}] for r in range(4)}
    views = views_of(recs)
    every = attribute_exit(views, {"n0": 1, "n1": 1}, NODES, 2001.0)
    assert (every.kind, every.rank, every.node) == ("exit", None, None)  # a script error
    lone = attribute_exit(views, {"n0": None, "n1": 137}, NODES, 2001.0)
    assert (lone.kind, lone.rank, lone.node) == ("exit", None, "n1")  # a lost agent
