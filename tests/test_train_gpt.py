"""examples/train_gpt.py: the PyTorch-native trainer that runs a meshplan plan.

The reference is `--single-process` (whole model, same batches, gradient accumulation over the
plan's micro-batches). A 4-process TP2xPP2 (sequence parallel) run under torchrun must give
the same per-step losses, its checkpoint must resume under another layout with the losses of
an uninterrupted run, and MESHPLAN_FAULT_KILL must take the job down at the named step.
All runs are subprocesses with OMP_NUM_THREADS=1 (tiny-gpt, a few steps each).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cost_models.specs import Layout, SpecError
from planner.planfile import Plan, write_plan
from planner.specfiles import load_cluster, load_model

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINER = REPO_ROOT / "examples" / "train_gpt.py"
STEPS = 5
CKPT_STEP = 3
REL_TOL = 1e-4
TIMEOUT_S = 240


def _write_plan(path: Path, world: int = 4, **layout_kw) -> Path:
    """A tiny-gpt plan on local-cpu processes, world 4 as 2 nodes x 2 (default TP2xPP2 with
    sequence parallelism, 4 micro-batches of 1 sequence) or world 1 as 1 node x 1."""
    model = load_model("tiny-gpt")
    nodes = 2 if world == 4 else 1
    cluster = load_cluster("local-cpu", nodes=nodes, gpus_per_node=world // nodes)
    base = {"tp": 2, "pp": 2, "dp": 1, "micro_batch_size": 1, "global_batch_size": 4,
            "seq_len": 32, "sequence_parallel": True}
    if world == 1:
        base |= {"tp": 1, "pp": 1, "sequence_parallel": False}
    layout = Layout(**(base | layout_kw))
    layout.validate(model, cluster.world_size)
    write_plan(Plan(model, cluster, layout, tuple(n.name for n in cluster.nodes), {}), path)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPLAN_")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | extra


def _run(args: list, nproc: int = 0, **env: str) -> subprocess.CompletedProcess:
    """Run the trainer (under torchrun when nproc > 0); never raises on a failed run."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launcher, str(TRAINER), *map(str, args)]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=REPO_ROOT)


def _losses(log: Path) -> dict[int, float]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert got.keys() == want.keys()
    for step, loss in got.items():
        assert abs(loss - want[step]) <= REL_TOL * abs(want[step]), (step, loss, want[step])


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    return _write_plan(tmp_path_factory.mktemp("plan") / "plan.yaml")


@pytest.fixture(scope="module")
def reference(plan, tmp_path_factory) -> tuple[dict[int, float], Path]:
    """Per-step losses of the uninterrupted single-process run, and its checkpoint dir."""
    out = tmp_path_factory.mktemp("ref")
    log, ckpt = out / "losses.jsonl", out / "ckpt"
    proc = _run(["--plan", plan, "--single-process", "--steps", STEPS, "--log-file", log,
                 "--ckpt-dir", ckpt, "--ckpt-every", CKPT_STEP])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _losses(log), ckpt


@pytest.fixture(scope="module")
def tp2pp2_run(plan, tmp_path_factory) -> tuple[dict[int, float], Path]:
    """The 4-process TP2xPP2 run, checkpointing every CKPT_STEP steps."""
    out = tmp_path_factory.mktemp("tp2pp2")
    log, ckpt = out / "losses.jsonl", out / "ckpt"
    proc = _run(["--plan", plan, "--steps", STEPS, "--log-file", log, "--ckpt-dir", ckpt,
                 "--ckpt-every", CKPT_STEP], nproc=4)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return _losses(log), ckpt


