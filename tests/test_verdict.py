"""The memory verdict: a margin when it fits, "tight" near the edge, a remedy when over."""

from __future__ import annotations

import json
import subprocess
import sys

from cost_models.specs import Layout
from planner.engine import estimate_layout
from planner.options import resolve_problem
from planner.verdict import TIGHT_FRACTION, memory_verdict

ARGS = ["--model", "llama3.1-70b", "--cluster", "dgx-h100", "--nodes", "8", "--seq-len", "8192",
        "--global-batch-size", "128"]


def _estimate(tp, pp, recompute="none", headroom=0.05, cp=1, vp=1):
    prob = resolve_problem("llama3.1-70b", "dgx-h100", 8, None, 8192, 128, "bf16", "auto")
    lay = Layout(tp=tp, pp=pp, dp=64 // (tp * pp * cp), cp=cp, vp=vp, micro_batch_size=1,
                 global_batch_size=128, seq_len=8192, recompute=recompute,
                 sequence_parallel=tp > 1)
    return estimate_layout(prob, lay, headroom)


def test_fitting_layout_reports_its_margin():
    est = _estimate(4, 4, cp=2, vp=5)
    v = memory_verdict(est, 0.05)
    assert v.fits and not v.tight and v.remedy is None
    assert v.margin_GiB == est.capacity_GiB - est.peak_GiB > TIGHT_FRACTION * v.usable_GiB
    assert v.line().startswith("fits: ") and "5% of memory kept free" in v.line()


def test_tight_when_the_margin_is_inside_the_band():
    est = _estimate(4, 4, cp=2, vp=5)
    # choose the headroom so that the layout fits with 2% of usable memory to spare
    headroom = 1 - est.peak_GiB / 0.98 / (est.capacity_GiB / 0.95)
    v = memory_verdict(_estimate(4, 4, cp=2, vp=5, headroom=headroom), headroom)
    assert v.fits and v.tight and v.line().startswith("tight: ")


def test_over_names_the_recompute_that_fits_and_its_cost():
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "estimate", *ARGS, "--tp", "4",
                           "--pp", "2", "--micro-batch-size", "1", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    verdict = json.loads(proc.stdout)["verdict"]
    assert not verdict["fits"] and verdict["margin_GiB"] < 0
    assert verdict["remedy"].startswith("--recompute full frees") and "(fits," in verdict["remedy"]
    full = _estimate(4, 2, recompute="full")
    assert full.fits  # the remedy is true
    assert "--recompute full frees" in proc.stderr and proc.stderr.count("\n") == 1
