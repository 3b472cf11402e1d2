"""Goodput: Young/Daly checkpoint intervals, Daly's expected ETTR, and a failure-trace replay
that checks the closed form (Llama 3's published failure rate at 16,384 GPUs)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from cost_models import goodput as gp


def test_llama3_failure_rate_from_table5():
    # Llama 3 Table 5: 419 unexpected interruptions in 54 days on 16,384 H100 = one per 3.09 h
    assert sum(gp.LLAMA3_INTERRUPTIONS.values()) == 419
    assert gp.job_mtbf_s(gp.LLAMA3_MTBF_GPU_HOURS, 16_384) / 3600 == pytest.approx(54 * 24 / 419)


def test_young_and_daly_intervals():
    assert gp.young_interval_s(2.0, 10_000.0) == pytest.approx(200.0)  # sqrt(2 * 2 * 10^4)
    # Daly eq. 37 tends to Young minus the checkpoint as delta/M -> 0, and to M past 2M
    assert gp.daly_interval_s(1e-3, 1e6) == pytest.approx(gp.young_interval_s(1e-3, 1e6), rel=1e-3)
    assert gp.daly_interval_s(300.0, 100.0) == 100.0


def test_daly_interval_maximises_expected_ettr():
    m, delta, restart = 11_000.0, 30.0, 600.0
    tau = gp.daly_interval_s(delta, m)
    best = gp.expected_ettr(tau, delta, restart, m)
    grid = np.linspace(0.2 * tau, 5 * tau, 400)
    assert best >= max(gp.expected_ettr(t, delta, restart, m) for t in grid) - 1e-4


def test_replay_accounts_exactly_for_a_known_trace():
    # work 100 s in segments of 40 s, checkpoint 5 s, restart 10 s; one failure at t = 50:
    # segment 1 [0, 45) saved; failure 5 s into segment 2 -> lost 5 s; restart [50, 60)
    r = gp.replay(np.array([50.0]), work_s=100.0, interval_s=40.0, checkpoint_s=5.0,
                  restart_s=10.0)
    assert (r.failures, r.lost_work_s, r.restart_time_s) == (1, 5.0, 10.0)
    assert r.wall_s == pytest.approx(60 + 45 + 25)  # then 40 + 5 and the last 20 + 5
    clean = gp.replay(np.array([]), 100.0, 40.0, 5.0, 10.0)
    assert clean.wall_s == 115.0 and clean.ettr == pytest.approx(100 / 115)


def test_a_failure_during_restart_restarts_again():
    r = gp.replay(np.array([10.0, 15.0]), work_s=20.0, interval_s=100.0, checkpoint_s=1.0,
                  restart_s=10.0)
    # lost 10 s, restart interrupted at 15, full restart 15 -> 25, then 20 + 1
    assert r.failures == 2 and r.wall_s == pytest.approx(25 + 21)


@pytest.mark.parametrize("gpus,checkpoint_s,restart_s", [
    (16_384, 2.8, 600.0),    # Llama 3.1 405B on 16,384 H100 with Llama 3's failure rate
    (16_384, 120.0, 1800.0),  # slow storage, slow restarts
    (100_000, 30.0, 900.0),  # a 100k-GPU job: a failure every half hour
])
def test_replay_agrees_with_the_closed_form_within_two_points(gpus, checkpoint_s, restart_s):
    m = gp.job_mtbf_s(gp.LLAMA3_MTBF_GPU_HOURS, gpus)
    tau = gp.daly_interval_s(checkpoint_s, m)
    expected = gp.expected_ettr(tau, checkpoint_s, restart_s, m)
    work = 540 * 86400.0
    played = gp.replay(gp.poisson_trace(m, 3 * work, seed=3), work, tau, checkpoint_s, restart_s)
    assert abs(played.ettr - expected) < 0.02, (played.ettr, expected)
    assert played.failures > 1000


def test_goodput_command_for_405b_on_16384_h100(tmp_path):
    plan = tmp_path / "plan.yaml"
    made = subprocess.run([sys.executable, "-m", "planner.cli", "plan", "--model", "llama3.1-405b",
                           "--cluster", "dgx-h100", "--nodes", "2048", "--seq-len", "8192",
                           "--global-batch-size", "2048", "-o", str(plan)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert made.returncode == 0, made.stderr
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "goodput", str(plan), "--json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["gpus"] == 16_384 and out["job_mtbf_s"] / 3600 == pytest.approx(3.09, abs=0.01)
    assert 0.85 < out["ettr"] < 0.99 and math.isclose(out["interval_s"], out["optimal_interval_s"])
    assert abs(out["replay"]["ettr"] - out["ettr"]) < 0.02
    assert out["interval_steps"] >= 1 and out["replay"]["causes"]["faulty GPU"] > 0
    text = subprocess.run([sys.executable, "-m", "planner.cli", "goodput", str(plan)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120).stdout
    assert "expected ETTR" in text and "checkpoint every" in text
