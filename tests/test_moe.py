"""Mixture-of-experts cost model: parameter counts, expert parallelism, all-to-all, search."""

from dataclasses import replace

import pytest

from cost_models import flops, megatron
from cost_models.specs import Layout, SpecError
from planner.search import SearchSpace, search
from planner.specfiles import load_cluster, load_model

MIXTRAL = load_model("mixtral-8x7b")
H100x8 = load_cluster("dgx-h100", nodes=8)


def test_mixtral_total_and_active_parameters():
    # Mistral AI, "Mixtral of Experts" (Jiang et al. 2024): 46.7B total, 12.9B active per token.
    assert flops.parameter_count(MIXTRAL) / 1e9 == pytest.approx(46.7, abs=0.05)
    active = (flops.layer_gemm_flops(MIXTRAL, 1) * MIXTRAL.num_layers
              + flops.lm_head_flops(MIXTRAL, 1)) / 2 + MIXTRAL.vocab_size * MIXTRAL.hidden_size
    assert active / 1e9 == pytest.approx(12.9, abs=0.1)


def _layout(**kw):
    base = dict(tp=1, pp=4, dp=16, micro_batch_size=1, global_batch_size=256, seq_len=4096,
                vp=8, recompute="selective")
    base.update(kw)
    return Layout(**base)


def test_expert_parallelism_splits_expert_weights_and_adds_all_to_all():
    one = megatron.estimate(MIXTRAL, H100x8, _layout(ep=1))
    eight = megatron.estimate(MIXTRAL, H100x8, _layout(ep=8))
    assert one.time.ep_comm_s == 0.0 and eight.time.ep_comm_s > 0.0
    # 8 experts over 8 ranks: each GPU keeps 1/8 of the expert weights.
    assert eight.memory.weights_bytes < 0.35 * one.memory.weights_bytes
    assert eight.peak_GiB < one.peak_GiB


def test_all_to_all_grows_when_the_group_leaves_the_node():
    inside = megatron.estimate(MIXTRAL, H100x8, _layout(ep=8))           # tp*cp*ep = 8: one node
    across = megatron.estimate(MIXTRAL, H100x8, _layout(tp=2, dp=8, ep=8, sequence_parallel=True))
    per_token_inside = inside.time.ep_comm_s / inside.time.compute_s
    per_token_across = across.time.ep_comm_s / across.time.compute_s
    assert per_token_across > per_token_inside


def test_ep_must_divide_experts_and_data_parallel_ranks():
    with pytest.raises(SpecError, match="must divide the 8 experts"):
        megatron.estimate(MIXTRAL, H100x8, _layout(ep=3))
    dense = load_model("llama3.1-8b")
    with pytest.raises(SpecError, match="mixture-of-experts"):
        megatron.estimate(dense, H100x8, replace(_layout(ep=2), pp=2, dp=32, vp=1))


def test_search_plans_moe_with_valid_expert_parallelism():
    res = search(MIXTRAL, H100x8, 4096, 256, SearchSpace(), top_k=5)
    assert res.plans
    for est in res.plans:
        lay = est.layout
        lay.validate(MIXTRAL, 64)
        assert MIXTRAL.num_experts % lay.ep == 0 and (lay.tp * lay.cp * lay.dp) % (lay.etp * lay.ep) == 0
        assert est.fits
    assert max(e.layout.ep for e in res.plans) > 1  # sharding experts pays on 64 GPUs


def test_heterogeneous_cost_models_say_moe_is_unsupported():
    with pytest.raises(SpecError, match="use --cost-model megatron"):
        megatron.require_dense(MIXTRAL)
