"""Baselines the heterogeneous benchmark (and its tests) compare meshplan's plans with; not
part of the product.

- `uniform_plan`: the layout a topology-blind planner picks (the homogeneous search on the
  cluster's nominal link and first GPU type, even split, cluster node order);
- `brute_force`: the best of every distinct node order of given layouts, each with its
  partition-ILP split (exact where tractable).
"""

from __future__ import annotations

from dataclasses import replace

from cost_models.specs import InfeasibleLayout, Layout
from planner.hetero_search import best_of, distinct_orders
from planner.search import SearchSpace, search


def uniform_plan(model, cluster, seq_len: int, global_batch_size: int, space: SearchSpace | None = None,
                 tp: int | None = None) -> Layout:
    """The layout a topology-blind planner picks: the homogeneous search on the cluster's
    nominal `inter_node` link and first GPU type, even layer split (node order = cluster's).
    `tp` fixes the tensor-parallel degree (Megatron's default: tp = GPUs per node)."""
    space = replace(space or SearchSpace(), refine_top=0, tp=tp)
    gpu = cluster.nodes[0].gpu
    uniform = replace(cluster, bandwidth_GBps=None, latency_s=None, nic_links={},
                      nodes=tuple(replace(n, gpu=gpu, nic=cluster.nodes[0].nic) for n in cluster.nodes),
                      gpu_types={gpu: cluster.gpu_types[gpu]})
    res = search(model, uniform, seq_len, global_batch_size, space, top_k=1)
    if not res.plans:
        raise InfeasibleLayout(f"no layout of {model.name} fits the uniform view of {cluster.name}")
    return replace(res.plans[0].layout, layers_per_stage=None)


def brute_force(model, cluster, fab, layouts, headroom: float = 0.05):
    """The best (PlacedPlan) over every distinct node order of every layout in `layouts`,
    each with its partition-ILP layer split; None when intractable."""
    orders = distinct_orders(cluster, fab)
    if orders is None:
        return None, 0
    best, tried = None, 0
    for lay in layouts:
        found = best_of(model, cluster, fab, lay, [(o, "brute-force", "exhaustive") for o in orders],
                        headroom)
        tried += len(orders)
        if found is not None and (best is None or found.result.estimate.step_time_s
                                  < best.result.estimate.step_time_s):
            best = found
    return best, tried
