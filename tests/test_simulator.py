"""The event-driven step simulator against closed forms, hand-derived orders and invariants."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.simulator import StepTasks, rank_order, simulate_step
from cost_models.specs import SpecError


def tasks(pp: int, m: int, fwd, bwd, vp: int = 1, p2p_s: float = 0.0, dp_comm_s: float = 0.0,
          dp_overlap: float = 0.0, optimizer_s: float = 0.0) -> StepTasks:
    """StepTasks from per-rank (vp = 1) or per-[rank][chunk] times; scalars mean 'every stage'."""
    def table(x):
        if isinstance(x, int | float):
            return tuple((float(x),) * vp for _ in range(pp))
        return tuple(tuple(row) if isinstance(row, tuple) else (float(row),) for row in x)
    return StepTasks(pp, vp, m, table(fwd), table(bwd), (p2p_s,) * (pp * vp - 1),
                     (dp_comm_s,) * pp, dp_overlap, (optimizer_s,) * pp)


def compute_events(result, rank):
    return sorted((e for e in result.events if e.rank == rank and e.kind in ("fwd", "bwd", "opt")),
                  key=lambda e: e.start_s)


# ------------------------------------------------------------------------------------------
# Closed forms
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pp,m", [(1, 5), (2, 4), (4, 8), (4, 16), (8, 32), (4, 3), (8, 3), (4, 1)])
def test_1f1b_equal_stages_is_m_plus_p_minus_1_slots(pp, m):
    tf, tb = 1.0, 2.0
    result = simulate_step(tasks(pp, m, tf, tb), "1f1b")
    assert result.step_time_s == pytest.approx((m + pp - 1) * (tf + tb))
    # every rank does the same work; the bubble is (p-1)(tf+tb) on each
    assert result.idle_s == pytest.approx([(pp - 1) * (tf + tb)] * pp)


@pytest.mark.parametrize("pp,vp,m", [(2, 2, 4), (4, 2, 8), (4, 4, 8), (4, 3, 12), (8, 2, 16), (4, 2, 4)])
@pytest.mark.parametrize("tf,tb", [(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)])
def test_interleaved_equal_stages_is_m_plus_p_minus_1_over_v(pp, vp, m, tf, tb):
    """Narayanan et al. 2021 sec. 2.2.2: bubble (p-1)/v * (tf+tb) with tf, tb per whole rank."""
    result = simulate_step(tasks(pp, m, tf / vp, tb / vp, vp=vp), "interleaved")
    assert result.step_time_s == pytest.approx((m + (pp - 1) / vp) * (tf + tb))


def test_interleaving_divides_the_bubble_by_v():
    plain = simulate_step(tasks(4, 8, 1.0, 2.0), "1f1b")
    inter = simulate_step(tasks(4, 8, 0.25, 0.5, vp=4), "interleaved")
    assert plain.idle_s[0] == pytest.approx(9.0)
    assert inter.idle_s[0] == pytest.approx(9.0 / 4)


@pytest.mark.parametrize("fwd,m", [((1, 1, 2, 2), 8), ((1, 2, 3, 4), 4), ((1, 1, 1, 3), 6), ((2, 5), 3)])
def test_uneven_stages_slowest_last_is_m_minus_1_max_plus_sum(fwd, m):
    bwd = [2 * f for f in fwd]
    slot = [f + b for f, b in zip(fwd, bwd, strict=True)]
    result = simulate_step(tasks(len(fwd), m, fwd, bwd), "1f1b")
    assert result.step_time_s == pytest.approx((m - 1) * max(slot) + sum(slot))


def test_uneven_stages_bounds_random():
    """Same bwd/fwd ratio on every stage: the slowest stage's m slots plus the fill before it
    is a lower bound, (m-1)*max + sum an upper bound."""
    rng = random.Random(7)
    for _ in range(200):
        pp, m, ratio = rng.randint(1, 6), rng.randint(1, 10), rng.uniform(0.5, 3.0)
        fwd = [rng.uniform(0.1, 3.0) for _ in range(pp)]
        slot = [f * (1 + ratio) for f in fwd]
        step = simulate_step(tasks(pp, m, fwd, [f * ratio for f in fwd])).step_time_s
        lower = max(m * slot[r] + sum(slot[:r]) for r in range(pp))
        assert lower - 1e-9 <= step <= (m - 1) * max(slot) + sum(slot) + 1e-9


def test_slowest_stage_first_runs_at_its_own_rate():
    # stage 0 takes 9 per micro-batch, the others 3: nothing waits on the others
    result = simulate_step(tasks(4, 8, (3, 1, 1, 1), (6, 2, 2, 2)))
    assert result.step_time_s == pytest.approx(8 * 9)
    assert result.idle_s[0] == pytest.approx(0.0)


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_p2p_single_microbatch_adds_2_p_minus_1_transfers(pp):
    tf, tb, c = 1.0, 2.0, 0.3
    result = simulate_step(tasks(pp, 1, tf, tb, p2p_s=c))
    assert result.step_time_s == pytest.approx(pp * (tf + tb) + 2 * (pp - 1) * c)


@pytest.mark.parametrize("m", [4, 8, 16, 32])
def test_p2p_is_exposed_in_fill_drain_and_steady_state(m):
    """At least the fill/drain 2(p-1)c, at most 2c on every one of the m+p-1 slots."""
    pp, tf, tb, c = 4, 1.0, 2.0, 0.1
    step = simulate_step(tasks(pp, m, tf, tb, p2p_s=c)).step_time_s
    assert (m + pp - 1) * (tf + tb) + 2 * (pp - 1) * c <= step + 1e-9
    assert step <= (m + pp - 1) * (tf + tb + 2 * c) + 1e-9


def test_p2p_occupies_the_link_not_the_compute():
    result = simulate_step(tasks(2, 4, 1.0, 2.0, p2p_s=0.5))
    sends = [e for e in result.events if e.kind == "p2p"]
    assert len(sends) == 2 * 4  # one activation and one gradient per micro-batch
    first = min(sends, key=lambda e: e.start_s)
    assert (first.rank, first.peer, first.start_s, first.end_s) == (0, 1, 1.0, 1.5)
    # rank 0 keeps computing (forward of micro-batch 1) while micro-batch 0 is on the wire
    f1 = next(e for e in result.events if (e.rank, e.kind, e.microbatch) == (0, "fwd", 1))
    assert f1.start_s == pytest.approx(1.0)


def test_transfers_on_one_link_queue():
    # the 2nd activation waits for the 1st to leave the link 0 -> 1: F1 reaches rank 1 at 2.1
    result = simulate_step(tasks(2, 2, 0.1, 0.1, p2p_s=1.0))
    f1 = next(e for e in result.events if (e.rank, e.kind, e.microbatch) == (1, "fwd", 1))
    assert f1.start_s == pytest.approx(2.1)
    assert result.step_time_s == pytest.approx(3.4)


@pytest.mark.parametrize("overlap,expected_extra", [(0.0, 2.0), (0.5, 1.0), (1.0, 0.0)])
def test_dp_overlap_hides_part_of_the_reduction(overlap, expected_extra):
    m, tf, tb, dp, opt = 4, 1.0, 3.0, 2.0, 0.25
    result = simulate_step(tasks(1, m, tf, tb, dp_comm_s=dp, dp_overlap=overlap, optimizer_s=opt))
    assert result.step_time_s == pytest.approx(m * (tf + tb) + expected_extra + opt)
    dp_event = next(e for e in result.events if e.kind == "dp")
    assert dp_event.start_s == pytest.approx(m * (tf + tb) - overlap * dp)


def test_dp_overlap_cannot_exceed_one_microbatch_of_work():
    # 90% of a 10 s reduction cannot hide under one micro-batch's 1 s forward + 3 s backward
    # (grad reduce-scatter under the backward, param all-gather under the next forward): 6 s stay
    # exposed
    result = simulate_step(tasks(1, 2, 1.0, 3.0, dp_comm_s=10.0, dp_overlap=0.9))
    assert result.step_time_s == pytest.approx(2 * 4.0 + 6.0)


def test_dp_and_optimizer_after_pipeline_on_every_rank():
    pp, m = 4, 8
    result = simulate_step(tasks(pp, m, 1.0, 2.0, dp_comm_s=1.0, optimizer_s=0.5))
    # rank 0 finishes its backwards last, at (m+p-1)*3; then 1 s reduction and 0.5 s step
    assert result.pipeline_s == pytest.approx((m + pp - 1) * 3.0)
    assert result.step_time_s == pytest.approx((m + pp - 1) * 3.0 + 1.5)


# ------------------------------------------------------------------------------------------
# Orders
# ------------------------------------------------------------------------------------------


def ops(text: str):
    """'F0.1 B1.0' -> [(False, chunk 0, mb 1), (True, chunk 1, mb 0)]."""
    return [(t[0] == "B", int(t[1:].split(".")[0]), int(t.split(".")[1])) for t in text.split()]


def test_1f1b_order():
    assert rank_order(4, 1, 5, 1) == ops("F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 F0.4 B0.2 B0.3 B0.4")
    assert rank_order(4, 1, 5, 3) == ops("F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3 F0.4 B0.4")
    assert rank_order(4, 1, 2, 0) == ops("F0.0 F0.1 B0.0 B0.1")  # m < p: all forwards first


def test_interleaved_order_matches_megatron_table():
    # pp=2, vp=2, m=4: groups of pp=2 micro-batches through chunk 0 then chunk 1;
    # warm-up 2*(pp-rank-1) + (vp-1)*pp = 4 on rank 0 and 2 on rank 1
    assert rank_order(2, 2, 4, 0) == ops(
        "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3")
    assert rank_order(2, 2, 4, 1) == ops(
        "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3")


@given(pp=st.integers(1, 6), vp=st.integers(1, 4), groups=st.integers(1, 4))
@settings(max_examples=40, deadline=None)
def test_every_op_once_and_forward_before_backward(pp, vp, groups):
    if vp > 1 and pp == 1:
        return
    m = pp * groups
    for r in range(pp):
        order = rank_order(pp, vp, m, r)
        assert sorted(order) == sorted((b, c, j) for b in (False, True) for c in range(vp) for j in range(m))
        seen = set()
        for is_bwd, c, j in order:
            assert not is_bwd or (c, j) in seen
            seen.add((c, j))


# ------------------------------------------------------------------------------------------
# Invariants
# ------------------------------------------------------------------------------------------

durations = st.floats(0.01, 5.0)


@given(pp=st.integers(1, 5), vp=st.integers(1, 3), groups=st.integers(1, 3), data=st.data(),
       c=st.floats(0.0, 1.0), dp=st.floats(0.0, 3.0), overlap=st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_invariants(pp, vp, groups, data, c, dp, overlap):
    if vp > 1 and pp == 1:
        vp = 1
    m = pp * groups
    grid = st.lists(st.lists(durations, min_size=vp, max_size=vp).map(tuple), min_size=pp, max_size=pp)
    fwd, bwd = data.draw(grid), data.draw(grid)
    t = StepTasks(pp, vp, m, tuple(fwd), tuple(bwd), (c,) * (pp * vp - 1), (dp,) * pp, overlap, (0.1,) * pp)
    result = simulate_step(t, "interleaved" if vp > 1 else "1f1b")
    assert result.step_time_s >= max(result.busy_s) - 1e-9
    for r in range(pp):
        evs = compute_events(result, r)
        assert all(a.end_s <= b.start_s + 1e-9 for a, b in zip(evs, evs[1:], strict=False))
        assert sum(e.duration_s for e in evs) == pytest.approx(result.busy_s[r])
    _check_dependencies(result, c)
    for link in {(e.rank, e.peer) for e in result.events if e.kind == "p2p"}:
        sends = sorted((e for e in result.events if e.kind == "p2p" and (e.rank, e.peer) == link),
                       key=lambda e: e.start_s)
        assert all(a.end_s <= b.start_s + 1e-9 for a, b in zip(sends, sends[1:], strict=False))


def _check_dependencies(result, c):
    pp, stages = result.pp, result.pp * result.vp
    at = {(e.kind, e.chunk * pp + e.rank, e.microbatch): e for e in result.events if e.kind in ("fwd", "bwd")}
    for (kind, k, j), e in at.items():
        if kind == "fwd" and k > 0:
            assert e.start_s >= at["fwd", k - 1, j].end_s + c - 1e-9
        if kind == "bwd":
            assert e.start_s >= at["fwd", k, j].end_s - 1e-9
            if k < stages - 1:
                assert e.start_s >= at["bwd", k + 1, j].end_s + c - 1e-9


def test_large_pipeline_is_fast():
    t = tasks(16, 256, 0.01, 0.02, vp=8, p2p_s=0.001, dp_comm_s=0.05, dp_overlap=0.5, optimizer_s=0.01)
    start = time.perf_counter()
    result = simulate_step(t, "interleaved")
    elapsed = time.perf_counter() - start
    assert len([e for e in result.events if e.kind in ("fwd", "bwd")]) == 2 * 256 * 128
    assert elapsed < 5.0  # ~0.3 s alone; generous for a shared 2-core machine


# ------------------------------------------------------------------------------------------
# Input errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"pp": 0}, "pp must be a positive integer"),
    ({"fwd_s": ((1.0,),)}, r"fwd_s must be \[pp=2\]\[vp=1\]"),
    ({"p2p_s": ()}, "p2p_s must have 1 entries"),
    ({"bwd_s": ((1.0,), (-1.0,))}, "non-negative"),
    ({"dp_overlap": 1.5}, r"dp_overlap must be in \[0, 1\]"),
])
def test_bad_tasks(kwargs, match):
    base = {"pp": 2, "vp": 1, "num_microbatches": 4, "fwd_s": ((1.0,), (1.0,)),
            "bwd_s": ((2.0,), (2.0,)), "p2p_s": (0.0,), "dp_comm_s": (0.0, 0.0),
            "dp_overlap": 0.0, "optimizer_s": (0.0, 0.0)}
    with pytest.raises(SpecError, match=match):
        StepTasks(**{**base, **kwargs})


def test_bad_schedules():
    with pytest.raises(SpecError, match="schedule must be one of"):
        simulate_step(tasks(2, 4, 1.0, 1.0), "gpipe")
    with pytest.raises(SpecError, match="use schedule 'interleaved'"):
        simulate_step(tasks(2, 4, 1.0, 1.0, vp=2), "1f1b")
    with pytest.raises(SpecError, match="multiple of pp = 4"):
        simulate_step(tasks(4, 6, 1.0, 1.0, vp=2), "interleaved")


# ------------------------------------------------------------------------------------------
# Gantt chart and `meshplan simulate`
# ------------------------------------------------------------------------------------------


def test_gantt_png(tmp_path):
    from planner.gantt import render_gantt

    result = simulate_step(tasks(4, 8, 0.005, 0.01, vp=2, p2p_s=0.0005, dp_comm_s=0.01,
                                 dp_overlap=0.5, optimizer_s=0.002), "interleaved")
    out = render_gantt(result, tmp_path / "sub" / "g.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert not list(out.parent.glob(".*.tmp"))  # no temporary file left behind


def test_gantt_unwritable(tmp_path):
    from planner.gantt import render_gantt

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpecError, match="cannot write the Gantt chart"):
        render_gantt(simulate_step(tasks(2, 2, 1.0, 1.0)), blocker / "g.png")


def test_planning_modules_do_not_import_matplotlib():
    import subprocess
    import sys

    code = ("import sys, planner.gantt, planner.cmd_simulate, cost_models.simulator; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _plan_file(tmp_path, estimate_s=1.0):
    from cost_models.specs import Layout, ModelSpec
    from planner.planfile import Plan, write_plan
    from planner.specfiles import load_cluster

    model = ModelSpec(name="tiny", num_layers=8, hidden_size=1024, ffn_hidden_size=4096,
                      num_heads=16, num_kv_heads=16, head_dim=64, vocab_size=32000)
    cluster = load_cluster("dgx-h100", nodes=1)
    layout = Layout(tp=2, pp=4, dp=1, vp=2, micro_batch_size=1, global_batch_size=8, seq_len=1024)
    path = tmp_path / "plan.yaml"
    write_plan(Plan(model, cluster, layout, tuple(n.name for n in cluster.nodes),
                    {"step_time_s": estimate_s}), path)
    return path


def _fake_step_tasks(model, cluster, layout):
    pp, vp = layout.pp, layout.vp
    return StepTasks(pp, vp, layout.num_microbatches, ((0.005,) * vp,) * pp, ((0.01,) * vp,) * pp,
                     (0.0,) * (pp * vp - 1), (0.0,) * pp, 0.0, (0.0,) * pp)


@pytest.fixture
def fake_cost_model(monkeypatch):
    from cost_models import step_tasks

    monkeypatch.setattr(step_tasks, "uniform", _fake_step_tasks)


def test_simulate_command_json_and_gantt(tmp_path, fake_cost_model):
    import json

    from click.testing import CliRunner

    from planner.cmd_simulate import simulate

    plan = _plan_file(tmp_path, estimate_s=0.3)
    gantt = tmp_path / "out.png"
    res = CliRunner().invoke(simulate, [str(plan), "--gantt", str(gantt), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    # m=8, pp=4, vp=2 chunks of 0.005 + 0.01 s: 0.03 s per micro-batch per rank: (8 + 3/2) * 0.03 = 0.285 s
    assert out["simulated_step_time_s"] == pytest.approx(0.285)
    assert out["analytic_step_time_s"] == 0.3
    assert out["difference_pct"] == pytest.approx(-5.0)
    assert out["simulation"]["schedule"] == "interleaved"
    assert gantt.read_bytes()[:4] == b"\x89PNG"


def test_simulate_command_text(tmp_path, fake_cost_model):
    from click.testing import CliRunner

    from planner.cmd_simulate import simulate

    res = CliRunner().invoke(simulate, [str(_plan_file(tmp_path, estimate_s=0.285))])
    assert res.exit_code == 0, res.output
    assert "simulated step      285.00 ms" in res.output
    assert "+0.00 %" in res.output


@pytest.mark.parametrize("args,message", [
    (["missing.yaml"], "plan file missing.yaml does not exist"),
    (["{plan}", "--gantt", "out.svg"], "give a path ending in .png"),
    (["{plan}", "--gantt", "{blocker}/g.png"], "is a file, not a directory"),
])
def test_simulate_command_bad_input_is_one_line(tmp_path, args, message):
    import subprocess
    import sys

    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    plan = tmp_path / "plan.yaml"
    plan.write_text("meshplan: 1\n")  # never read: the --gantt checks come first
    argv = [a.format(plan=plan, blocker=blocker) for a in args]
    out = subprocess.run([sys.executable, "-m", "planner.cli", "simulate", *argv],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_simulate_with_the_real_cost_model(tmp_path):
    """The simulator and the analytic model are independent estimates of the same step: on
    a plain interleaved layout they must agree to within 10% (measured: -0.8%)."""
    import json

    from click.testing import CliRunner

    from cost_models import megatron
    from planner.cmd_simulate import simulate
    from planner.planfile import Plan, read_plan, write_plan

    path = _plan_file(tmp_path)
    plan = read_plan(path)
    estimate = megatron.estimate(plan.model, plan.cluster, plan.layout)
    write_plan(Plan(plan.model, plan.cluster, plan.layout, plan.node_order, estimate.to_dict()), path)
    res = CliRunner().invoke(simulate, [str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["analytic_step_time_s"] == pytest.approx(estimate.step_time_s)
    assert abs(out["difference_pct"]) < 10.0
