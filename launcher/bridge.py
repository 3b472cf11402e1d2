"""A Megatron-Bridge recipe override for a plan: `apply_meshplan(cfg)` on a ConfigContainer.

Megatron-Bridge (`pip install megatron-bridge`, checked at 0.3.1 with megatron-core 0.16.1) is
NVIDIA's current training entry point: a recipe builds a `ConfigContainer` whose `model` is a
GPTModelProvider (a megatron-core TransformerConfig), with `train`, `dataset`, `ddp`,
`optimizer`, `comm_overlap` and `mixed_precision` beside it. The override sets on it what
launcher/megatron.py writes as Megatron-LM flags, field for field, so the two say the same:
the same TransformerConfig values that benchmarks/check_megatron_args.py compares with the
plan. tests/test_framework_bridge.py checks every field name against those classes' source in
the released wheels (they do not import without transformers, TE and a GPU stack).
"""

from __future__ import annotations

from planner.planfile import Plan

from .architecture import architecture, transformer_config_fields
from .megatron import tp_overlap_assumed

# Megatron-Bridge mixed-precision recipe names (training/mixed_precision.py, `register`).
# fp8: per-tensor current scaling, the recipe of the Megatron-LM flags (FP8_RECIPE); mxfp8:
# fp8 'e4m3' with fp8_recipe 'mxfp8', fp8_param_gather and reuse_grad_buf_for_mxfp8_param_ag.
PRECISION = {"bf16": "bf16_mixed", "fp8": "bf16_with_fp8_current_scaling_mixed",
             "mxfp8": "bf16_with_mxfp8_mixed"}


def _pipeline_fields(plan: Plan) -> dict[str, object]:
    lay, sizes = plan.layout, [s.num_layers for s in plan.stages]
    out: dict[str, object] = {"virtual_pipeline_model_parallel_size": lay.vp if lay.vp > 1 else None}
    if lay.pp == 1 or len(set(sizes)) == 1:
        return out
    if lay.vp == 1 and len(set(sizes[1:-1])) <= 1:
        out.update(num_layers_in_first_pipeline_stage=sizes[0],
                   num_layers_in_last_pipeline_stage=sizes[-1])
        return out
    parts = [f"t*{n}" for n in sizes]
    parts[0], parts[-1] = "E" + parts[0], parts[-1] + "L"
    out["pipeline_model_parallel_layout"] = "|".join(parts)
    return out


def model_fields(plan: Plan) -> dict[str, object]:
    """GPTModelProvider / TransformerConfig field -> value."""
    m, lay = plan.model, plan.layout
    arch = architecture(m)[0]
    out: dict[str, object] = {
        "tensor_model_parallel_size": lay.tp, "pipeline_model_parallel_size": lay.pp,
        "context_parallel_size": lay.cp, "expert_model_parallel_size": lay.ep,
        "sequence_parallel": lay.sequence_parallel and lay.tp > 1,
        "seq_length": lay.seq_len, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.ffn_hidden_size, "num_attention_heads": m.num_heads,
        "num_query_groups": m.num_kv_heads, "kv_channels": m.head_dim,
        "share_embeddings_and_output_weights": m.tied_embeddings,
        **transformer_config_fields(m, arch),
        "position_embedding_type": arch.position_embedding,
        "recompute_granularity": None if lay.recompute == "none" else lay.recompute,
    }
    if lay.recompute == "full":
        out.update(recompute_method="uniform", recompute_num_layers=1)
    if arch.position_embedding == "rope":
        out.update(rotary_base=arch.rope_theta, rotary_percent=arch.rotary_fraction)
        if arch.rope_scaling is not None and arch.rope_scaling.kind == "llama3":
            out.update(rope_scaling=True, rope_scaling_factor=arch.rope_scaling.factor)
    if m.is_moe:
        flex = lay.moe_dispatcher != "alltoall"
        out.update(num_moe_experts=m.num_experts, moe_router_topk=m.experts_top_k,
                   moe_ffn_hidden_size=m.expert_ffn_hidden_size,
                   moe_token_dispatcher_type="flex" if flex else "alltoall",
                   moe_grouped_gemm=True,
                   overlap_moe_expert_parallel_comm=lay.moe_a2a_overlap)
        if flex:
            out["moe_flex_dispatcher_backend"] = lay.moe_dispatcher
        if m.shared_expert_ffn_hidden_size:
            out["moe_shared_expert_intermediate_size"] = m.shared_expert_ffn_hidden_size
    if m.layer_pattern:  # a hybrid recipe's MambaModelProvider (megatron-bridge 0.3.1)
        out.update(hybrid_override_pattern=m.layer_pattern, mamba_num_heads=m.mamba_num_heads,
                   mamba_head_dim=m.mamba_head_dim, mamba_state_dim=m.mamba_state_dim,
                   mamba_num_groups=m.mamba_groups)
    if m.mtp_layers:  # multi-token prediction modules on the last stage (estimated there)
        out["mtp_num_layers"] = m.mtp_layers
    if lay.te_cross_entropy:  # the loss the memory estimate priced (`memory.TE_LOGIT_BYTES`)
        out.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    if lay.cuda_graph_modules:  # Transformer Engine per-module graphs (megatron-core 0.16.1
        # spells the module list cuda_graph_scope; Megatron-LM@d98e8a64 --cuda-graph-modules)
        out.update(cuda_graph_impl="transformer_engine",
                   cuda_graph_scope=list(lay.cuda_graph_modules))
    out.update(_pipeline_fields(plan))
    return out


