"""A plan as framework arguments: one mapping per framework, and what it cannot express.

- Megatron-LM (launcher/megatron.py): pretrain_gpt.py flags for the layout, the schedule and
  the whole network, the overlaps the estimate assumed, the FP8 recipe, and the environment
  Megatron asserts (CUDA_DEVICE_MAX_CONNECTIONS=1).
- Megatron-Bridge (launcher/bridge.py): the same values as a recipe override of its
  ConfigContainer (model provider, train, dataset, ddp, optimizer, overlap, precision).
- torchtitan (launcher/torchtitan.py): `--section.field` overrides and a recipe hook, for
  the released 0.3.0 (default) or the main branch.

Where a framework will run something other than what the plan assumed, `launch_notes` says
so, and where the cost model can price what will really run, it re-estimates the step.

Names are the real ones of those projects: tests/data/framework_args_*.txt list them (commits
named there), benchmarks/check_megatron_args.py runs Megatron-LM's own parser on them and
tests/test_framework_torchtitan.py torchtitan 0.3.0's ConfigManager and ParallelDims.
"""

from __future__ import annotations

import dataclasses

from cost_models import megatron as cost_model
from cost_models.specs import SpecError
from planner.planfile import Plan

from . import torchtitan
from .megatron import megatron_args, megatron_env, megatron_notes, megatron_pipeline_args

__all__ = ["megatron_args", "megatron_env", "megatron_notes", "megatron_pipeline_args",
           "framework_env", "launch_notes", "torchtitan_args", "torchtitan_settings",
           "torchtitan_config_py", "torchtitan_model_parts", "TITAN_SCHEDULES"]

TITAN_SCHEDULES = torchtitan.SCHEDULES
TITAN_VERSIONS = torchtitan.VERSIONS


def _check_version(version: str) -> None:
    if version not in TITAN_VERSIONS:
        raise SpecError(f"unknown torchtitan version {version!r}; use one of {TITAN_VERSIONS}")


def torchtitan_settings(plan: Plan, version: str = torchtitan.DEFAULT_VERSION) -> dict[str, object]:
    _check_version(version)
    return torchtitan.settings(plan, version)


def torchtitan_args(plan: Plan, version: str = torchtitan.DEFAULT_VERSION) -> list[str]:
    _check_version(version)
    return torchtitan.args(plan, version)


def torchtitan_config_py(plan: Plan, version: str = torchtitan.DEFAULT_VERSION) -> str:
    _check_version(version)
    return torchtitan.config_py(plan, version)


def torchtitan_model_parts(plan: Plan) -> list[list[str]]:
    return torchtitan.model_parts(plan)


def framework_env(plan: Plan, framework: str) -> dict[str, str]:
    """Environment the framework needs on every rank (exported by every launch file)."""
    return megatron_env(plan) if framework == "megatron" else {}


def _step_s(plan: Plan) -> float | None:
    est = plan.estimate or {}
    value = est.get("step_time_s")
    return float(value) if isinstance(value, int | float) else None


def reestimate(plan: Plan, *, gpu_changes: dict | None = None,
               layout_changes: dict | None = None) -> float:
    """Step time (s) of what will really run: the plan with GPU/layout fields replaced."""
    cluster = plan.cluster
    if gpu_changes:
        gpu_types = {name: dataclasses.replace(spec, **gpu_changes)
                     for name, spec in cluster.gpu_types.items()}
        cluster = dataclasses.replace(cluster, gpu_types=gpu_types)
    layout = dataclasses.replace(plan.layout, **(layout_changes or {}))
    return cost_model.estimate(plan.model, cluster, layout).step_time_s


def _reestimate_note(plan: Plan, what: str, **changes) -> str:
    new = reestimate(plan, **changes)
    old = _step_s(plan)
    was = f" (plan: {old:.3f} s)" if old is not None else ""
    return f"estimate re-done for what torchtitan will run ({what}): {new:.3f} s/step{was}"


def _torchtitan_reestimates(plan: Plan) -> list[str]:
    lay, gpu = plan.layout, plan.cluster.gpu
    gpu_changes, layout_changes, what = {}, {}, []
    if lay.tp > 1 and lay.sequence_parallel and gpu.tp_comm_overlap > 0:
        gpu_changes["tp_comm_overlap"] = 0.0
        what.append("no TP overlap")
    if lay.dtype == "fp8":
        layout_changes["dtype"] = "bf16"
        what.append("bf16")
    if not what:
        return []
    try:
        return [_reestimate_note(plan, ", ".join(what), gpu_changes=gpu_changes,
                                 layout_changes=layout_changes)]
    except SpecError as exc:  # e.g. a plan file whose cluster the cost model cannot price
        return [f"estimate not re-done: {exc}"]


def launch_notes(plan: Plan, framework: str,
                 titan_version: str = torchtitan.DEFAULT_VERSION) -> list[str]:
    """One line per way the chosen framework departs from the plan (for stderr)."""
    if framework == "megatron":
        return megatron_notes(plan)
    if framework == "torchtitan":
        _check_version(titan_version)
        return torchtitan.notes(plan, titan_version) + _torchtitan_reestimates(plan)
    return []
