"""Event-driven simulation of one training step over a plan's pipeline placement.

A second, independent estimate of the step time next to the analytic cost model: every pp
rank executes its forward/backward operations in the order its pipeline schedule prescribes
(1F1B, or Megatron-LM's interleaved 1F1B when vp > 1); an operation starts once its rank is
free and its inputs have arrived. Activation/gradient transfers occupy the link between two
ranks, not their compute. After its last backward, each rank reduces gradients across data
parallelism (partly hidden behind that backward) and runs the optimizer.

Pure: numpy only, no I/O. Times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.specs import SpecError


@dataclass(frozen=True, slots=True)
class StepTasks:
    """The durations a step is made of, per pipeline rank and virtual stage (seconds).

    Virtual stage k (0 .. pp*vp-1, in model order) lives on pp rank k % pp as its chunk
    k // pp; with vp = 1, virtual stage k is simply pp rank k.
    """

    pp: int
    """Pipeline-parallel ranks (>= 1)."""
    vp: int
    """Model chunks (virtual stages) per pp rank (>= 1); 1 means plain 1F1B."""
    num_microbatches: int
    """Micro-batches m per step per data-parallel replica (>= 1)."""
    fwd_s: tuple[tuple[float, ...], ...]
    """[pp_rank][chunk] forward time of one micro-batch on that virtual stage, seconds."""
    bwd_s: tuple[tuple[float, ...], ...]
    """[pp_rank][chunk] backward time (including any recompute) of one micro-batch, seconds."""
    p2p_s: tuple[float, ...]
    """[k] activation transfer time from virtual stage k to k+1, seconds; len pp*vp - 1.
    The gradient transfer from k+1 back to k is assumed to take the same time."""
    dp_comm_s: tuple[float, ...]
    """[pp_rank] data-parallel gradient reduction time after the rank's last backward, seconds."""
    dp_overlap: float
    """Fraction (0..1) of dp_comm_s that can run hidden under the rank's last micro-batch
    backward (gradient buckets reduced while later layers still compute)."""
    optimizer_s: tuple[float, ...]
    """[pp_rank] optimizer step time, seconds."""

    def __post_init__(self) -> None:
        for name in ("pp", "vp", "num_microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"StepTasks.{name} must be a positive integer, got {value!r}")
        for name in ("fwd_s", "bwd_s"):
            table = getattr(self, name)
            if len(table) != self.pp or any(len(row) != self.vp for row in table):
                raise SpecError(f"StepTasks.{name} must be [pp={self.pp}][vp={self.vp}] times")
        expected = {"p2p_s": self.pp * self.vp - 1, "dp_comm_s": self.pp, "optimizer_s": self.pp}
        for name, length in expected.items():
            if len(getattr(self, name)) != length:
                raise SpecError(f"StepTasks.{name} must have {length} entries, "
                                f"got {len(getattr(self, name))}")
        times = [t for row in self.fwd_s + self.bwd_s for t in row]
        times += [*self.p2p_s, *self.dp_comm_s, *self.optimizer_s]
        if any(not t >= 0.0 for t in times):  # also rejects NaN
            raise SpecError("StepTasks durations must be non-negative seconds")
        if not 0.0 <= self.dp_overlap <= 1.0:
            raise SpecError(f"StepTasks.dp_overlap must be in [0, 1], got {self.dp_overlap!r}")

    @property
    def num_stages(self) -> int:
        """Virtual stages pp * vp."""
        return self.pp * self.vp
