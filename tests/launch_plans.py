"""The plans issue 16's acceptance names, as `meshplan plan` picks them (dgx-h100, seq 8192,
global batch 128), plus one plan per other model family; shared by the framework tests.

Layouts and uneven splits are the ones `meshplan plan` chose for these problems:
  8b        --model llama3.1-8b  --nodes 1                            -> tp2 dp4 sp
  70b-vp    --model llama3.1-70b --nodes 8 --tp 4 --pp 4 --vp 2 --cp 2 -> tp4 pp4 cp2 dp2 vp2
  70b-pp3   --model llama3.1-70b --nodes 6 --pp 3                      -> tp4 pp3 cp2 dp2, 27/27/26
  70b-fp8   --model llama3.1-70b --nodes 6 --pp 6 --dtype fp8          -> tp2 pp6 cp4, 13/14/14/13/13/13
  mixtral   --model mixtral-8x7b --nodes 2 --ep 8                      -> pp2 cp4 dp2 ep8 vp3, 5/6/6/5/5/5
  8b-fsdp   --model llama3.1-8b  --nodes 1 --tp 1 --pp 1 --fsdp      -> dp8 FSDP2
  8b-hsdp   --model llama3.1-8b  --nodes 2 --tp 2 --fsdp --dp-replicate 2 -> tp2 dp8 (4 x 2)
"""

from __future__ import annotations

from cost_models import megatron as cost_model
from cost_models.specs import Layout
from planner.planfile import Plan
from planner.specfiles import load_cluster, load_model

ACCEPTANCE = {
    "8b": ("llama3.1-8b", 1, dict(tp=2, pp=1, dp=4, sequence_parallel=True)),
    "70b-vp": ("llama3.1-70b", 8, dict(tp=4, pp=4, dp=2, cp=2, vp=2, sequence_parallel=True)),
    "70b-pp3": ("llama3.1-70b", 6, dict(tp=4, pp=3, dp=2, cp=2, sequence_parallel=True,
                                        layers_per_stage=(27, 27, 26))),
    "70b-fp8": ("llama3.1-70b", 6, dict(tp=2, pp=6, dp=1, cp=4, sequence_parallel=True,
                                        dtype="fp8", layers_per_stage=(13, 14, 14, 13, 13, 13))),
    "mixtral-ep8": ("mixtral-8x7b", 2, dict(tp=1, pp=2, dp=2, cp=4, ep=8, vp=3,
                                            layers_per_stage=(5, 6, 6, 5, 5, 5))),
    "8b-fsdp": ("llama3.1-8b", 1, dict(tp=1, pp=1, dp=8, fsdp=True, framework="torchtitan")),
    "8b-hsdp": ("llama3.1-8b", 2, dict(tp=2, pp=1, dp=8, fsdp=True, dp_replicate=2,
                                       sequence_parallel=True, framework="torchtitan",
                                       torch_compile=True, async_tp=True)),
}
FAMILIES = {
    "qwen2.5-7b": ("qwen2.5-7b", 1, dict(tp=2, pp=1, dp=4, sequence_parallel=True)),
    "qwen3-8b": ("qwen3-8b", 1, dict(tp=2, pp=2, dp=2, sequence_parallel=True)),
    "mistral-7b": ("mistral-7b", 1, dict(tp=1, pp=2, dp=4)),
    "nemotron-4-15b": ("nemotron-4-15b", 2, dict(tp=4, pp=2, dp=2, sequence_parallel=True)),
    "gpt3-175b": ("gpt3-175b", 16, dict(tp=8, pp=8, dp=2, vp=3, sequence_parallel=True,
                                        recompute="selective")),
    "qwen3-8b-modules": ("qwen3-8b", 1, dict(tp=2, pp=2, dp=2, sequence_parallel=True,
                                             recompute="selective",
                                             recompute_modules=("layernorm", "mlp"))),
    "deepseek-v3-modules": ("deepseek-v3", 32, dict(
        tp=2, pp=8, dp=16, ep=16, recompute="selective",
        recompute_modules=("layernorm", "moe_act", "mla_up_proj"),
        layers_per_stage=(7, 8, 8, 8, 8, 8, 8, 6))),
    # Megatron-Bridge-style MoE extras: expert A2A overlap (needs vp > 1 with pp > 1), the
    # flex dispatcher's DeepEP backend and per-module CUDA graphs of attention and router.
    "mixtral-overlap": ("mixtral-8x7b", 2, dict(
        tp=1, pp=2, dp=2, cp=4, ep=8, vp=3, layers_per_stage=(5, 6, 6, 5, 5, 5),
        moe_a2a_overlap=True, moe_dispatcher="deepep",
        cuda_graph_modules=("attn", "moe_router", "moe_preprocess"))),
    # Transformer Engine's fused loss: the Bridge override sets it, Megatron-LM cannot
    "70b-te-loss": ("llama3.1-70b", 8, dict(tp=8, pp=1, dp=8, sequence_parallel=True,
                                            te_cross_entropy=True)),
    "70b-offload": ("llama3.1-70b", 8, dict(tp=8, pp=1, dp=8, sequence_parallel=True,
                                            offload_activation_layers=40)),
    # torchtitan FSDP2 keeping the gathered blocks until their backward
    "8b-fsdp-never": ("llama3.1-8b", 1, dict(tp=1, pp=1, dp=8, fsdp=True, framework="torchtitan",
                                              fsdp_reshard_after_forward="never")),
    # Megatron-FSDP ZeRO-2 (--data-parallel-sharding-strategy optim_grads)
    "8b-zero2": ("llama3.1-8b", 2, dict(tp=1, pp=1, dp=16, fsdp=True,
                                         fsdp_strategy="optim_grads")),
    "deepseek-v3": ("deepseek-v3", 32, dict(tp=2, pp=8, dp=16, ep=16, recompute="full",
                                            layers_per_stage=(7, 8, 8, 8, 8, 8, 8, 6))),
    # a hybrid (Mamba-2 / attention / MoE) model: the stages are '|' in its layer pattern
    "nemotron3-nano": ("nemotron-3-nano-30b-a3b", 2, dict(tp=2, pp=2, dp=4, ep=8, etp=1, vp=2,
                                                          sequence_parallel=True,
                                                          layers_per_stage=(14, 13, 13, 12))),
    # MoE parallel folding: ep 32 over tp 2 x dp 16 (ep > dp), whole experts (etp 1).
    "deepseek-v3-fold": ("deepseek-v3", 32, dict(tp=2, pp=8, dp=16, ep=32, etp=1,
                                                 recompute="full", cuda_graphs=True,
                                                 layers_per_stage=(7, 8, 8, 8, 8, 8, 8, 6))),
}


