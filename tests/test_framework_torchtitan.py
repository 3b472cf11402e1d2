"""torchtitan 0.3.0 (what `pip install torchtitan` gives) accepts the arguments meshplan
writes and builds the planned model with the planned stage split.

The released wheel is installed without its dependencies (on first use, by
tests/external_packages.py into .ci/torchtitan, or MESHPLAN_TORCHTITAN_PATH) with the few light packages its config path imports; tests/titan_check.py
then runs torchtitan's own ConfigManager.parse_args, ParallelDims.from_config and builds the
model on the meta device, in one subprocess for all plans. Two cases reproduce the old
mapping's failures (no --training.disable_cuda_graphs with pp > 1; the last stage naming
`output` instead of `lm_head`) and must be caught, so the check can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cost_models.flops import parameter_count
from launcher import frameworks
from launcher.architecture import architecture
from launcher.torchtitan import titan_model

sys.path.insert(0, str(Path(__file__).parent))
import external_packages  # noqa: E402
import launch_plans  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TITAN_PATH = os.environ.get("MESHPLAN_TORCHTITAN_PATH", str(ROOT / ".ci" / "torchtitan"))
external_packages.ensure_torchtitan(Path(TITAN_PATH))
STAND_IN = ["--module", "deepseek_v3", "--config", "deepseek_v3_debugmodel"]  # MoE, for layout only


def _titan_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (TITAN_PATH, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _titan_version() -> str | None:
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('torchtitan'))"],
        env=_titan_env(), capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


VERSION = _titan_version()
pytestmark = pytest.mark.skipif(
    VERSION != "0.3.0",
    reason=f"torchtitan 0.3.0 not in {TITAN_PATH} (found {VERSION}) and the package index "
           "could not be reached to install it (tests/external_packages.py)")


def _cases(plans) -> list[dict]:
    cases = []
    for name, plan in plans.items():
        args = frameworks.torchtitan_args(plan, "0.3.0")
        stand_in = titan_model(plan) is None
        cases.append({"name": name, "args": (STAND_IN if stand_in else []) + args,
                      "world": plan.layout.world, "stand_in": stand_in})
    pp_plan = plans["70b-pp3"]
    bad = [a for a in frameworks.torchtitan_args(pp_plan, "0.3.0") if a != "--training.disable_cuda_graphs"]
    cases.append({"name": "old-no-disable-cuda-graphs", "args": bad, "world": pp_plan.layout.world})
    old = [a.replace("lm_head", "output") for a in frameworks.torchtitan_args(pp_plan, "0.3.0")]
    cases.append({"name": "old-output-name", "args": old, "world": pp_plan.layout.world})
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    plans = {k: launch_plans.make(k) for k in launch_plans.ACCEPTANCE}
    plans["deepseek-v3"] = launch_plans.make("deepseek-v3", launch_plans.FAMILIES)
    plans["8b-fsdp-never"] = launch_plans.make("8b-fsdp-never", launch_plans.FAMILIES)
    cases_file = tmp_path_factory.mktemp("titan") / "cases.json"
    cases_file.write_text(json.dumps(_cases(plans)))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "titan_check.py"), str(cases_file)],
                          env=_titan_env(), capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MESHPLAN-RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return plans, json.loads(line[0].split(" ", 1)[1])


@pytest.mark.parametrize("name", [*launch_plans.ACCEPTANCE, "deepseek-v3", "8b-fsdp-never"])
def test_torchtitan_accepts_plan_and_builds_it(results, name):
    plans, res = results
    plan, got = plans[name], res[name]
    assert got["accepted"], got.get("error")
    assert got["errors"] == []
    lay = plan.layout
    dims = lay.dims  # FSDP / HSDP plans: shard dp/dp_replicate, replicate dp_replicate
    assert got["dims"] == {"dp_replicate": dims.dp_replicate if lay.fsdp else 1,
                           "dp_shard": dims.dp_shard if lay.fsdp else lay.dp, "cp": lay.cp,
                           "tp": lay.tp, "pp": lay.pp, "ep": lay.ep}
    # the estimate of an FSDP plan assumed its reshard policy (torchtitan's default unless set)
    assert got["reshard_after_forward"] == (lay.fsdp_reshard_after_forward if lay.fsdp
                                            else "never")
    # what the estimate priced: fused kernels under compile, async TP (torchtitan's config)
    assert got["compile"] == [lay.torch_compile, lay.async_tp]
    if lay.pp > 1:
        assert got["stages"] == [[s.first_layer, s.num_layers] for s in plan.stages]
    if titan_model(plan) is not None and plan.model.name.startswith("llama"):
        m, arch = plan.model, architecture(plan.model)[0]
        assert got["shape"] == {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
                                "vocab_size": m.vocab_size, "num_heads": m.num_heads,
                                "num_kv_heads": m.num_kv_heads, "rope_theta": arch.rope_theta,
                                "rope_scaling": "llama"}
        assert got["params"] == parameter_count(m)


def test_old_mapping_failures_are_caught(results):
    _, res = results
    assert not res["old-no-disable-cuda-graphs"]["accepted"]
    assert "cuda" in res["old-no-disable-cuda-graphs"]["error"].lower() or \
        "exit" in res["old-no-disable-cuda-graphs"]["error"]
    assert any("lacks" in e for e in res["old-output-name"]["errors"])
