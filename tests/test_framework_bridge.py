"""The Megatron-Bridge recipe override names only real config fields, and says what the
Megatron-LM arguments say.

Megatron-Bridge's config classes do not import here (they pull in transformers, Transformer
Engine and a GPU stack), so the released wheels' sources (megatron-bridge 0.3.1,
megatron-core 0.16.1; tests/external_packages.py downloads them without dependencies into .ci/wheels on
first use, or MESHPLAN_WHEELS) are read with `ast`: every `cfg.<section>.<field>` the override sets must be
a dataclass field of that section's class (or a base class), and the mixed-precision recipe a
registered one. The override's model fields must equal the TransformerConfig values the
Megatron-LM flags produce (the ones benchmarks/check_megatron_args.py compares with the plan).
"""

from __future__ import annotations

import ast
import os
import re
import sys
import zipfile
from pathlib import Path

import pytest

from launcher import bridge

sys.path.insert(0, str(Path(__file__).parent))
import external_packages  # noqa: E402
import launch_plans  # noqa: E402

WHEELS = Path(os.environ.get("MESHPLAN_WHEELS", Path(__file__).resolve().parents[1] / ".ci" / "wheels"))
external_packages.ensure_bridge_wheels(WHEELS)
SECTIONS = {  # ConfigContainer section -> (module path in the wheels, class), bases follow
    "model": [("megatron/bridge/models/gpt_provider.py", "GPTModelProvider"),
              ("megatron/core/transformer/transformer_config.py", "TransformerConfig"),
              ("megatron/core/model_parallel_config.py", "ModelParallelConfig")],
    "train": [("megatron/bridge/training/config.py", "TrainingConfig")],
    "dataset": [("megatron/core/datasets/blended_megatron_dataset_config.py",
                 "BlendedMegatronDatasetConfig")],
    "ddp": [("megatron/core/distributed/distributed_data_parallel_config.py",
             "DistributedDataParallelConfig")],
    "optimizer": [("megatron/core/optimizer/optimizer_config.py", "OptimizerConfig")],
}


def _sources() -> dict[str, str]:
    wheels = sorted(WHEELS.glob("megatron_bridge-0.3.1-*.whl")) + sorted(WHEELS.glob("megatron_core-0.16.1-*.whl"))
    if len(wheels) < 2:
        return {}
    out = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(".py"):
                    out[name] = zf.read(name).decode()
    return out


SOURCES = _sources()
pytestmark = pytest.mark.skipif(not SOURCES, reason=f"megatron-bridge 0.3.1 / megatron-core 0.16.1 "
                                f"wheels not in {WHEELS} (tests/external_packages.py could not download them: no package index?)")


def _fields(path: str, cls: str) -> set[str]:
    tree = ast.parse(SOURCES[path])
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls]
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)
            and isinstance(s.target, ast.Name)}


def _known(section: str) -> set[str]:
    return set().union(*(_fields(p, c) for p, c in SECTIONS[section]))


@pytest.mark.parametrize("name", [*launch_plans.ACCEPTANCE, "mixtral-overlap", "70b-te-loss"])
def test_override_fields_are_real(name):
    plan = launch_plans.make(name, {**launch_plans.ACCEPTANCE, **launch_plans.FAMILIES})
    text = bridge.recipe_override_py(plan)
    ast.parse(text)
    for section, field in re.findall(r"cfg\.(\w+)\.(\w+) =", text):
        assert field in _known(section), f"cfg.{section}.{field}"
    comm = _fields("megatron/bridge/training/comm_overlap.py", "CommOverlapConfig")
    assert "tp_comm_overlap" in comm
    recipe = re.search(r"cfg\.mixed_precision = '(\w+)'", text).group(1)
    registered = re.findall(r"@register\ndef (\w+)\(", SOURCES["megatron/bridge/training/mixed_precision.py"])
    assert recipe in registered


@pytest.mark.parametrize("name", launch_plans.ACCEPTANCE)
def test_override_says_what_the_megatron_flags_say(name):
    from launcher.megatron import megatron_args

    plan = launch_plans.make(name)
    fields = bridge.model_fields(plan)
    flags = megatron_args(plan)
    pairs = dict(zip(flags, flags[1:], strict=False))
    assert fields["tensor_model_parallel_size"] == int(pairs["--tensor-model-parallel-size"])
    assert fields["num_layers"] == int(pairs["--num-layers"])
    assert fields["normalization"] == pairs["--normalization"]
    assert fields["rotary_base"] == float(pairs["--rotary-base"])
    assert fields.get("pipeline_model_parallel_layout") == pairs.get("--pipeline-model-parallel-layout")
    assert fields.get("num_layers_in_first_pipeline_stage") == (
        int(pairs["--decoder-first-pipeline-num-layers"]) if "--decoder-first-pipeline-num-layers" in pairs else None)
    assert bridge.other_fields(plan)["train"]["global_batch_size"] == int(pairs["--global-batch-size"])
    assert ("--tp-comm-overlap" in flags) == ("tp_comm_overlap=True" in bridge.recipe_override_py(plan))


