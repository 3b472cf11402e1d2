"""Closed-form numbers from the papers the cost model cites."""

import numpy as np
import pytest

from cost_models import flops, memory
from cost_models.specs import ModelSpec
from planner.specfiles import load_model

GPT3 = load_model("gpt3-175b")


def test_gpt3_175b_parameter_count_narayanan_table1():
    # Narayanan et al. 2021 (SC'21) Table 1 lists GPT-3 as 174.6B parameters
    # (l=96, h=12288, V=51200, s=2048) under P = 12lh^2(1 + 13/12h + (V+s)/12lh).
    p = flops.megatron_paper_params(96, 12288, 51200, 2048)
    assert round(p / 1e9, 1) == 174.6
    # Our per-matrix count (no biases, no learned positions) agrees within 0.1%.
    assert flops.parameter_count(GPT3) == pytest.approx(p, rel=1e-3)


@pytest.mark.parametrize("name,batch,seq", [("gpt3-175b", 1536, 2048), ("gpt-1t", 3072, 2048),
                                            ("gpt-1.7b", 512, 2048)])
def test_96bslh2_formula_equals_component_count(name, batch, seq):
    # Narayanan et al. 2021 Eq. 3: 96·B·s·l·h²·(1 + s/6h + V/16lh) is a GPT step with full
    # recompute and non-causal attention; our component count must reproduce it exactly.
    m = load_model(name)
    ours = flops.hardware_flops_per_step(m, batch, seq, "full", causal=False)
    paper = flops.megatron_paper_flops(batch, seq, m.num_layers, m.hidden_size, m.vocab_size)
    assert ours == paper
    closed = 96 * batch * seq * m.num_layers * m.hidden_size**2 * (
        1 + seq / (6 * m.hidden_size) + m.vocab_size / (16 * m.num_layers * m.hidden_size))
    assert paper == pytest.approx(closed, rel=1e-12)


def test_model_flops_are_three_forwards_and_causal_halves_attention():
    s = 8192
    full = flops.model_flops_per_step(GPT3, 1, s, causal=False)
    causal = flops.model_flops_per_step(GPT3, 1, s, causal=True)
    core = flops.attention_core_flops(GPT3, 1, s, causal=False)
    assert full - causal == 3 * GPT3.num_layers * core // 2


# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
# Sec. 4 (Eq. 1, 2) and Table 2: activation bytes per layer, GPT-3 175B, s=2048, b=1, t=8.
S, B, H, A, T = 2048, 1, 12288, 96, 8
SBH = S * B * H


@pytest.mark.parametrize("sp,recompute,expected", [
    (False, "none", SBH * (10 + 24 / T + 5 * A * S / (H * T))),   # Eq. 1
    (True, "none", SBH / T * (34 + 5 * A * S / H)),               # Eq. 2
    (False, "selective", SBH * (10 + 24 / T)),                    # Table 2
    (True, "selective", 34 * SBH / T),                            # Table 2
    (False, "full", 2 * SBH),                                     # Sec. 4.3
    (True, "full", 2 * SBH / T),
])
def test_korthikanti_activation_bytes(sp, recompute, expected):
    got = memory.activation_bytes_per_layer(GPT3, B, S, T, 1, sp, recompute, flash_attention=False)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_korthikanti_no_parallelism_34_plus_5as_over_h():
    got = memory.activation_bytes_per_layer(GPT3, B, S, 1, flash_attention=False)
    assert float(got) == pytest.approx(SBH * (34 + 5 * A * S / H), rel=1e-12)


def test_context_parallel_divides_sequence():
    one = memory.activation_bytes_per_layer(GPT3, 1, 8192, 8, 1, True, "selective")
    four = memory.activation_bytes_per_layer(GPT3, 1, 8192, 8, 4, True, "selective")
    assert float(one) == pytest.approx(4 * float(four))


