"""`ParallelDims`: the one owner of the parallel degrees, their rank order and their groups.

Modelled on torchtitan's `ParallelDims` (torchtitan/distributed/parallel_dims.py): one frozen
object holds the degrees, the mesh order, the size and rank stride of every communication
group, the world size, the expert-side view and the rules a combination must obey (each with
its reason). Nothing else in meshplan spells out a degree tuple, a stride or the rank order:
the cost models, the search, the placement ILP, the plan file, the launcher and the example
trainer all ask this object.

Rank order tp-cp-dp-pp (Megatron-LM's default; tp varies fastest):
    global rank = tp + T·(cp + C·(dp + D·pp))
so a dimension's rank stride is the product of the degrees before it in `MESH_ORDER`.

Expert side (Megatron-Core "MoE parallel folding", Liu et al. 2025, arXiv:2504.14960, and
megatron/core/parallel_state.py): the attention layers use the mesh tp-cp-dp-pp and the MoE
layers fold a second mesh etp-ep-edp-pp over the SAME ranks of each pipeline stage. So
etp·ep must divide tp·cp·dp; an expert-parallel group has stride etp; routed experts are
split over etp (expert tensor parallel) and ep; the ranks holding the same experts (expert
data parallel) number edp = tp·cp·dp/(etp·ep), stride etp·ep.

The fields may be ints (one layout) or numpy integer arrays (a `LayoutGrid`'s columns): every
derived quantity is plain arithmetic and broadcasts, so the vectorised search stays vectorised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from .errors import SpecError

MESH_ORDER: tuple[str, ...] = ("tp", "cp", "dp", "pp")
"""Mesh dimensions, fastest-varying rank first."""
DEGREES: tuple[str, ...] = ("tp", "pp", "dp", "cp", "ep", "vp", "etp")
"""Every degree, in the order layouts list them (JSON keys, grid columns, sort keys)."""
RANK_ORDER = "-".join(MESH_ORDER)
"""The rank order as plan files spell it: 'tp-cp-dp-pp'."""


@dataclass(frozen=True, slots=True)
class Group:
    """A communication group: `size` ranks, `stride` global ranks apart."""

    size: object
    stride: object


@dataclass(frozen=True, slots=True)
class ParallelDims:
    """The parallel degrees of one layout (ints) or of a grid of layouts (numpy arrays)."""

    tp: object
    """Tensor parallel: splits heads and MLP columns (Megatron-LM)."""
    pp: object
    """Pipeline parallel: splits layers into stages."""
    dp: object
    """Data parallel: replicas of the model."""
    cp: object = 1
    """Context parallel: splits each sequence (ring attention)."""
    ep: object = 1
    """Expert parallel (MoE): splits the routed experts over the attention's cp·dp ranks."""
    vp: object = 1
    """Virtual pipeline stages (model chunks) per pipeline rank; not a mesh dimension."""
    etp: object = 1
    """Expert tensor parallel (MoE): splits each routed expert's matrices; folded with ep
    over the stage's tp·cp·dp ranks (not a mesh dimension of the attention layers)."""
    dp_replicate: object = 1
    """HSDP replicate degree: dp = dp_replicate x dp_shard, the shard index varying fastest
    (torchtitan's mesh [pp, dp_replicate, dp_shard, cp, tp]); 1 without HSDP. Not one of
    `DEGREES` (a split of dp, not another dimension)."""

    @classmethod
    def of(cls, obj) -> ParallelDims:
        """The degrees of any object carrying them as attributes (`Layout`, `LayoutGrid`)."""
        return cls(**{name: getattr(obj, name) for name in DEGREES},
                   dp_replicate=getattr(obj, "dp_replicate", 1))

    @classmethod
    def fill(cls, world: int, dp: int | None = None, **given: int) -> ParallelDims:
        """The degrees `given` with dp derived so that the mesh fills `world` GPUs; SpecError
        when they do not divide `world` or when a given `dp` disagrees."""
        others = [n for n in MESH_ORDER if n != "dp"]
        names = "*".join(n for n in DEGREES if n in others)
        used = _mesh_product(given)
        if world % used:
            values = "*".join(str(given.get(n, 1)) for n in DEGREES if n in others)
            raise SpecError(
                f"{names} = {values} = {used} does not divide the cluster's {world} "
                "GPUs; choose degrees whose product divides the GPU count"
            )
        derived = world // used
        if dp is not None and dp != derived:
            raise SpecError(f"--dp {dp} does not match GPUs/({names}) = {world}/{used} = "
                            f"{derived}; drop --dp or change the other degrees")
        return cls(**{"cp": 1, "ep": 1, "vp": 1, "etp": 1, **given, "dp": derived})

    def refill(self, world: int) -> ParallelDims:
        """These degrees with dp re-derived for `world` GPUs (`fill`'s checks)."""
        return ParallelDims.fill(world, **{n: getattr(self, n) for n in DEGREES if n != "dp"})

    @property
    def mesh_key(self) -> tuple:
        """The mesh degrees in `MESH_ORDER` (a layout's shape: what its rank map depends on)."""
        return tuple(getattr(self, name) for name in MESH_ORDER)

    # ---------------------------------------------------------------- mesh, sizes, strides

    def size(self, dim: str):
        return getattr(self, dim)

    def stride(self, dim: str):
        """Global-rank distance between neighbours along `dim` (product of faster dims)."""
        out = 1
        for name in MESH_ORDER[: MESH_ORDER.index(dim)]:
            out = out * getattr(self, name)
        return out

    @property
    def world(self):
        """GPUs the layout occupies: the product of the mesh degrees."""
        out = 1
        for name in MESH_ORDER:
            out = out * getattr(self, name)
        return out

    @property
    def stage_size(self):
        """Ranks per pipeline stage (tp·cp·dp): the stride between neighbouring stages."""
        return self.stride("pp")

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """Mesh shape, slowest dimension first, e.g. (pp, dp, cp, tp): what a row-major
        `torch.distributed.device_mesh.init_device_mesh` takes."""
        return tuple(int(getattr(self, name)) for name in reversed(MESH_ORDER))

    @property
    def mesh_names(self) -> tuple[str, ...]:
        return tuple(reversed(MESH_ORDER))

    # ---------------------------------------------------------------- groups

    def group(self, name: str) -> Group:
        """Size and stride of the group `name`:

        tp, cp, dp, pp  one mesh dimension;
        dp_cp           the gradient-reduction group of replicated parameters (dp x cp,
                        Megatron-LM reduces over both): stride tp;
        etp             the expert tensor-parallel group: stride 1 (etp-ep-edp-pp);
        ep              the expert-parallel all-to-all group: stride etp;
        edp             ranks holding the same experts (tp·cp·dp/(etp·ep)): stride etp·ep;
        dp_shard        the FSDP shard group: dp/dp_replicate x cp ranks, stride tp
                        (torchtitan shards over its flattened "dp_shard_cp" mesh);
        dp_replicate    HSDP's replicate group: dp_replicate ranks holding the same shard,
                        stride tp·cp·dp_shard.
        """
        if name in MESH_ORDER:
            return Group(self.size(name), self.stride(name))
        if name == "dp_cp":
            return Group(self.dp * self.cp, self.stride("cp"))
        if name == "etp":
            return Group(self.etp, 1)
        if name == "ep":
            return Group(self.ep, self.etp)
        if name == "edp":
            return Group(self.expert_dp, self.expert_tp * self.ep)
        if name == "dp_shard":
            return Group(self.dp_shard * self.cp, self.stride("cp"))
        if name == "dp_replicate":
            return Group(self.dp_replicate, self.stride("dp") * self.dp_shard)
        raise KeyError(f"no parallel group {name!r}")

    @property
    def dp_shard(self):
        """FSDP shard degree along dp: dp / dp_replicate."""
        return self.dp // self.dp_replicate

    @property
    def expert_tp(self):
        """Tensor-parallel degree of the routed experts (etp)."""
        return self.etp

    @property
    def expert_dp(self):
        """Expert data-parallel degree: ranks of a stage that hold the same experts,
        tp·cp·dp/(etp·ep)."""
        return self.stage_size // (self.etp * self.ep)

    # ---------------------------------------------------------------- where ranks sit

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of global rank `rank`, e.g. {'tp': 1, 'cp': 0, 'dp': 2, 'pp': 0}."""
        out, rest = {}, int(rank)
        for name in MESH_ORDER:
            rest, out[name] = divmod(rest, int(getattr(self, name)))
        return out

    def rank_grid(self) -> np.ndarray:
        """Global ranks as an array indexed [pp, dp, cp, tp] (`mesh_names` order)."""
        return np.arange(int(self.world)).reshape(self.mesh_shape)

    def node_grid(self, gpus_per_node: int) -> tuple[int, int]:
        """(stages, blocks): node ranks as pp stages x blocks of one stage each. SpecError
        when tp·cp·dp is not a multiple of the GPUs per node (a node would hold two stages)."""
        per_stage = int(self.stage_size)
        if per_stage % gpus_per_node:
            raise SpecError(
                f"placement: tp*cp*dp = {per_stage} GPUs per pipeline stage is not a multiple of "
                f"{gpus_per_node} GPUs per node, so a node would hold two stages; change tp/cp/dp"
            )
        return int(self.pp), per_stage // gpus_per_node

    # ---------------------------------------------------------------- names

    def key(self) -> tuple:
        """The degrees in `DEGREES` order (a hashable identity)."""
        return tuple(getattr(self, name) for name in DEGREES)

    def label_parts(self) -> list[str]:
        """'tp4', 'pp4', 'cp2', 'dp2', 'ep8', 'etp1', 'vp5': tp, pp and dp always, the rest
        when > 1; etp when experts are split (ep > 1) and it differs from tp."""
        shown = ("tp", "pp", "cp", "dp", "ep", "etp", "vp")
        return [f"{name}{getattr(self, name)}" for name in shown
                if name in ("tp", "pp", "dp")
                or (getattr(self, name) > 1 if name != "etp" else
                    self.ep > 1 and self.etp != self.tp)]

    def to_dict(self) -> dict[str, int]:
        """The `DEGREES` (dp_replicate, a split of dp, is left to the layout)."""
        return {name: getattr(self, name) for name in DEGREES}

    # ---------------------------------------------------------------- rules

    def validate(self, model, num_gpus: int | None, seq_len: int, end_chunks: int = 0) -> None:
        """Raise SpecError on the first rule the degrees break (each states its reason).
        `end_chunks` (0-2): model chunks at the pipeline's ends that hold only the embedding /
        the loss (Megatron-Core account_for_embedding/loss_in_pipeline_split)."""
        if num_gpus is not None and self.world != num_gpus:
            raise SpecError(
                f"tp*pp*cp*dp = {self.tp}*{self.pp}*{self.cp}*{self.dp} = {self.world} but the "
                f"cluster has {num_gpus} GPUs; choose degrees whose product is {num_gpus}"
            )
        _check_divides(self.tp, model.num_heads, "tp", "attention heads",
                       "each tensor-parallel rank holds whole heads (Megatron-LM)")
        _check_divides(self.tp, model.num_kv_heads, "tp", "KV heads",
                       "each tensor-parallel rank needs whole KV heads (GQA)")
        if model.mamba_layers and not mamba_tp_splits(self.tp, model):
            raise SpecError(f"tp={self.tp} must divide the Mamba heads "
                            f"({model.mamba_num_heads}) and groups ({model.mamba_groups}): each "
                            "tensor-parallel rank holds whole heads and B/C groups (Megatron-Core "
                            "MambaMixer)")
        if not cp_covers(self.cp, model):
            raise SpecError("cp > 1 with Mamba layers is not modelled (Megatron-Core splits the "
                            "SSM heads over cp with all-to-alls); use cp 1")
        if not cp_splits(self.cp, seq_len):
            raise SpecError(
                f"seq-len {seq_len} must be divisible by 2*cp = {2 * self.cp}: context "
                "parallelism splits each sequence into 2*cp chunks for causal load balance"
            )
        chunks = self.pp * self.vp
        if chunks > model.num_layers + end_chunks:
            raise SpecError(
                f"pp*vp = {chunks} exceeds the model's {model.num_layers} layers; lower --pp or --vp"
            )
        if self.vp > 1 and self.pp == 1:
            raise SpecError("vp > 1 (interleaved schedule) needs pp > 1")
        self._validate_experts(model)

    def _validate_experts(self, model) -> None:
        """Megatron-Core's expert rules: ep divides the experts, etp the expert width, and the
        expert mesh etp·ep folds into the tp·cp·dp ranks of a pipeline stage."""
        if not model.is_moe:
            if self.ep > 1:
                raise SpecError("ep > 1 needs a mixture-of-experts model")
            if self.etp not in (1, self.tp):
                raise SpecError("--etp applies to mixture-of-experts models only; drop it")
            return
        if model.num_experts % self.ep:
            raise SpecError(f"ep={self.ep} must divide the {model.num_experts} experts; choose "
                            f"--ep from {_divisor_hint(model.num_experts)}")
        if model.expert_ffn_hidden_size % self.etp:
            raise SpecError(f"etp={self.etp} must divide the expert MLP width "
                            f"{model.expert_ffn_hidden_size} (each expert's columns are split); "
                            f"choose --etp from {_divisor_hint(model.expert_ffn_hidden_size)}")
        if self.stage_size % (self.etp * self.ep):
            raise SpecError(
                f"etp*ep = {self.etp}*{self.ep} = {self.etp * self.ep} must divide tp*cp*dp = "
                f"{self.tp}*{self.cp}*{self.dp} = {self.stage_size} (Megatron-Core MoE parallel "
                "folding: the expert mesh etp x ep x edp reuses each pipeline stage's ranks); "
                "change --ep or --etp")


def _divisor_hint(n: int, count: int = 8) -> str:
    """The first `count` divisors of n, for an error message ("1, 2, 4, ..." when more)."""
    found = [d for d in range(1, min(n, 4096) + 1) if n % d == 0]
    return ", ".join(map(str, found[:count])) + (", ..." if len(found) > count else "")


# -------------------------------------------------------------------- rules as predicates
# (the search enumerates with these; `ParallelDims.validate` explains them)


def tp_splits(tp: int, model) -> bool:
    """tp divides the query and the KV heads (and a hybrid's Mamba heads and groups): every
    tensor-parallel rank holds whole heads."""
    return model.num_heads % tp == 0 and model.num_kv_heads % tp == 0 \
        and (not model.mamba_layers or mamba_tp_splits(tp, model))


def mamba_tp_splits(tp: int, model) -> bool:
    """tp divides the Mamba-2 heads and B/C groups (Megatron-Core MambaMixer's rule)."""
    return model.mamba_num_heads % tp == 0 and model.mamba_groups % tp == 0


def cp_covers(cp: int, model) -> bool:
    """Context parallelism is modelled for every layer kind the model has (not Mamba's)."""
    return cp == 1 or not model.mamba_layers


def cp_splits(cp: int, seq_len: int) -> bool:
    """Context parallelism cuts each sequence into 2·cp chunks (causal load balance)."""
    return cp == 1 or seq_len % (2 * cp) == 0


def expert_degrees(model, stage_ranks: int, etp: int) -> list[int]:
    """ep values for a model: divisors of the experts with etp·ep dividing the stage's
    tp·cp·dp ranks (Megatron-Core MoE parallel folding); [1] for dense models."""
    if not model.is_moe:
        return [1]
    return [e for e in divisors(model.num_experts) if stage_ranks % (e * etp) == 0]


def expert_tp_degrees(model, tp: int, stage_ranks: int | None = None,
                      max_etp: int | None = None) -> list[int]:
    """etp values the search tries: every one Megatron-Core accepts, i.e. dividing the expert
    width and the stage's tp·cp·dp ranks (`stage_ranks`), up to `max_etp` (the search's tp
    bound: an expert tensor-parallel group inside one NVLink domain, like tp's); without a
    stage, 1 (the Megatron-Bridge MoE recipes' whole experts) and tp (Megatron-Core's default).
    [tp] for dense models (etp is then meaningless)."""
    if not model.is_moe:
        return [tp]
    if stage_ranks is None:
        options = {1, tp}
    else:
        options = {e for e in divisors(stage_ranks) if max_etp is None or e <= max_etp}
    return sorted(e for e in options if model.expert_ffn_hidden_size % e == 0)


def mesh_degrees(world: int, fixed: dict[str, int | None], allowed: dict[str, list[int]]):
    """Every assignment of the mesh degrees whose product is `world`, each dimension taking
    a value from `allowed` (all divisors where absent) and equal to `fixed` where set; the
    last mesh dimension in search order is derived. Yields dicts name -> degree."""
    order = ("tp", "cp", "pp")  # searched; dp = world / (tp·cp·pp) is derived
    def rec(i: int, left: int, chosen: dict):
        if i == len(order):
            if fixed.get("dp") is None or fixed["dp"] == left:
                yield {**chosen, "dp": left}
            return
        name = order[i]
        options = allowed.get(name, divisors(left))
        for value in options:
            if left % value or (fixed.get(name) is not None and value != fixed[name]):
                continue
            yield from rec(i + 1, left // value, {**chosen, name: value})
    yield from rec(0, world, {})


def derived_dp(world: int, **given: int) -> int:
    """dp that fills `world` GPUs with the other mesh degrees `given` (floor; non-mesh
    degrees such as vp are ignored)."""
    return world // _mesh_product(given)


def _mesh_product(given: dict) -> int:
    out = 1
    for name in MESH_ORDER:
        if name != "dp":
            out *= given.get(name, 1)
    return out


@cache
def _divisor_tuple(n: int) -> tuple[int, ...]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(small + [n // d for d in reversed(small) if d * d != n])


def divisors(n: int) -> list[int]:
    """Divisors of n in increasing order (trial division up to sqrt(n), cached)."""
    return list(_divisor_tuple(n))


def _check_divides(degree: int, count: int, flag: str, what: str, reason: str) -> None:
    if count % degree:
        options = [d for d in range(1, count + 1) if count % d == 0 and d <= 64]
        raise SpecError(
            f"{flag}={degree} does not divide the model's {count} {what} ({reason}); "
            f"use one of {options}"
        )
