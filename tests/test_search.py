"""Planner search: validity, fit, monotonicity in GPUs, determinism, CLI contract."""

import json
from dataclasses import fields, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import megatron
from cost_models.specs import Layout, SpecError
from planner import search as search_module
from planner.planfile import read_plan
from planner.search import SearchSpace, generate, search, search_nodes
from planner.specfiles import load_cluster, load_model

MODELS = ["llama3.1-8b", "llama3.1-70b", "gpt3-175b", "qwen2.5-72b", "mistral-7b"]


def _check_plan(est, model, world):
    lay = est.layout
    assert lay.tp * lay.pp * lay.cp * lay.dp == world
    lay.validate(model, world)  # divisibility of heads, KV heads, batch, sequence, layers
    assert est.fits
    again = megatron.estimate(model, load_cluster("dgx-h100", nodes=world // 8), lay)
    assert again.step_time_s == pytest.approx(est.step_time_s)


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(MODELS), nodes=st.sampled_from([2, 4, 8, 16]),
       seq=st.sampled_from([2048, 4096, 8192]), gbs_per_node=st.sampled_from([4, 16]))
def test_every_returned_plan_is_valid_and_fits(name, nodes, seq, gbs_per_node):
    model = load_model(name)
    cluster = load_cluster("dgx-h100", nodes=nodes)
    res = search(model, cluster, seq, gbs_per_node * nodes * 8 // 8 * 8, top_k=3)
    for est in res.plans:
        _check_plan(est, model, cluster.world_size)
    assert res.feasible <= res.valid
    times = [e.step_time_s for e in res.plans]
    assert times == sorted(times)


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(MODELS), nodes=st.sampled_from([2, 4, 8, 16]),
       seq=st.sampled_from([2048, 8192]))
def test_doubling_nodes_never_makes_best_step_time_worse(name, nodes, seq):
    model = load_model(name)
    gbs = 512
    small = search(model, load_cluster("dgx-h100", nodes=nodes), seq, gbs, top_k=1)
    big = search(model, load_cluster("dgx-h100", nodes=2 * nodes), seq, gbs, top_k=1)
    if small.plans:
        assert big.plans, "more GPUs lost every fitting layout"
        assert big.plans[0].step_time_s <= small.plans[0].step_time_s * (1 + 1e-9)


@settings(max_examples=15, deadline=None)
@given(tp=st.sampled_from([1, 2, 4, 8]), pp=st.sampled_from([1, 2, 4]),
       rec=st.sampled_from(["none", "selective", "full"]), dp=st.sampled_from([1, 2, 4]))
def test_more_data_parallel_gpus_never_raise_memory_per_gpu(tp, pp, rec, dp):
    # Same model-parallel layout and global batch, twice the replicas: per-GPU memory must not grow.
    model = load_model("llama3.1-70b")
    lay = Layout(tp=tp, pp=pp, dp=dp, micro_batch_size=1, global_batch_size=64, seq_len=4096,
                 recompute=rec, sequence_parallel=tp > 1)
    a = megatron.estimate(model, load_cluster("dgx-h100", nodes=max(1, tp * pp * dp // 8),
                                              gpus_per_node=min(8, tp * pp * dp)), lay)
    lay2 = replace(lay, dp=2 * dp)
    b = megatron.estimate(model, load_cluster("dgx-h100", nodes=max(1, tp * pp * dp // 4),
                                              gpus_per_node=min(8, 2 * tp * pp * dp)), lay2)
    assert b.peak_GiB <= a.peak_GiB + 1e-9


def test_search_is_deterministic_and_ranks_published_layout_near_the_top():
    model = load_model("llama3.1-70b")
    cluster = load_cluster("dgx-h100", nodes=8)
    a = search(model, cluster, 8192, 128, top_k=40)
    b = search(model, cluster, 8192, 128, top_k=40)
    assert [e.layout for e in a.plans] == [e.layout for e in b.plans]
    assert [e.step_time_s for e in a.plans] == [e.step_time_s for e in b.plans]
    # dgxc-benchmarking's tuned Llama 3.1 70B layout on 64 H100 (tp4 pp4 cp2 vp5 mbs1) is
    # among meshplan's leaders, within 3% of its pick (the model's own error is ~2% there).
    keys = [(e.layout.tp, e.layout.pp, e.layout.cp, e.layout.vp, e.layout.micro_batch_size,
             e.layout.recompute) for e in a.plans]
    assert (4, 4, 2, 5, 1, "none") in keys
    published = a.plans[keys.index((4, 4, 2, 5, 1, "none"))]
    assert published.step_time_s <= a.plans[0].step_time_s * 1.03


def test_generate_only_valid_candidates():
    model = load_model("llama3.1-70b")
    grid = generate(model, 64, 8, 8192, 128, SearchSpace())
    assert len(grid) > 1000
    for i in range(0, len(grid), 97):
        grid.layout(i).validate(model, 64)


def test_fixed_degrees_restrict_the_space():
    model = load_model("llama3.1-70b")
    res = search(model, load_cluster("dgx-h100", nodes=8), 8192, 128,
                 SearchSpace(tp=8, pp=2), top_k=3)
    assert all((e.layout.tp, e.layout.pp) == (8, 2) for e in res.plans)
    with pytest.raises(SpecError, match=r"--tp 3 .*attention heads.*--tp may be \[1, 2, 4, 8\]"):
        search(model, load_cluster("dgx-h100", nodes=8), 8192, 128, SearchSpace(tp=3))


def test_prime_node_count_plans_on_largest_usable_subset():
    model = load_model("gpt-530b")
    res = search_nodes(model, load_cluster("dgx-a100", nodes=641), 2048, 2520, top_k=1)
    assert res.idle_nodes == ("node640",)
    assert res.plans[0].layout.world == 5120


def test_uneven_partition_when_ends_carry_embedding_and_head():
    # Large vocabulary relative to the model: the ILP moves layers off the LM-head stage.
    # On even splits DualPipe leads (its end ranks share the LM head), and the ILP cannot
    # re-split it; the looped layouts behind it are re-split too, and one of them wins.
    model = replace(load_model("llama3.1-8b"), vocab_size=512_000)
    res = search(model, load_cluster("dgx-h100", nodes=2), 4096, 64,
                 SearchSpace(tp=2, pp=4, vp=1), top_k=3)
    split = res.plans[0].layout.layers_per_stage
    assert split is not None and split[-1] < max(split), split
    dualpipe = [p for p in res.plans if p.layout.schedule == "dualpipe"]
    assert dualpipe and res.plans[0].step_time_s < 0.95 * dualpipe[0].step_time_s


def test_plan_cli_json_contract_and_plan_file(tmp_path, run_cli):
    out = tmp_path / "plan.yaml"
    code, stdout, err = run_cli(
        ["plan", "--model", "llama3.1-70b", "--cluster", "dgx-h100", "--nodes", "8", "--seq-len",
         "8192", "--global-batch-size", "128", "--json", "--top-k", "3", "-o", str(out)])
    assert code == 0, err
    data = json.loads(stdout)
    assert set(data["search"]) >= {"candidates", "feasible", "seconds", "solver"}
    assert len(data["plans"]) == 3
    first = data["plans"][0]
    assert {"layout", "estimate", "placement"} <= set(first)
    assert first["estimate"]["fits"] is True
    plan = read_plan(out)
    assert plan.layout.to_dict() == {k: v for k, v in first["layout"].items()}
    assert plan.nnodes == 8


def test_plan_cli_nothing_fits_gives_numbers(run_cli):
    code, out, err = run_cli(
        ["plan", "--model", "llama3.1-405b", "--cluster", "dgx-h100", "--nodes", "1",
         "--seq-len", "8192", "--global-batch-size", "128"])
    assert code == 3
    assert "closest:" in out and "GiB" in out  # the advice ends the report (stdout)
    assert "x the GPUs" in out  # a scale-up that fits, with its layout and memory
    assert len(err.strip().splitlines()) == 1 and "see the suggestions above" in err


@pytest.mark.parametrize("args,needle", [
    (["--nodes", "0"], "integer in 1.."),
    (["--global-batch-size", "-8"], "integer in 1.."),
    (["--tp", "5"], "attention heads"),
    (["--mem-headroom", "0.9"], "0.9"),
])
def test_plan_cli_bad_input_one_line(args, needle, run_cli):
    base = {"--model": "llama3.1-70b", "--cluster": "dgx-h100", "--nodes": "8",
            "--seq-len": "8192", "--global-batch-size": "128"}
    base.update(dict(zip(args[::2], args[1::2], strict=False)))
    code, _, err = run_cli(["plan", *[x for kv in base.items() for x in kv]])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_min_max_rank_time_equals_brute_force():
    """The exact lower bound that lets the search skip the partition ILP: the best slowest-rank
    time over every integer split (>= vp layers per rank), by enumeration."""
    import itertools
    import random

    from planner.search import min_max_rank_time

    rng = random.Random(7)
    for _ in range(200):
        pp, vp = rng.randint(1, 4), rng.randint(1, 2)
        layers = rng.randint(pp * vp, 10)
        t = rng.choice([1.0, 0.37, 2.5])
        extra = np.array([rng.choice([0.0, 0.0, 0.5, 1.3, 3.0]) for _ in range(pp)])
        best = min(max(t * n + extra[r] for r, n in enumerate(split))
                   for split in itertools.product(range(vp, layers + 1), repeat=pp)
                   if sum(split) == layers)
        assert min_max_rank_time(t, extra, layers, vp) == pytest.approx(best, rel=1e-12)


# ---------------------------------------------------- static-memory prefilter (issue 12)

PREFILTER_PROBLEMS = [
    # (model, cluster, nodes, seq, gbs, space): dense and MoE, FSDP/HSDP, torchtitan, bf16
    # grads, fp8 on Hopper (transposed fp8 weight copy) and Blackwell (none), each with
    # combinations whose weights and optimizer state alone overflow the GPU
    ("llama3.1-405b", "dgx-h100", 32, 8192, 256, SearchSpace()),
    ("llama3.1-405b", "dgx-h100", 2048, 8192, 2048, SearchSpace()),  # plan_speed (b)
    ("llama3.1-405b", "dgx-h100", 16, 4096, 128, SearchSpace(fsdp=(False, True), dp_replicate=2,
                                                              grad_reduce_fp32=False)),
    ("llama3.1-70b", "dgx-h100", 2, 4096, 64, SearchSpace(fsdp=(False, True),
                                                          framework="torchtitan")),
    ("gpt3-175b", "dgx-h100", 16, 2048, 128, SearchSpace(dtype="fp8",
                                                         distributed_optimizer=(False,))),
    ("llama3.1-405b", "gb200-nvl72", 16, 8192, 128, SearchSpace(dtype="fp8")),
    ("mixtral-8x7b", "dgx-h100", 4, 4096, 64, SearchSpace()),
    ("deepseek-v3", "dgx-h100", 64, 4096, 512, SearchSpace()),
]


def _full(model, cluster, seq, gbs, space):
    """Every valid layout, evaluated (what the search did before the prefilter)."""
    space = search_module.with_default_max_tp(space, cluster)
    grid = generate(model, cluster.world_size, cluster.gpus_per_node, seq, gbs, space)
    res = megatron.evaluate(model, cluster, grid)
    return grid, res, megatron.fits_mask(res, cluster.gpu, space.headroom)


@pytest.mark.parametrize("name,cluster_name,nodes,seq,gbs,space", PREFILTER_PROBLEMS)
def test_state_bound_never_exceeds_the_evaluated_peak(name, cluster_name, nodes, seq, gbs, space):
    """`state_bytes_lower_bound` reads only degrees and sharding, so it must stay below the
    peak of every row, whatever its vp, schedule, micro-batch, recompute and SP."""
    model, cluster = load_model(name), load_cluster(cluster_name, nodes=nodes)
    grid, res, _ = _full(model, cluster, seq, gbs, space)
    bound = megatron.state_bytes_lower_bound(model, grid, cluster.gpu.fp8_transpose_copy)
    assert np.all(bound <= res.peak_bytes * (1 + 1e-12)), name
    assert np.any(bound > 0.5 * res.peak_bytes)  # and it is not trivially loose


@pytest.mark.parametrize("name,cluster_name,nodes,seq,gbs,space", PREFILTER_PROBLEMS)
def test_prefilter_drops_only_layouts_that_do_not_fit(name, cluster_name, nodes, seq, gbs, space,
                                                      monkeypatch):
    model, cluster = load_model(name), load_cluster(cluster_name, nodes=nodes)
    grid, res, fits = _full(model, cluster, seq, gbs, space)
    space = replace(space, refine_top=0)
    got = search(model, cluster, seq, gbs, space, top_k=3)
    assert got.pruned > 0, "the prefilter ruled nothing out: the test exercises nothing"
    assert got.valid == len(grid)
    assert got.feasible == int(fits.sum())
    assert got.plans[0].step_time_s == pytest.approx(res.step_time_s[fits].min(), rel=1e-12)
    # the same search with the prefilter off (every combination passes) ranks the same plans
    monkeypatch.setattr(search_module, "state_fits", lambda _m, base, space, *_: np.ones(
        (len(base["tp"]), len(search_module._shardings(space))), dtype=bool))
    every = search(model, cluster, seq, gbs, space, top_k=3)
    assert every.pruned == 0 and every.valid == len(grid)
    assert [e.layout for e in got.plans] == [e.layout for e in every.plans]
    assert [e.step_time_s for e in got.plans] == [e.step_time_s for e in every.plans]
    assert [e.layout for e in got.alternatives] == [e.layout for e in every.alternatives]


def test_nothing_fits_still_ranks_nearest_over_every_layout():
    """When nothing fits, `nearest` (the advice's starting point) is the least-overflowing of
    all valid layouts, pruned ones included."""
    model, cluster = load_model("llama3.1-405b"), load_cluster("dgx-h100", nodes=1)
    grid, res, fits = _full(model, cluster, 8192, 128, SearchSpace())
    got = search(model, cluster, 8192, 128)
    assert not got.plans and not fits.any()
    assert got.candidates == len(grid) and got.pruned == 0
    least = np.sort(res.peak_bytes)[:3] / (1 << 30)
    assert [e.peak_GiB for e in got.nearest] == pytest.approx(least.tolist(), rel=1e-9)


def test_prefilter_prices_fp8_weights_for_the_gpu():
    """Blackwell keeps no transposed fp8 weight copy: a bound with Hopper's copy would rule out
    layouts that fit. With the capacity set to the peak of such a layout, it is kept."""
    model, cluster = load_model("llama3.1-405b"), load_cluster("gb200-nvl72", nodes=16)
    space = SearchSpace(dtype="fp8", refine_top=0)
    grid, res, _ = _full(model, cluster, 8192, 128, space)
    hopper = megatron.state_bytes_lower_bound(model, grid, fp8_transpose_copy=True)
    over = np.flatnonzero(hopper > res.peak_bytes)
    assert len(over), "no layout where Hopper's fp8 bytes would overstate the bound"
    headroom = 1 - res.peak_bytes[over].max() / (cluster.gpu.memory_GiB * (1 << 30))
    capacity = megatron.capacity_GiB(cluster.gpu, headroom) * (1 << 30)
    assert np.any(res.peak_bytes[over] <= capacity)  # some of them fit
    got = search(model, cluster, 8192, 128, replace(space, headroom=headroom), top_k=1)
    assert got.feasible == int((res.peak_bytes <= capacity).sum())


@pytest.mark.parametrize("name,cluster_name,nodes,seq,gbs,space", PREFILTER_PROBLEMS[2:7])
def test_recompute_runs_evaluate_like_row_by_row(name, cluster_name, nodes, seq, gbs, space):
    """`evaluate(variants=...)` computes each run of recompute variants' recompute-free terms
    once: every field equals the row-by-row evaluation exactly (FSDP/HSDP, torchtitan, fp8,
    MoE)."""
    model, cluster = load_model(name), load_cluster(cluster_name, nodes=nodes)
    space = search_module.with_default_max_tp(space, cluster)
    grid = generate(model, cluster.world_size, cluster.gpus_per_node, seq, gbs, space)
    variants = len(search_module.recompute_options(model, space)[0])
    assert variants > 1
    rows, runs = megatron.evaluate(model, cluster, grid), megatron.evaluate(model, cluster, grid,
                                                                          variants)
    for f in fields(rows):
        assert np.array_equal(getattr(rows, f.name), getattr(runs, f.name)), f.name
    shuffled = grid.take(np.random.default_rng(0).permutation(len(grid)))
    with pytest.raises(AssertionError, match="recompute runs"):
        megatron.evaluate(model, cluster, shuffled, variants)


@pytest.mark.parametrize("name,cluster_name,nodes,seq,gbs,space", PREFILTER_PROBLEMS[2:7])
def test_evaluate_in_chunks_equals_one_piece(monkeypatch, name, cluster_name, nodes, seq, gbs,
                                             space):
    """`evaluate` prices large grids `EVALUATE_CHUNK_ROWS` rows at a time, each chunk whole
    runs of recompute variants (the size rounded down to a multiple of the run length): every
    field equals the grid priced in one piece exactly, the grid-wide FLOP counts included."""
    model, cluster = load_model(name), load_cluster(cluster_name, nodes=nodes)
    space = search_module.with_default_max_tp(space, cluster)
    grid = generate(model, cluster.world_size, cluster.gpus_per_node, seq, gbs, space)
    variants = len(search_module.recompute_options(model, space)[0])
    whole = [megatron.evaluate(model, cluster, grid, v) for v in (1, variants)]
    rows = len(grid) // 5 + 1  # six chunks or so; not a multiple of the run length
    monkeypatch.setattr(megatron, "EVALUATE_CHUNK_ROWS", rows)
    assert len(grid) > 3 * rows > 3 * variants
    for v, one in zip((1, variants), whole, strict=True):
        chunked = megatron.evaluate(model, cluster, grid, v)
        for f in fields(one):
            assert np.array_equal(getattr(one, f.name), getattr(chunked, f.name)), (v, f.name)


@pytest.mark.parametrize("chunk_rows", [None, 97])
def test_dominating_grid_and_result_are_its_rows_priced_in_one_piece(monkeypatch, chunk_rows):
    """`_evaluate_dominating` returns every layout's no-recompute row, then the other
    variants (in runs) of the layouts that overflow without recompute, and their result
    stacked once from every chunk of both grids: each field equals `evaluate` of that grid
    in one piece, the grid-wide FLOP counts included (chunks of 97 rows: many parts)."""
    model, cluster = load_model("llama3.1-70b"), load_cluster("dgx-h100", nodes=4)
    space = search_module.with_default_max_tp(SearchSpace(), cluster)
    layouts, _ = search_module._generate_layouts(model, cluster.world_size,
                                                 cluster.gpus_per_node, 8192, 64, space)
    variants = len(layouts.codes)
    if chunk_rows:
        monkeypatch.setattr(megatron, "EVALUATE_CHUNK_ROWS", chunk_rows)
    grid, res, dominated = search_module._evaluate_dominating(model, cluster, layouts, 0.05)
    first = layouts.variants(np.arange(layouts.count), [0])
    fit = megatron.fits_mask(megatron.evaluate(model, cluster, first), cluster.gpu, 0.05)
    over = np.nonzero(~fit)[0]
    assert 0 < len(over) < layouts.count and dominated == int(fit.sum()) * (variants - 1)
    expect = first.concat(layouts.variants(over, np.arange(1, variants)))
    assert len(grid) == len(expect) == layouts.count + len(over) * (variants - 1)
    for name in ("tp", "pp", "dp", "micro_batch_size", "recompute", "schedule"):
        assert np.array_equal(grid.column(name), expect.column(name)), name
    assert not grid.price_stall.any()
    monkeypatch.setattr(megatron, "EVALUATE_CHUNK_ROWS", 10**9)
    whole = megatron.evaluate(model, cluster, grid)
    for f in fields(whole):
        assert np.array_equal(getattr(whole, f.name), getattr(res, f.name)), f.name


@pytest.mark.parametrize(("name", "nodes", "seq", "gbs", "extra"), [
    ("llama3.1-70b", 8, 8192, 128, {}),
    ("llama3.1-70b", 4, 8192, 64, {}),  # memory-bound: the top picks recompute layernorm
    ("mixtral-8x7b", 2, 8192, 64, {}),  # ... and layernorm + moe_act
    ("llama3.1-8b", 2, 8192, 64, dict(fsdp=(False, True))),
])
def test_skipping_variants_of_layouts_that_fit_without_recompute_changes_nothing(
        name, nodes, seq, gbs, extra):
    """`_evaluate_dominating` skips the recompute variants of every layout that fits without
    recompute; with no recompute not listed first the search evaluates every row. Same plans,
    alternatives and feasible count either way."""
    model, cluster = load_model(name), load_cluster("dgx-h100", nodes=nodes)
    fast = search(model, cluster, seq, gbs, SearchSpace(**extra), top_k=5)
    full = search(model, cluster, seq, gbs,
                  SearchSpace(recompute=("full", "none", "selective"), **extra), top_k=5)
    assert fast.dominated > 0 and full.dominated == 0
    assert fast.feasible == full.feasible and fast.valid == full.valid
    assert [p.layout for p in fast.plans] == [p.layout for p in full.plans]
    assert [p.step_time_s for p in fast.plans] == [p.step_time_s for p in full.plans]
    assert [p.layout for p in fast.alternatives] == [p.layout for p in full.alternatives]
    if name != "llama3.1-8b" and nodes < 8:  # the memory-bound cases: a module list wins
        assert fast.plans[0].layout.recompute_modules
