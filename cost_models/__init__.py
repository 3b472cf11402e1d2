"""meshplan's vocabulary and physics: specs, FLOPs, memory, time, schedules, cost models.

Pure functions and frozen dataclasses; numpy/scipy only; no file or network I/O.
"""

from .specs import (
    ClusterSpec,
    Estimate,
    GemmEfficiency,
    GpuSpec,
    InfeasibleLayout,
    Layout,
    LinkSpec,
    MemoryBreakdown,
    ModelSpec,
    NodeSpec,
    SpecError,
    TimeBreakdown,
)

__all__ = [
    "ClusterSpec", "Estimate", "GemmEfficiency", "GpuSpec", "InfeasibleLayout", "Layout",
    "LinkSpec", "MemoryBreakdown", "ModelSpec", "NodeSpec", "SpecError", "TimeBreakdown",
]
