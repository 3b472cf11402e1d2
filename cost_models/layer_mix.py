"""Which kind each layer is, and what a pipeline rank's own mix of kinds costs.

The cost model prices one averaged layer: attention, dense-MLP, MoE and Mamba costs weighted
by their shares of the model's layers. A pipeline rank holds contiguous layers, so its mix can
differ from the average: DeepSeek-V3's first rank holds its three dense layers (an 18432-wide
MLP each, no experts), a Nemotron-H segment more or fewer Mamba layers than the model. This
room says, for each rank, how many average layers its own layers are worth - in time, in
replicated parameters, in routed-expert parameters and in activation bytes - so every
per-rank formula (`megatron.evaluate`, `megatron.rank_costs`, the partition ILP's
`megatron.stage_costs`, the simulator's `step_tasks`) prices the layers the rank really holds.

Kinds: "dense" / "moe" for a transformer whose layers differ only in their MLP (leading dense
layers, MoE every n-th layer), one per symbol of a hybrid `ModelSpec.layer_pattern` (M, *, -,
E). A model with one kind gets no mix (`None`) and every rank is priced as before.

Weights: a kind's weight is one layer of it over the averaged layer (`probe`: the model with
every layer of that kind, priced by the same formulas). The most numerous kind's weight is
what makes the weights sum to the model's layer count, so the whole model - and so a pp = 1
layout, and the sum over the ranks - is priced exactly as the averaged layer prices it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from functools import cache

import numpy as np

from .grid import LayoutGrid, rank_of_stage
from .schedules import is_mirrored, is_v_shape
from .specs import ModelSpec, even_split

TRANSFORMER_KINDS = ("dense", "moe")
"""Kinds of a non-hybrid model's layers: the dense MLP, or the mixture of experts."""


def layer_kinds(model: ModelSpec) -> tuple[tuple[str, ...], np.ndarray] | None:
    """(kind names, kind code of each layer in model order), or None when every layer is
    the same kind. MoE layers of a non-hybrid model follow `ModelSpec.num_dense_layers` and
    `moe_layer_every`: after the dense prefix, every n-th layer, the n-th first (Llama 4's
    interleave_moe_layer_step: layers 1, 3, 5, ... with step 2)."""
    if model.layer_pattern:
        names = tuple(dict.fromkeys(model.layer_pattern))
        codes = np.array([names.index(c) for c in model.layer_pattern], dtype=np.int64)
    else:
        if not model.is_moe or model.num_moe_layers in (0, model.num_layers):
            return None
        step, start = model.moe_layer_every, model.num_dense_layers
        moe = np.zeros(model.num_layers, dtype=bool)
        moe[start + step - 1::step] = True
        moe[start + step * model.num_moe_layers:] = False  # the count ModelSpec gives
        names, codes = TRANSFORMER_KINDS, moe.astype(np.int64)
    return (names, codes) if len(names) > 1 else None


def probe(model: ModelSpec, kind: str) -> ModelSpec:
    """`model` with every layer of `kind`: a pricing probe, not a model anyone trains (a
    hybrid pattern without E layers would fail ModelSpec's own checks, which hold for the
    real model), so it is copied, not rebuilt."""
    out = copy.copy(model)
    if model.layer_pattern:
        object.__setattr__(out, "layer_pattern", kind * model.num_layers)
    else:
        object.__setattr__(out, "num_dense_layers", model.num_layers if kind == "dense" else 0)
        object.__setattr__(out, "moe_layer_every", 1)
    return out


def derive_weights(counts: np.ndarray, probed: np.ndarray) -> np.ndarray:
    """Weights (rows, K) of each kind against the averaged layer from the probed ratios
    (rows, K; the most numerous kind's column is ignored): that kind's weight makes
    sum_k counts_k * w_k the layer count, so the model as a whole costs what the averaged
    layer says (never negative)."""
    derived = int(np.argmax(counts))
    w = np.array(probed, dtype=float, copy=True)
    others = np.arange(len(counts)) != derived
    rest = w[:, others] @ counts[others]
    w[:, derived] = np.maximum(counts.sum() - rest, 0.0) / counts[derived]
    return w