def other_fields(plan: Plan) -> dict[str, dict[str, object]]:
    """ConfigContainer section -> field -> value, besides the model."""
    lay, gpu = plan.layout, plan.cluster.gpu
    overlap = lay.dims.group("dp_cp").size > 1 and gpu.dp_comm_overlap > 0
    return {
        "train": {"micro_batch_size": lay.micro_batch_size,
                  "global_batch_size": lay.global_batch_size},
        "dataset": {"sequence_length": lay.seq_len},
        "ddp": {"use_distributed_optimizer": lay.distributed_optimizer or lay.fsdp,
                "overlap_grad_reduce": overlap,
                "overlap_param_gather": overlap and (lay.distributed_optimizer or lay.fsdp),
                # Bridge's mixed_precision.grad_reduce_in_fp32 is applied over this one at
                # setup: its perf recipes set both (llama31_llm_pretrain.py).
                "grad_reduce_in_fp32": lay.grad_reduce_fp32,
                **_fsdp_fields(plan)},
        "optimizer": {"use_distributed_optimizer": lay.distributed_optimizer or lay.fsdp},
    }


def _fsdp_fields(plan: Plan) -> dict[str, object]:
    """Megatron-FSDP in megatron-core's DistributedDataParallelConfig: ZeRO-3 sharding
    (optim_grads_params) or ZeRO-2 (optim_grads, `Layout.fsdp_strategy`) and, for HSDP, the replicated outer dp as
    num_distributed_optimizer_instances (what Bridge's GB200 405B recipe sets with FSDP)."""
    lay = plan.layout
    if not lay.fsdp:
        return {}
    out: dict[str, object] = {"use_megatron_fsdp": True,
                              "data_parallel_sharding_strategy": lay.fsdp_strategy}
    if lay.dp_replicate > 1:
        out["num_distributed_optimizer_instances"] = lay.dp_replicate
    return out


def hybrid_split_problem(plan: Plan) -> str | None:
    """Why megatron-core 0.16.1's MambaBlock (what Megatron-Bridge 0.3.1 builds hybrids with)
    cannot build the plan's stages, or None: it has no virtual stages and splits layers
    evenly or with a different first / last stage only."""
    lay, sizes = plan.layout, [s.num_layers for s in plan.stages]
    if not plan.model.layer_pattern or lay.pp == 1:
        return None
    if lay.vp > 1:
        return "interleaved (vp > 1) stages"
    if len(set(sizes)) > 1 and len(set(sizes[1:-1])) > 1:
        return f"the uneven middle stages {sizes[1:-1]}"
    return None


def recipe_override_py(plan: Plan) -> str:
    """Python source of `apply_meshplan(cfg)` for a Megatron-Bridge recipe's ConfigContainer
    (for a hybrid whose stages Bridge 0.3.1 cannot build, one that raises saying so)."""
    problem = hybrid_split_problem(plan)
    if problem:
        why = (f"Megatron-Bridge 0.3.1 builds hybrid models with megatron-core 0.16.1 "
               f"MambaBlock, which cannot build {problem}; run Megatron-LM with "
               "megatron_args.sh (pretrain_hybrid.py) or re-plan with --vp 1")
        return "\n".join([
            '"""meshplan plan as a Megatron-Bridge (0.3.x) recipe override: not expressible."""',
            "", "", "def apply_meshplan(cfg):", f"    raise NotImplementedError({why!r})", ""])
    lines = [
        '"""meshplan plan as a Megatron-Bridge (0.3.x) recipe override.',
        "",
        "    cfg = llama31_70b_pretrain_config(...)   # any recipe building a ConfigContainer",
        "    cfg = apply_meshplan(cfg)",
        '"""',
        "",
        "",
        "def apply_meshplan(cfg):",
        '    """Set the plan\'s layout, model, batch, overlaps and precision on cfg."""',
        "    from megatron.bridge.training.comm_overlap import CommOverlapConfig",
        "",
    ]
    if plan.model.mlp_kind == "squared_relu":
        lines.append("    from megatron.core.activations import squared_relu")
        lines.append("    cfg.model.activation_func = squared_relu")
    elif plan.model.mlp_kind == "gated_silu":
        lines.append("    import torch.nn.functional as F")
        lines.append("    cfg.model.activation_func = F.silu")
    for key, value in model_fields(plan).items():
        lines.append(f"    cfg.model.{key} = {value!r}")
    for section, values in other_fields(plan).items():
        for key, value in values.items():
            lines.append(f"    cfg.{section}.{key} = {value!r}")
    lines.append(f"    cfg.comm_overlap = CommOverlapConfig(tp_comm_overlap={tp_overlap_assumed(plan)!r})")
    lines.append(f"    cfg.mixed_precision = {PRECISION[plan.layout.dtype]!r}")
    lines.append("    return cfg")
    return "\n".join(lines) + "\n"
