"""The planner's ILP models against brute force, plus the behaviours they exist for."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cost_models.dims import ParallelDims
from cost_models.specs import GiB, InfeasibleLayout, SpecError
from planner import ilp_solver
from planner.ilp_partition import partition_layers
from planner.ilp_placement import node_classes, place_nodes, placement_cost

# --------------------------------------------------------------------------------------------
# brute force, written from the docstrings, independent of the ILP code
# --------------------------------------------------------------------------------------------


def brute_partition(num_layers, pp, vp, layer_time, scale, extra, mem, fixed, cap):
    """Min over every contiguous split into pp*vp non-empty chunks (chunk k on rank k % pp)
    of the slowest rank's time; None when no split fits in memory. mem has shape (pp, L)."""
    best = None
    chunks = pp * vp
    for cuts in itertools.combinations(range(1, num_layers), chunks - 1):
        bounds = (0, *cuts, num_layers)
        times, used = np.array(extra, float), np.array(fixed, float)
        for k in range(chunks):
            r, part = k % pp, slice(bounds[k], bounds[k + 1])
            times[r] += scale[r] * np.sum(layer_time[part])
            used[r] += np.sum(mem[r, part])
        if np.all(used <= cap) and (best is None or times.max() < best):
            best = times.max()
    return best


def brute_placement(bw, stages, blocks, collective, hop, work, speed):
    """Min over every injective node -> slot map of compute + collective + pipeline (s)."""
    n = bw.shape[0]
    perms = np.array(list(itertools.permutations(range(n), stages * blocks)))
    grid = perms.reshape(len(perms), stages, blocks)
    bw = np.minimum(bw, bw.T).astype(float)
    np.fill_diagonal(bw, np.inf)
    compute = np.max([work[s] / speed[grid[:, s]].min(axis=1) for s in range(stages)], axis=0)
    ring = [bw[grid[:, s, :, None], grid[:, s, None, :]].min(axis=(1, 2)) for s in range(stages)]
    dp = np.max([collective[s] / (1e9 * ring[s]) for s in range(stages)], axis=0)
    if blocks == 1:
        dp = np.zeros(len(perms))
    paths = np.zeros((len(perms), blocks))
    for s in range(stages - 1):
        paths += hop[s] / (1e9 * bw[grid[:, s], grid[:, s + 1]])
    total = compute + dp + paths.max(axis=1)
    return float(total.min()), perms[int(total.argmin())]


def random_partition_case(rng, per_layer: bool):
    pp = int(rng.integers(2, 5))
    vp = int(rng.integers(1, 3)) if pp <= 3 else 1
    num_layers = int(rng.integers(pp * vp, 13))
    if per_layer:
        dense = int(rng.integers(0, 4))  # MoE-like: a few cheap dense layers, then MoE layers
        layer_time = np.where(np.arange(num_layers) < dense, 0.4, 1.0) * rng.uniform(0.9, 1.1)
        if rng.random() < 0.3:
            layer_time = rng.uniform(0.5, 1.5, num_layers)  # arbitrary per-layer costs
        mem = np.outer(rng.uniform(0.5, 2.0, pp), np.where(np.arange(num_layers) < dense, 1, 3))
    else:
        layer_time = float(rng.uniform(0.5, 2.0))
        mem = rng.uniform(0.5, 2.0, pp)
    return dict(
        num_layers=num_layers, num_stages=pp, vp=vp, layer_time_s=layer_time,
        stage_time_scale=rng.uniform(0.5, 2.0, pp),
        stage_extra_time_s=rng.uniform(0, 3, pp) * (rng.random(pp) < 0.6),
        layer_mem_bytes=mem * GiB,
        stage_fixed_mem_bytes=rng.uniform(0, 4, pp) * GiB,
        stage_capacity_bytes=rng.uniform(*((6, 26) if per_layer else (3, 20)), pp) * GiB,
    )


def brute_for(case):
    pp, n = case["num_stages"], case["num_layers"]
    layer_time = np.broadcast_to(np.asarray(case["layer_time_s"], float), (n,))
    mem = np.asarray(case["layer_mem_bytes"], float)
    mem = mem if mem.ndim == 2 else np.repeat(mem[:, None], n, axis=1)
    return brute_partition(n, pp, case["vp"], layer_time, case["stage_time_scale"],
                           case["stage_extra_time_s"], mem, case["stage_fixed_mem_bytes"],
                           case["stage_capacity_bytes"])


