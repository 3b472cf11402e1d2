"""Pipette-style cost model: `--cost-model pipette` (see `cost_models.hetero` for the formulas).

Links are the measured per-node-pair matrices of the cluster spec (NIC-kind links where a
spec has none); a pipeline hop costs its actual node pair, a TP/CP/DP collective its slowest
member link [Pipette, Yim et al. 2024].
"""

from __future__ import annotations

from . import hetero, megatron
from .specs import ClusterSpec, Estimate, Layout, ModelSpec

STYLE = "pipette"


def estimate(model: ModelSpec, cluster: ClusterSpec, layout: Layout,
             headroom: float = megatron.DEFAULT_HEADROOM, node_order=None) -> Estimate:
    """One layout with node rank k on node `node_order[k]` (default: the cluster's order)."""
    return hetero.estimate(model, cluster, layout, headroom, node_order, style=STYLE)


def fabric(cluster: ClusterSpec) -> hetero.Fabric:
    """The node-pair links this style sees."""
    return hetero.fabric(cluster, STYLE)
