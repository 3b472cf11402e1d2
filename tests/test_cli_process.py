"""The CLI contract as other tools see it: a real `meshplan` process whose stdout is parsed.

In-process tests (capsys) cannot see what C libraries write to file descriptor 1 — HiGHS'
banner broke `--json` exactly that way — so these run the console script as a process, and
one test builds the wheel and runs it from a fresh virtual environment outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLAN_70B = ["--model", "llama3.1-70b", "--cluster", "dgx-h100", "--nodes", "8", "--seq-len", "8192",
            "--global-batch-size", "128"]
ESTIMATE_70B = ["estimate", *PLAN_70B, "--tp", "4", "--pp", "4", "--cp", "2", "--vp", "5",
                "--micro-batch-size", "1", "--json"]
ESTIMATE_KEYS = {"step_time_s", "tokens_per_s", "mfu", "tflops_per_gpu", "fits", "memory",
                 "breakdown", "layout"}


def _run(argv: list[str], cwd: Path, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    env = None
    if exe is not None:  # the wheel's venv: nothing from this checkout may leak in
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    exe = exe or [sys.executable, "-m", "planner.cli"]
    return subprocess.run([*exe, *argv], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=env)


def _strict_json(text: str):
    """json.loads that refuses NaN/Infinity, which Python's parser accepts by default."""
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_plan_json_is_one_object_when_the_ilp_runs(tmp_path):
    # pp 8 with 1f1b: the LM-head stage is heavy, so the partition ILP runs (and HiGHS
    # prints its banner from C unless it is kept off descriptor 1)
    proc = _run(["plan", *PLAN_70B, "--pp", "8", "--vp", "1", "--schedule", "1f1b", "--json"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = _strict_json(proc.stdout)  # nothing before or after the object
    assert out["search"]["solver"] in ("HiGHS", "PULP_CBC_CMD"), "the partition ILP ran"
    assert len(set(out["plans"][0]["layout"]["layers_per_stage"])) > 1  # an uneven split
    assert "Running HiGHS" not in proc.stdout + proc.stderr
    assert set(out["search"]) >= {"candidates", "feasible", "seconds", "solver", "mem_headroom"}


def test_plan_text_has_no_solver_banner_and_keeps_layout_names_whole(tmp_path):
    proc = _run(["plan", *PLAN_70B], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HiGHS 1." not in proc.stdout and "THIRD_PARTY" not in proc.stdout
    row = next(ln for ln in proc.stdout.splitlines() if ln.lstrip().startswith("1 "))
    assert "tp4 pp4 cp2 dp2 vp2 mbs1 sp zb-v" in row  # one line, not wrapped at 80 columns
    assert "5% of memory kept free" in proc.stdout


def test_estimate_json_contract(tmp_path):
    proc = _run(ESTIMATE_70B, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = _strict_json(proc.stdout)
    assert ESTIMATE_KEYS <= set(out) and out["mem_headroom"] == 0.05
    assert 10 < out["step_time_s"] < 20 and out["fits"] is True


def test_simulate_json_contract(tmp_path):
    plan = tmp_path / "plan.yaml"
    made = _run(["plan", *PLAN_70B, "-o", str(plan)], tmp_path)
    assert made.returncode == 0, made.stderr
    assert oct(plan.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600
    proc = _run(["simulate", str(plan), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = _strict_json(proc.stdout)
    assert out["simulation"] and out["gantt"] is None


def test_json_output_never_holds_nan():
    from planner.jsonout import to_json

    text = to_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert _strict_json(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tracked files, installed into a fresh venv (its
    dependencies come from this interpreter's site-packages: no network in CI)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the tracked files")
    for rel in tracked.stdout.splitlines():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp / "dist").glob("meshplan-*.whl"))
    env_dir = tmp / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py = env_dir / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install",
                                "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return env_dir


def test_wheel_in_a_fresh_venv_has_its_presets(wheel_venv, tmp_path):
    exe = [str(wheel_venv / "bin" / "meshplan")]
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(wheel_venv / "bin" / "python"), "-c",
                            "import planner; print(planner.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=clean)
    assert str(wheel_venv) in where.stdout, f"imported {where.stdout} (not the wheel)"
    models = _run(["models"], tmp_path, exe)
    assert models.returncode == 0 and "llama3.1-70b" in models.stdout, models.stderr
    est = _run(ESTIMATE_70B, tmp_path, exe)
    assert est.returncode == 0, est.stderr
    assert ESTIMATE_KEYS <= set(_strict_json(est.stdout))
    plan = _run(["plan", "--model", "llama3.1-8b", "--cluster", "dgx-h100", "--nodes", "1",
                 "--seq-len", "8192", "--global-batch-size", "32", "--json"], tmp_path, exe)
    assert plan.returncode == 0, plan.stderr
    assert _strict_json(plan.stdout)["plans"]


class _Terminal:
    """A stand-in for a terminal stream: isatty() True, text collected."""

    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_speaks_only_for_long_work_on_a_terminal():
    import io
    import time

    from planner.progress import progress

    term = _Terminal()
    with progress("planning x", after_s=0.05, stream=term):
        time.sleep(0.3)
    assert term.text.startswith("planning x ...\n") and "done in" in term.text
    quick = _Terminal()
    with progress("planning y", after_s=5.0, stream=quick):
        pass
    assert quick.text == ""
    piped = io.StringIO()
    with progress("planning z", after_s=0.0, stream=piped):
        time.sleep(0.05)
    assert piped.getvalue() == ""  # logs and captures stay clean
