"""Per-rank pricing of the layers each pipeline rank really holds (`cost_models.layer_mix`):
DeepSeek-V3's three leading dense layers, Llama 4's interleaved MoE layers, a Nemotron-H
hybrid pattern."""

from dataclasses import replace

import numpy as np
import pytest

from cost_models import layer_mix, megatron, memory, step_tasks
from cost_models.grid import LayoutGrid, rank_of_stage
from cost_models.specs import Layout
from planner.specfiles import load_cluster, load_model

DSV3 = load_model("deepseek-v3")
MAVERICK = load_model("llama4-maverick")
NANO = load_model("nemotron-3-nano-30b-a3b")
H100 = load_cluster("dgx-h100", nodes=64)


def _dsv3(**kw) -> Layout:
    base = dict(tp=1, pp=16, dp=32, ep=32, micro_batch_size=1, global_batch_size=1024,
                seq_len=4096, recompute="selective")
    base.update(kw)
    return Layout(**base)


def _grid(model, layouts) -> LayoutGrid:
    grids = [LayoutGrid.from_layout(lay, model.num_layers) for lay in layouts]
    out = grids[0]
    for g in grids[1:]:
        out = out.concat(g)
    return out


def _mix(model, g):
    lt = megatron.layer_times(model, H100.gpu, H100, g)
    return megatron.layer_mix_of(model, H100, g, lt, memory.activation_terms(model, g))


def test_layer_kinds_follow_the_config():
    names, codes = layer_mix.layer_kinds(DSV3)  # first_k_dense_replace = 3
    assert names == ("dense", "moe") and codes[:4].tolist() == [0, 0, 0, 1]
    assert codes.sum() == 58
    # Llama 4 Maverick, interleave_moe_layer_step = 2: layers 1, 3, 5, ... are MoE
    _, codes = layer_mix.layer_kinds(MAVERICK)
    assert codes[:6].tolist() == [0, 1, 0, 1, 0, 1] and codes.sum() == 24
    names, codes = layer_mix.layer_kinds(NANO)
    assert "".join(names[c] for c in codes) == NANO.layer_pattern
    assert layer_mix.layer_kinds(load_model("qwen3-30b-a3b")) is None  # every layer MoE
    assert layer_mix.layer_kinds(load_model("llama3.1-8b")) is None


def test_probe_parameters_are_the_real_layers():
    # DeepSeek-V3 (config.json): a dense layer's MLP is 3 x 7168 x 18432, a MoE layer's
    # shared expert 3 x 7168 x 2048 plus a 256 x 7168 router, and 256 routed experts.
    dense, moe = (layer_mix.probe(DSV3, k) for k in ("dense", "moe"))
    gap = memory.dense_layer_params(dense) - memory.dense_layer_params(moe)
    assert gap == 3 * 7168 * (18432 - 2048) - 256 * 7168
    assert memory.expert_layer_params(moe) == 256 * 3 * 7168 * 2048
    assert memory.expert_layer_params(dense) == 0


def test_weights_price_the_whole_model_as_the_averaged_layer():
    layouts = [_dsv3(), _dsv3(pp=8, dp=64, vp=2), _dsv3(tp=2, dp=16, ep=16,
                                                        sequence_parallel=True)]
    for model in (DSV3, MAVERICK, NANO):
        lays = [replace(lay, ep=1 if not model.is_moe else min(lay.ep, model.num_experts))
                for lay in layouts]
        mix = _mix(model, _grid(model, lays))
        for w in (mix.time, mix.acts):
            assert np.allclose(w @ mix.counts, model.num_layers)
            assert (w > 0).all()
        assert mix.counts @ mix.dense == pytest.approx(model.num_layers)


def test_pp1_is_priced_exactly_as_before_and_pp_gt_1_by_its_own_layers(monkeypatch):
    single = _dsv3(pp=1, dp=512, ep=64)
    staged = _dsv3()
    with_mix = [megatron.estimate(DSV3, H100, lay) for lay in (single, staged)]
    monkeypatch.setattr(megatron, "layer_mix_of", lambda *a, **k: None)  # the averaged layer
    averaged = [megatron.estimate(DSV3, H100, lay) for lay in (single, staged)]
    assert with_mix[0].step_time_s == pytest.approx(averaged[0].step_time_s, rel=1e-12)
    assert with_mix[0].peak_GiB == pytest.approx(averaged[0].peak_GiB, rel=1e-12)
    # pp = 16: the critical rank holds MoE layers only, heavier than the averaged layer
    assert with_mix[1].step_time_s > averaged[1].step_time_s * 1.005