@dataclass(frozen=True, slots=True)
class RankLayers:
    """The layers of one pipeline rank kind (arrays over the grid, or numbers), as counts of
    averaged layers in each of the costs they drive."""

    count: np.ndarray | float
    """Layers the rank holds."""
    time: np.ndarray | float
    """... worth this many averaged layers of time (forward, backward, recompute, exposed
    TP / CP / EP communication)."""
    dense: np.ndarray | float
    """... of replicated parameters (attention, norms, dense MLP or shared experts, Mamba)."""
    expert: np.ndarray | float
    """... of routed-expert parameters."""
    acts: np.ndarray | float
    """... of activation bytes kept per in-flight micro-batch."""

    @classmethod
    def uniform(cls, count) -> RankLayers:
        """Layers that are each the averaged layer (a model of one kind)."""
        return cls(count, count, count, count, count)

    @classmethod
    def of(cls, layers) -> RankLayers:
        return layers if isinstance(layers, RankLayers) else cls.uniform(layers)

    def per_layer(self, value):
        """`value` (one of the fields) per layer the rank holds: the rank's average layer
        over the averaged layer (1 for a rank without layers)."""
        count = np.asarray(self.count, dtype=float)
        return np.divide(value, count, out=np.ones(np.broadcast(value, count).shape),
                         where=count > 0)

    def mean(self, other: RankLayers) -> RankLayers:
        """Each field's mean with `other`'s (DualPipe: a rank's own and mirrored stage)."""
        return RankLayers(*((getattr(self, f.name) + getattr(other, f.name)) / 2
                            for f in fields(self)))

    def take(self, index) -> RankLayers:
        """The rows `index` of every field that is an array over the grid."""
        return RankLayers(*(np.asarray(v)[index] if np.ndim(v) else v
                            for v in (self.count, self.time, self.dense, self.expert, self.acts)))


PER_RANK_COLUMNS = ("dp", "pp", "vp", "global_batch_size", "distributed_optimizer", "schedule",
                    "layers_first", "layers_last", "layers_mid")
"""Grid columns that one layer's time and activation bytes do not read (they shape the
pipeline and the data-parallel group, not a layer); rows that differ only in them share
their kinds' weights (`layer_rows`; tests/test_layer_mix.py checks the claim)."""


def layer_rows(g: LayoutGrid) -> tuple[np.ndarray, np.ndarray]:
    """(a row index of each distinct per-layer setting of `g`, each row's position among
    them): rows equal in every column but `PER_RANK_COLUMNS`."""
    key, radix = np.zeros(len(g), dtype=np.int64), 1
    names = ("tp", "cp", "ep", "etp", "micro_batch_size", "recompute", "sequence_parallel",
             "flash_attention", "fsdp", "dp_replicate", "grad_reduce_fp32", "framework",
             "recompute_modules", "offload_activation_layers", "moe_a2a_overlap", "price_stall")
    for name in names:
        value = np.asarray(getattr(g, name))
        if value.ndim == 0:
            continue  # one value for the whole grid
        if value.dtype.kind in "biu":
            code = value.astype(np.int64) - int(value.min())
        else:  # a column of names
            code = np.unique(value, return_inverse=True)[1].reshape(-1)
        size = int(code.max(initial=0)) + 1
        if radix * size >= 2 ** 62:  # too many distinct settings for one integer key
            key, radix = np.unique(key, return_inverse=True)[1].astype(np.int64), len(g)
        key, radix = key * size + code, radix * size
    return unique_rows(key)