def test_bytes_per_parameter_megatron_distributed_optimizer_table():
    # Megatron-LM docs, Distributed Optimizer: bf16 params + fp32 grads -> 18 bytes plain,
    # 6 + 12/d distributed.
    assert memory.bytes_per_parameter(False, 8) == 18
    for d in (1, 2, 8, 64):
        assert float(memory.bytes_per_parameter(True, d)) == pytest.approx(6 + 12 / d)


def test_interleaved_inflight_matches_korthikanti_factor():
    # Korthikanti Sec. 4.2.3: first stage holds L·(1 + (p-1)/(p·v)) layers' worth.
    p, v, m = 8, 4, 64
    got = memory.inflight_microbatches(np.int64(p), np.int64(v), np.int64(m), 0)
    assert float(got) / p == pytest.approx(1 + (p - 1) / (p * v))
    assert memory.inflight_microbatches(np.int64(8), np.int64(1), np.int64(64), 3) == 5
    assert memory.inflight_microbatches(np.int64(8), np.int64(1), np.int64(2), 0) == 2  # m < p


def test_gqa_shrinks_kv_activations():
    mha = ModelSpec("a", 2, 1024, 4096, 16, 16, 64, 1000)
    gqa = ModelSpec("b", 2, 1024, 4096, 16, 4, 64, 1000)
    assert memory.activation_bytes_per_layer(gqa, 1, 512, 1) < memory.activation_bytes_per_layer(mha, 1, 512, 1)


