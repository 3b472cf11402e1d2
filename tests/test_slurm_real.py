"""The generated launch.sbatch runs to completion under a real SLURM.

A private one-node cluster (tests/slurm_cluster.py: munged + slurmctld + slurmd from Debian's
slurm-wlm, the node as `slurmd -C` reports it) runs `sbatch --wait launch.sbatch` for a
`local-cpu` plan of the example trainer (2 processes, tp 2). The job must finish with exit 0,
the trainer must log every step, and the torchrun task must get every CPU of the node
(--exclusive + srun --cpus-per-task), not the one CPU SLURM gives a task by default.
Skipped, saying why, when not root or the packages are not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import slurm_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REASON = slurm_cluster.missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
STEPS = 3


def _meshplan(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "planner.cli", *args], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=120)


@pytest.fixture
def cluster(tmp_path):
    c = slurm_cluster.start(tmp_path / "slurm")
    yield c
    c.stop()


def _plan_and_launch(tmp_path: Path) -> tuple[dict, Path, Path]:
    """A tp2 local-cpu plan of the example trainer and its slurm launch files: (env, launch
    directory, the trainer's loss log)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    plan, out, log = tmp_path / "plan.yaml", tmp_path / "launch", tmp_path / "losses.jsonl"
    _meshplan("plan", "--model", "tiny-gpt", "--cluster", "local-cpu", "--nodes", "1",
              "--gpus-per-node", "2", "--seq-len", "32", "--global-batch-size", "8", "--tp", "2",
              "-o", str(plan), env=env)
    _meshplan("launch", str(plan), "--script", str(ROOT / "examples" / "train_gpt.py"),
              "--backend", "slurm", "-o", str(out), "--python", sys.executable, "--",
              "--steps", str(STEPS), "--log-file", str(log), env=env)
    return env, out, log


def test_sbatch_of_local_cpu_plan_completes(cluster, tmp_path):
    env, out, log = _plan_and_launch(tmp_path)
    job_out = tmp_path / "job.out"
    probe = 'echo "cpus_per_task=${SLURM_CPUS_PER_TASK:-}"; '
    script = out / "launch.sbatch"
    text = script.read_text()
    assert "#SBATCH --exclusive" in text and "--cpus-per-task=" in text
    # Record the CPUs SLURM gave the job step's task.
    script.write_text(text.replace("exec torchrun", f"{probe}exec torchrun", 1))
    sub = subprocess.run(["sbatch", "--wait", "-o", str(job_out), str(script)],
                         env=dict(cluster.env, **{k: env[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS")}),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = job_out.read_text() if job_out.exists() else ""
    assert sub.returncode == 0, f"{sub.stderr}\n{output[-3000:]}\n{cluster.logs()}"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(STEPS)), output[-2000:]
    node_cpus = os.cpu_count()
    assert f"cpus_per_task={node_cpus}" in output, output[-2000:]


def test_supervised_sbatch_runs_meshplan_run_with_srun_agents(cluster, tmp_path):
    """launch.supervised.sbatch: `meshplan run` in the batch step, the node agent started
    with srun as a job step, the ranks' records over the collector, the job to its end."""
    env, out, log = _plan_and_launch(tmp_path)
    script = out / "launch.supervised.sbatch"
    assert "planner.cli run" in script.read_text() and "--launcher srun" in script.read_text()
    job_out = tmp_path / "job.out"
    sub = subprocess.run(["sbatch", "--wait", "-o", str(job_out), str(script)],
                         env=dict(cluster.env, **{k: env[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS")}),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = job_out.read_text() if job_out.exists() else ""
    assert sub.returncode == 0, f"{sub.stderr}\n{output[-3000:]}\n{cluster.logs()}"
    runs = sorted((out / "run").glob("job-*"))
    assert len(runs) == 1, output[-2000:]
    summary = json.loads((runs[0] / "run.json").read_text())
    assert summary["ok"] is True, summary
    attempt = summary["attempts"][0]
    assert attempt["records"]["received"] > 0 and attempt["records"]["lost"] == 0, attempt
    agents = [json.loads(x) for x in (runs[0] / "attempt0" / "monitor" / "agents.jsonl")
              .read_text().splitlines()]
    start = next(a for a in agents if a["ev"] == "start")
    assert start["slurm_step"] not in (None, "batch", "extern"), start  # srun made it a step
    assert any(a["ev"] == "exit" and a["code"] == 0 for a in agents), agents
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(STEPS)), output[-2000:]