@dataclass(frozen=True, slots=True)
class LayerMix:
    """A multi-kind model's layers and each kind's weights on one grid."""

    codes: np.ndarray
    """Kind code of each layer, model order (`layer_kinds`)."""
    time: np.ndarray
    """(settings, K): one layer's time over the averaged layer's."""
    acts: np.ndarray
    """(settings, K): one layer's activation bytes over the averaged layer's."""
    dense: np.ndarray
    """(K,): one layer's replicated parameters over the averaged layer's."""
    expert: np.ndarray
    """(K,): one layer's routed-expert parameters over the averaged layer's."""
    setting: np.ndarray
    """(rows,): each grid row's row of `time` and `acts` (`layer_rows`)."""

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.codes, minlength=self.time.shape[1]).astype(float)

    def take(self, index) -> LayerMix:
        return LayerMix(self.codes, self.time, self.acts, self.dense, self.expert,
                        self.setting[index])

    def holding(self, kind_counts: np.ndarray, rows=slice(None)) -> RankLayers:
        """`RankLayers` of ranks holding `kind_counts` layers of each kind ((K,), or (n, K)
        for the grid rows `rows`)."""
        c = np.asarray(kind_counts, dtype=float)
        at = self.setting[rows]
        return RankLayers(c.sum(axis=-1), (self.time[at] * c).sum(axis=-1),
                          c @ self.dense, c @ self.expert, (self.acts[at] * c).sum(axis=-1))

    def layers(self, indices, row: int = 0) -> RankLayers:
        """`RankLayers` of a rank holding the layers `indices` (model order), grid row `row`."""
        kinds = np.bincount(self.codes[np.asarray(indices, dtype=np.int64)],
                            minlength=self.time.shape[1])
        return self.holding(kinds, slice(row, row + 1))

    def ranks(self, g: LayoutGrid) -> tuple[RankLayers, RankLayers, RankLayers]:
        """(first, last, busiest middle) ranks of every row of `g`, as `megatron._rank_kinds`
        takes them. The middle rank is the one with the most time; its parameter and
        activation counts are the largest of any middle rank's (an upper bound when the
        middle ranks' mixes differ)."""
        vshape = is_v_shape(g.schedule)
        mirror = is_mirrored(g.schedule)
        key = ((g.pp * (int(g.vp.max(initial=1)) + 1) + g.vp) * 2 + vshape) * 2 + mirror
        splits, split_of = unique_rows(key)
        mixes = [_rank_kind_counts(self.codes.tobytes(), len(self.codes), self.time.shape[1],
                                   g.layers_per_stage, int(g.pp[i]), int(g.vp[i]),
                                   bool(vshape[i]), bool(mirror[i])) for i in splits]
        inner = [_maximal(r[1:-1]) for r in mixes]  # pp <= 2: no middle rank, all zero
        # each kind's weight on every row, as contiguous columns
        time, acts = ([w[self.setting, k] for k in range(w.shape[1])] for w in (self.time, self.acts))
        out = []
        for cand in ([r[:1] for r in mixes], [r[-1:] for r in mixes], inner):
            count, dense, expert = (np.array([float(np.max(c @ w, initial=0.0)) for c in cand])
                                    [split_of] for w in (np.ones(len(self.dense)), self.dense,
                                                         self.expert))
            out.append(RankLayers(count, _largest(time, cand, split_of), dense, expert,
                                  _largest(acts, cand, split_of)))
        return tuple(out)


def _largest(weights: list[np.ndarray], cand: list[np.ndarray], split: np.ndarray) -> np.ndarray:
    """Per grid row, the largest over the candidate mixes of its split of sum_k weights[k] *
    count_k (weights: K columns over the grid; cand[j]: (n_j, K) mixes of split j; an empty
    candidate list counts as an empty rank)."""
    width = max(1, max(len(c) for c in cand))
    pad = np.zeros((len(cand), width, len(weights)))  # padded with empty ranks
    for j, c in enumerate(cand):
        pad[j, :len(c)] = c
    best = None
    for w in range(width):
        value = sum(col * pad[split, w, k] for k, col in enumerate(weights))
        best = value if best is None else np.maximum(best, value)
    return best


def _maximal(mixes: np.ndarray) -> np.ndarray:
    """The distinct rows of `mixes` ((n, K) kind counts) that no other row covers in every
    kind: the only candidates for the largest of any positive weighting."""
    mixes = np.unique(mixes, axis=0)
    covered = [(np.all(mixes >= m, axis=1) & np.any(mixes > m, axis=1)).any() for m in mixes]
    return mixes[~np.array(covered, dtype=bool)] if len(mixes) else mixes


def unique_rows(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a row index of each distinct non-negative integer key, each row's position among
    them): in O(rows) when the keys are small, else by sorting."""
    key = np.asarray(key, dtype=np.int64)
    top = int(key.max(initial=0)) + 1
    if top > 4 * len(key) + 1024:
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        return first, inverse.reshape(-1)
    slot = np.full(top, -1, dtype=np.int64)
    slot[key[::-1]] = np.arange(len(key))[::-1]  # the first row holding each key wins
    present = np.nonzero(slot >= 0)[0]
    where = np.zeros_like(slot)
    where[present] = np.arange(len(present))
    return slot[present], where[key]


@cache
def _rank_kind_counts(codes: bytes, num_layers: int, kinds: int, split: tuple[int, ...] | None,
                      pp: int, vp: int, vshape: bool, mirror: bool = False) -> np.ndarray:
    """(pp, K) layers of each kind on each pipeline rank (virtual stage k on
    `rank_of_stage(k, pp, vshape)`); `split`: the grid's explicit split, else the even one.
    `mirror` (DualPipe): rank r also holds stage pp-1-r and runs each of its two stages for
    half the micro-batches, so its counts are the two stages' mean (the schedule's weight
    copies, `schedules.weight_copies`, double them back for the parameters)."""
    layer_codes = np.frombuffer(codes, dtype=np.int64)
    stages = split if split is not None else even_split(num_layers, pp * vp)
    out = np.zeros((pp, kinds))
    start = 0
    for k, n in enumerate(stages):
        out[rank_of_stage(k, pp, vshape)] += np.bincount(layer_codes[start:start + n],
                                                          minlength=kinds)
        start += n
    return (out + out[::-1]) / 2 if mirror else out
