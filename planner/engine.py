"""Cost-model selection: one place that maps `--cost-model` to the functions that evaluate.

auto: `megatron` for a uniform cluster; `pipette` when the cluster holds measured per-pair
links (it also models mixed GPU types); otherwise `holmes` when nodes mix NIC kinds or GPU
types. `pipette` and `holmes` plan with `planner.hetero.search_hetero` (layout + placement).
"""

from __future__ import annotations

import importlib

from cost_models import megatron
from cost_models.specs import ClusterSpec, Estimate, Layout, SpecError

from .options import Problem

# name -> module implementing `estimate(model, cluster, layout, headroom)` and
# `evaluate(model, cluster, grid)`.
MODULES = {"megatron": "cost_models.megatron", "pipette": "cost_models.pipette",
           "holmes": "cost_models.holmes"}


def _available(name: str) -> bool:
    try:
        importlib.import_module(MODULES[name])
    except ModuleNotFoundError:
        return False
    return True


def resolve_cost_model(name: str, cluster: ClusterSpec) -> str:
    """The concrete cost model for `name` on `cluster` (SpecError if it cannot apply)."""
    mixed = len({(n.gpu, n.nic) for n in cluster.nodes}) > 1
    if name == "auto":
        if cluster.bandwidth_GBps is not None and _available("pipette"):
            return "pipette"
        if mixed and _available("holmes"):
            return "holmes"
        return "megatron"
    if not _available(name):
        raise SpecError(f"cost model {name!r} is not available in this build; use megatron")
    return name


def cost_model_module(name: str):
    return importlib.import_module(MODULES[name]) if name != "megatron" else megatron


def estimate_layout(prob: Problem, layout: Layout, headroom: float = megatron.DEFAULT_HEADROOM
                    ) -> Estimate:
    """Validate and estimate one layout with the problem's cost model."""
    name = resolve_cost_model(prob.cost_model, prob.cluster)
    return cost_model_module(name).estimate(prob.model, prob.cluster, layout, headroom)