def make(name: str, table: dict = ACCEPTANCE) -> Plan:
    """The named plan, with its estimate (as `meshplan plan -o` writes it)."""
    model_name, nodes, dims = table[name]
    model, cluster = load_model(model_name), load_cluster("dgx-h100", nodes=nodes)
    seq = 2048 if model_name.startswith("gpt") else 8192
    layout = Layout(micro_batch_size=1, global_batch_size=128 if nodes < 16 else 512,
                    seq_len=seq, **dims)
    layout.validate(model, cluster.world_size)
    est = cost_model.estimate(model, cluster, layout)
    return Plan(model, cluster, layout, tuple(n.name for n in cluster.nodes),
                {"step_time_s": est.step_time_s})


def all_plans() -> dict[str, Plan]:
    return {**{k: make(k) for k in ACCEPTANCE}, **{k: make(k, FAMILIES) for k in FAMILIES}}


def nvl72(trays: int = 72, dtype: str = "mxfp8", **dims) -> Plan:
    """Llama 3.1 405B on GB200 NVL72 trays (4 GPUs each, 18 per rack), as `meshplan plan`
    chose it for 72 trays (tp4 pp6 cp4 dp3), in MXFP8 unless told otherwise."""
    model, cluster = load_model("llama3.1-405b"), load_cluster("gb200-nvl72", nodes=trays)
    dims = dims or dict(tp=4, pp=6, cp=4, dp=trays * 4 // 96)
    layout = Layout(micro_batch_size=1, global_batch_size=288, seq_len=8192, dtype=dtype,
                    sequence_parallel=True, **dims)
    layout.validate(model, cluster.world_size)
    est = cost_model.estimate(model, cluster, layout)
    return Plan(model, cluster, layout, tuple(n.name for n in cluster.nodes),
                {"step_time_s": est.step_time_s})
