"""Holmes-style cost model: `--cost-model holmes` (see `cost_models.hetero` for the formulas).

Links come from each node's NIC kind: a group inside one kind uses that fabric, a mixed
group falls back to the common transport (e.g. TCP over Ethernet); stages run at their
slowest GPU [Holmes, Yang et al. 2023]. Measured matrices are ignored in this style.
"""

from __future__ import annotations

from . import hetero, megatron
from .specs import ClusterSpec, Estimate, Layout, ModelSpec

STYLE = "holmes"


def estimate(model: ModelSpec, cluster: ClusterSpec, layout: Layout,
             headroom: float = megatron.DEFAULT_HEADROOM, node_order=None) -> Estimate:
    """One layout with node rank k on node `node_order[k]` (default: the cluster's order)."""
    return hetero.estimate(model, cluster, layout, headroom, node_order, style=STYLE)


def fabric(cluster: ClusterSpec) -> hetero.Fabric:
    """The node-pair links this style sees."""
    return hetero.fabric(cluster, STYLE)