def test_mxfp8_recipe_is_what_the_megatron_flags_say():
    """bf16_with_mxfp8_mixed (the name the override writes for --dtype mxfp8) sets the same
    fp8 format and recipe as the Megatron-LM flags, and the fp8 parameter all-gather they add."""
    from launcher.megatron import megatron_args

    plan = launch_plans.nvl72()
    assert bridge.PRECISION["mxfp8"] in re.findall(
        r"@register\ndef (\w+)\(", SOURCES["megatron/bridge/training/mixed_precision.py"])
    text = SOURCES["megatron/bridge/training/mixed_precision.py"]
    body = text[text.index(f"def {bridge.PRECISION['mxfp8']}("):].split("\n\n\n")[0]
    sets = dict(re.findall(r"cfg\.(\w+) = (.+)", body))
    flags = megatron_args(plan)
    pairs = dict(zip(flags, flags[1:], strict=False))
    assert sets["fp8"].strip("'\"") == pairs["--fp8-format"] == "e4m3"
    assert sets["fp8_recipe"].strip("'\"") == pairs["--fp8-recipe"] == "mxfp8"
    assert sets["fp8_param_gather"] == "True" and "--fp8-param-gather" in flags
    assert sets["reuse_grad_buf_for_mxfp8_param_ag"] == "True"
    assert "--reuse-grad-buf-for-mxfp8-param-ag" in flags
    assert f"cfg.mixed_precision = {bridge.PRECISION['mxfp8']!r}" in bridge.recipe_override_py(plan)


def test_te_loss_is_set_by_the_override_and_noted_for_megatron_lm():
    from launcher.megatron import megatron_args, megatron_notes

    plan = launch_plans.make("70b-te-loss", launch_plans.FAMILIES)
    fields = bridge.model_fields(plan)
    assert fields["cross_entropy_loss_fusion"] is True
    assert fields["cross_entropy_fusion_impl"] == "te"
    assert "--cross-entropy-fusion-impl" not in megatron_args(plan)  # Megatron-LM rejects it
    assert any("fused cross entropy" in n and "GiB more" in n for n in megatron_notes(plan))
    moe = bridge.model_fields(launch_plans.make("mixtral-overlap", launch_plans.FAMILIES))
    assert moe["moe_token_dispatcher_type"] == "flex" and moe["moe_flex_dispatcher_backend"] == "deepep"
    assert moe["overlap_moe_expert_parallel_comm"] is True
    assert moe["cuda_graph_scope"] == ["attn", "moe_router", "moe_preprocess"]


def test_hybrid_override_names_mamba_provider_fields():
    """A hybrid's override sets the layer pattern and Mamba-2 shape on the MambaModelProvider
    a Nemotron-H recipe builds (megatron-bridge 0.3.1), and refuses what its megatron-core
    0.16.1 MambaBlock cannot build (virtual stages) instead of building something else."""
    from dataclasses import replace

    vp2 = launch_plans.make("nemotron3-nano", launch_plans.FAMILIES)
    plan = replace(vp2, layout=replace(vp2.layout, vp=1, layers_per_stage=(26, 26)))
    text = bridge.recipe_override_py(plan)
    mamba = _fields("megatron/bridge/models/mamba/mamba_provider.py", "MambaModelProvider") \
        | _known("model") | _fields("megatron/core/transformer/transformer_config.py",
                                    "TransformerConfig")
    for section, field in re.findall(r"cfg\.(\w+)\.(\w+) =", text):
        assert field in (mamba if section == "model" else _known(section)), f"cfg.{section}.{field}"
    assert f"cfg.model.hybrid_override_pattern = {plan.model.layer_pattern!r}" in text
    assert "cfg.model.mamba_num_groups = 8" in text
    scope: dict = {}
    exec(bridge.recipe_override_py(vp2), scope)  # noqa: S102 - the generated file
    with pytest.raises(NotImplementedError, match="vp > 1"):
        scope["apply_meshplan"](None)