# --------------------------------------------------------------------------------------------
# partition
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_layer", [False, True], ids=["uniform", "per_layer"])
def test_partition_equals_brute_force(per_layer):
    rng = np.random.default_rng(7 if per_layer else 3)
    agree = infeasible = 0
    cases = 18 if per_layer else 24
    for _ in range(cases):
        case = random_partition_case(rng, per_layer)
        best = brute_for(case)
        if best is None:
            with pytest.raises(InfeasibleLayout, match="memory|does not fit"):
                partition_layers(**case)
            infeasible += 1
            continue
        part = partition_layers(**case)
        assert part.status == "optimal" and part.gap is not None and part.gap < 1e-6
        assert part.max_stage_time_s == pytest.approx(best, rel=1e-7)
        assert sum(part.layers_per_stage) == case["num_layers"]
        assert min(part.layers_per_stage) >= 1
        assert np.all(np.array(part.stage_mem_bytes) <= case["stage_capacity_bytes"] + 1)
        agree += 1
    kind = "per-layer" if per_layer else "uniform"
    print(f"\npartition ({kind}): ILP == brute force on {agree} instances, "
          f"{infeasible} infeasible instances raised InfeasibleLayout")
    assert agree >= cases // 2  # the generator must produce mostly feasible instances


def _llama_like(pp=4, num_layers=32, extra=(0.0, 0.0, 0.0, 0.0), scale=(1.0,) * 4, **kw):
    args = dict(
        num_layers=num_layers, num_stages=pp, layer_time_s=0.010,
        stage_time_scale=np.array(scale), stage_extra_time_s=np.array(extra),
        layer_mem_bytes=np.full(pp, 1.0 * GiB), stage_fixed_mem_bytes=np.full(pp, 8.0 * GiB),
        stage_capacity_bytes=np.full(pp, 80.0 * GiB),
    )
    args.update(kw)
    return args


def test_partition_uneven_ends_when_embedding_and_head_are_heavy():
    # embedding costs 3 layers' time on stage 0, LM head + loss 5 layers' time on the last
    part = partition_layers(**_llama_like(extra=(0.030, 0.0, 0.0, 0.050)))
    first, *middle, last = part.layers_per_stage
    assert sum(part.layers_per_stage) == 32
    assert first < min(middle) and last < first  # the heavier end gets the fewest layers
    even_max = 8 * 0.010 + 0.050  # Megatron's even split: the last stage would take 0.13 s
    assert part.max_stage_time_s < even_max - 0.015
    assert part.max_stage_time_s == pytest.approx((32 * 0.010 + 0.080) / 4, abs=0.010)
    print(f"\nuneven ends: {part.layers_per_stage}, max stage {part.max_stage_time_s * 1e3:.1f} "
          f"ms (even split {even_max * 1e3:.0f} ms), {part.solver} {part.status}, "
          f"gap {part.gap}, {part.seconds * 1e3:.1f} ms")


def test_partition_gives_faster_gpus_more_layers():
    # stages 1 and 3 run on GPUs twice as fast (e.g. H100 next to A100)
    part = partition_layers(**_llama_like(scale=(1.0, 0.5, 1.0, 0.5)))
    slow, fast = part.rank_layers[0::2], part.rank_layers[1::2]
    assert min(fast) > max(slow)
    assert part.rank_layers == (6, 11, 5, 10) or sum(fast) >= 2 * sum(slow) - 2
    assert max(part.stage_time_s) - min(part.stage_time_s) <= 0.010 + 1e-12


def test_partition_memory_limit_moves_layers_off_the_first_stage():
    # under 1F1B stage i holds pp - i micro-batches: per-layer memory falls along the pipeline
    mem = np.array([4.0, 3.0, 2.0, 1.0]) * GiB
    part = partition_layers(**_llama_like(layer_mem_bytes=mem,
                                          stage_capacity_bytes=np.full(4, 40.0 * GiB)))
    assert part.rank_layers[0] * 4 + 8 <= 40  # stage 0 capped by memory at 8 layers
    assert part.rank_layers[0] == 8 and sum(part.rank_layers) == 32
    assert np.all(np.array(part.stage_mem_bytes) <= 40 * GiB)


