"""The plan file (`plan.yaml`): what `plan` writes and `launch`/`run`/`simulate` read.

Format (version `meshplan: 1`), self-contained so it can be re-read without the original files:

    meshplan: 1
    model: {ModelSpec fields}
    cluster: {cluster.yaml form, GPU specs written out}
    layout: {tp, pp, dp, cp, ep, vp, micro_batch_size, global_batch_size, seq_len, recompute,
             sequence_parallel, distributed_optimizer, schedule, dtype, layers_per_stage}
    stages:                      # one per virtual stage (model chunk), in model order
      - {index: 0, pp_rank: 0, chunk: 0, first_layer: 0, last_layer: 20}   # [first, last)
    placement:
      rank_order: tp-cp-dp-pp    # cost_models.dims.RANK_ORDER (tp fastest)
      node_order: [node3, node0, ...]   # node rank i runs on node_order[i]
    estimate: {estimate --json object}
    planning:                    # how it was planned, so a re-plan uses the same options
      cost_model: auto           # as given to --cost-model
      space: {SearchSpace fields: recompute, headroom, fixed degrees, ...}

Global rank r lives on node rank r // gpus_per_node, local rank r % gpus_per_node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cost_models.dims import RANK_ORDER
from cost_models.specs import ClusterSpec, Layout, ModelSpec, SpecError

from .fileio import write_atomic
from .specfiles import (
    cluster_from_dict,
    cluster_to_dict,
    dump_yaml,
    model_from_dict,
    model_to_dict,
    read_mapping,
)

if TYPE_CHECKING:
    from .search import SearchSpace

PLAN_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Stage:
    """One model chunk: layers [first_layer, last_layer) on pipeline rank `pp_rank`."""

    index: int
    pp_rank: int
    chunk: int
    first_layer: int
    last_layer: int

    @property
    def num_layers(self) -> int:
        return self.last_layer - self.first_layer


@dataclass(frozen=True, slots=True)
class RankCoords:
    """Where a global rank sits in the mesh (`ParallelDims.coords`)."""

    pp: int
    dp: int
    cp: int
    tp: int


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What the user asked the planner for: the cost model and the search space (options)."""

    cost_model: str
    space: SearchSpace

    def to_dict(self) -> dict:
        return {"cost_model": self.cost_model, "space": self.space.to_dict()}

    @classmethod
    def from_dict(cls, data, where: str) -> PlanRequest:
        from .search import SearchSpace

        if not isinstance(data, dict) or not isinstance(data.get("cost_model"), str):
            raise SpecError(f"{where}: planning must hold cost_model and space; regenerate the plan")
        return cls(data["cost_model"], SearchSpace.from_dict(data.get("space") or {}, where))


@dataclass(frozen=True, slots=True)
class Plan:
    model: ModelSpec
    cluster: ClusterSpec
    layout: Layout
    node_order: tuple[str, ...]
    """Physical node name for each node rank."""
    estimate: dict
    """The estimate object (informative; launch does not depend on it)."""
    request: PlanRequest | None = None
    """How it was planned (None: unknown, e.g. a hand-written plan; re-plans use defaults)."""

    @property
    def stages(self) -> tuple[Stage, ...]:
        return stage_ranges(self.layout, self.model.num_layers)

    @property
    def gpus_per_node(self) -> int:
        return self.cluster.gpus_per_node

    @property
    def nnodes(self) -> int:
        return len(self.node_order)

    def coords(self, rank: int) -> RankCoords:
        return rank_coords(rank, self.layout)

    def to_dict(self) -> dict:
        out = {
            "meshplan": PLAN_FORMAT,
            "model": model_to_dict(self.model),
            "cluster": cluster_to_dict(self.cluster),
            **self.layout_dict(),
        }
        if self.request is not None:
            out["planning"] = self.request.to_dict()
        return out

    def layout_dict(self) -> dict:
        """The plan file's layout, stages, placement and estimate (no model or cluster: `plan
        --json` prints these, and writing out a 2,048-node cluster per plan costs more than the
        search)."""
        return {
            "layout": self.layout.to_dict(),
            "stages": [
                {"index": s.index, "pp_rank": s.pp_rank, "chunk": s.chunk,
                 "first_layer": s.first_layer, "last_layer": s.last_layer}
                for s in self.stages
            ],
            "placement": {"rank_order": RANK_ORDER, "node_order": list(self.node_order)},
            "estimate": self.estimate,
        }


