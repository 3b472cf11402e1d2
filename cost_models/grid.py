"""`LayoutGrid`: many candidate layouts as a struct of numpy arrays (same names as `Layout`).

The cost models evaluate a grid in one vectorised pass; `estimate` uses a grid of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dims import DEGREES, ParallelDims
from .recompute_modules import DEFAULT_MASK, mask_of, names_of
from .schedules import CODE, SCHEDULES, V_SHAPE, default_schedule
from .specs import RECOMPUTE_KINDS, Layout

INT_FIELDS = (*DEGREES, "micro_batch_size", "global_batch_size")


@dataclass(frozen=True, slots=True)
class LayoutGrid:
    """N layouts. Rank layer counts are the layers each pipeline rank holds (sum of its chunks):
    first rank, last rank, and the most loaded middle rank (0 when pp <= 2)."""

    tp: np.ndarray
    pp: np.ndarray
    dp: np.ndarray
    cp: np.ndarray
    ep: np.ndarray
    vp: np.ndarray
    etp: np.ndarray
    micro_batch_size: np.ndarray
    global_batch_size: np.ndarray
    recompute: np.ndarray
    """0 none, 1 selective, 2 full."""
    sequence_parallel: np.ndarray
    distributed_optimizer: np.ndarray
    flash_attention: np.ndarray
    layers_first: np.ndarray
    layers_last: np.ndarray
    layers_mid: np.ndarray
    seq_len: int
    dtype: str
    cuda_graphs: bool = False
    """Grid-wide: whole-iteration CUDA graphs (`Layout.cuda_graphs`)."""
    cuda_graph_modules: tuple[str, ...] = ()
    """Grid-wide: Megatron per-module CUDA graphs (`Layout.cuda_graph_modules`)."""
    moe_dispatcher: str = "alltoall"
    """Grid-wide: the MoE token dispatcher (`Layout.moe_dispatcher`)."""
    te_cross_entropy: bool = False
    """Grid-wide: Transformer Engine's fused loss (`Layout.te_cross_entropy`)."""
    fsdp_strategy: str = "optim_grads_params"
    """Grid-wide: Megatron-FSDP's sharding strategy for the fsdp rows (`Layout.fsdp_strategy`)."""
    fsdp_reshard_after_forward: str = "default"
    """Grid-wide: torchtitan's reshard policy for the fsdp rows
    (`Layout.fsdp_reshard_after_forward`)."""
    torch_compile: bool = False
    """Grid-wide: torchtitan under torch.compile (`Layout.torch_compile`)."""
    async_tp: bool = False
    """Grid-wide: torchtitan async TP (`Layout.async_tp`)."""
    schedule: np.ndarray | None = None
    """Pipeline schedule codes (`cost_models.schedules.SCHEDULES` index); None: the default
    for each row's vp. With a V-shape schedule the first rank holds the LM head too."""
    fsdp: np.ndarray | bool = False
    """Fully sharded data parallelism (a column, or one value for the whole grid)."""
    dp_replicate: np.ndarray | int = 1
    """HSDP replicate degree (divides dp; 1 without HSDP)."""
    grad_reduce_fp32: np.ndarray | bool = True
    """fp32 main gradients (False: bf16 grad buffers)."""
    framework: np.ndarray | str = "megatron"
    """Whose memory conventions (`Layout.framework`)."""
    recompute_modules: np.ndarray | int = DEFAULT_MASK
    """Selective recompute's Megatron modules as a bitmask (`recompute_modules.BIT`)."""
    offload_activation_layers: np.ndarray | int = 0
    """Layers whose activations are offloaded to host memory (`Layout.offload_activation_layers`)."""
    moe_a2a_overlap: np.ndarray | bool = False
    """Megatron's expert all-to-all overlap (`Layout.moe_a2a_overlap`)."""
    layers_per_stage: tuple[int, ...] | None = None
    """Grid-wide explicit split (`Layout.layers_per_stage`, a grid of one layout); None: each
    row's even split (the rank counts above are derived from it either way)."""
    price_stall: np.ndarray | bool = True
    """Whether `megatron.evaluate` prices the stall of an interleaved row's uneven chunks
    (`simulator.interleaved_stall_layers`); False leaves it out, a lower bound on the step
    that `planner.search` refines only where the ranking reads it."""

    def __post_init__(self) -> None:
        if self.schedule is None:
            object.__setattr__(self, "schedule", np.where(self.vp > 1, CODE["interleaved"],
                                                          CODE["1f1b"]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.tp)

    def column(self, name: str) -> np.ndarray:
        """Field `name` as an array of len(self) (the optional fields may be one value)."""
        return np.broadcast_to(np.asarray(getattr(self, name)), (len(self),))

    @property
    def dims(self) -> ParallelDims:
        """The degrees as arrays (group sizes and strides broadcast over the grid)."""
        return ParallelDims.of(self)

    @property
    def num_microbatches(self) -> np.ndarray:
        return self.global_batch_size // (self.dp * self.micro_batch_size)

    def _grid_wide(self) -> dict:
        """The grid-wide (non-column) values, for a grid of other rows of the same search."""
        return {name: getattr(self, name) for name in GRID_WIDE}

    @property
    def titan(self) -> np.ndarray:
        """Rows under torchtitan's conventions (`Layout.framework`): one value when the
        framework is grid-wide, as in the search, else a column."""
        return np.asarray(self.framework) == "torchtitan"

    def take(self, index) -> LayoutGrid:
        """A sub-grid (boolean mask or integer index array). An optional column holding one
        value for the whole grid stays that value."""
        arrays = {name: self.column(name)[index] for name in (*_ARRAY_FIELDS, "schedule")}
        optional = {name: getattr(self, name) if np.ndim(getattr(self, name)) == 0
                    else np.asarray(getattr(self, name))[index] for name in OPTIONAL_FIELDS}
        return LayoutGrid(**arrays, **optional, **self._grid_wide())

    def concat(self, other: LayoutGrid) -> LayoutGrid:
        """This grid's rows, then `other`'s (same grid-wide values)."""
        arrays = {name: np.concatenate([self.column(name), other.column(name)])
                  for name in (*_ARRAY_FIELDS, "schedule")}
        for name in OPTIONAL_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            same = np.ndim(mine) == 0 and np.ndim(theirs) == 0 and mine == theirs
            arrays[name] = mine if same else np.concatenate([self.column(name),
                                                             other.column(name)])
        return LayoutGrid(**arrays, **self._grid_wide())

    def layout(self, i: int, layers_per_stage: tuple[int, ...] | None = None) -> Layout:
        """The i-th candidate as a Layout."""
        kw = {name: int(getattr(self, name)[i]) for name in INT_FIELDS}
        return Layout(
            **kw, seq_len=self.seq_len, recompute=RECOMPUTE_KINDS[int(self.recompute[i])],
            sequence_parallel=bool(self.sequence_parallel[i]),
            distributed_optimizer=bool(self.distributed_optimizer[i]),
            flash_attention=bool(self.flash_attention[i]), dtype=self.dtype,
            layers_per_stage=layers_per_stage, cuda_graphs=self.cuda_graphs,
            cuda_graph_modules=self.cuda_graph_modules, moe_dispatcher=self.moe_dispatcher,
            te_cross_entropy=self.te_cross_entropy,
            fsdp_strategy=self.fsdp_strategy if bool(self.column("fsdp")[i])
            else "optim_grads_params",
            fsdp_reshard_after_forward=self.fsdp_reshard_after_forward
            if bool(self.column("fsdp")[i]) else "default",
            moe_a2a_overlap=bool(self.column("moe_a2a_overlap")[i]),
            torch_compile=self.torch_compile, async_tp=self.async_tp,
            pipeline_schedule=_named_schedule(int(self.schedule[i]), int(self.vp[i])),
            fsdp=bool(self.column("fsdp")[i]),
            dp_replicate=int(self.column("dp_replicate")[i]),
            grad_reduce_fp32=bool(self.column("grad_reduce_fp32")[i]),
            framework=str(self.column("framework")[i]),
            recompute_modules=_modules(int(self.recompute[i]), int(self.column("recompute_modules")[i])),
            offload_activation_layers=int(self.column("offload_activation_layers")[i]),
        )

    @classmethod
    def from_layout(cls, layout: Layout, num_layers: int) -> LayoutGrid:
        first, last, mid = rank_layer_counts(layout.stage_layers(num_layers), layout.pp,
                                             layout.schedule in V_SHAPE)
        arrays = {name: np.array([getattr(layout, name)], dtype=np.int64) for name in INT_FIELDS}
        return cls(
            **arrays,
            recompute=np.array([RECOMPUTE_KINDS.index(layout.recompute)], dtype=np.int64),
            sequence_parallel=np.array([layout.sequence_parallel]),
            distributed_optimizer=np.array([layout.distributed_optimizer]),
            flash_attention=np.array([layout.flash_attention]),
            layers_first=np.array([first]), layers_last=np.array([last]), layers_mid=np.array([mid]),
            seq_len=layout.seq_len, dtype=layout.dtype, cuda_graphs=layout.cuda_graphs,
            cuda_graph_modules=layout.cuda_graph_modules, moe_dispatcher=layout.moe_dispatcher,
            te_cross_entropy=layout.te_cross_entropy, fsdp_strategy=layout.fsdp_strategy,
            fsdp_reshard_after_forward=layout.fsdp_reshard_after_forward,
            moe_a2a_overlap=np.array([layout.moe_a2a_overlap]),
            torch_compile=layout.torch_compile, async_tp=layout.async_tp,
            schedule=np.array([CODE[layout.schedule]], dtype=np.int64),
            fsdp=np.array([layout.fsdp]),
            dp_replicate=np.array([layout.dp_replicate], dtype=np.int64),
            grad_reduce_fp32=np.array([layout.grad_reduce_fp32]),
            framework=np.array([layout.framework]),
            recompute_modules=np.array([mask_of(layout.recompute_modules) or DEFAULT_MASK]),
            offload_activation_layers=np.array([layout.offload_activation_layers]),
            layers_per_stage=layout.layers_per_stage,
        )


def _modules(recompute: int, mask: int) -> tuple[str, ...]:
    """Layout.recompute_modules of a grid row: () for Megatron's default or without
    selective recompute."""
    if RECOMPUTE_KINDS[recompute] != "selective" or mask == DEFAULT_MASK:
        return ()
    return names_of(mask)


_ARRAY_FIELDS = INT_FIELDS + (
    "recompute", "sequence_parallel", "distributed_optimizer", "flash_attention", "layers_first", "layers_last",
    "layers_mid",
)
GRID_WIDE = ("seq_len", "dtype", "cuda_graphs", "cuda_graph_modules", "moe_dispatcher",
             "te_cross_entropy", "fsdp_strategy", "fsdp_reshard_after_forward",
             "torch_compile", "async_tp",
             "layers_per_stage")
"""Fields that hold one value for the whole grid (`LayoutGrid.take`, `concat` keep them)."""
OPTIONAL_FIELDS = ("fsdp", "dp_replicate", "grad_reduce_fp32", "framework", "recompute_modules",
                   "offload_activation_layers", "moe_a2a_overlap", "price_stall")
"""Columns with a grid-wide default (searches that do not vary them pass nothing)."""


def rank_of_stage(k: int, pp: int, v_shape: bool = False) -> int:
    """Pipeline rank of virtual stage k: k % pp (looped), or the V of ZB-V / DualPipeV
    (stage k < pp on rank k, stage k >= pp on rank 2·pp - 1 - k; Qi et al. 2024 Sec. 6)."""
    if v_shape and k >= pp:
        return 2 * pp - 1 - k
    return k % pp


def rank_layer_counts(stage_layers: tuple[int, ...], pp: int,
                      v_shape: bool = False) -> tuple[int, int, int]:
    """(first rank, last rank, busiest middle rank) layer totals; virtual stage k is on
    `rank_of_stage(k, pp, v_shape)`."""
    totals = [0] * pp
    for k, n in enumerate(stage_layers):
        totals[rank_of_stage(k, pp, v_shape)] += n
    mid = max(totals[1:-1]) if pp > 2 else 0
    return totals[0], totals[-1], mid


def _named_schedule(code: int, vp: int) -> str | None:
    """A Layout's `pipeline_schedule` for a grid code: None when it is the vp's default."""
    name = SCHEDULES[code]
    return None if name == default_schedule(vp) else name
