"""Multi-token prediction (DeepSeek-V3 Sec. 2.2): parsed from num_nextn_predict_layers, priced
on the last pipeline stage (a projection, one more layer, another pass through the shared head),
launched with Megatron's --mtp-num-layers, and left out where the pinned torchtitan cannot run
it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cost_models import flops
from cost_models.megatron import estimate
from cost_models.specs import GiB, Layout
from launcher import bridge, frameworks, torchtitan
from planner.planfile import Plan
from planner.specfiles import MODELS_DIR, load_cluster, load_model


@pytest.fixture(scope="module")
def dsv3():
    return load_model("deepseek-v3")


def test_config_key_sets_the_modules(tmp_path, dsv3):
    assert dsv3.mtp_layers == 1  # the published config: num_nextn_predict_layers 1
    cfg = json.loads((MODELS_DIR / "deepseek-v3.json").read_text())
    del cfg["num_nextn_predict_layers"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert load_model(str(path)).mtp_layers == 0
    cfg["num_nextn_predict_layers"] = -1
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_nextn_predict_layers must be a positive integer"):
        load_model(str(path))


def test_model_flops_count_projection_layer_and_head(dsv3):
    tokens = 4096
    without = flops.model_flops_per_step(replace(dsv3, mtp_layers=0), 1, tokens)
    per_layer = flops.layer_gemm_flops(dsv3, tokens) + flops.attention_core_flops(dsv3, 1, tokens)
    extra = 3 * (per_layer + flops.lm_head_flops(dsv3, tokens)
                 + 2 * tokens * 2 * dsv3.hidden_size * dsv3.hidden_size)
    assert flops.model_flops_per_step(dsv3, 1, tokens) - without == pytest.approx(extra)
    assert flops.parameter_count(dsv3) == flops.parameter_count(replace(dsv3, mtp_layers=0))


def _layout(**kw) -> Layout:
    base = dict(tp=1, pp=8, vp=1, dp=32, ep=32, etp=1, micro_batch_size=1,
                global_batch_size=1024, seq_len=4096, recompute="full", dtype="fp8")
    return Layout(**{**base, **kw})


def test_last_stage_pays_one_more_layer_and_head(dsv3):
    cluster = load_cluster("dgx-h100", nodes=32)
    lay = _layout()
    with_mtp = estimate(dsv3, cluster, lay)
    without = estimate(replace(dsv3, mtp_layers=0), cluster, lay)
    # the last of 8 stages already runs the head; one more layer (+ head) makes it the slowest
    assert with_mtp.step_time_s > without.step_time_s * 1.01
    # its weights: one more MoE layer's experts over ep, a dense part and the embedding copy
    assert with_mtp.memory.peak_bytes > without.memory.peak_bytes + 0.5 * GiB
    titan = replace(lay, framework="torchtitan", fsdp=True)
    assert estimate(dsv3, cluster, titan).step_time_s == pytest.approx(
        estimate(replace(dsv3, mtp_layers=0), cluster, titan).step_time_s)


def _plan(model, lay):
    cluster = load_cluster("dgx-h100", nodes=32)
    lay.validate(model, cluster.world_size)
    return Plan(model, cluster, lay, tuple(n.name for n in cluster.nodes),
                {"step_time_s": estimate(model, cluster, lay).step_time_s})


def test_launch_artifacts_name_the_modules(dsv3):
    plan = _plan(dsv3, _layout(tp=2, pp=8, dp=16, ep=16, etp=None, sequence_parallel=True))
    args = frameworks.megatron_args(plan)
    assert args[args.index("--mtp-num-layers") + 1] == "1"
    assert bridge.model_fields(plan)["mtp_num_layers"] == 1
    assert any("no multi-token prediction" in n for n in torchtitan.notes(plan))
    dense = _plan(replace(dsv3, mtp_layers=0), plan.layout)
    assert "--mtp-num-layers" not in frameworks.megatron_args(dense)
    assert "mtp_num_layers" not in bridge.model_fields(dense)


def test_cli_mtp_layers_overrides_the_config():
    """`estimate --mtp-layers 0` trains without the config's module; a bad count is one line."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "planner.cli", "estimate", "-m", "deepseek-v3", "-c",
            "dgx-h100", "--nodes", "32", "--seq-len", "4096", "--gbs", "1024", "--tp", "1",
            "--pp", "8", "--ep", "32", "--etp", "1", "--mbs", "1", "--recompute", "full",
            "--dtype", "fp8", "--mem-headroom", "0", "--json"]
    steps = []
    for extra in ([], ["--mtp-layers", "0"]):
        r = subprocess.run(base + extra, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        steps.append(json.loads(r.stdout)["step_time_s"])
    assert steps[0] > steps[1] * 1.01
    bad = subprocess.run(base + ["--mtp-layers", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--mtp-layers" in bad.stderr and "Traceback" not in bad.stderr
