"""Hybrid Mamba-2 / attention / MoE models (Nemotron-H, Nemotron 3): the layer pattern, the
Mamba-2 parameter and FLOP counts, its time and memory, and the CLI's answers."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import flops, mamba, megatron, memory
from cost_models.grid import LayoutGrid
from cost_models.specs import Layout, ModelSpec, SpecError
from planner.specfiles import gpu_preset, load_cluster, load_model, model_from_config

# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config.json (the keys that shape the network)
NANO = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "num_hidden_layers": 52, "hidden_size": 2688, "intermediate_size": 1856,
        "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
        "vocab_size": 131072, "max_position_embeddings": 262144, "mlp_hidden_act": "relu2",
        "mamba_hidden_act": "silu", "mamba_num_heads": 64, "mamba_head_dim": 64,
        "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "chunk_size": 128, "expand": 2,
        "n_routed_experts": 128, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
        "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 3712,
        "tie_word_embeddings": False}
# nvidia/Nemotron-H-8B-Base-8K config.json: a dense hybrid (no experts), attention_head_dim
H8B = {**{k: v for k, v in NANO.items()
          if not k.startswith(("moe_", "n_routed", "n_shared", "num_experts"))},
       "hidden_size": 4096, "intermediate_size": 21504,
       "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
       "num_key_value_heads": 8, "attention_head_dim": 128, "max_position_embeddings": 8192,
       "mamba_num_heads": 128}
del H8B["head_dim"]


def test_nemotron3_nano_parameters_match_the_published_sizes():
    """NVIDIA 2025, Nemotron 3 Nano technical report / model card: 31.6B total parameters,
    3.2B active (3.6B with the embeddings)."""
    m = model_from_config(NANO, "nano")
    assert (m.mamba_layers, m.attention_layers, m.num_moe_layers, m.dense_mlp_layers) == \
        (23, 6, 23, 0)
    assert m.norms_per_layer == 1 and m.mlp_kind == "squared_relu"
    assert flops.parameter_count(m) == pytest.approx(31.6e9, rel=0.01)
    assert flops.active_parameter_count(m) == pytest.approx(3.6e9, rel=0.01)
    assert flops.active_parameter_count(m, count_embedding=False) == pytest.approx(3.2e9, rel=0.01)


def test_mamba_mixer_parameters_by_hand():
    """One Nano Mamba-2 mixer: in_proj 2688 x (2·4096 + 2·8·128 + 64), conv (4096 + 2048) x
    (4 + 1), dt_bias/A_log/D 3·64, gated norm 4096, out_proj 4096 x 2688."""
    m = model_from_config(NANO, "nano")
    want = 2688 * 10304 + 6144 * 5 + 3 * 64 + 4096 + 4096 * 2688
    assert flops.mamba_params(m) == want
    assert memory.dense_layer_params(m) == pytest.approx(
        (23 * want + 6 * flops.attention_params(m) + 23 * flops.moe_shared_params(m)) / 52
        + flops.norm_params(m))


def test_dense_hybrid_parses_with_attention_head_dim():
    m = model_from_config(H8B, "h8b")
    assert not m.is_moe and m.head_dim == 128
    assert (m.mamba_layers, m.attention_layers, m.dense_mlp_layers) == (24, 4, 24)
    assert m.active_ffn_width == pytest.approx(21504 * 24 / 52)


def test_ssd_scan_flops_by_hand():
    """Dao & Gu 2024 Sec. 6, chunk Q: per token 2·G·Q·N (C·B^T per group) + H·(2·Q·P + 4·N·P)
    (masked product, chunk state, state output), plus the convolution 2·(H·P + 2·G·N)·K."""
    m = model_from_config(NANO, "nano")
    per_token = 2 * 8 * 128 * 128 + 64 * (2 * 128 * 64 + 4 * 128 * 64) + 2 * 6144 * 4
    assert flops.mamba_scan_flops(m, 1000) == 1000 * per_token
    # the projections dominate the mixer: the scan is a few percent of its FLOPs
    assert flops.mamba_scan_flops(m, 1) < 0.1 * flops.mamba_proj_flops(m, 1)


def _pair(name: str = "llama3-8b") -> tuple[ModelSpec, ModelSpec]:
    """A transformer and the same network written as a hybrid pattern: each layer split into
    an attention block (*) and its MLP block (- dense, E mixture of experts)."""
    dense = replace(load_model(name), mtp_layers=0)
    mlps = ["-"] * dense.num_dense_layers + ["E"] * dense.num_moe_layers if dense.is_moe \
        else ["-"] * dense.num_layers
    return dense, replace(dense, num_layers=2 * dense.num_layers, norms_per_layer=1,
                          num_dense_layers=0, moe_layer_every=1,
                          layer_pattern="".join("*" + mlp for mlp in mlps))


@pytest.mark.parametrize("name,nodes,dims", [
    ("llama3-8b", 2, dict(tp=4, pp=2, dp=2, sequence_parallel=True, recompute="selective")),
    ("llama3-8b", 2, dict(tp=2, pp=4, dp=2, pipeline_schedule="zb-h1", dtype="fp8")),
    ("llama3-8b", 1, dict(tp=2, pp=1, dp=4, flash_attention=False, recompute="selective",
                          recompute_modules=("core_attn", "layernorm"))),
    ("qwen3-30b-a3b", 2, dict(tp=1, pp=2, dp=8, ep=8)),
    ("deepseek-v3", 32, dict(tp=2, pp=8, dp=16, ep=16, recompute="selective",
                             recompute_modules=("layernorm", "moe_act", "mla_up_proj"),
                             layers_per_stage=(8, 8, 8, 8, 8, 7, 7, 7))),
])
def test_pattern_of_attention_and_mlp_blocks_is_the_transformer(name, nodes, dims):
    """Written as `*-*-...` (`*E` for MoE layers) a transformer keeps its parameters, FLOPs,
    step time and memory: the pattern's per-layer averages must add up to the classic layer
    (dense, MoE, MLA, fp8, zero-bubble, unfused attention with core_attn recompute)."""
    dense, hybrid = _pair(name)
    assert flops.parameter_count(hybrid) == flops.parameter_count(dense)
    assert flops.model_flops_per_step(hybrid, 8, 4096) == pytest.approx(
        flops.model_flops_per_step(dense, 8, 4096), rel=1e-12)
    cluster = load_cluster("dgx-h100", nodes=nodes)
    lay = Layout(micro_batch_size=1, global_batch_size=256, seq_len=4096, **dims)
    split = dims.get("layers_per_stage")  # the same layers per stage: twice the blocks
    a = megatron.estimate(dense, cluster, lay)
    b = megatron.estimate(hybrid, cluster, replace(
        lay, layers_per_stage=split and tuple(2 * n for n in split)))
    assert b.step_time_s == pytest.approx(a.step_time_s, rel=1e-9)
    assert b.time.tp_comm_s == pytest.approx(a.time.tp_comm_s, rel=1e-9)
    assert b.memory.weights_bytes == pytest.approx(a.memory.weights_bytes, rel=1e-9)
    if not dims.get("flash_attention", True):  # the transient scores of one attention block
        assert b.memory.activations_bytes < a.memory.activations_bytes
    elif dims.get("recompute", "none") != "none":  # one block rematerialised, not one layer
        assert b.memory.activations_bytes == pytest.approx(a.memory.activations_bytes, rel=0.01)
    else:
        assert b.memory.activations_bytes == pytest.approx(a.memory.activations_bytes, rel=1e-9)


def test_hybrid_with_multi_token_prediction_is_refused():
    with pytest.raises(SpecError, match="multi-token prediction on a hybrid"):
        replace(load_model("nemotron-3-nano-30b-a3b"), mtp_layers=1)


def test_mamba_mixer_time_scales_with_tokens_and_tp():
    m = model_from_config(NANO, "nano")
    gpu = gpu_preset("B200")
    f1, b1 = mamba.mixer_times(m, gpu, 8192, 1)
    f2, _ = mamba.mixer_times(m, gpu, 16384, 1)
    f3, _ = mamba.mixer_times(m, gpu, 24576, 1)
    ft, _ = mamba.mixer_times(m, gpu, 16384, 2)
    assert 0 < f1 < b1
    assert f3 - f2 == pytest.approx(f2 - f1, rel=1e-9)  # linear in tokens past the launches
    assert f2 - f1 > 0.5 * f1
    assert ft == pytest.approx(f1, rel=1e-9)  # tp splits the heads: half the work per GPU
    assert mamba.mixer_times(load_model("llama3-8b"), gpu, 8192, 1) == (0.0, 0.0)


def test_mamba_layers_cost_time_and_memory():
    """Removing the scan's work (a model whose M layers had no SSD) must make the layer
    faster; the Mamba activations must show in the per-layer bytes."""
    m = load_model("nemotron-3-nano-30b-a3b")
    cluster = load_cluster("dgx-b200", nodes=1)
    g = LayoutGrid.from_layout(Layout(tp=1, pp=1, dp=8, ep=8, micro_batch_size=2,
                                      global_batch_size=512, seq_len=8192), m.num_layers)
    with_scan = megatron.layer_base(m, cluster.gpu, cluster, g)
    f, b = mamba.mixer_times(m, cluster.gpu, 2 * 8192, 1)
    assert float(with_scan.fwd_s[0]) > f > 0
    kept = memory.activation_bytes_per_layer(m, 2, 8192, 1)
    no_mamba = memory.activation_bytes_per_layer(replace(m, layer_pattern=m.layer_pattern.replace(
        "M", "-")), 2, 8192, 1)
    assert kept != no_mamba


@pytest.mark.parametrize("change,words", [
    (dict(layer_pattern="MEX"), "layer_pattern must be a string"),
    (dict(layer_pattern="ME"), "layer_pattern has 2 layers"),
    (dict(num_experts=0, experts_top_k=0), "has E (MoE) layers"),
    (dict(mamba_state_dim=0), "need mamba_num_heads"),
    (dict(mamba_groups=3), "not a multiple of mamba_groups"),
    (dict(num_dense_layers=1), "leave num_dense_layers"),
])
def test_bad_patterns_are_one_clear_error(change, words):
    m = model_from_config(NANO, "nano")
    with pytest.raises(SpecError, match=re.escape(words)):
        replace(m, **change)


def test_tp_must_split_the_mamba_heads_and_groups():
    m = replace(load_model("nemotron-3-nano-30b-a3b"), mamba_groups=1)
    lay = Layout(tp=2, pp=1, dp=4, ep=4, micro_batch_size=1, global_batch_size=64,
                 seq_len=4096)
    with pytest.raises(SpecError, match="Mamba heads"):
        megatron.estimate(m, load_cluster("dgx-b200", nodes=1), lay)


def test_latent_moe_configs_are_refused_clearly():
    with pytest.raises(SpecError, match="latent MoE"):
        model_from_config({**NANO, "moe_latent_size": 1024}, "super")


def meshplan(*args):
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True)


BASE = ["--model", "nemotron-3-nano-30b-a3b", "--cluster", "dgx-b200", "--nodes", "1",
        "--seq-len", "8192", "--global-batch-size", "512", "--micro-batch-size", "2",
        "--ep", "8", "--pp", "1"]


def test_estimate_cli_on_the_published_layout():
    r = meshplan("estimate", *BASE, "--tp", "1", "--dtype", "mxfp8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and 5 < out["step_time_s"] < 60


@pytest.mark.parametrize("extra,words", [
    (["--tp", "1", "--cp", "2", "--nodes", "2"], "cp > 1 with Mamba layers"),
    (["--tp", "4", "--nodes", "1"], "does not divide the model's 2 KV heads"),
    (["--tp", "1", "--framework", "torchtitan"], "torchtitan has no Mamba"),
])
def test_estimate_cli_refuses_what_it_cannot_model(extra, words):
    r = meshplan("estimate", *BASE, *extra)
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_plan_then_launch_writes_megatron_hybrid_files(tmp_path):
    """`meshplan plan` then `launch --framework megatron` as processes: the Megatron arguments
    carry the pattern and Mamba shape, the torchtitan files are left out (no Mamba there) and
    --framework torchtitan is one line, nothing written."""
    plan = tmp_path / "plan.yaml"
    r = meshplan("plan", "--model", "nemotron-3-nano-30b-a3b", "--cluster", "dgx-b200",
                 "--nodes", "1", "--seq-len", "8192", "--global-batch-size", "512",
                 "-o", str(plan))
    assert r.returncode == 0, r.stderr
    script = tmp_path / "train.py"
    script.write_text("")
    out = tmp_path / "launch"
    r = meshplan("launch", str(plan), "--script", str(script), "-o", str(out),
                 "--framework", "megatron")
    assert r.returncode == 0, r.stderr
    assert "pretrain_hybrid.py" in r.stderr
    args = (out / "megatron_args.sh").read_text()
    assert "--hybrid-layer-pattern" in args and "--mamba-num-heads 64" in args
    assert not (out / "torchtitan_args.sh").exists()
    bad = tmp_path / "titan"
    r = meshplan("launch", str(plan), "--script", str(script), "-o", str(bad),
                 "--framework", "torchtitan")
    assert r.returncode == 2 and "torchtitan has no Mamba" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not bad.exists()


def test_nano_preset_is_the_cited_config():
    preset = load_model("nemotron-3-nano-30b-a3b")
    assert replace(preset, name="n") == replace(model_from_config(NANO, "nano"), name="n")


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="M*-E", min_size=2, max_size=24), st.sampled_from([1, 2]),
       st.sampled_from(["bf16", "fp8"]), st.booleans())
def test_any_pattern_adds_up(pattern, tp, dtype, recompute):
    """Any pattern: parameters are the per-kind counts times the per-kind sizes, and an
    estimate gives a finite, positive step and memory (no layer kind left unpriced)."""
    base = model_from_config(NANO, "nano")
    moe = "E" in pattern
    m = replace(base, num_layers=len(pattern), layer_pattern=pattern,
                **({} if moe else dict(num_experts=0, experts_top_k=0,
                                       expert_ffn_hidden_size=0, num_shared_experts=0,
                                       shared_expert_ffn_hidden_size=0)))
    per_kind = {"M": flops.mamba_params(m), "*": flops.attention_params(m),
                "-": flops.dense_mlp_params(m),
                "E": (m.num_experts * flops.routed_expert_params(m) + flops.moe_shared_params(m))
                if moe else 0}
    body = sum(per_kind[c] for c in pattern) + len(pattern) * flops.norm_params(m)
    embed = 2 * m.vocab_size * m.hidden_size + m.hidden_size
    assert flops.parameter_count(m) == body + embed
    lay = Layout(tp=tp, pp=1, dp=8 // tp, ep=8 // tp if moe else 1, etp=1 if moe else None,
                 micro_batch_size=1, global_batch_size=64, seq_len=4096, dtype=dtype,
                 sequence_parallel=tp > 1, recompute="selective" if recompute else "none")
    est = megatron.estimate(m, load_cluster("dgx-h100", nodes=1), lay)
    assert 0 < est.step_time_s < 1e4 and est.memory.activations_bytes > 0


def test_the_documented_hybrid_model_file_loads(tmp_path):
    """docs/models.md's hybrid model-file example is a valid meshplan model file."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    block = text.split("A hybrid meshplan model file")[1].split("```yaml")[1].split("```")[0]
    path = tmp_path / "hybrid.yaml"
    path.write_text(block)
    m = load_model(str(path))
    assert (m.mamba_layers, m.attention_layers, m.dense_mlp_layers) == (4, 1, 3)
    assert m.mamba_inner == 4096
