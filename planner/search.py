"""Search every valid layout, fast: generate only valid candidates as numpy arrays, evaluate
them in one vectorised pass of the cost model, keep those that fit, and let the partition ILP
re-split the layers of the leaders (uneven stages where it pays).

    from planner.search import SearchSpace, search
    result = search(model, cluster, seq_len=8192, global_batch_size=128, space=SearchSpace())
    result.plans[0]   # the fastest fitting Estimate (layout.layers_per_stage set by the ILP)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from cost_models import dims, megatron, recompute_modules, schedules
from cost_models.grid import LayoutGrid, rank_layer_counts
from cost_models.specs import (
    RECOMPUTE_KINDS,
    SCHEDULES,
    ClusterSpec,
    Estimate,
    GiB,
    InfeasibleLayout,
    Layout,
    ModelSpec,
    NodeSpec,
    SpecError,
    a2a_overlap_mask,
    even_split,
)

from .fixed_degrees import FIXED_AXES, explain_fixed

if TYPE_CHECKING:
    from .ilp_partition import Partition


class NoCandidates(SpecError):
    """No valid layout exists for the cluster as given (before any memory check)."""


@dataclass(frozen=True, slots=True)
class SearchSpace:
    """What the search may choose. A fixed degree (tp=4) restricts that axis to one value."""

    dtype: str = "bf16"
    """Matmul dtype of every candidate."""
    recompute: tuple[str, ...] = RECOMPUTE_KINDS
    """Recomputation settings to consider."""
    micro_batch_sizes: tuple[int, ...] = tuple(range(1, 17))
    """Micro-batch sizes to consider (those dividing gbs/dp are kept)."""
    max_vp: int | None = None
    """Largest number of virtual stages per pipeline rank; None: every vp with pp*vp <= layers
    (what `estimate` and Megatron-LM accept)."""
    max_cp: int = 32
    max_tp: int | None = None
    """Largest tp; None: `default_max_tp` (a node's GPUs, or up to 8 of an NVLink domain)."""
    sequence_parallel: tuple[bool, ...] = (True, False)
    distributed_optimizer: tuple[bool, ...] = (True, False)
    flash_attention: bool = True
    """Fused attention kernels (set False to model pre-2022 software stacks)."""
    headroom: float = 0.05
    """Fraction of GPU memory the planner keeps free (prediction error, allocator spikes)."""
    refine_top: int = 5
    """How many leading candidates get their layer split re-optimised by the ILP."""
    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    vp: int | None = None
    dp: int | None = None
    ep: int | None = None
    etp: int | None = None
    """Fixed expert tensor-parallel degree (MoE); None searches every etp Megatron accepts
    up to max_tp (`dims.expert_tp_degrees`)."""
    micro_batch_size: int | None = None
    schedules: tuple[str, ...] = SCHEDULES
    """Pipeline schedules to consider (`cost_models.schedules`)."""
    schedule: str | None = None
    """A fixed schedule (`--schedule`); None lets the search choose among `schedules`."""
    fsdp: tuple[bool, ...] = (False,)
    """Sharding choices: (False,) Megatron DP / distributed optimizer only, (True,) FSDP only,
    (False, True) both (plan --fsdp / --consider-fsdp)."""
    dp_replicate: int = 1
    """HSDP replicate degree of the FSDP candidates."""
    grad_reduce_fp32: bool = True
    """fp32 main gradients (False: bf16 grad buffers) for every candidate."""
    framework: str = "megatron"
    """Memory conventions of every candidate (`Layout.framework`)."""
    torch_compile: bool = False
    """torchtitan candidates under torch.compile (`Layout.torch_compile`)."""
    async_tp: bool = False
    """torchtitan candidates with async TP (`Layout.async_tp`; needs torch_compile)."""
    recompute_modules: tuple[tuple[str, ...], ...] | None = None
    """Megatron module lists tried with selective recompute (`--recompute-modules`); None:
    `recompute_modules.search_sets(model)` (the default, a cheap and a whole-MLP set)."""
    moe_a2a_overlap: bool = True
    """MoE: Megatron's expert all-to-all overlap on every candidate that its rules allow
    (`specs.a2a_overlap_problem`); False: never (`Layout.moe_a2a_overlap`)."""
    moe_dispatcher: str = "alltoall"
    """MoE token dispatcher of every candidate (`Layout.moe_dispatcher`)."""
    cuda_graph_modules: tuple[str, ...] = ()
    """Megatron per-module CUDA graphs of every candidate (`Layout.cuda_graph_modules`)."""
    te_cross_entropy: bool = False
    """Transformer Engine's fused loss on every candidate (`Layout.te_cross_entropy`)."""
    fsdp_strategy: str = "optim_grads_params"
    """Megatron-FSDP's sharding strategy of the FSDP candidates (`Layout.fsdp_strategy`)."""
    fsdp_reshard_after_forward: str = "default"
    """torchtitan's reshard policy of the FSDP candidates (`Layout.fsdp_reshard_after_forward`)."""

    def to_dict(self) -> dict:
        """The plan file's form (tuples as lists)."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, tuple) else v
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> SearchSpace:
        known = {f.name: f for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - set(known):
            extra = sorted(set(data) - set(known)) if isinstance(data, dict) else data
            raise SpecError(f"{where}: unknown search-space keys {extra}; regenerate the plan")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if kwargs.get("recompute_modules") is not None:
            kwargs["recompute_modules"] = tuple(tuple(x) for x in kwargs["recompute_modules"])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SpecError(f"{where}: bad search space: {exc}") from None


@dataclass(frozen=True, slots=True)
class SearchResult:
    plans: tuple[Estimate, ...]
    """Fitting layouts, fastest first (deduplicated)."""
    candidates: int
    """Valid layouts generated and evaluated (`pruned` counts the others)."""
    feasible: int
    """Of those, how many fit in memory."""
    seconds: float
    solver: str
    """The ILP solver used for the layer partition ("none" when no pipeline to split)."""
    partitions: tuple[Partition | None, ...] = ()
    """ILP outcome per returned plan (None when pp == 1 or not refined)."""
    nearest: tuple[Estimate, ...] = field(default=())
    """When nothing fits: the candidates that miss by the least memory."""
    cluster: ClusterSpec | None = None
    """The cluster planned for (a subset of the input when some nodes must stay idle)."""
    idle_nodes: tuple[str, ...] = ()
    """Nodes left out because no valid layout uses all of them."""
    alternatives: tuple[Estimate, ...] = ()
    """Best fitting layout of each other (tp, pp, cp) family, for explaining the winner."""
    pruned: int = 0
    """Valid layouts not evaluated: their weights, gradients and optimizer state alone exceed
    the GPU memory (`state_fits`), so none of them fits."""
    dominated: int = 0
    """Valid layouts not evaluated: recompute variants of a layout that fits without
    recompute (`_evaluate_dominating`); every one of them fits and is slower. Counted in
    `feasible`."""

    @property
    def rate(self) -> float:
        return self.candidates / self.seconds if self.seconds else float("inf")

    @property
    def valid(self) -> int:
        """Every valid layout of the space: evaluated, pruned or dominated."""
        return self.candidates + self.pruned + self.dominated

    def skipped_note(self, sep: str) -> str:
        """What was not evaluated and why, for the summary lines ('' when nothing)."""
        parts = ([f"{self.pruned:,} ruled out by static memory alone"] if self.pruned else []) \
            + ([f"{self.dominated:,} recompute variants of layouts that fit without recompute "
                "skipped"] if self.dominated else [])
        return "".join(sep + p for p in parts)


DEFAULT_TP_CAP = 8
"""Largest default tp when the NVLink domain is larger than a node (GB200 NVL72: tp 8 spans
two 4-GPU trays at NVLink speed). Capped at 8 because the GEMM efficiencies (max fraction +
per-kernel overhead) were fitted on runs with tp <= 8, so thinner GEMMs (h/tp columns) would be
extrapolated, and each further tp choice multiplies the search grid (405B on 4,096 trays must
plan in <= 2 s); `--max-tp` lifts it."""


def default_max_tp(cluster: ClusterSpec) -> int:
    """The search's tp bound when `--max-tp` is not given: one node's GPUs, or
    min(NVLink domain GPUs, DEFAULT_TP_CAP) when the domain spans several nodes."""
    gpn = cluster.gpus_per_node
    return max(gpn, min(cluster.domain_gpus, DEFAULT_TP_CAP))


def with_default_max_tp(space: SearchSpace | None, cluster: ClusterSpec) -> SearchSpace:
    """`space` (default: SearchSpace()) with max_tp filled in by `default_max_tp`."""
    space = space or SearchSpace()
    return space if space.max_tp else replace(space, max_tp=default_max_tp(cluster))


def divisors(n: int) -> list[int]:
    """Divisors of n in increasing order (trial division up to sqrt(n))."""
    return dims.divisors(n)


def degree_combos(model: ModelSpec, world: int, gpus_per_node: int, seq_len: int,
                  space: SearchSpace) -> dict[str, np.ndarray]:
    """Columns (one per degree of `ParallelDims` but vp) of every valid degree combination:
    mesh degrees whose product is `world`, tp dividing the (KV) heads and within an NVLink
    domain, cp splitting the sequence, pp <= layers, and ep among `dims.expert_degrees`."""
    max_tp = space.max_tp or gpus_per_node
    allowed = {"tp": [t for t in divisors(world) if dims.tp_splits(t, model) and t <= max_tp],
               "cp": [c for c in divisors(world) if c <= space.max_cp and dims.cp_splits(c, seq_len)
                      and dims.cp_covers(c, model)]}
    fixed = {name: getattr(space, name) for name in dims.MESH_ORDER}
    rows = []
    for combo in dims.mesh_degrees(world, fixed, allowed):
        if combo["pp"] > model.num_layers:
            continue
        stage = combo["tp"] * combo["cp"] * combo["dp"]
        etps = ([space.etp] if space.etp is not None and model.is_moe
                else dims.expert_tp_degrees(model, combo["tp"], stage, max_tp))
        for etp in etps:
            for ep in dims.expert_degrees(model, stage, etp):
                if space.ep in (None, ep):
                    rows.append({**combo, "ep": ep, "etp": etp})
    names = [n for n in dims.DEGREES if n != "vp"]
    return {n: np.array([r[n] for r in rows], dtype=np.int64) for n in names}


def dominated(space: SearchSpace, d: dims.ParallelDims, sched, sp, sp_ok, do,
              is_moe: bool = False) -> np.ndarray:
    """Rows another row of the space beats or ties on step time and memory, which the search
    therefore never needs to evaluate (exact: the best layout is never among them):

    - sequence parallelism off with tp > 1 in a dense model: SP splits the norm/dropout
      activations and the elementwise passes over tp, lets TP communication overlap, and
      moves the same collective bytes (Korthikanti et al. 2022 Sec. 4.2.2); not for MoE,
      where the expert-side model (etp folding) can price SP higher (found by the
      brute-force test);
    - the plain optimizer with dp*cp > 1: the distributed one shards the optimizer state and
      its reduce-scatter (fp32) + all-gather (bf16) moves fewer bytes than the fp32
      all-reduce, in as many latency steps (Megatron-LM distributed optimizer);
    - 1F1B with pp > 1 when ZB-H1 is allowed: the same order and memory, bubble
      (p-1)(F+B-W) <= (p-1)(F+B+W) (Qi et al. 2024 Table 3).
    Each rule applies only when the dominating choice is in the space."""
    out = np.zeros(sp.shape, dtype=bool)
    if True in space.sequence_parallel and not is_moe:
        out |= ~sp & (d.tp > 1) & sp_ok
    if True in space.distributed_optimizer:
        out |= ~do & (d.group("dp_cp").size > 1)
    if space.schedule is None and "zb-h1" in space.schedules:
        out |= (sched == schedules.CODE["1f1b"]) & (d.pp > 1)
    return out


def _expand(rows: np.ndarray, values: np.ndarray, *carried: np.ndarray):
    """Every (row, value) pair: `rows` and each carried column repeated once per value, and
    the value column; returns (rows, value) or ((rows, *carried), value)."""
    values = np.asarray(values)
    n = len(values)
    out = [np.repeat(col, n) for col in (rows, *carried)]
    col = np.tile(values, len(rows))
    return (out[0], col) if not carried else (tuple(out), col)


def _stage_counts(num_layers: int, pp: np.ndarray, vp: np.ndarray, vshape: np.ndarray):
    """(first, last, busiest middle) rank layer counts of each row's even split."""
    keys = (pp * (num_layers + 1) + vp) * 2 + vshape.astype(np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    table = np.array([_rank_counts(num_layers, int(k // 2 // (num_layers + 1)),
                                   int(k // 2 % (num_layers + 1)), bool(k % 2)) for k in uniq],
                     dtype=np.int64).reshape(-1, 3)
    return table[inverse.ravel()]


def _read_prefix(grid: LayoutGrid, order, fits, leaders: int, families: int) -> list[int]:
    """The rows of `order` that `search` reads: every row up to the last of `_leaders`' picks
    and up to the first of `families` distinct `FAMILY` keys (the explanation's walk)."""
    chosen = _leaders(grid, order, fits, leaders)
    last = int(np.nonzero(np.isin(order, chosen))[0].max()) if chosen else -1
    seen, out = set(), []
    for pos, i in enumerate(order):
        if not fits[i]:
            break
        out.append(int(i))
        seen.add(tuple(int(getattr(grid, name)[i]) for name in FAMILY))
        if pos >= last and len(seen) >= families:
            break
    return out


STALL_POOL_ROWS = 4096
"""Rows (by lower bound) `_evaluate_with_stalls` re-ranks while pricing stalls; grown when the
ranking's prefix could reach past them."""


def _evaluate_dominating(model: ModelSpec, cluster: ClusterSpec, layouts: _Layouts,
                         headroom: float):
    """Evaluate every layout's first recompute option (no recompute), then the other
    options of the layouts that do not fit without it, skipping the variants of a layout
    that fits: recompute only adds time and frees memory, so they fit and are slower, and
    they can neither win nor lead a family (the ranking keeps one row per layout). Only the
    evaluated rows are materialised. Returns (grid, result, dominated): the evaluated rows
    (every layout's no-recompute row, then the other variants of the layouts that do not
    fit without recompute, in runs) and how many were skipped. The stall is not priced here
    (`_evaluate_with_stalls` does)."""
    variants = len(layouts.codes)
    first = _unpriced(layouts.variants(np.arange(layouts.count), [0]))
    parts = megatron.evaluate_parts(model, cluster, first)
    fit_first = np.concatenate([megatron.fits_mask(p, cluster.gpu, headroom) for p in parts])
    dominated = int(fit_first.sum()) * (variants - 1)
    over = np.nonzero(~fit_first)[0]
    grid = first
    if len(over):
        # the other variants of each layout that overflows, in runs (`variants`' order)
        rest_rows = np.repeat(over, variants - 1)
        rest_options = np.tile(np.arange(1, variants), len(over))
        rest = _unpriced(layouts.rows(rest_rows, rest_options))
        parts += megatron.evaluate_parts(model, cluster, rest, variants - 1)
        # ~10^6 rows: the whole grid is built afresh once both parts are gone (concatenating
        # them held three copies), and its result is stacked once from every chunk
        del first, rest, grid
        grid = _unpriced(layouts.rows(
            np.concatenate([np.arange(layouts.count), rest_rows]),
            np.concatenate([np.zeros(layouts.count, dtype=np.int64), rest_options])))
    return grid, megatron.stack_results(model, grid, parts), dominated


def _unpriced(grid: LayoutGrid) -> LayoutGrid:
    """`grid` with the interleaved stall left unpriced (`LayoutGrid.price_stall`)."""
    return replace(grid, price_stall=np.zeros(len(grid), dtype=bool))


def _evaluate_with_stalls(model: ModelSpec, cluster: ClusterSpec, grid: LayoutGrid,
                          headroom: float, leaders: int, variants: int = 1,
                          res: megatron.GridResult | None = None):
    """`megatron.evaluate` of `grid` with the interleaved stall priced only where it can
    change what `search` returns (branch and bound, exact): unpriced, a row's step is a lower
    bound (the stall only adds bubble), so the unpriced rows of the prefix the ranking reads
    are priced (only those rows re-evaluated) until that prefix is exact. The re-ranking runs
    on the `STALL_POOL_ROWS` best lower bounds; it is exact once the prefix ends inside the
    pool and before the first lower bound outside it (else the pool grows). Returns (grid,
    result, fits, order); past the prefix, order is by lower bound. `variants`: the grid's
    runs of recompute variants (`megatron.evaluate`); `res`: that evaluation when done
    already (`_evaluate_dominating`)."""
    priced = np.zeros(len(grid), dtype=bool)
    grid = replace(grid, price_stall=priced)
    if res is None:
        res = megatron.evaluate(model, cluster, grid, variants)
    fits = megatron.fits_mask(res, cluster.gpu, headroom)  # memory does not see the stall
    open_rows = megatron.uneven_interleaved(model, grid)
    # by lower bound; the rows that do not fit last, in row order: every walk of the ranking
    # (`_read_prefix`, `_leaders`, `_family_leaders`) stops at the first of them
    fit_rows = np.nonzero(fits)[0]
    first = np.concatenate([fit_rows[_order(grid, res.step_time_s[fit_rows], fit_rows)],
                            np.nonzero(~fits)[0]])
    size = STALL_POOL_ROWS
    while True:
        pool = first[:size]
        sub = grid.take(pool)  # for the tie-break keys only
        while True:
            order = pool[_order(sub, np.where(fits[pool], res.step_time_s[pool], np.inf))]
            prefix = _read_prefix(grid, order, fits, leaders, FAMILY_COUNT + 1)
            todo = np.array([i for i in prefix if open_rows[i]], dtype=np.int64)
            if not len(todo):
                break
            open_rows[todo] = False
            priced = priced.copy()
            priced[todo] = True
            grid = replace(grid, price_stall=priced)
            bubble = np.array(res.pp_bubble_s, dtype=float)  # only these rows' bubble changes
            bubble[todo] = megatron.evaluate(model, cluster, grid.take(todo)).pp_bubble_s
            res = replace(res, pp_bubble_s=bubble)
        if size >= len(grid):
            return grid, res, fits, order
        rest = first[size]  # the best lower bound outside the pool
        if not fits[rest] or (prefix and len(prefix) < len(pool) and np.round(
                res.step_time_s[prefix[-1]], 9) < np.round(res.step_time_s[rest], 9)):
            return grid, res, fits, np.concatenate([order, first[size:]])
        size *= 8


@cache
def _rank_counts(num_layers: int, pp: int, vp: int, v_shape: bool) -> tuple[int, int, int]:
    return rank_layer_counts(even_split(num_layers, pp * vp), pp, v_shape)


def generate(model: ModelSpec, world: int, gpus_per_node: int, seq_len: int,
             global_batch_size: int, space: SearchSpace) -> LayoutGrid:
    """All valid candidates as a LayoutGrid (only valid rows are ever materialised)."""
    return _generate(model, world, gpus_per_node, seq_len, global_batch_size, space)[0]


STATE_BOUND_SLACK = 1e-9
"""Relative margin of the static-memory prefilter: a combination is skipped only when its
lower bound exceeds the capacity by more than this, so float rounding between the bound and
the evaluated peak can never drop a layout that fits."""


def _shardings(space: SearchSpace) -> list[tuple[bool, bool]]:
    """(distributed optimizer, fsdp) pairs of the space; FSDP makes the optimizer choice moot."""
    out = [(x, False) for x in space.distributed_optimizer if False in space.fsdp]
    return out + ([(True, True)] if True in space.fsdp else [])


def state_fits(model: ModelSpec, base: dict[str, np.ndarray], space: SearchSpace,
               seq_len: int, capacity_bytes: float, fp8_transpose_copy: bool = True
               ) -> np.ndarray:
    """(combinations x shardings) mask: False where the static memory of the degree
    combination `base` row with that sharding (`megatron.state_bytes_lower_bound`: weights,
    gradients and optimizer state of its fullest rank, over every vp, schedule, micro-batch,
    recompute and SP choice) already exceeds `capacity_bytes`, so no inner choice can fit.
    `fp8_transpose_copy`: the GPU's (`GpuSpec.fp8_transpose_copy`)."""
    shardings = _shardings(space)
    n, k = len(base["tp"]), len(shardings)
    cols = {name: np.repeat(col, k) for name, col in base.items()}
    fsdp = np.tile([f for _, f in shardings], n).astype(bool)
    one = np.ones(n * k, dtype=np.int64)
    grid = LayoutGrid(
        **cols, vp=one, micro_batch_size=one, global_batch_size=one, recompute=0 * one,
        sequence_parallel=np.zeros(n * k, dtype=bool),
        distributed_optimizer=np.tile([d for d, _ in shardings], n).astype(bool),
        flash_attention=np.full(n * k, space.flash_attention), layers_first=one,
        layers_last=one, layers_mid=one, seq_len=seq_len, dtype=space.dtype, fsdp=fsdp,
        # HSDP needs dp % dp_replicate == 0 (`generate` drops the other FSDP rows anyway)
        dp_replicate=np.where(fsdp & (cols["dp"] % space.dp_replicate == 0),
                              space.dp_replicate, 1),
        grad_reduce_fp32=space.grad_reduce_fp32, framework=space.framework)
    bound = megatron.state_bytes_lower_bound(model, grid, fp8_transpose_copy)
    return (bound <= capacity_bytes * (1 + STATE_BOUND_SLACK)).reshape(n, k)


def _generate(model: ModelSpec, world: int, gpus_per_node: int, seq_len: int,
              global_batch_size: int, space: SearchSpace,
              capacity_bytes: float | None = None,
              fp8_transpose_copy: bool = True) -> tuple[LayoutGrid, int]:
    """(the valid candidates, how many valid candidates were left out). The rows come in runs
    of the `recompute_options` variants of one layout (the innermost axis; see
    `megatron.evaluate`'s `variants`). With `capacity_bytes`, the rows whose degree
    combination and sharding `state_fits` rules out (their static memory alone exceeds it on
    a GPU with `fp8_transpose_copy`) are counted, not materialised."""
    layouts, pruned = _generate_layouts(model, world, gpus_per_node, seq_len,
                                        global_batch_size, space, capacity_bytes,
                                        fp8_transpose_copy)
    return layouts.variants(np.arange(layouts.count)), pruned


@dataclass(frozen=True, slots=True)
class _Layouts:
    """The valid layouts of a search before their recompute variants: one entry per layout
    in each column; `variants` materialises the grid rows of chosen layouts."""

    model: ModelSpec
    space: SearchSpace
    seq_len: int
    global_batch_size: int
    base: dict[str, np.ndarray]
    """`degree_combos`' columns; `cols["b"]` indexes them."""
    cols: dict[str, np.ndarray]
    """Per layout: b (degree combination), v, mb, sc, sp, do, fs, first, last, mid."""
    codes: np.ndarray
    """`recompute_options` codes and masks (the variants, in run order)."""
    masks: np.ndarray

    @property
    def count(self) -> int:
        return len(self.cols["b"])

    def variants(self, layouts: np.ndarray, options: np.ndarray | None = None) -> LayoutGrid:
        """The grid rows of `layouts` (indices), each as a run of the recompute options
        `options` (indices into `codes`; default all), in that order."""
        options = np.arange(len(self.codes)) if options is None else np.asarray(options)
        layouts = np.asarray(layouts, dtype=np.int64)
        return self.rows(np.repeat(layouts, len(options)), np.tile(options, len(layouts)))

    def rows(self, layouts: np.ndarray, options: np.ndarray) -> LayoutGrid:
        """The grid rows (layouts[i], recompute option options[i]), one per pair, in order."""
        return _grid_of(self, {k: col[layouts] for k, col in self.cols.items()},
                        np.asarray(options))


def _generate_layouts(model: ModelSpec, world: int, gpus_per_node: int, seq_len: int,
                      global_batch_size: int, space: SearchSpace,
                      capacity_bytes: float | None = None,
                      fp8_transpose_copy: bool = True) -> tuple[_Layouts, int]:
    """`_generate` before the recompute variants are expanded: (the valid layouts, how many
    valid candidates were left out)."""
    base = degree_combos(model, world, gpus_per_node, seq_len, space)
    combos = len(base["tp"])
    max_vp = model.num_layers if space.max_vp is None else space.max_vp
    vps = np.array([v for v in range(1, max_vp + 1) if space.vp in (None, v)]
                   or ([space.vp] if space.vp is not None else []), dtype=np.int64)
    mbs = np.array([b for b in space.micro_batch_sizes if space.micro_batch_size in (None, b)])
    if space.micro_batch_size is not None and not len(mbs):
        mbs = np.array([space.micro_batch_size])
    rec_codes, rec_masks = recompute_options(model, space)
    sps = np.array(space.sequence_parallel)
    shardings = _shardings(space)  # (distributed optimizer, fsdp)
    dopts = np.array([x[0] for x in shardings], dtype=bool)
    fsdps = np.array([x[1] for x in shardings], dtype=bool)
    names = (space.schedules if space.schedule is None else (space.schedule,))
    scheds = schedules.codes(names)
    # Expand one axis at a time, filtering as soon as a rule can be checked.
    b, v = _expand(np.arange(combos), vps)
    keep = (base["pp"][b] * v <= model.num_layers) & ((v == 1) | (base["pp"][b] > 1))
    (b, v), mb = _expand(b[keep], mbs, v[keep])
    keep = global_batch_size % (base["dp"][b] * mb) == 0
    (b, v, mb), sc = _expand(b[keep], scheds, v[keep], mb[keep])
    pp_b, dp_b = base["pp"][b], base["dp"][b]
    keep = schedules.valid_mask(sc, pp_b, v, global_batch_size // (dp_b * mb))
    if space.schedule is None and "zb-h1" in space.schedules:  # see `dominated`
        keep &= ~((sc == schedules.CODE["1f1b"]) & (pp_b > 1))
    (b, v, mb, sc), sp = _expand(b[keep], sps, v[keep], mb[keep], sc[keep])
    (b, v, mb, sc, sp), sh = _expand(b, np.arange(len(shardings)), v, mb, sc, sp)
    do, fs = dopts[sh], fsdps[sh]
    d = dims.ParallelDims(**{n: col[b] for n, col in base.items()}, vp=v)
    sp_ok = (seq_len // d.cp) % d.tp == 0
    ok = np.where(d.tp == 1, ~sp, sp_ok)  # SP only with tp > 1, s/cp split by tp
    ok &= do | (d.group("dp_cp").size > 1)  # without DP both optimisers coincide
    ok &= ~fs | ((d.dp % space.dp_replicate == 0) & (d.group("dp_cp").size > 1))  # HSDP splits dp
    ok &= ~dominated(space, d, sc, sp, sp_ok, do, model.is_moe)
    pruned = 0
    if capacity_bytes is not None and len(b):
        fits = state_fits(model, base, space, seq_len, capacity_bytes,
                          fp8_transpose_copy)[b, sh]
        pruned = int(np.count_nonzero(ok & ~fits)) * len(rec_codes)
        ok &= fits
    keep = np.nonzero(ok)[0]
    b, v, mb, sc, sp, do, fs = (col[keep] for col in (b, v, mb, sc, sp, do, fs))
    # rank layer counts once per layout, before its recompute variants (the innermost axis)
    counts = _stage_counts(model.num_layers, base["pp"][b], v, schedules.is_v_shape(sc))
    first, last, mid = counts.T
    cols = dict(b=b, v=v, mb=mb, sc=sc, sp=sp, do=do, fs=fs, first=first, last=last, mid=mid)
    return _Layouts(model, space, seq_len, global_batch_size, base, cols, rec_codes,
                    rec_masks), pruned


def _grid_of(layouts: _Layouts, cols: dict[str, np.ndarray], ri: np.ndarray) -> LayoutGrid:
    """The LayoutGrid of rows given as `_Layouts.cols`-named columns (`_Layouts.variants`);
    `ri` indexes the recompute options."""
    b, v, mb, sc, sp, do, fs, first, last, mid = cols.values()
    model, space, base = layouts.model, layouts.space, layouts.base
    rec_codes, rec_masks = layouts.codes, layouts.masks
    seq_len, global_batch_size = layouts.seq_len, layouts.global_batch_size
    d = dims.ParallelDims(**{n: col[b] for n, col in base.items()}, vp=v)
    degrees = d.to_dict()
    grid = LayoutGrid(
        **degrees, micro_batch_size=mb,
        global_batch_size=np.full_like(degrees["tp"], global_batch_size), recompute=rec_codes[ri],
        sequence_parallel=sp, distributed_optimizer=do,
        flash_attention=np.full(len(b), space.flash_attention), layers_first=first,
        layers_last=last, layers_mid=mid, seq_len=seq_len, dtype=space.dtype,
        schedule=sc, fsdp=fs, dp_replicate=np.where(fs, space.dp_replicate, 1),
        grad_reduce_fp32=space.grad_reduce_fp32, framework=space.framework,
        recompute_modules=rec_masks[ri], torch_compile=space.torch_compile,
        async_tp=space.async_tp, moe_dispatcher=space.moe_dispatcher,
        te_cross_entropy=space.te_cross_entropy and space.framework == "megatron",
        fsdp_strategy=space.fsdp_strategy if space.framework == "megatron"
        else "optim_grads_params",
        fsdp_reshard_after_forward=space.fsdp_reshard_after_forward
        if space.framework == "torchtitan" else "default",
        cuda_graph_modules=space.cuda_graph_modules,
        moe_a2a_overlap=a2a_overlap_allowed(model, space, d.ep, d.pp, v, rec_codes[ri],
                                            rec_masks[ri]),
    )
    return grid


def a2a_overlap_allowed(model: ModelSpec, space: SearchSpace, ep, pp, vp, recompute, masks):
    """Per row: whether the candidate runs Megatron's expert A2A overlap, i.e. the space asks
    for it and Megatron-Core's rules allow it (`specs.a2a_overlap_mask`)."""
    if not (space.moe_a2a_overlap and model.is_moe and space.framework == "megatron"):
        return False
    moe_recomputed = (recompute == 1) & ((masks & recompute_modules.BIT["moe"]) != 0)
    return a2a_overlap_mask(ep, pp, vp, recompute == 2, moe_recomputed)


def recompute_options(model: ModelSpec, space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    """(recompute code, module mask) pairs the search tries: each of `space.recompute`, and
    for Megatron's selective recompute each module list (`SearchSpace.recompute_modules`).
    Megatron's default list (core_attn) with flash attention frees nothing and costs the
    attention forward: dominated by no recompute when that is allowed (exact)."""
    codes, masks = [], []
    for kind in space.recompute:
        code = RECOMPUTE_KINDS.index(kind)
        sets = ((recompute_modules.DEFAULT,) if kind != "selective" or space.framework != "megatron"
                else space.recompute_modules or recompute_modules.search_sets(model))
        for mods in sets:
            mask = recompute_modules.mask_of(mods)
            if (kind == "selective" and space.framework == "megatron" and space.flash_attention
                    and mask == recompute_modules.DEFAULT_MASK and "none" in space.recompute):
                continue
            codes.append(code)
            masks.append(mask)
    return np.array(codes, dtype=np.int64), np.array(masks, dtype=np.int64)


SIMPLER_FIRST = ("tp", "pp", "cp", "vp", "recompute", "schedule")
"""Tie-break of equal step times: smaller values of these first, in this priority."""
FAMILY = ("tp", "pp", "cp")
"""Degrees that define a layout family (the explanation compares the best of each)."""


def _order(grid: LayoutGrid, step: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Deterministic ranking: step time, then simpler layouts (`SIMPLER_FIRST`), then row
    order (the sort is stable). With `rows` (indices), of those rows only (`step` is theirs):
    positions into `rows`."""
    simpler = np.zeros(len(step), dtype=np.int64)  # the tie-break keys as one mixed-radix int
    for name in SIMPLER_FIRST:
        col = getattr(grid, name) if rows is None else getattr(grid, name)[rows]
        simpler = simpler * (int(col.max(initial=0)) + 1) + col
    return np.lexsort((simpler, np.round(step, 9)))


def refinable(lay: Layout) -> bool:
    """Whether the partition ILP can re-split `lay`: it models looped stage placement
    (stage k on rank k % pp), so pp > 1 and neither a V schedule nor DualPipe."""
    return lay.pp > 1 and lay.schedule not in schedules.V_SHAPE and lay.schedule != "dualpipe"


def refine_partition(model: ModelSpec, cluster: ClusterSpec, est: Estimate,
                     headroom: float, beat_s: float = np.inf
                     ) -> tuple[Estimate, Partition | None]:
    """Re-split the layers of `est`'s layout with the partition ILP; keep the better one.
    `beat_s`: skip the ILP when not even a perfectly balanced split (every rank at the
    average load, no pipeline bubble) could bring the step below it."""
    lay = est.layout
    if not refinable(lay):
        return est, None
    costs = megatron.stage_costs(model, cluster, lay, headroom)
    ranks = np.array(rank_layer_counts(lay.stage_layers(model.num_layers), lay.pp))
    per_layer = np.broadcast_to(costs.layer_time_s, (model.num_layers,))  # layer kinds differ
    times = _per_rank_sums(lay, per_layer) + costs.extra_time_s
    average = (per_layer.sum() + costs.extra_time_s.sum()) / lay.pp
    if times.max() <= average * (1 + 1e-3) and ranks.size:
        return est, None  # the even split already meets the average-load lower bound
    gain_s = lay.num_microbatches * (times.max() - average) + est.time.pp_bubble_s
    if est.step_time_s - gain_s >= beat_s:
        return est, None  # ... or cannot beat the best layout found
    if np.ndim(costs.layer_time_s) == 0 and times.max() <= min_max_rank_time(
            costs.layer_time_s, costs.extra_time_s, model.num_layers, lay.vp) * (1 + 1e-9):
        return est, None  # ... or the exact integer optimum: the ILP cannot do better
    from .ilp_partition import partition_layers  # pulp: imported only when a split is solved

    best, found = (est, None), None
    for times, mem in _partition_models(costs, lay.vp):
        try:
            part = partition_layers(model.num_layers, lay.pp, times, np.ones(lay.pp),
                                    costs.extra_time_s, mem, costs.fixed_mem_bytes,
                                    costs.capacity_bytes, vp=lay.vp, time_limit_s=5.0)
        except InfeasibleLayout:
            continue
        found = found or part
        new = megatron.estimate(model, cluster,
                                replace(lay, layers_per_stage=part.layers_per_stage), headroom)
        if new.fits and (not best[0].fits or new.step_time_s < best[0].step_time_s - 1e-12):
            best = (new, part)
    return best if best[1] is not None else (est, found)


def _partition_models(costs: megatron.StageCosts, vp: int):
    """(layer times, layer memory) for the partition ILP: the stage costs as they are, and
    for a model of several layer kinds (per-layer costs) also as uniform layers - their mean
    time, each rank's largest layer memory (a safe bound) - whose ILP spreads each rank's
    layers evenly over its interleaved chunks; `refine_partition` keeps whichever split the
    full estimate prices faster. Interleaved layouts of several layer kinds get the uniform
    model only: the per-layer ILP balances the ranks and bounds the largest chunk, but not
    how chunk sizes vary along the interleaved order, on which Megatron's fixed order stalls
    (`megatron.interleaved_stall_s`). Over 15 interleaved leaders of three plans (DeepSeek-V3
    on 1,024 and 2,048 H100, Llama 4 Maverick on 512) its splits were always slower than the
    even split (Maverick pp2 vp9: 4.26 s even, 4.95-5.21 s re-split, each solve at its 5 s
    limit), while the uniform model's won 8 times."""
    per_layer = bool(np.ndim(costs.layer_time_s))
    if not (per_layer and vp > 1):
        yield costs.layer_time_s, costs.layer_mem_bytes
    if per_layer:
        yield float(np.mean(costs.layer_time_s)), costs.layer_mem_bytes.max(axis=1)


def min_max_rank_time(layer_time_s: float, extra_time_s: np.ndarray, num_layers: int,
                      vp: int) -> float:
    """The smallest slowest-rank time any integer split of `num_layers` identical layers over
    the ranks can reach, memory ignored (so a lower bound for the partition ILP, whose stage
    times are layer_time_s * n_r + extra_time_s[r] with n_r >= vp layers per rank).

    T is achievable iff sum_r floor((T - extra_r) / t) >= num_layers with every term >= vp;
    the optimum is one of the values extra_r + k * t, found by bisection over them.
    """
    extra = np.asarray(extra_time_s, dtype=float)
    if layer_time_s <= 0:
        return float(extra.max())
    counts = np.arange(vp, num_layers + 1)
    values = np.unique((extra[:, None] + layer_time_s * counts[None, :]).ravel())

    def enough(t_max: float) -> bool:
        n = np.floor((t_max - extra) / layer_time_s * (1 + 1e-12) + 1e-9)
        return bool(n.min() >= vp and n.sum() >= num_layers)

    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(values[mid]) else (mid + 1, hi)
    return float(values[lo])


def _per_rank_sums(lay: Layout, per_layer: np.ndarray) -> np.ndarray:
    """Sum of `per_layer` (one value per layer, model order) over each pipeline rank's layers
    (virtual stage k on rank k % pp)."""
    stages = np.asarray(lay.stage_layers(len(per_layer)))
    rank = np.repeat(np.arange(len(stages)) % lay.pp, stages)
    return np.bincount(rank, per_layer, minlength=lay.pp)


def _leaders(grid: LayoutGrid, order: np.ndarray, fits: np.ndarray, count: int,
             eligible: np.ndarray | None = None) -> list[int]:
    """The first `count` fitting rows of `order` that differ in more than their recompute
    setting: variants of one layout with more recompute rank right behind it (a norm
    recomputed costs little) and would crowd distinct layouts out of the ILP refinement.
    `eligible`: only rows where it is True count."""
    cols = [grid.column(n) for n in ("tp", "pp", "dp", "cp", "ep", "etp", "vp",
                                     "micro_batch_size", "sequence_parallel",
                                     "distributed_optimizer", "schedule", "fsdp")]
    out, seen = [], set()
    for i in order:
        if len(out) == count or not fits[i]:
            break
        key = tuple(int(c[i]) for c in cols)
        if key not in seen and (eligible is None or eligible[i]):
            seen.add(key)
            out.append(int(i))
    return out


def _refinable_rows(grid: LayoutGrid, order: np.ndarray, fits: np.ndarray, count: int,
                    taken: list[int]) -> list[int]:
    """The first `count` distinct fitting layouts of `order` with pp > 1 and one stage per
    rank (1f1b, zb-h1) that are not among `taken`: when the leaders are V or DualPipe
    layouts (no ILP), such a layout behind them may still win once its layers are re-split.
    (Interleaved ones are left out: their ILP is slow on deep models and a re-split of their
    chunks mostly trades rank imbalance for the uneven-chunk stall.)"""
    flat = (grid.pp > 1) & np.isin(grid.schedule, [schedules.CODE["1f1b"],
                                                   schedules.CODE["zb-h1"]])
    flat[taken] = False
    return _leaders(grid, order, fits, count, flat)


def search(model: ModelSpec, cluster: ClusterSpec, seq_len: int, global_batch_size: int,
           space: SearchSpace | None = None, top_k: int = 5) -> SearchResult:
    """Rank every valid layout for `model` on `cluster` (homogeneous cost model)."""
    space = with_default_max_tp(space, cluster)
    start = time.perf_counter()
    gpu = cluster.gpu
    problem = (model, cluster.world_size, cluster.gpus_per_node, seq_len, global_batch_size, space)
    capacity = megatron.capacity_GiB(gpu, space.headroom) * GiB
    leading = max(top_k, space.refine_top)
    layouts, pruned = _generate_layouts(*problem, capacity_bytes=capacity,
                                        fp8_transpose_copy=gpu.fp8_transpose_copy)
    codes = layouts.codes
    variants = len(codes)  # the grid's innermost axis
    if not layouts.count * variants and not pruned:
        raise NoCandidates(_no_candidate_reason(model, cluster, seq_len, global_batch_size, space))
    dominated = 0
    if not layouts.count * variants:
        grid = layouts.variants(np.arange(0))  # nothing to evaluate: all was pruned
    else:
        if variants > 1 and codes[0] == RECOMPUTE_KINDS.index("none"):
            grid, done, dominated = _evaluate_dominating(model, cluster, layouts,
                                                         space.headroom)
        else:
            grid, done = layouts.variants(np.arange(layouts.count)), None
        grid, res, fits, order = _evaluate_with_stalls(model, cluster, grid, space.headroom,
                                                       leading, variants, done)
    if pruned and (not len(grid) or not fits.any()):  # `nearest` ranks every valid layout
        grid, pruned = _generate(*problem)  # nothing fits: nothing was dominated either
        grid, res, fits, order = _evaluate_with_stalls(model, cluster, grid, space.headroom,
                                                       leading, variants)
    leaders = _leaders(grid, order, fits, leading)
    plans, parts, solver = [], [], "none"
    for i in leaders:
        est = megatron.result_estimate(res, i, grid.layout(i), gpu, space.headroom)
        if len(plans) < space.refine_top:
            est, part = refine_partition(model, cluster, est, space.headroom)
            solver = part.solver if part is not None else solver
        else:
            part = None
        plans.append(est)
        parts.append(part)
    # leaders the ILP cannot re-split (V / DualPipe) only: the best looped layouts behind
    # them, re-split, may still win (each skipped when even a balanced split could not)
    extra = [] if any(refinable(e.layout) for e in plans[:space.refine_top]) \
        else _refinable_rows(grid, order, fits, space.refine_top, leaders)
    best_s = min((e.step_time_s for e in plans), default=np.inf)
    for i in extra:
        est = megatron.result_estimate(res, i, grid.layout(i), gpu, space.headroom)
        est, part = refine_partition(model, cluster, est, space.headroom, beat_s=best_s)
        if part is not None and est.step_time_s < best_s:
            plans.append(est)
            parts.append(part)
            best_s, solver = est.step_time_s, part.solver
    ranked = sorted(zip(plans, parts, strict=False), key=lambda ep: ep[0].step_time_s)[:top_k]
    alternatives = _family_leaders(res, grid, order, fits, gpu, space.headroom,
                                   ranked[0][0].layout if ranked else None)
    nearest = ()
    if not ranked:
        over = np.argsort(res.peak_bytes)[:3]
        nearest = tuple(megatron.result_estimate(res, int(i), grid.layout(int(i)), gpu,
                                                 space.headroom) for i in over)
    return SearchResult(
        plans=tuple(e for e, _ in ranked), candidates=len(grid),
        feasible=int(fits.sum()) + dominated, dominated=dominated,
        seconds=time.perf_counter() - start, solver=solver,
        partitions=tuple(p for _, p in ranked), nearest=nearest, cluster=cluster,
        alternatives=alternatives, pruned=pruned,
    )


FAMILY_COUNT = 4
"""Other families the explanation compares the winner with (`_family_leaders`)."""


def _family_leaders(res, grid: LayoutGrid, order, fits, gpu, headroom: float,
                    winner: Layout | None, count: int = FAMILY_COUNT) -> tuple[Estimate, ...]:
    """The fastest fitting layout of each `FAMILY` other than the winner's."""
    if winner is None:
        return ()
    seen = {tuple(getattr(winner, name) for name in FAMILY)}
    out = []
    for i in order:
        if not fits[i]:
            break  # order puts every non-fitting candidate last
        key = tuple(int(getattr(grid, name)[i]) for name in FAMILY)
        if key in seen:
            continue
        seen.add(key)
        out.append(megatron.result_estimate(res, int(i), grid.layout(int(i)), gpu, headroom))
        if len(out) == count:
            break
    return tuple(out)


def search_nodes(model: ModelSpec, cluster: ClusterSpec, seq_len: int, global_batch_size: int,
                 space: SearchSpace | None = None, top_k: int = 5) -> SearchResult:
    """`search`, and if no layout can use every node (e.g. 641 nodes, a prime), the largest
    subset of nodes (at most 1/8 left idle) that admits one; `idle_nodes` says which."""
    start = time.perf_counter()
    space = with_default_max_tp(space, cluster)
    try:
        return search(model, cluster, seq_len, global_batch_size, space, top_k)
    except NoCandidates:
        n = cluster.num_nodes
        if n == 1:
            raise
        gpn = cluster.gpus_per_node
        for keep in range(n - 1, max(0, n - max(1, n // 8)) - 1, -1):
            if not _may_have_candidates(model, keep * gpn, gpn, seq_len, global_batch_size,
                                        space or SearchSpace()):
                continue
            sub = replace(cluster, nodes=cluster.nodes[:keep], bandwidth_GBps=_sub(cluster.bandwidth_GBps, keep),
                          latency_s=_sub(cluster.latency_s, keep))
            try:
                res = search(model, sub, seq_len, global_batch_size, space, top_k)
            except NoCandidates:
                continue
            # seconds: the whole search, the probing of smaller node counts included
            return replace(res, idle_nodes=tuple(x.name for x in cluster.nodes[keep:]),
                           seconds=time.perf_counter() - start)
        raise


def _may_have_candidates(model: ModelSpec, world: int, gpus_per_node: int, seq_len: int,
                         global_batch_size: int, space: SearchSpace) -> bool:
    """Cheap necessary condition for `generate` to yield a layout on `world` GPUs: some degree
    combination whose dp times an allowed micro-batch size divides the global batch."""
    rows = degree_combos(model, world, gpus_per_node, seq_len, space)
    if not len(rows["dp"]):
        return False
    mbs = [b for b in space.micro_batch_sizes if space.micro_batch_size in (None, b)] \
        or [space.micro_batch_size]
    dp = np.unique(rows["dp"])
    return any(global_batch_size % (int(d) * b) == 0 for d in dp for b in mbs)


def _sub(matrix, keep: int):
    return None if matrix is None else tuple(tuple(row[:keep]) for row in matrix[:keep])


def _no_candidate_reason(model: ModelSpec, cluster: ClusterSpec, seq_len: int, gbs: int,
                         space: SearchSpace) -> str:
    world = cluster.world_size
    if space.schedule is not None:
        reason = _schedule_reason(model, cluster, seq_len, gbs, space)
        if reason:
            return reason
    if any(getattr(space, k) for k in FIXED_AXES):
        specific = explain_fixed(model, cluster, seq_len, gbs, space)
        if specific:
            return specific
        fixed = ", ".join(f"--{k.replace('micro_batch_size', 'mbs')} {getattr(space, k)}"
                          for k in FIXED_AXES if getattr(space, k))
        return (f"{fixed}: each is possible on {world} GPUs with global batch {gbs}, but not "
                "together; fix fewer of them and let the search choose")
    return (f"no valid layout for {world} GPUs, global batch {gbs}, sequence {seq_len}: the batch "
            "must be divisible by the data-parallel degree; use a global batch that is a "
            f"multiple of a divisor of {world}")


def _schedule_reason(model: ModelSpec, cluster: ClusterSpec, seq_len: int, gbs: int,
                     space: SearchSpace) -> str | None:
    """Why no layout runs the fixed schedule: the rule (`schedules.schedule_problem`) most of
    the layouts valid under other schedules break; None when the schedule is not the cause."""
    grid = generate(model, cluster.world_size, cluster.gpus_per_node, seq_len, gbs,
                    replace(space, schedule=None))
    need = schedules.CHUNKS[space.schedule]
    rows = np.nonzero(grid.vp > 1 if need is None else grid.vp == need)[0]
    rows = rows if len(rows) else np.arange(len(grid))  # else the vp is the rule it breaks
    messages: dict[str, int] = {}
    for i in rows[:500]:
        text = schedules.schedule_problem(space.schedule, int(grid.pp[i]), int(grid.vp[i]),
                                          int(grid.num_microbatches[i]))
        if text:
            messages[text] = messages.get(text, 0) + 1
    if not messages:
        return None
    return f"--schedule {space.schedule} leaves no valid layout: {max(messages, key=messages.get)}"


def scaled_cluster(cluster: ClusterSpec, factor: int) -> ClusterSpec:
    """The same cluster with `factor` times the nodes (for "what would fit" advice)."""
    nodes = tuple(NodeSpec(f"{n.name}-x{k}" if k else n.name, n.gpus, n.gpu, n.nic, n.rack)
                  for k in range(factor) for n in cluster.nodes)
    return replace(cluster, nodes=nodes, bandwidth_GBps=None, latency_s=None)


def layout_key(lay: Layout) -> tuple:
    return (*lay.dims.key(), lay.micro_batch_size, lay.recompute, lay.recompute_modules,
            lay.sequence_parallel, lay.distributed_optimizer, lay.schedule, lay.fsdp)