def stage_ranges(layout: Layout, num_layers: int) -> tuple[Stage, ...]:
    """Virtual stage k (model order) runs on pipeline rank k % pp as its chunk k // pp
    (Megatron-LM / torch.distributed.pipelining interleaved assignment)."""
    out, start = [], 0
    for k, n in enumerate(layout.stage_layers(num_layers)):
        out.append(Stage(k, k % layout.pp, k // layout.pp, start, start + n))
        start += n
    return tuple(out)


def rank_coords(rank: int, layout: Layout) -> RankCoords:
    """Coordinates of `rank` in the layout's mesh (the owner's rank order)."""
    return RankCoords(**layout.dims.coords(rank))


def write_plan(plan: Plan, path: str | Path) -> None:
    write_atomic(path, "# meshplan plan file; `meshplan launch` reads it.\n" + dump_yaml(plan.to_dict()))


def plan_from_dict(data: dict, where: str) -> Plan:
    version = data.get("meshplan")
    if version != PLAN_FORMAT:
        raise SpecError(f"{where} is not a meshplan plan file (meshplan: {version!r}, want 1)")
    for key in ("model", "cluster", "layout", "placement"):
        if key not in data:
            raise SpecError(f"plan file {where} lacks {key!r}; regenerate it with meshplan plan")
    model = model_from_dict(data["model"], where)
    cluster = cluster_from_dict(data["cluster"], f"{where}: cluster")
    layout = Layout.from_dict(data["layout"])
    layout.validate(model, cluster.world_size)
    placement = data["placement"]
    if not isinstance(placement, dict) or placement.get("rank_order", RANK_ORDER) != RANK_ORDER:
        raise SpecError(f"{where}: placement.rank_order must be {RANK_ORDER}")
    order = tuple(placement.get("node_order") or [n.name for n in cluster.nodes])
    names = {n.name for n in cluster.nodes}
    if sorted(order) != sorted(names):
        raise SpecError(
            f"{where}: placement.node_order {list(order)} must list each cluster node once"
        )
    estimate = data.get("estimate") or {}
    if not isinstance(estimate, dict):
        raise SpecError(f"{where}: estimate must be a mapping; regenerate the plan")
    request = PlanRequest.from_dict(data["planning"], f"{where}: planning") \
        if data.get("planning") is not None else None
    plan = Plan(model, cluster, layout, order, estimate, request)
    if "stages" in data:
        _check_stages(data["stages"], plan, where)
    return plan


_STAGE_KEYS = ("index", "pp_rank", "chunk", "first_layer", "last_layer")


def _check_stages(stages, plan: Plan, where: str) -> None:
    """The file's stage list must be the layout's: every layer in exactly one stage, in model
    order, on the pipeline rank the interleaved assignment gives (a hand edit that drops or
    doubles a layer is refused rather than silently re-derived)."""
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        raise SpecError(f"{where}: stages must be a list of mappings; regenerate the plan")
    expected = plan.stages
    layers = plan.model.num_layers
    covered = [0] * layers
    for i, st in enumerate(stages):
        if set(st) != set(_STAGE_KEYS) or not all(
                isinstance(st[k], int) and not isinstance(st[k], bool) for k in _STAGE_KEYS):
            raise SpecError(f"{where}: stages[{i}] must have integer keys {list(_STAGE_KEYS)}")
        first, last = st["first_layer"], st["last_layer"]
        if not 0 <= first < last <= layers:
            raise SpecError(f"{where}: stages[{i}] layers [{first}, {last}) must be a non-empty "
                            f"range inside the model's 0..{layers}; regenerate the plan")
        for layer in range(first, last):
            covered[layer] += 1
    missing = [k for k, c in enumerate(covered) if c == 0]
    doubled = [k for k, c in enumerate(covered) if c > 1]
    if missing or doubled:
        raise SpecError(f"{where}: stages must hold every layer exactly once; missing layers "
                        f"{missing[:8]}, layers in two stages {doubled[:8]}; regenerate the plan "
                        "or fix layout.layers_per_stage")
    found = tuple(Stage(**{k: st[k] for k in _STAGE_KEYS}) for st in stages)
    if found != expected:
        sizes = [s.num_layers for s in expected]
        raise SpecError(f"{where}: stages disagree with layout.layers_per_stage (which gives "
                        f"{len(expected)} stages of {sizes[:16]} layers); edit both or regenerate")


def read_plan(path: str | Path) -> Plan:
    """Load and validate a plan file; SpecError with one clear line if anything is off."""
    return plan_from_dict(read_mapping(Path(path), "plan"), str(path))