def _resume(plan: Path, saved: Path, tmp_path: Path) -> dict[int, float]:
    """Resume a copy of checkpoint dir `saved` on one process, after planting a save that died
    before its rename (.tmp_step_N) and a step dir without DCP metadata: both newer than the
    real checkpoint, both must be ignored. Returns the resumed run's losses."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    (ckpt / f".tmp_step_{STEPS}").mkdir()
    (ckpt / f"step_{STEPS - 1}").mkdir()
    log = tmp_path / "losses.jsonl"
    proc = _run(["--plan", plan, "--single-process", "--steps", STEPS, "--log-file", log,
                 "--ckpt-dir", ckpt])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"step_{CKPT_STEP}" in proc.stdout
    return _losses(log)


def test_single_process_learns(reference):
    losses = [reference[0][s] for s in range(STEPS)]
    assert math.isclose(losses[0], math.log(512), rel_tol=0.02)  # ~uniform over tiny-gpt's vocab
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))


def test_resume_equals_uninterrupted(reference, plan, tmp_path):
    losses, saved = reference
    assert sorted(p.name for p in saved.iterdir()) == [f"step_{CKPT_STEP}"]
    _assert_close(_resume(plan, saved, tmp_path), {s: losses[s] for s in range(CKPT_STEP, STEPS)})


@pytest.mark.torchrun
def test_tp2pp2_matches_single_process(tp2pp2_run, reference):
    losses, ckpt = tp2pp2_run
    _assert_close(losses, reference[0])
    assert sorted(p.name for p in ckpt.iterdir()) == [f"step_{CKPT_STEP}"]  # no .tmp left


@pytest.mark.torchrun
def test_checkpoint_resumes_under_another_layout(tp2pp2_run, reference, plan, tmp_path):
    """A TP2xPP2 checkpoint resumes on one process (DCP reshards the DTensors) with the
    losses of the uninterrupted run."""
    want = {s: reference[0][s] for s in range(CKPT_STEP, STEPS)}
    _assert_close(_resume(plan, tp2pp2_run[1], tmp_path), want)


@pytest.mark.torchrun
def test_fault_kill_stops_the_job_at_that_step(tmp_path):
    plan = _write_plan(tmp_path / "one.yaml", world=1)
    log = tmp_path / "losses.jsonl"
    proc = _run(["--plan", plan, "--steps", STEPS, "--log-file", log], nproc=1,
                MESHPLAN_FAULT_KILL="0:2")
    assert proc.returncode != 0
    assert "rank 0 killed at step 2" in proc.stdout
    assert sorted(_losses(log)) == [0, 1]  # steps 0 and 1 finished, step 2 never did


def test_unsupported_layout_is_a_one_line_error(tmp_path):
    cp_plan = _write_plan(tmp_path / "cp.yaml", tp=2, pp=1, cp=2, sequence_parallel=False)
    proc = _run(["--plan", cp_plan, "--steps", 1])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cp=2") and proc.stderr.count("\n") == 1


def test_fault_variables_target_one_rank_and_reject_malformed_values(monkeypatch):
    monkeypatch.syspath_prepend(str(TRAINER.parent))
    train_gpt = pytest.importorskip("train_gpt")
    env = {"MESHPLAN_FAULT_KILL": "3:2", "MESHPLAN_FAULT_HANG": "1:4",
           "MESHPLAN_FAULT_SLOW": "1:2.5:3"}
    assert train_gpt.parse_faults(env, 3) == train_gpt.Faults(kill_step=2)
    assert train_gpt.parse_faults(env, 1) == train_gpt.Faults(None, 4, 2.5, 3)
    assert train_gpt.parse_faults(env, 0) == train_gpt.Faults()
    for name, value in (("MESHPLAN_FAULT_KILL", "1"), ("MESHPLAN_FAULT_KILL", "1:2.5"),
                        ("MESHPLAN_FAULT_SLOW", "0:fast"), ("MESHPLAN_FAULT_SLOW", "0:0.5")):
        with pytest.raises(SpecError, match=name):
            train_gpt.parse_faults({name: value}, 0)


def test_chunks_share_names_and_weights_with_the_whole_model(monkeypatch):
    """Weights depend on (seed, parameter name) only, names carry global layer indices, and
    uneven chunks composed in order compute the whole model (tied head included)."""
    monkeypatch.syspath_prepend(str(TRAINER.parent))
    torch = pytest.importorskip("torch")
    gpt_model = pytest.importorskip("gpt_model")
    spec = load_model("tiny-gpt")
    whole = gpt_model.build_chunk(spec, 0, spec.num_layers, seed=7)
    parts = [gpt_model.build_chunk(spec, a, b, seed=7) for a, b in ((0, 1), (1, 5), (5, 8))]
    full = dict(whole.named_parameters())
    for part in parts:
        for name, param in part.named_parameters():
            assert torch.equal(param, full[name]), name
    assert "layers.5.attention.wq.weight" in dict(parts[2].named_parameters())
    assert parts[2].output.weight is parts[2].tok_embeddings.weight  # tied on the last chunk
    tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = tokens
    for part in parts:
        hidden = part(hidden)
    torch.testing.assert_close(hidden, whole(tokens), rtol=0, atol=0)
    other = gpt_model.build_chunk(spec, 0, spec.num_layers, seed=8)
    assert not torch.equal(other.layers["0"].attention.wq.weight, whole.layers["0"].attention.wq.weight)