def _rank_layers(lay: Layout, num_layers: int) -> list[np.ndarray]:
    """The layer indices each pipeline rank of `lay` holds (stage k on `rank_of_stage`)."""
    stages = lay.stage_layers(num_layers)
    starts = np.concatenate([[0], np.cumsum(stages)])
    vshape = lay.schedule in ("zb-v", "dualpipev")
    return [np.concatenate([np.arange(starts[k], starts[k + 1]) for k in range(len(stages))
                            if rank_of_stage(k, lay.pp, vshape) == r]) for r in range(lay.pp)]


@pytest.mark.parametrize("kw", [dict(pp=4, dp=16, vp=2), dict(pp=6, dp=8),
                                dict(pp=4, dp=16, vp=2, pipeline_schedule="zb-v"),
                                dict(pp=4, dp=16, layers_per_stage=(20, 10, 12, 10))])
def test_ranks_match_a_rank_by_rank_count(kw):
    lay = Layout(tp=1, ep=8, micro_batch_size=1, global_batch_size=256, seq_len=4096, **kw)
    g = _grid(NANO, [lay])
    mix = _mix(NANO, g)
    first, last, mid = mix.ranks(g)
    for row in range(len(g)):
        held = [mix.layers(ix, row) for ix in _rank_layers(lay, NANO.num_layers)]
        assert first.time[row] == pytest.approx(float(held[0].time[0]))
        assert first.expert[row] == pytest.approx(float(held[0].expert))
        assert last.time[row] == pytest.approx(float(held[-1].time[0]))
        assert last.dense[row] == pytest.approx(float(held[-1].dense))
        assert mid.time[row] == pytest.approx(max(float(h.time[0]) for h in held[1:-1]))
        assert mid.acts[row] == pytest.approx(max(float(h.acts[0]) for h in held[1:-1]))
        # the hybrid's stages hold different mixes: their times differ
        assert max(float(h.time[0]) for h in held) > min(float(h.time[0]) for h in held)


