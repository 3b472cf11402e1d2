"""`meshplan launch` tells on stderr what the framework will run differently, re-estimates
it, and exports the environment the framework requires in every launch file."""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

from launcher.launch_cli import launch
from planner.planfile import write_plan

sys.path.insert(0, str(Path(__file__).parent))
import launch_plans  # noqa: E402

SCRIPT = str(Path(__file__).resolve().parents[1] / "examples" / "train_gpt.py")


def _launch(tmp_path: Path, name: str, *extra: str):
    plan = tmp_path / "plan.yaml"
    write_plan(launch_plans.make(name), plan)
    out = tmp_path / "out"
    result = CliRunner().invoke(launch, [str(plan), "--script", SCRIPT, "-o", str(out), *extra])
    return result, out


def test_torchtitan_notes_and_reestimate_on_stderr(tmp_path):
    result, out = _launch(tmp_path, "70b-fp8", "--framework", "torchtitan")
    assert result.exit_code == 0, result.output
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("meshplan launch: note:")]
    assert any("float8" in n for n in notes) and any("re-done" in n and "s/step" in n for n in notes)
    assert "re-done" in (out / "README.md").read_text()
    assert "--training.local_batch_size" in (out / "torchtitan_args.sh").read_text()


def test_torchtitan_main_names_and_bad_version(tmp_path):
    result, out = _launch(tmp_path, "70b-pp3", "--framework", "torchtitan", "--torchtitan-version", "main")
    assert result.exit_code == 0
    assert "num_pp_microbatches" in (out / "torchtitan_args.sh").read_text()
    bad, _ = _launch(tmp_path, "70b-pp3", "--torchtitan-version", "0.2")
    assert bad.exit_code == 2 and "0.3.0" in bad.output


def test_megatron_env_in_every_launch_file(tmp_path):
    result, out = _launch(tmp_path, "70b-vp", "--framework", "megatron")
    assert result.exit_code == 0 and result.stderr == ""
    for name in ("node-0.sh", "launch.sbatch", "megatron_args.sh", "pytorchjob.yaml"):
        assert "CUDA_DEVICE_MAX_CONNECTIONS" in (out / name).read_text(), name
    plain, out2 = _launch(tmp_path / "p", "70b-vp")
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in (out2 / "node-0.sh").read_text()