def test_partition_infeasible_memory_names_the_limit():
    with pytest.raises(InfeasibleLayout, match=r"hold at most 28 of the 32 layers"):
        partition_layers(**_llama_like(stage_capacity_bytes=np.full(4, 15.0 * GiB)))
    cap = np.array([80.0, 80.0, 8.5, 80.0]) * GiB
    with pytest.raises(InfeasibleLayout, match=r"pipeline stage 2 does not fit"):
        partition_layers(**_llama_like(stage_capacity_bytes=cap))
    with pytest.raises(InfeasibleLayout, match=r"3 layers cannot give each of the 4"):
        partition_layers(**_llama_like(num_layers=3))


def test_partition_infeasible_only_because_chunks_are_contiguous():
    # any 2 layers fit on either stage, but the two big layers come first: no prefix/suffix
    # split fits, which only the solver can tell
    mem = np.array([[5.0, 5.0, 1.0, 1.0]] * 2) * GiB
    with pytest.raises(InfeasibleLayout, match="no contiguous split of 4 layers"):
        partition_layers(4, 2, np.ones(4), np.ones(2), np.zeros(2), mem, np.zeros(2),
                         np.array([6.0, 6.5]) * GiB)


def test_partition_interleaved_chunks():
    part = partition_layers(**_llama_like(extra=(0.030, 0.0, 0.0, 0.050)), vp=2)
    chunks = part.layers_per_stage
    assert len(chunks) == 8 and min(chunks) >= 1 and sum(chunks) == 32
    totals = [sum(chunks[k] for k in range(r, 8, 4)) for r in range(4)]
    assert tuple(totals) == part.rank_layers
    assert max(c for c in (chunks[0], chunks[-1])) <= min(chunks[1:-1])  # ends stay small
    ranges = part.layer_ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == 32
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_partition_moe_with_dense_layers_is_fast_and_contiguous():
    # 3 cheap dense layers, then 77 MoE layers, 8 stages: the per-layer formulation
    layer_time = np.r_[np.full(3, 0.004), np.full(77, 0.010)]
    args = _llama_like(pp=8, num_layers=80, layer_time_s=layer_time,
                       extra=(0.05, 0, 0, 0, 0, 0, 0, 0.08), scale=(1.0,) * 8)
    args.update(layer_mem_bytes=np.full(8, 0.5 * GiB), stage_fixed_mem_bytes=np.full(8, GiB),
                stage_capacity_bytes=np.full(8, 80.0 * GiB))
    part = partition_layers(**args)
    assert part.status == "optimal"
    times = [0.05 + 0.0, *([0.0] * 6), 0.08]
    start = 0
    for r, n in enumerate(part.layers_per_stage):
        assert part.stage_time_s[r] == pytest.approx(times[r] + layer_time[start:start + n].sum())
        start += n
    assert part.max_stage_time_s == pytest.approx(0.12)  # total 0.912 s / 8 = 0.114 -> 0.12
    print(f"\nMoE 80 layers / 8 stages: {part.layers_per_stage}, {part.seconds:.2f} s")


def test_partition_uniform_path_is_fast():
    args = _llama_like(pp=8, num_layers=80, extra=(0.05, 0, 0, 0, 0, 0, 0, 0.08),
                       scale=(1.0,) * 8, layer_mem_bytes=np.full(8, GiB),
                       stage_fixed_mem_bytes=np.full(8, GiB),
                       stage_capacity_bytes=np.full(8, 80.0 * GiB))
    runs = [partition_layers(**args).seconds for _ in range(5)]
    print(f"\nuniform 80 layers / 8 stages: median {np.median(runs) * 1e3:.1f} ms per solve")


def test_partition_falls_back_to_cbc(monkeypatch):
    case = _llama_like(extra=(0.030, 0.0, 0.0, 0.050))
    with_highs = partition_layers(**case)
    monkeypatch.setattr(ilp_solver, "highs_available", lambda: False)
    with_cbc = partition_layers(**case)
    # the CBC that pulp 3.3 bundles now and then runs this small model to the time limit
    # without proving the gap closed (seen here in about 1 of 4 runs of this file): it still
    # holds the optimum then, reported as "feasible"
    assert with_cbc.solver == "PULP_CBC_CMD" and with_cbc.status in ("optimal", "feasible")
    assert with_cbc.max_stage_time_s == pytest.approx(with_highs.max_stage_time_s)
    assert with_cbc.layers_per_stage == with_highs.layers_per_stage