def test_per_layer_settings_ignore_the_pipeline_and_data_parallel_columns():
    lays = [_dsv3(pp=pp, dp=512 // pp, vp=vp) for pp, vp in ((1, 1), (4, 1), (8, 2), (16, 1))]
    lays += [_dsv3(tp=2, dp=16, ep=16, sequence_parallel=True), _dsv3(recompute="full")]
    g = _grid(DSV3, lays)
    rows, setting = layer_mix.layer_rows(g)
    assert len(rows) == 3 and setting[:4].tolist() == [setting[0]] * 4
    lt = megatron.layer_times(DSV3, H100.gpu, H100, g).total_s
    acts = np.broadcast_to(memory.activation_terms(DSV3, g).per_layer, (len(g),))
    assert np.array_equal(lt, lt[rows][setting])  # the claim `layer_rows` rests on
    assert np.array_equal(acts, acts[rows][setting])


def test_stage_costs_give_each_layer_its_kind():
    costs = megatron.stage_costs(DSV3, H100, _dsv3())
    assert costs.layer_time_s.shape == (61,) and costs.layer_mem_bytes.shape == (16, 61)
    dense, moe = costs.layer_time_s[0], costs.layer_time_s[3]
    assert np.allclose(costs.layer_time_s[:3], dense) and np.allclose(costs.layer_time_s[3:], moe)
    assert dense < moe  # one rank's 1/32 of the experts plus the all-to-all cost more
    assert _dsv3().stage_layers(61)[0] == 3  # rank 0 holds the dense layers
    assert not np.allclose(costs.layer_mem_bytes[:, 0], costs.layer_mem_bytes[:, 3])
    uniform = megatron.stage_costs(load_model("llama3.1-8b"), H100,
                                   Layout(tp=1, pp=4, dp=128, micro_batch_size=1,
                                          global_batch_size=1024, seq_len=4096))
    assert np.ndim(uniform.layer_time_s) == 0 and uniform.layer_mem_bytes.shape == (4,)


def test_simulator_stages_carry_their_layers():
    tasks = step_tasks.uniform(DSV3, H100, _dsv3(pp=4, dp=128, global_batch_size=2048))
    stages = _dsv3(pp=4).stage_layers(61)  # 15, 16, 15, 15: rank 0's 3 dense + 12 MoE
    per_layer = [tasks.fwd_s[r][0] / stages[r] for r in range(4)]
    assert per_layer[0] < per_layer[1] == pytest.approx(per_layer[2])  # 3 dense layers


def _fullest_rank_state_bytes(model, lay: Layout) -> float:
    """The largest weights + gradients + optimizer state of the layers any pipeline rank of
    `lay` really holds (the embedding and LM head left out, as the bound leaves them), plus
    the fixed buffer allowance: at most the fullest rank's peak, so the bound must stay
    below it."""
    g = LayoutGrid.from_layout(lay, model.num_layers)
    mix = _mix(model, g)
    states = []
    for ix in _rank_layers(lay, model.num_layers):
        state = megatron.rank_state(model, g, mix.layers(ix), False, False, 1)
        parts = memory.state_bytes(g, state.dense + state.expert, state.optimizer,
                                   H100.gpu.fp8_transpose_copy)
        states.append(float(np.ravel(sum(parts.values()))[0]))
    return max(states) + memory.BUFFER_FIXED_BYTES


@pytest.mark.parametrize("model,pp", [(DSV3, 4), (DSV3, 16), (DSV3, 30), (NANO, 3),
                                      (NANO, 12)])
def test_state_lower_bound_holds_for_mixed_models(model, pp):
    lay = Layout(tp=1, pp=pp, dp=8, ep=8, micro_batch_size=1, global_batch_size=1024,
                 seq_len=4096, recompute="selective")
    g = LayoutGrid.from_layout(lay, model.num_layers)
    bound = float(megatron.state_bytes_lower_bound(model, g, H100.gpu.fp8_transpose_copy)[0])
    assert bound <= _fullest_rank_state_bytes(model, lay) * (1 + 1e-12)
    if model is DSV3 and pp == 30:
        # ceil(61 / 30) = 3 averaged layers would overshoot: the one 3-layer rank holds the
        # light dense layers, the others 2 MoE layers
        state = megatron.rank_state(model, g, 3, False, False, 1)
        parts = memory.state_bytes(g, state.dense + state.expert, state.optimizer,
                                   H100.gpu.fp8_transpose_copy)
        ceil_bound = float(np.ravel(sum(parts.values()))[0]) + memory.BUFFER_FIXED_BYTES
        assert ceil_bound > _fullest_rank_state_bytes(model, lay)


def test_dualpipe_ranks_hold_their_mirrored_stage():
    # DualPipe: rank r holds stage r and stage pp-1-r (each for half the micro-batches)
    lay = _dsv3(pp=4, dp=128, global_batch_size=2048, pipeline_schedule="dualpipe")
    g = LayoutGrid.from_layout(lay, DSV3.num_layers)
    mix = _mix(DSV3, g)
    own = [mix.layers(ix) for ix in _rank_layers(lay, DSV3.num_layers)]
    first, last, _ = mix.ranks(g)
    for got, r in ((first, 0), (last, 3)):
        for field in ("dense", "expert", "time", "acts"):
            pair = float(np.ravel(getattr(own[r], field))[0] + np.ravel(getattr(own[3 - r], field))[0])
            assert 2 * float(np.ravel(getattr(got, field))[0]) == pytest.approx(pair)
    assert float(own[0].dense) != pytest.approx(float(own[3].dense))  # 3 dense layers
    tasks = step_tasks.uniform(DSV3, H100, lay)
    assert lay.stage_layers(61)[1:3] == (16, 15)  # ranks 1 and 2 both hold stages 1 and 2
    assert tasks.dp_comm_s[1] == pytest.approx(tasks.dp_comm_s[2])
    assert tasks.optimizer_s[1] == pytest.approx(tasks.optimizer_s[2])


def test_stage_costs_memory_is_exact_under_fsdp():
    # the ILP's affine memory (one entry per rank and layer) against each rank's own costs
    split = (20, 10, 15, 16)
    lay = _dsv3(pp=4, dp=128, ep=16, fsdp=True, framework="torchtitan", global_batch_size=2048)
    costs = megatron.stage_costs(DSV3, H100, lay)
    lay = replace(lay, layers_per_stage=split)
    g = LayoutGrid.from_layout(lay, DSV3.num_layers)
    mix, parts = _mix(DSV3, g), megatron.layout_parts(lay, DSV3, H100)
    for r, ix in enumerate(_rank_layers(lay, DSV3.num_layers)):
        ilp = costs.fixed_mem_bytes[r] + costs.layer_mem_bytes[r, ix].sum()
        real = megatron.rank_costs(DSV3, H100, g, parts.layer, parts.embedding_s, parts.head_s,
                                   mix.layers(ix), r == 0, r == 3, r).total_bytes
        assert ilp == pytest.approx(float(np.ravel(real)[0]), rel=1e-9)


def test_fsdp_blocks_are_the_ranks_own_layers(monkeypatch):
    # torchtitan FSDP2 with pp 4: rank 0 gathers DeepSeek-V3's 3 dense layers' parameters
    # (no experts) and 12 MoE layers', not 15 averaged layers'
    lay = _dsv3(pp=4, dp=128, ep=16, fsdp=True, framework="torchtitan", global_batch_size=2048)
    g = LayoutGrid.from_layout(lay, DSV3.num_layers)
    mix = _mix(DSV3, g)
    first = megatron._rank_kinds(g, mix)[0][0]
    static = megatron.rank_static(DSV3, H100, g, first, True, False, 0)
    _, block, _ = static.fsdp_params
    dense, moe = (layer_mix.probe(DSV3, k) for k in ("dense", "moe"))
    assert lay.stage_layers(61)[0] == 15
    held = [3 * memory.dense_layer_params(dense) + 12 * memory.dense_layer_params(moe),
            12 * memory.expert_layer_params(moe)]
    assert 15 * float(block[0]) == pytest.approx(held[0] + held[1] / 16)
    with_mix = megatron.estimate(DSV3, H100, lay)
    monkeypatch.setattr(megatron, "layer_mix_of", lambda *a, **k: None)
    averaged = megatron.estimate(DSV3, H100, lay)
    assert with_mix.peak_GiB != pytest.approx(averaged.peak_GiB, rel=1e-3)


def test_interleaved_partition_uses_the_uniform_model_only_and_beats_the_per_layer_one():
    """Interleaved DeepSeek-V3: the per-layer ILP balances the ranks but leaves uneven chunks,
    which Megatron's interleaved order stalls on; the uniform model's even chunks do not. So
    interleaved layouts get the uniform model only, and its split beats the per-layer one."""
    from planner import search
    from planner.ilp_partition import partition_layers

    lay = Layout(tp=2, pp=4, dp=64, ep=128, etp=1, vp=5, micro_batch_size=1, global_batch_size=2048,
                 seq_len=4096, recompute="selective", sequence_parallel=True,
                 recompute_modules=("layernorm", "moe_act", "mla_up_proj"), moe_a2a_overlap=True)
    even = megatron.estimate(DSV3, H100, lay)
    refined, part = search.refine_partition(DSV3, H100, even, 0.05)
    costs = megatron.stage_costs(DSV3, H100, lay, 0.05)
    models = list(search._partition_models(costs, lay.vp))
    assert len(models) == 1 and np.ndim(models[0][0]) == 0  # uniform layers only
    assert len(list(search._partition_models(costs, 1))) == 2  # looped: both models
    split = partition_layers(61, lay.pp, costs.layer_time_s, np.ones(lay.pp), costs.extra_time_s,
                             costs.layer_mem_bytes, costs.fixed_mem_bytes, costs.capacity_bytes,
                             vp=lay.vp).layers_per_stage
    per_layer = megatron.estimate(DSV3, H100, replace(lay, layers_per_stage=split), 0.05)
    assert refined.fits and part is not None
    assert refined.step_time_s <= even.step_time_s
    assert refined.step_time_s < 0.97 * per_layer.step_time_s
