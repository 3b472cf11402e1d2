"""plan -> meshplan launch -> run: the generated per-node scripts train on a simulated
2-node x 2-process cluster (localhost, c10d rendezvous on 127.0.0.1, gloo), exactly as a user
runs them on two hosts, and match a single-process run of the same model and data.

Plans are made with `meshplan plan` (`_write_plan`, degrees fixed), with node_order reversed
(node rank 0 = localnode1), and node rank 1's script is started first so that torchrun's
c10d ordering (by join/pid) differs from the plan's: the rank pinning must put global rank r
on node plan.node_order[r // 2] anyway (checked via launcher.runtime's per-rank records).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from planner.planfile import Plan, read_plan, write_plan

pytestmark = pytest.mark.torchrun

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINER = REPO_ROOT / "examples" / "train_gpt.py"
STEPS = 5
RUN_TIMEOUT_S = 240
REL_TOL = 1e-4


def _write_plan(path: Path, tp: int, pp: int, vp: int = 1, layers=None) -> Path:
    """Plan tiny-gpt on local-cpu (2 nodes x 2 processes) with `meshplan plan`, fixing the
    degrees under test. The plan's placement is then reversed (node rank 0 = localnode1) to
    exercise rank pinning, and `layers` (if given) overrides the ILP's split to exercise uneven
    stages."""
    cmd = [sys.executable, "-m", "planner.cli", "plan", "--model", "tiny-gpt", "--cluster",
           "local-cpu", "--nodes", "2", "--gpus-per-node", "2", "--seq-len", "32",
           "--global-batch-size", "8", "--tp", str(tp), "--pp", str(pp), "--vp", str(vp),
           "--mbs", "1", "--recompute", "none", "--top-k", "1", "-o", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = read_plan(path)
    layout = plan.layout
    assert (layout.tp, layout.pp, layout.vp, layout.dp) == (tp, pp, vp, 4 // (tp * pp))
    if layers is not None:
        layout = replace(layout, layers_per_stage=tuple(layers))
    layout.validate(plan.model, plan.cluster.world_size)
    write_plan(replace(plan, layout=layout, node_order=("localnode1", "localnode0")), path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("MESHPLAN_FAULT_KILL", "MESHPLAN_FAULT_HANG", "MESHPLAN_FAULT_SLOW"):
        if key not in extra:
            env.pop(key, None)
    return env


def _run_nodes(out_dir: Path, env: dict[str, str], logs: Path) -> list[int]:
    """Start every node's script (node rank 1 first), wait; kill process groups on timeout."""
    procs = []
    try:
        for rank in (1, 0):
            log = open(logs / f"node{rank}.log", "ab")  # closed in the finally below
            procs.append((subprocess.Popen(["bash", str(out_dir / f"node-{rank}.sh")], env=env,
                                           stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
            time.sleep(0.5)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch in {out_dir} did not finish in {RUN_TIMEOUT_S}s; logs in {logs}")
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    return [proc.returncode for proc, _ in procs]


def _losses(log_file: Path, start_line: int = 0) -> list[tuple[int, float]]:
    lines = log_file.read_text().splitlines()[start_line:] if log_file.exists() else []
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _assert_match(losses: dict[int, float], reference: list[float], what: str) -> list[float]:
    assert sorted(losses) == list(range(STEPS)), f"{what}: steps {sorted(losses)}"
    rel = [abs(losses[i] - reference[i]) / abs(reference[i]) for i in range(STEPS)]
    assert max(rel) <= REL_TOL, f"{what}: relative loss differences {rel}"
    return rel


def _assert_placement(monitor_dir: Path, plan: Plan) -> None:
    """Global rank r ran on node plan.node_order[r // gpus_per_node]."""
    seen = {}
    for path in monitor_dir.glob("rank*.jsonl"):
        for rec in map(json.loads, path.read_text().splitlines()):
            if rec.get("ev") == "start":
                seen[rec["rank"]] = rec["node"]
    assert sorted(seen) == list(range(4)), f"ranks that started: {sorted(seen)}"
    for rank, node in seen.items():
        assert node == plan.node_order[rank // plan.gpus_per_node], f"rank {rank} ran on {node}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """Per-step losses of the single-process run (the same for every layout)."""
    tmp = tmp_path_factory.mktemp("reference")
    plan = _write_plan(tmp / "plan.yaml", tp=1, pp=1)
    log = tmp / "losses.jsonl"
    subprocess.run([sys.executable, str(TRAINER), "--plan", str(plan), "--single-process",
                    "--steps", str(STEPS), "--log-file", str(log)], env=_env(), check=True,
                   timeout=RUN_TIMEOUT_S, capture_output=True)
    losses = dict(_losses(log))
    return [losses[i] for i in range(STEPS)]


def _launch(tmp: Path, plan_path: Path, extra_args: list[str]) -> Path:
    """`meshplan launch` as a user runs it; returns DIR."""
    out = tmp / "launch dir"  # a space in every generated path
    subprocess.run([sys.executable, "-m", "planner.cli", "launch", str(plan_path), "--script",
                    str(TRAINER), "-o", str(out), "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                    "--python", sys.executable, "--", "--steps", str(STEPS), "--log-file",
                    str(tmp / "losses.jsonl"), *extra_args], check=True, timeout=120)
    return out


# TP2xPP2 covers the pipeline and TP2xDP2 data parallelism (PP2xDP2 was dropped for CI time).
@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["TP2xDP2", "TP2xPP2"])
def test_launch_runs_layout_and_matches_single_process(tmp_path, reference, tp, pp):
    plan_path = _write_plan(tmp_path / "plan.yaml", tp=tp, pp=pp)
    out = _launch(tmp_path, plan_path, [])
    codes = _run_nodes(out, _env(MESHPLAN_MONITOR_DIR=str(tmp_path / "mon")), tmp_path)
    assert codes == [0, 0], f"node exit codes {codes}; see {tmp_path}/node*.log"
    rel = _assert_match(dict(_losses(tmp_path / "losses.jsonl")), reference, f"tp{tp} pp{pp}")
    _assert_placement(tmp_path / "mon", read_plan(out / "plan.yaml"))
    print(f"tp{tp}xpp{pp}: max relative loss difference {max(rel):.2e}")


def test_interleaved_uneven_resumes_from_checkpoint(tmp_path, reference):
    """PP2 x VP2 x DP2 with uneven stages (1,3,2,2 layers): stop the run after the step-2
    checkpoint (rank 3 dies as step 3 begins), relaunch the same files; the run continues at
    step 2 and every step's loss equals the uninterrupted single-process run."""
    plan_path = _write_plan(tmp_path / "plan.yaml", tp=1, pp=2, vp=2, layers=(1, 3, 2, 2))
    ckpt = tmp_path / "ckpt"
    out = _launch(tmp_path, plan_path, ["--ckpt-dir", str(ckpt), "--ckpt-every", "2"])
    log = tmp_path / "losses.jsonl"
    codes = _run_nodes(out, _env(MESHPLAN_FAULT_KILL="3:3"), tmp_path)
    assert codes != [0, 0], "the injected fault should have stopped the first launch"
    first = _losses(log)
    # Steps 0, 1 and (unless rank 0 is torn down before writing its line) 2.
    assert [s for s, _ in first] in ([0, 1], [0, 1, 2]), f"first launch logged steps {first}"
    assert (ckpt / "step_2").is_dir(), f"no step_2 checkpoint in {sorted(os.listdir(ckpt))}"

    codes = _run_nodes(out, _env(MESHPLAN_MONITOR_DIR=str(tmp_path / "mon")), tmp_path)
    assert codes == [0, 0], f"relaunch exit codes {codes}; see {tmp_path}/node*.log"
    second = _losses(log, start_line=len(first))
    assert [s for s, _ in second] == [2, 3, 4], f"relaunch logged steps {second}"
    rel = _assert_match(dict(first + second), reference, "interleaved, resumed")
    if len(first) == 3:  # step 2 ran in both launches: the resumed run repeats it exactly
        assert abs(second[0][1] - first[2][1]) <= REL_TOL * abs(first[2][1])
    _assert_placement(tmp_path / "mon", read_plan(out / "plan.yaml"))
    print(f"interleaved resumed: max relative loss difference {max(rel):.2e}")