def test_activation_offload_moves_layers_to_host_and_costs_what_the_link_cannot_hide():
    """Megatron --cpu-offloading-num-layers: N of L layers' activations leave the GPU (TE's
    offload releases each before the layer whose slot it frees runs); the transfer is exposed only where the host link is slower than the
    layer's compute (PCIe H100 vs Grace NVLink-C2C GB200)."""
    from cost_models import megatron
    from cost_models.specs import Layout, SpecError
    from planner.specfiles import load_cluster, load_model

    model = load_model("llama3.1-70b")
    base = dict(tp=8, pp=1, dp=1, micro_batch_size=1, global_batch_size=8, seq_len=8192,
                sequence_parallel=True)
    for preset, gpus in (("dgx-h100", 8), ("gb200-nvl72", 4)):
        cluster = load_cluster(preset, nodes=8 // gpus)
        plain = megatron.estimate(model, cluster, Layout(**base))
        off = megatron.estimate(model, cluster, Layout(**base, offload_activation_layers=40))
        per_layer = memory.activation_bytes_per_layer(model, 1, 8192, 8, 1, True)
        assert plain.memory.activations_bytes - off.memory.activations_bytes == pytest.approx(
            40 * per_layer, rel=1e-9)
        extra = off.step_time_s / plain.step_time_s - 1
        if preset == "dgx-h100":
            assert extra > 0.02, extra  # 55 GB/s PCIe cannot hide a layer's activations
        else:
            assert 0 <= extra < 0.01, extra  # 450 GB/s C2C can
    for bad in (dict(pp=2, dp=1), dict(recompute="full")):
        with pytest.raises(SpecError, match="pp = 1, no recompute"):
            Layout(**{**base, "tp": 4, **bad}, offload_activation_layers=4).validate(model, 8)
    with pytest.raises(SpecError, match="fewer than the model's layers"):
        Layout(**base, offload_activation_layers=80).validate(model, 8)


def test_fp8_weight_bytes_per_gpu_generation():
    """Transformer Engine's fp8 weights: data + a transpose where fp8 GEMMs need TN (Hopper),
    MXFP8's rowwise and columnwise copies with one E8M0 scale per 32; + bf16 weights when
    fp8_param_gather is off."""
    assert float(memory.fp8_weight_bytes("fp8", True, True)) == 2.0  # Hopper
    assert float(memory.fp8_weight_bytes("fp8", False, True)) == 1.0  # Blackwell
    assert float(memory.fp8_weight_bytes("mxfp8", False, True)) == pytest.approx(2 + 2 / 32)
    assert float(memory.fp8_weight_bytes("fp8", True, False)) == 4.0


def test_power_cap_slows_tensor_kernels_not_memory_bound_ones():
    from dataclasses import replace

    from cost_models import compute
    from planner.specfiles import gpu_preset

    h100 = gpu_preset("H100-SXM")
    capped = replace(h100, power_limit_W=500.0)
    assert capped.clock_fraction == pytest.approx((500 / 700) ** (1 / 3))
    flops = 1e15
    ratio = (compute.gemm_time(flops, 0, capped, "bf16") / compute.gemm_time(flops, 0, h100, "bf16"))
    assert ratio == pytest.approx(1 / capped.clock_fraction)
    assert compute.memory_bound_time(1e9, capped) == compute.memory_bound_time(1e9, h100)
    assert replace(h100, power_limit_W=800.0).clock_fraction == 1.0  # a cap above TDP: none


def test_torchtitan_eager_and_vanilla_tp_cost_more_than_compiled_and_async():
    from cost_models import megatron
    from cost_models.specs import Layout
    from planner.specfiles import load_cluster, load_model

    model, cluster = load_model("llama3.1-8b"), load_cluster("dgx-h100", nodes=1)
    base = dict(tp=8, pp=1, dp=1, micro_batch_size=1, global_batch_size=4, seq_len=8192,
                sequence_parallel=True, framework="torchtitan")
    step = {k: megatron.estimate(model, cluster, Layout(**base, **kw)).step_time_s
            for k, kw in {"eager": {}, "compiled": dict(torch_compile=True),
                          "async": dict(torch_compile=True, async_tp=True)}.items()}
    assert step["eager"] > step["compiled"] > step["async"]
    mega = {c: megatron.estimate(model, cluster, Layout(**{**base, "framework": "megatron"},
                                                        torch_compile=c)).step_time_s
            for c in (False, True)}
    assert mega[False] == mega[True] < step["async"] * 1.0001  # TE: fused and overlapped


def test_torchtitan_sdpa_attention_runs_at_the_gpu_factor():
    # PyTorch SDPA (FlashAttention-2 on Hopper) against TE's cuDNN attention: the fused
    # attention time scales by 1 / GpuSpec.sdpa_attention_factor for torchtitan layouts only
    from cost_models import flops as _flops
    from cost_models import megatron as _meg
    from cost_models.grid import LayoutGrid as _Grid
    from cost_models.specs import Layout as _Layout
    from planner.specfiles import gpu_preset as _gpu
    from planner.specfiles import load_model as _load

    model, gpu = _load("llama3.1-8b"), _gpu("H100-SXM")
    assert gpu.sdpa_attention_factor == 0.75 and _gpu("B200").sdpa_attention_factor == 1.0
    times = {}
    for fw in ("megatron", "torchtitan"):
        lay = _Layout(tp=1, pp=1, dp=8, micro_batch_size=1, global_batch_size=8, seq_len=8192,
                      framework=fw, fsdp=fw == "torchtitan")
        g = _Grid.from_layout(lay, model.num_layers)
        attn = _flops.attention_core_flops(model, 1, 8192)
        times[fw] = [float(x[0]) for x in _meg._attention_times(model, gpu, g, attn)]
    for titan, mega in zip(times["torchtitan"], times["megatron"], strict=True):
        assert titan == pytest.approx(mega / 0.75)


def test_te_fused_cross_entropy_keeps_only_the_bf16_logits():
    # TE's Triton loss writes the gradient into the bf16 logits in place: 2 bytes per logit
    # against Megatron's vocab-parallel loss with its fp32 softmax (6)
    from dataclasses import replace as _replace

    from cost_models import megatron as _meg
    from cost_models.memory import MEGATRON_LOGIT_BYTES, TE_LOGIT_BYTES
    from cost_models.specs import Layout as _Layout
    from planner.specfiles import load_cluster as _cluster
    from planner.specfiles import load_model as _load

    model, cluster = _load("llama3.1-8b"), _cluster("dgx-h100", nodes=1)
    lay = _Layout(tp=1, pp=1, dp=8, micro_batch_size=2, global_batch_size=16, seq_len=8192)
    plain = _meg.estimate(model, cluster, lay).memory.activations_bytes
    fused = _meg.estimate(model, cluster, _replace(lay, te_cross_entropy=True)).memory
    saved = (MEGATRON_LOGIT_BYTES - TE_LOGIT_BYTES) * 2 * 8192 * model.vocab_size
    assert plain - fused.activations_bytes == pytest.approx(saved)


def test_first_of_max_matches_argmax_with_ties():
    """The critical / fullest rank pick equals np.argmax over (first, last, mid), ties to the
    earlier rank (the search's ranking must not change with how it is computed)."""
    from cost_models.megatron import _first_of_max

    rng = np.random.default_rng(0)
    a, b, c = rng.integers(0, 3, size=(3, 2000)).astype(float)  # many ties
    take_last, take_mid = _first_of_max(a, b, c)
    picked = np.where(take_mid, 2, np.where(take_last, 1, 0))
    assert (picked == np.argmax(np.stack([a, b, c]), axis=0)).all()


def test_flash_attention_rate_falls_with_head_dim_as_flashattention3_measures():
    # Each score costs one softmax exponential on the SFUs besides 2·(d_qk + d_v) matmul
    # FLOPs, so small heads run further below the matmul rate. FlashAttention-3 on H100,
    # bf16 forward at 4k tokens (Shah et al. 2024, Fig. 5): 476 TFLOP/s at head dim 64 against
    # 638 at 128 (0.746). Blackwell Ultra doubles the SFU rate (tensor_flops_per_exp 512 ->
    # 256) at the same tensor rate, so its attention is faster than B200's at equal peaks.
    from cost_models import compute
    from planner.specfiles import gpu_preset as _gpu

    h100 = _gpu("H100-SXM")
    per_flop = {d: compute.attention_time(1e15, h100, "bf16", 0, flops_per_score=4 * d) / 1e15
                for d in (64, 128)}
    assert per_flop[128] / per_flop[64] == pytest.approx(476 / 638, rel=0.03)
    b200, b300 = _gpu("B200"), _gpu("B300")
    assert b200.peak_flops("bf16") == b300.peak_flops("bf16")
    fwd = {g.name: compute.attention_time(1e15, g, "bf16", 0, flops_per_score=512)
           for g in (b200, b300)}
    assert fwd["B300"] == pytest.approx(fwd["B200"] * 1.5 / 2.0)
    # without an SFU rate (or a per-score count) only the matmuls are timed
    plain = compute.attention_time(1e15, h100, "bf16", 0)
    assert plain == pytest.approx(1e15 / (h100.efficiency["bf16"].attention_fraction * 989e12))


def test_head_dim_enters_the_attention_core_time_through_the_exponentials():
    # gpt-oss's 64-wide heads: the same causal FLOPs take longer than at head dim 128, forward
    # (1 + 256/256 vs 1 + 256/512 on Hopper) and backward (2.5 + 1 vs 2.5 + 0.5)
    from dataclasses import replace as _replace

    from cost_models import megatron as _meg
    from cost_models.grid import LayoutGrid as _Grid
    from cost_models.specs import Layout as _Layout
    from planner.specfiles import gpu_preset as _gpu

    gpu = _gpu("H100-SXM")
    wide = load_model("llama3.1-8b")
    narrow = _replace(wide, head_dim=64, num_heads=2 * wide.num_heads)  # same q width
    lay = _Layout(tp=1, pp=1, dp=8, micro_batch_size=1, global_batch_size=8, seq_len=8192)
    g = _Grid.from_layout(lay, wide.num_layers)
    attn = flops.attention_core_flops(wide, 1, 8192)
    assert flops.attention_core_flops(narrow, 1, 8192) == attn
    ovh = gpu.efficiency["bf16"].overhead_s
    (wf, wb), (nf, nb) = (_meg._attention_times(m, gpu, g, attn) for m in (wide, narrow))
    assert (float(nf[0]) - ovh) / (float(wf[0]) - ovh) == pytest.approx(2.0 / 1.5)
    assert (float(nb[0]) - 2 * ovh) / (float(wb[0]) - 2 * ovh) == pytest.approx(3.5 / 3.0)
