"""The validation bands `estimate` and `plan` print (planner/data/validation.yaml) are what
the cost model scores on the published runs now, and the commands show them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from published import CSV, CSV_2025  # noqa: E402
from validate_published import HELDOUT, bands  # noqa: E402

from planner import validation  # noqa: E402
from planner.specfiles import load_cluster  # noqa: E402


@pytest.mark.skipif(not (CSV.exists() and CSV_2025.exists()),
                    reason="shared/data/ not beside the checkout")
def test_shipped_bands_are_the_current_validation():
    """Fails when a cost-model change moves a band: rerun
    `python benchmarks/validate_published.py --write-bands`."""
    now = {(b.gpu, b.kind): b for b in bands([CSV, CSV_2025, HELDOUT])}
    shipped = validation._bands()
    assert set(now) == set(shipped)
    for key, band in now.items():
        assert shipped[key].runs == band.runs, key
        assert shipped[key].mean_error == pytest.approx(band.mean_error, abs=5e-4), key
        assert shipped[key].max_error == pytest.approx(band.max_error, abs=5e-4), key
    # the bands cover what the shared files hold: dense Hopper and Ampere, MoE on Blackwell
    assert {("H100-SXM", "dense"), ("A100-80GB", "dense"), ("B200", "moe"),
            ("GB200", "moe")} <= set(now)


def test_bands_text_round_trips(tmp_path, monkeypatch):
    made = [validation.Band("X1", "moe", 3, 0.1234, 0.5), validation.Band("X1", "dense", 1, 0, 0)]
    path = tmp_path / "validation.yaml"
    path.write_text(validation.bands_yaml(made))
    monkeypatch.setattr(validation, "BANDS_FILE", path)
    validation._bands.cache_clear()
    try:
        got = validation.band_for("X1", True)
        assert (got.runs, got.mean_error, got.max_error) == (3, 0.123, 0.5)
        assert validation.band_for("X1", False).runs == 1
        assert validation.band_for("X2", True) is None
    finally:
        validation._bands.cache_clear()


def test_lines_say_what_was_validated_and_what_was_not():
    b200 = load_cluster("dgx-b200", 1)
    line, band = validation.validation_of(b200, True, "megatron")
    assert band["gpu"] == "B200" and band["kind"] == "moe" and band["runs"] >= 7
    assert line.startswith(f"validated on {band['runs']} published MoE runs on B200")
    assert f"{100 * band['mean_error']:.1f}% on average" in line
    line, band = validation.validation_of(load_cluster("local-cpu", 1), False, "megatron")
    assert band == {"gpu": "CPU", "kind": "dense", "runs": 0, "mean_error": None,
                    "max_error": None}
    assert line.startswith("not validated: no published dense run on CPU")
    assert validation.validation_of(b200, True, "pipette") == (None, None)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_estimate_and_plan_print_the_band_of_their_gpu_and_kind():
    base = ("--model", "qwen3-30b-a3b", "--cluster", "dgx-b200", "--nodes", "1", "--seq-len",
            "4096", "--global-batch-size", "512", "--dtype", "mxfp8")
    est = _cli("estimate", *base, "--tp", "1", "--pp", "1", "--ep", "8", "--mbs", "4")
    assert est.returncode == 0, est.stderr
    band = validation.band_for("B200", True)
    assert band.line() in est.stdout
    js = _cli("estimate", *base, "--tp", "1", "--pp", "1", "--ep", "8", "--mbs", "4", "--json")
    assert json.loads(js.stdout)["validation"] == band.to_dict()
    plan = _cli("plan", *base, "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["validation"] == band.to_dict()
    dense = _cli("plan", "--model", "tiny-gpt", "--cluster", "local-cpu", "--nodes", "1",
                 "--seq-len", "128", "--global-batch-size", "8")
    assert dense.returncode == 0, dense.stderr
    assert "not validated: no published dense run on CPU" in dense.stdout
