"""The event simulator's inputs: per-stage durations of one step from the cost models.

`uniform` turns a layout on a uniform cluster into `StepTasks` with the Megatron model's
primitives; `placed` does so for one data-parallel replica of a layout placed on a
heterogeneous cluster (each stage on its own view, the replica's actual hop links), and
`simulate_placed` simulates every distinct replica. `cost_models.simulator` plays them out.
"""

from __future__ import annotations

import numpy as np

from . import hetero_model, megatron, memory, schedules
from .grid import rank_of_stage
from .hetero_model import Fabric
from .layer_mix import RankLayers
from .simulator import StepTasks, simulate_step
from .specs import ClusterSpec, Layout, ModelSpec


def uniform(model: ModelSpec, cluster: ClusterSpec, layout: Layout) -> StepTasks:
    """Durations of one step per pipeline rank and virtual stage on a uniform cluster (the
    Megatron model's primitives)."""
    parts = megatron.layout_parts(layout, model, cluster)
    g, gpu, lt, emb, head = parts.grid, parts.gpu, parts.layer, parts.embedding_s, parts.head_s
    p, v = layout.pp, layout.vp
    stages = layout.stage_layers(model.num_layers)
    schedule = layout.schedule
    vshape = schedule in schedules.V_SHAPE
    passes = 2 + (1 if layout.recompute == "full" else 0)  # fwd, bwd, recomputed fwd
    tp_f = float(lt.tp_comm_s[0]) / passes  # the forward pass's collectives
    cp_f = float(lt.cp_comm_s[0]) / 3             # forward ring of three (fwd, bwd x2)
    ep_f = float(np.asarray(lt.ep_comm_s).ravel()[0]) / passes  # forward's share of a2a
    fwd_layer = float(lt.fwd_s[0]) + tp_f + cp_f + ep_f
    bwd_layer = float(lt.total_s[0]) - fwd_layer
    last = p * v - 1
    chunks = 2 if schedule == "dualpipe" else v  # dualpipe: one stage of each direction
    fwd = [[0.0] * chunks for _ in range(p)]
    bwd = [[0.0] * chunks for _ in range(p)]
    wgrad = [[0.0] * chunks for _ in range(p)]
    hide = [[0.0] * chunks for _ in range(p)]
    w_layer = float(megatron.weight_grad_time(model, gpu, g)[0])
    ep_layer = float(np.asarray(lt.ep_comm_s).ravel()[0])
    places = []
    for k in range(p * v):
        places.append((k, rank_of_stage(k, p, vshape), k // p))
        if schedule == "dualpipe":  # the reverse direction's stage k sits on rank p-1-k
            places.append((k, p - 1 - k, 1))
    mix = megatron.layer_mix_of(model, cluster, g, lt, memory.activation_terms(model, g))
    starts = np.concatenate([[0], np.cumsum(stages)])
    span = [np.arange(starts[k], starts[k + 1]) for k in range(len(stages))]

    def held(ks):
        """The layers of the stages `ks` as `layer_mix.RankLayers` (averaged layers)."""
        indices = np.concatenate([span[k] for k in ks]) if ks else np.array([], dtype=int)
        return RankLayers.uniform(np.array([float(len(indices))])) if mix is None \
            else mix.layers(indices)

    for k, r, c in places:
        n = float(held([k]).time[0])  # the stage's layers, in averaged layers of time
        fwd[r][c] = n * fwd_layer + (float(emb[0]) / 3 if k == 0 else 0.0) \
            + (float(head[0]) / 3 if k == last else 0.0)
        bwd[r][c] = n * bwd_layer + (2 * float(emb[0]) / 3 if k == 0 else 0.0) \
            + (2 * float(head[0]) / 3 if k == last else 0.0)
        wgrad[r][c] = n * min(w_layer, float(lt.bwd_s[0]))
        hide[r][c] = n * min(ep_layer, float(lt.compute_s[0]))  # hidden under compute
    hop = float(megatron.pp_hop_time(model, cluster, g)[0])
    dp, opt = [], []
    def on(r):
        return [k for k in range(len(stages)) if rank_of_stage(k, p, vshape) == r]

    for r in range(p):
        layers = held(on(r))
        if schedule == "dualpipe":  # its mirrored stage too; weight copies double the mean
            layers = layers.mean(held(on(p - 1 - r)))
        holds = schedules.holds_ends(schedules.CODE[schedule], p, r)
        rc = megatron.rank_costs(model, cluster, g, lt, emb, head, layers, *map(bool, holds), r)
        dp.append(float(rc.dp_comm_s[0]))
        opt.append(float(rc.optimizer_step_s[0]))
    split = schedule in schedules.ZERO_BUBBLE
    return StepTasks(
        pp=p, vp=chunks, num_microbatches=layout.num_microbatches,
        fwd_s=tuple(tuple(row) for row in fwd), bwd_s=tuple(tuple(row) for row in bwd),
        p2p_s=tuple([hop] * (p * chunks - 1)), dp_comm_s=tuple(dp),
        dp_overlap=gpu.dp_comm_overlap, optimizer_s=tuple(opt),
        wgrad_s=tuple(tuple(row) for row in wgrad) if split else (),
        overlap_s=tuple(tuple(row) for row in hide) if split else (),
    )


def placed(model: ModelSpec, cluster: ClusterSpec, fab: Fabric, layout: Layout, node_order,
           replica: int) -> StepTasks:
    """Durations of one replica's pipeline (one DP rank) for `cost_models.simulator`.

    Each pp rank's row is `uniform` on that stage's own view (GPU type and TP/CP
    link), the transfers use the replica's actual hop links, and the DP reduction of a stage
    uses its DP group's slowest link."""
    megatron.require_dense(model)
    views = hetero_model.stage_views(cluster, fab, layout, node_order)
    costs = hetero_model.GroupCosts(model, cluster, layout)
    p, v = layout.pp, layout.vp
    fwd, bwd, dp, opt = [], [], [], []
    for s in range(p):
        vw = views[s][replica]
        row = uniform(model, costs.view(vw.gpu, vw.tpcp), layout)
        gpu = hetero_model.slowest_gpu(cluster, [x.gpu for x in views[s]], layout.dtype)
        ranked = uniform(model, costs.view(gpu, vw.dp), layout)
        fwd.append(row.fwd_s[s])
        bwd.append(row.bwd_s[s])
        dp.append(ranked.dp_comm_s[s])
        opt.append(ranked.optimizer_s[s])
    p2p = tuple(costs.hop(views[k % p][replica].hop) for k in range(p * v - 1))
    overlap = min(cluster.gpu_types[g].dp_comm_overlap for g in set(fab.gpu))
    return StepTasks(pp=p, vp=v, num_microbatches=layout.num_microbatches, fwd_s=tuple(fwd),
                     bwd_s=tuple(bwd), p2p_s=p2p, dp_comm_s=tuple(dp), dp_overlap=overlap,
                     optimizer_s=tuple(opt))


def simulate_placed(model: ModelSpec, cluster: ClusterSpec, fab: Fabric, layout: Layout,
                    node_order):
    """Simulated step of every distinct replica pipeline; returns (step seconds, SimResult of
    the slowest replica, its index). Replicas with identical views are simulated once."""
    views = hetero_model.stage_views(cluster, fab, layout, node_order)
    seen: dict = {}
    for r in range(layout.dp):
        key = tuple(views[s][r] for s in range(layout.pp))
        if key not in seen:
            seen[key] = (simulate_step(placed(model, cluster, fab, layout, node_order, r)), r)
    sim, r = max(seen.values(), key=lambda sr: sr[0].step_time_s)
    return sim.step_time_s, sim, r
