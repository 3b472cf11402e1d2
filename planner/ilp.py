"""The planner's ILP models (pulp; HiGHS via highspy when installed, else CBC).

- `partition_layers`: integer layers per pipeline stage (and per interleaved chunk),
  minimising the slowest stage under per-stage memory limits, for stages of different speed
  or memory (`planner.ilp_partition`).
- `place_nodes`: which physical node holds each (stage, replica block) of the node-rank grid
  on a non-uniform cluster, so DP rings stay on fast links and pipeline hops take the slow
  ones (`planner.ilp_placement`).

Both take plain numbers (numpy arrays) and return frozen dataclasses that carry the solver
name, status, relative MIP gap and seconds; both raise `cost_models.specs.InfeasibleLayout`
naming the binding limit when no answer exists and `SpecError` for malformed inputs.
"""

from planner.ilp_partition import Partition, partition_layers
from planner.ilp_placement import (
    Placement,
    PlacementCost,
    grid_shape,
    node_classes,
    place_nodes,
    placement_cost,
)
from planner.ilp_solver import SolveOutcome, highs_available, make_solver

__all__ = [
    "Partition",
    "Placement",
    "PlacementCost",
    "SolveOutcome",
    "grid_shape",
    "highs_available",
    "make_solver",
    "node_classes",
    "partition_layers",
    "place_nodes",
    "placement_cost",
]