def test_partition_rejects_malformed_input():
    with pytest.raises(SpecError, match="stage_time_scale needs shape"):
        partition_layers(**_llama_like(scale=(1.0, 1.0)))
    with pytest.raises(SpecError, match="must be non-negative"):
        partition_layers(**_llama_like(extra=(0.0, -1.0, 0.0, 0.0)))
    with pytest.raises(SpecError, match="num_stages must be a positive integer"):
        partition_layers(**_llama_like(pp=0, scale=(), extra=()))


@settings(max_examples=20, deadline=None)
@given(
    num_layers=st.integers(4, 96),
    pp=st.integers(1, 8),
    vp=st.integers(1, 3),
    extra_first=st.floats(0, 0.2),
    extra_last=st.floats(0, 0.2),
)
@example(num_layers=11, pp=3, vp=1, extra_first=0.0, extra_last=1e-9)  # solver tolerances
def test_partition_invariants(num_layers, pp, vp, extra_first, extra_last):
    if num_layers < pp * vp:
        return
    extra = np.zeros(pp)
    extra[0] += extra_first
    extra[-1] += extra_last
    part = partition_layers(**_llama_like(
        pp=pp, num_layers=num_layers, extra=extra, scale=np.ones(pp),
        layer_mem_bytes=np.full(pp, GiB), stage_fixed_mem_bytes=np.zeros(pp),
        stage_capacity_bytes=np.full(pp, np.inf)), vp=vp)
    assert sum(part.layers_per_stage) == num_layers and min(part.layers_per_stage) >= 1
    even = np.array([num_layers // pp + (r < num_layers % pp) for r in range(pp)])
    assert part.max_stage_time_s <= np.max(even * 0.010 + extra) * (1 + 1e-9)  # never worse


# --------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------


def random_bw(rng, n, low=1.0, high=30.0):
    bw = rng.uniform(low, high, (n, n))
    return (bw + bw.T) / 2


@pytest.mark.parametrize("nodes,stages,blocks", [(6, 2, 3), (6, 3, 2), (7, 2, 3), (7, 3, 2),
                                                 (8, 2, 4)])
def test_exact_placement_equals_brute_force(nodes, stages, blocks):
    rng = np.random.default_rng(nodes * 10 + stages)
    bw = random_bw(rng, nodes)
    collective = rng.uniform(0.5e9, 3e9, stages)
    hop = rng.uniform(0.1e9, 1e9, stages - 1)
    work, speed = rng.uniform(0.1, 1.0, stages), rng.uniform(0.5, 1.0, nodes)
    best, _ = brute_placement(bw, stages, blocks, collective, hop, work, speed)
    got = place_nodes(bw, stages, blocks, collective, hop, work, speed, method="exact",
                      time_limit_s=60)
    assert got.status == "optimal" and got.gap < 1e-6
    assert got.objective_s == pytest.approx(best, rel=1e-7)
    assert len(set(got.node_for_rank)) == stages * blocks
    assert placement_cost(bw, got.node_for_rank, stages, blocks, collective, hop, work,
                          speed).total_s == pytest.approx(got.objective_s)
    print(f"\nexact placement {nodes} nodes {stages}x{blocks}: ILP {got.objective_s:.6f} s == "
          f"brute force {best:.6f} s; {got.solver} {got.status} gap {got.gap:.1e}, "
          f"{got.seconds:.2f} s")


def _two_nic_cluster(ib=4, eth=4, fast=25.0, slow=3.0, cross=1.0):
    kind = np.r_[np.zeros(ib), np.ones(eth)].astype(int)
    same = kind[:, None] == kind[None, :]
    bw = np.where(same, np.where(kind[:, None] == 0, fast, slow), cross)
    return bw.astype(float), kind


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregated_placement_equals_brute_force_on_class_clusters(seed):
    rng = np.random.default_rng(seed)
    bw, kind = _two_nic_cluster(ib=4, eth=4)
    order = rng.permutation(8)  # hide the classes behind a shuffled node order
    bw, kind = bw[np.ix_(order, order)], kind[order]
    speed = np.where(rng.random(8) < 0.5, 1.0, 0.6)[kind]  # per class: GPU type follows NIC
    collective, hop = rng.uniform(0.5e9, 3e9, 2), rng.uniform(0.1e9, 2e9, 1)
    work = rng.uniform(0.1, 1.0, 2)
    best, _ = brute_placement(bw, 2, 4, collective, hop, work, speed)
    got = place_nodes(bw, 2, 4, collective, hop, work, speed, method="aggregated")
    assert got.method == "aggregated" and got.num_classes == 2
    assert got.objective_s == pytest.approx(best, rel=1e-7)


@pytest.mark.parametrize("method", ["exact", "aggregated"])
def test_holmes_dp_groups_stay_within_one_nic_type(method):
    bw, kind = _two_nic_cluster()  # IB-IB 25 GB/s, Eth-Eth 3 GB/s, IB-Eth 1 GB/s (TCP)
    got = place_nodes(bw, 2, 4, np.array([2e9, 2e9]), 1e8, method=method)
    grid = kind[np.array(got.node_for_rank)].reshape(2, 4)
    assert all(len(set(row)) == 1 for row in grid)  # each stage's DP ring on one NIC type
    assert grid[0, 0] != grid[1, 0]  # so every pipeline hop crosses IB <-> Ethernet
    naive = placement_cost(bw, [0, 4, 1, 5, 2, 6, 3, 7], 2, 4, np.array([2e9, 2e9]), 1e8)
    assert got.objective_s < naive.total_s / 2
    print(f"\nHolmes ({method}): {got.node_for_rank}, {got.objective_s:.3f} s vs mixed "
          f"{naive.total_s:.3f} s; {got.solver} {got.status}")


def test_pipette_degraded_pair_stays_out_of_dp_rings():
    bw = np.full((8, 8), 25.0)
    bw[1, 2] = bw[2, 1] = 1.5  # one degraded link
    collective, hop = np.array([2e9, 2e9]), np.array([2e8])
    got = place_nodes(bw, 2, 4, collective, hop, method="exact")
    stage_of = {node: k // 4 for k, node in enumerate(got.node_for_rank)}
    assert stage_of[1] != stage_of[2]  # not inside one DP ring
    assert got.cost.collective_s == pytest.approx(2e9 / 25e9)
    identity = placement_cost(bw, range(8), 2, 4, collective, hop)  # 1 and 2 share stage 0
    assert identity.collective_s == pytest.approx(2e9 / 1.5e9)
    best, _ = brute_placement(bw, 2, 4, collective, hop, np.zeros(2), np.ones(8))
    assert got.objective_s == pytest.approx(best)


def test_pipette_forced_degraded_link_carries_a_pipeline_hop():
    # 4 nodes, 2 stages x 2 blocks; node 3 reaches 0 and 1 only through degraded links, so
    # it must share a stage or a hop with one of them: the ILP gives the slow link the hop
    bw = np.full((4, 4), 25.0)
    bw[3, :2] = bw[:2, 3] = 1.0
    collective, hop = np.array([4e9, 4e9]), np.array([1e8])
    got = place_nodes(bw, 2, 2, collective, hop, method="exact")
    grid = np.array(got.node_for_rank).reshape(2, 2)
    partner_in_stage = [row for row in grid if 3 in row][0]
    assert 2 in partner_in_stage  # the DP ring of node 3's stage uses the healthy link 2-3
    column = grid[:, list(grid[0]).index(3) if 3 in grid[0] else list(grid[1]).index(3)]
    assert set(column) & {0, 1}  # node 3's pipeline hop runs over a degraded link
    assert got.cost.collective_s == pytest.approx(4e9 / 25e9)
    assert got.cost.pipeline_s == pytest.approx(1e8 / 1e9)


def test_placement_puts_heavy_stage_on_fast_gpus():
    bw = np.full((4, 4), 25.0)
    speed = np.array([0.5, 1.0, 0.5, 1.0])  # nodes 1 and 3 have the faster GPU type
    got = place_nodes(bw, 2, 2, np.zeros(2), 0.0, stage_work_s=np.array([0.2, 1.0]),
                      node_speed=speed)
    assert set(got.node_for_rank[2:]) == {1, 3}
    assert got.cost.compute_s == pytest.approx(1.0)  # swapped: 1.0 / 0.5 = 2.0 s


def test_placement_leaves_the_slowest_spare_node_idle():
    bw = np.full((7, 7), 25.0)
    bw[4, :] = bw[:, 4] = 2.0  # node 4's NIC is degraded and one node is spare
    got = place_nodes(bw, 2, 3, np.array([1e9, 1e9]), 1e8)
    assert 4 not in got.node_for_rank
    assert got.node_order(7)[-1] == 4 and sorted(got.node_order(7)) == list(range(7))


def test_large_cluster_uses_aggregated_model():
    # 128 nodes: 64 InfiniBand (2 racks) + 64 Ethernet (2 racks), half of them an older GPU,
    # with +-3% measurement noise; pp=8 stages x 16 replica blocks
    rng = np.random.default_rng(1)
    kind = np.repeat([0, 1], 64)
    rack = np.repeat(np.arange(4), 32)
    speed = np.where(rack % 2 == 0, 1.0, 0.7)
    bw = np.where((kind[:, None] == 0) & (kind[None, :] == 0), 25.0,
                  np.where(kind[:, None] == kind[None, :], 3.0, 1.0))
    bw = np.where(rack[:, None] == rack[None, :], bw, 0.8 * bw) * rng.uniform(0.97, 1.03,
                                                                              (128, 128))
    args = (bw, 8, 16, np.full(8, 2e9), 2e8, np.full(8, 1.0), speed)
    start = time.perf_counter()
    got = place_nodes(*args, time_limit_s=3.0)
    wall = time.perf_counter() - start
    assert got.method == "aggregated" and got.num_classes == 4
    assert got.status in ("optimal", "feasible") and len(set(got.node_for_rank)) == 128
    grid = kind[np.array(got.node_for_rank)].reshape(8, 16)
    assert all(len(set(row)) == 1 for row in grid)  # no DP ring mixes NIC types
    shuffled = rng.permutation(128)
    assert got.objective_s < placement_cost(bw, shuffled, *args[1:]).total_s
    assert got.objective_s <= placement_cost(bw, range(128), *args[1:]).total_s + 1e-9
    print(f"\n128 nodes, 8x16: {wall:.2f} s wall ({got.solver} {got.status}, gap "
          f"{got.gap:.3g}, {got.num_classes} classes), objective {got.objective_s:.3f} s "
          f"= compute {got.cost.compute_s:.3f} + DP {got.cost.collective_s:.3f} + "
          f"PP {got.cost.pipeline_s:.3f}")


def test_node_classes_from_bandwidth_rows_and_labels():
    bw, kind = _two_nic_cluster(ib=5, eth=3)
    noisy = bw * np.random.default_rng(0).uniform(0.98, 1.02, bw.shape)
    classes = node_classes(noisy)
    assert len(set(classes[kind == 0])) == 1 and len(set(classes[kind == 1])) == 1
    assert classes[0] != classes[-1]
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2])  # e.g. GPU types that split the IB nodes
    split = node_classes(noisy, node_labels=labels)
    assert split.max() + 1 == 3 and split[1] != split[2]


def test_placement_errors():
    with pytest.raises(InfeasibleLayout, match="needs 8 nodes .* has 6"):
        place_nodes(np.full((6, 6), 10.0), 2, 4, np.ones(2), 1.0)
    with pytest.raises(SpecError, match="square"):
        place_nodes(np.ones((3, 4)), 1, 2, np.ones(1), 1.0)
    bad = np.full((4, 4), 10.0)
    bad[0, 1] = 0.0
    with pytest.raises(SpecError, match="positive finite bandwidth"):
        place_nodes(bad, 2, 2, np.ones(2), 1.0)
    with pytest.raises(SpecError, match="hop_bytes needs 1 entries"):
        place_nodes(np.full((4, 4), 10.0), 2, 2, np.ones(2), np.ones(3))
    with pytest.raises(SpecError, match="4 distinct node indices below 4"):
        placement_cost(np.full((4, 4), 10.0), [0, 1, 1, 2], 2, 2, np.ones(2), 1.0)


def test_node_grid():
    assert ParallelDims(tp=8, cp=1, dp=4, pp=2).node_grid(8) == (2, 4)
    assert ParallelDims(tp=4, cp=2, dp=2, pp=3).node_grid(8) == (3, 2)
    with pytest.raises(SpecError, match="not a multiple of 8"):
        ParallelDims(tp=2, cp=1, dp=2, pp=2).node_grid(8)
