"""The cost model against published runs (../shared/data/published_runs_calibration.csv):
at least 70 usable rows, overall MAPE <= 12% (issue acceptance), and the dgxc-benchmarking
iteration times (the least ambiguous target) within 8% on average (5.2% now)."""

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from published import CSV, HELDOUT, load_cases  # noqa: E402
from validate_published import best_estimate  # noqa: E402

pytestmark = pytest.mark.skipif(not CSV.exists(), reason=f"{CSV} not present (shared/ not beside the checkout)")


def test_published_runs_mape():
    cases, skipped = load_cases(CSV)
    assert len(cases) >= 70, f"only {len(cases)} usable rows ({len(skipped)} skipped)"
    errs = [abs(best_estimate(c).step_time_s / c.measured_step_s - 1) for c in cases]
    assert np.mean(errs) <= 0.12
    dgxc = [e for c, e in zip(cases, errs, strict=True) if "dgxc" in c.source]
    assert len(dgxc) >= 20 and np.mean(dgxc) <= 0.08


CSV_2025 = CSV.parent / "published_runs_2025_2026.csv"


@pytest.mark.skipif(not CSV_2025.exists(), reason=f"{CSV_2025} not present")
def test_2025_2026_runs_blackwell_dense_and_moe():
    """Megatron-Bridge 2025-2026 rows (../shared/data/published_runs_2025_2026.csv): every
    layout is accepted (FSDP rows too, issue 14); dense Bridge rows within 6% on average and
    each dense Blackwell row within 12% (3.6% / 7.5% now); MoE rows held under 25% (19% now:
    container releases differ by up to 1.6x on the same layout, see README)."""
    from published import load_cases_2025

    cases, skipped = load_cases_2025(CSV_2025)
    assert not skipped, skipped  # FSDP rows included since issue 14
    assert len(cases) >= 45
    errs = {c.label: abs(best_estimate(c).step_time_s / c.measured_step_s - 1) for c in cases}
    dense = [c for c in cases if not c.model.is_moe and "Megatron-Bridge" in c.source]
    assert np.mean([errs[c.label] for c in dense]) <= 0.06
    for c in dense:
        if c.cluster.gpu.name in ("B200", "GB200"):
            assert errs[c.label] <= 0.12, c.label
    moe = [errs[c.label] for c in cases if c.model.is_moe]
    assert len(moe) == 21 and np.mean(moe) <= 0.25
    # torchtitan FSDP2 rows (docs/fsdp.md): H200 within 12% (9.6, 11.2% now); the 96 GB H100 at
    # 500 W, whose tensor throughput is unknown, held under 30% (27.0% now)
    titan = [c for c in cases if "torchtitan" in c.source]
    assert len(titan) == 12
    h200 = [errs[c.label] for c in titan if c.cluster.gpu.name == "H200"]
    assert len(h200) == 2 and max(h200) <= 0.12
    assert np.mean([errs[c.label] for c in titan if c.cluster.gpu.name != "H200"]) <= 0.30




def test_heldout_moe_runs_are_read_as_published_and_fit():
    """The held-out runs (benchmarks/heldout_runs.py: DeepSeek-V3, and the shared families on
    GB300 / B300; nothing fitted on them): read with their presets, DeepSeek-V3 at Megatron-
    Bridge's layer split and with MTP as the table says, every usable one judged to fit at its
    published layout (none does not), and the error held under 30% (20.0% now; the figures
    per model and GPU are in the README)."""
    from dataclasses import replace

    from published import load_cases_2025

    from cost_models.megatron import estimate
    from planner.options import DEFAULT_PLAN_HEADROOM

    cases, skipped = load_cases_2025(HELDOUT)
    assert len(cases) >= 78 and not skipped, skipped
    # a release-family overlap fact the row's own layout (pp8 vp1) cannot take is dropped,
    # not the row (Megatron-Core refuses --overlap-moe-expert-parallel-comm there)
    b300 = [c for c in cases if c.label.startswith("  5 DeepSeek-V3 256xB300")]
    assert len(b300) == 1 and not any(lay.moe_a2a_overlap for lay in b300[0].layouts)
    deepseek = [c for c in cases if "DeepSeek" in c.label]
    assert len(deepseek) >= 20
    for c in deepseek:  # Bridge's table covers 4, 8 and 16 chunks (pp x vp)
        lay = c.layouts[0]
        if lay.pp * lay.vp in (4, 8, 16):
            assert lay.layers_per_stage is not None and sum(lay.layers_per_stage) == 61, c.label
    no_mtp = [c for c in deepseek if c.model.mtp_layers == 0]
    assert len(no_mtp) == 4  # the 25.11 rows labelled "w/o MTP"
    assert replace(no_mtp[0].model, mtp_layers=1) == deepseek[0].model
    for c in cases:
        ests = [estimate(c.model, c.cluster, lay, DEFAULT_PLAN_HEADROOM) for lay in c.layouts]
        assert any(e.fits for e in ests), c.label
    errs = [abs(best_estimate(c).step_time_s / c.measured_step_s - 1) for c in cases]
    assert np.mean(errs) <= 0.30
    # the hybrid family (Mamba-2 / attention / MoE): every row read with its preset's graphs,
    # its error held under 25% (16.3% now; H100 rows 1.4%)
    kimi = [c for c in cases if "Kimi" in c.label]  # DeepSeek-V3's network and layer split
    assert len(kimi) == 4 and all(sum(c.layouts[0].layers_per_stage) == 61 for c in kimi)
    nano = [c for c in cases if c.model.layer_pattern]
    assert len(nano) == 17
    assert all(c.layouts[0].cuda_graph_modules for c in nano)
    nano_errs = [abs(best_estimate(c).step_time_s / c.measured_step_s - 1) for c in nano]
    assert np.mean(nano_errs) <= 0.25
