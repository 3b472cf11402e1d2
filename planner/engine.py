"""The one way to plan: `plan(problem, space) -> PlanResult`, and the cost-model choice.

`plan` picks the cost model (`resolve_cost_model`), the uniform or heterogeneous search and
the node placement, and returns the ranked estimates with their plans. `meshplan plan`, the
explanations (`explain.advise`), the supervisor's re-plan after a fault and the benchmarks
all call it, so the same problem and options give the same layout everywhere.

auto: `megatron` for a uniform cluster; `pipette` when the cluster holds measured per-pair
links (it also models mixed GPU types); otherwise `holmes` when nodes mix NIC kinds or GPU
types. `pipette` and `holmes` plan with `planner.hetero_search.search_hetero` (layout + placement).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cost_models import hetero_model, megatron
from cost_models.specs import ClusterSpec, Estimate, Layout, SpecError

from .options import Problem
from .planfile import Plan, PlanRequest
from .search import SearchResult, SearchSpace, search_nodes

COST_MODELS = ("megatron", *hetero_model.STYLES)
"""megatron (uniform clusters) and the heterogeneous model's link styles."""


def resolve_cost_model(name: str, cluster: ClusterSpec) -> str:
    """The concrete cost model for `name` on `cluster` (SpecError if it is unknown)."""
    if name == "auto":
        if cluster.bandwidth_GBps is not None:
            return "pipette"
        if len({(n.gpu, n.nic) for n in cluster.nodes}) > 1:
            return "holmes"
        return "megatron"
    if name not in COST_MODELS:
        raise SpecError(f"cost model {name!r} is not one of {sorted(COST_MODELS)}; use megatron")
    return name


def estimate_layout(prob: Problem, layout: Layout, headroom: float = megatron.DEFAULT_HEADROOM
                    ) -> Estimate:
    """Validate and estimate one layout with the problem's cost model."""
    name = resolve_cost_model(prob.cost_model, prob.cluster)
    if name == "megatron":
        return megatron.estimate(prob.model, prob.cluster, layout, headroom)
    return hetero_model.estimate(prob.model, prob.cluster, layout, headroom, style=name)


@dataclass(frozen=True, slots=True)
class PlanResult:
    """Ranked plans of one problem. `result` holds the estimates best first and the search's
    counts; `hetero` the placement details when a heterogeneous model planned."""

    problem: Problem
    space: SearchSpace
    cost_model: str
    """The concrete cost model used (auto resolved)."""
    result: SearchResult
    hetero: object | None = None
    """`planner.hetero_search.HeteroSearch` for pipette/holmes, else None."""

    @property
    def node_orders(self) -> tuple[tuple[str, ...], ...]:
        """Node name per node rank for each ranked plan (the cluster's order when uniform)."""
        if self.hetero is not None:
            return self.hetero.node_orders
        names = tuple(n.name for n in self.result.cluster.nodes)
        return tuple(names for _ in self.result.plans)

    @property
    def plans(self) -> tuple[Plan, ...]:
        """The ranked estimates as plan files' contents (best first)."""
        request = PlanRequest(self.problem.cost_model, self.space)
        return tuple(Plan(self.problem.model, self.result.cluster, est.layout, order,
                          est.to_dict(), request)
                     for est, order in zip(self.result.plans, self.node_orders, strict=True))


def plan(problem: Problem, space: SearchSpace | None = None, top_k: int = 5) -> PlanResult:
    """Rank the layouts (and, on a heterogeneous cluster, the node placements) of `problem`
    with the cost model it asks for; `space` restricts what may be chosen (its dtype is the
    problem's). NoCandidates (a SpecError) when no valid layout exists at all."""
    space = replace(space or SearchSpace(), dtype=problem.dtype)
    name = resolve_cost_model(problem.cost_model, problem.cluster)
    args = (problem.model, problem.cluster, problem.seq_len, problem.global_batch_size, space, top_k)
    if name == "megatron":
        return PlanResult(problem, space, name, search_nodes(*args))
    from .hetero_search import search_hetero  # layouts, node placement and layer split together

    if space.schedule is not None and space.schedule not in hetero_model.HETERO_SCHEDULES:
        raise SpecError(f"the {name} cost model prices the {hetero_model.HETERO_SCHEDULES} "
                        f"schedules only, not {space.schedule}; use --cost-model megatron")
    space = replace(space, schedules=hetero_model.HETERO_SCHEDULES)
    args = (*args[:4], space, top_k)

    hs = search_hetero(*args, style=name)
    return PlanResult(problem, space, name, hs.result, hs)
