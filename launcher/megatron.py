"""Megatron-LM arguments for a plan (`pretrain_gpt.py`; hybrid Mamba models: `pretrain_hybrid.py`):
layout, schedule, model, overlaps, fp8.

Every flag is a real one of NVIDIA/Megatron-LM@d98e8a64 (tests/data/framework_args_megatron.txt
lists them all; benchmarks/check_megatron_args.py feeds the arguments to Megatron's own
parse_args, validate_args and core_transformer_config_from_args and compares the result
with the plan). What the arguments say, term by term:

- layout: --tensor/pipeline/context/expert-model-parallel-size; the pipeline split as
  --num-layers-per-virtual-pipeline-stage, --decoder-first/last-pipeline-num-layers or
  --pipeline-model-parallel-layout (one entry per virtual stage, model order).
- the network: every architecture flag the planned model needs (launcher.architecture),
  dropout 0 unless the model was trained with it; a hybrid's layer pattern with '|' between
  its pipeline stages (--hybrid-layer-pattern: Megatron builds the stages from the segments),
  its Mamba-2 shape and the hybrid layer spec.
- what the cost model assumed (cost_models/megatron.py): TE userbuffer TP overlap when the
  GPU's tp_comm_overlap > 0 and sequence parallelism is on (--tp-comm-overlap), the DP
  reduction overlapped with the last backward (--overlap-grad-reduce, and
  --overlap-param-gather with the distributed optimizer), the MoE token all-to-all
  (--moe-token-dispatcher-type alltoall, --moe-grouped-gemm).
- Megatron asserts CUDA_DEVICE_MAX_CONNECTIONS=1 for tp > 1 or cp > 1 before Blackwell
  (megatron/training/arguments.py, validate_args): `megatron_env` exports it.
"""

from __future__ import annotations

from cost_models.memory import MEGATRON_LOGIT_BYTES, TE_LOGIT_BYTES
from cost_models.specs import GiB
from planner.planfile import Plan

from .architecture import Architecture, architecture

# GPU preset name -> CUDA compute capability major (arguments.py get_device_arch_version).
_ARCH_MAJOR = {"A100-40": 8, "A100-80": 8, "H100-SXM": 9, "H200": 9, "B200": 10}
FP8_RECIPE = "tensorwise"  # per-tensor current scaling (Megatron-Bridge's H100 FP8 recipes)


def _flag(name: str, value: object) -> list[str]:
    return [f"--{name}", str(value)]


def cuda_arch_major(plan: Plan) -> int | None:
    """Compute capability major of the plan's GPU (None: not an NVIDIA GPU / unknown)."""
    return _ARCH_MAJOR.get(plan.cluster.gpu.name)


def megatron_env(plan: Plan) -> dict[str, str]:
    """Environment Megatron-LM requires for this plan (validate_args asserts it)."""
    lay, arch = plan.layout, cuda_arch_major(plan)
    # Megatron-FSDP asserts the opposite (CUDA_DEVICE_MAX_CONNECTIONS unset or > 1) and only
    # warns about tp/cp with it (validate_args, NVIDIA/Megatron-LM@d98e8a64).
    if lay.fsdp:
        return {}
    if (lay.tp > 1 or lay.cp > 1) and (arch is None or arch < 10):  # unknown GPU: set it
        return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    return {}


def megatron_pipeline_args(plan: Plan) -> list[str]:
    """Megatron's pipeline split for the plan's (possibly uneven, interleaved) stages.

    Even stages: nothing (vp = 1) or --num-layers-per-virtual-pipeline-stage. Uneven with
    vp = 1 and equal middle stages: --decoder-first/last-pipeline-num-layers. Anything else:
    --pipeline-model-parallel-layout, one '|'-separated entry per virtual stage in model order
    (E = embedding, t = transformer layer, L = loss), which Megatron assigns to pp rank k % pp
    like planner.planfile.stage_ranges.
    """
    layout, sizes = plan.layout, [s.num_layers for s in plan.stages]
    if plan.model.layer_pattern:  # a hybrid's stages are '|' in its pattern (`_hybrid_args`)
        return []
    if layout.pp == 1 or len(set(sizes)) == 1:
        return _flag("num-layers-per-virtual-pipeline-stage", sizes[0]) if layout.vp > 1 else []
    middle = sizes[1:-1]
    if layout.vp == 1 and len(set(middle)) <= 1:
        return (_flag("decoder-first-pipeline-num-layers", sizes[0])
                + _flag("decoder-last-pipeline-num-layers", sizes[-1]))
    parts = [f"t*{n}" for n in sizes]
    parts[0], parts[-1] = "E" + parts[0], parts[-1] + "L"
    return _flag("pipeline-model-parallel-layout", "|".join(parts))


DEGREE_FLAGS = {"tp": "tensor-model-parallel-size", "pp": "pipeline-model-parallel-size",
                "cp": "context-parallel-size", "ep": "expert-model-parallel-size",
                "etp": "expert-tensor-parallel-size"}
"""ParallelDims degree -> Megatron-LM flag; ep and etp are written for MoE models only."""


def _parallel_args(plan: Plan) -> list[str]:
    lay = plan.layout
    dims = lay.dims
    args = []
    for name, flag in DEGREE_FLAGS.items():
        if name not in ("ep", "etp") or plan.model.is_moe:
            args += _flag(flag, dims.size(name))
    if lay.sequence_parallel and lay.tp > 1:
        args.append("--sequence-parallel")
    return args + megatron_pipeline_args(plan)


def _batch_args(plan: Plan) -> list[str]:
    lay, m = plan.layout, plan.model
    return (_flag("micro-batch-size", lay.micro_batch_size)
            + _flag("global-batch-size", lay.global_batch_size) + _flag("seq-length", lay.seq_len)
            + _flag("max-position-embeddings", max(m.max_seq_len, lay.seq_len)))


def _recompute_args(plan: Plan) -> list[str]:
    kind = plan.layout.recompute
    if kind == "none":
        return []
    args = _flag("recompute-granularity", kind)
    if kind == "full":  # every layer (Megatron needs a method with full)
        args += _flag("recompute-method", "uniform") + _flag("recompute-num-layers", 1)
    if kind == "selective" and plan.layout.recompute_modules:  # () = Megatron's [core_attn]
        args += ["--recompute-modules", *plan.layout.recompute_modules]
    return args


def _offload_args(plan: Plan) -> list[str]:
    """Activation offload: Megatron sets cpu_offloading itself when the count is > 0."""
    n = plan.layout.offload_activation_layers
    return _flag("cpu-offloading-num-layers", n) if n else []


def tp_overlap_assumed(plan: Plan) -> bool:
    """The cost model hid TP communication behind GEMMs (TE userbuffers; needs SP)."""
    lay = plan.layout
    return lay.tp > 1 and lay.sequence_parallel and plan.cluster.gpu.tp_comm_overlap > 0


def _overlap_args(plan: Plan) -> list[str]:
    lay, gpu = plan.layout, plan.cluster.gpu
    args = ["--tp-comm-overlap"] if tp_overlap_assumed(plan) else []
    if lay.distributed_optimizer or lay.fsdp:  # Megatron-FSDP v1 runs on the dist. optimizer
        args.append("--use-distributed-optimizer")
    args += _sharding_args(plan)
    if lay.dims.group("dp_cp").size > 1 and gpu.dp_comm_overlap > 0:
        args.append("--overlap-grad-reduce")
        if lay.distributed_optimizer or lay.fsdp:
            args.append("--overlap-param-gather")
    if lay.cuda_graphs:  # Megatron asserts the NaN check is off under full-iteration graphs
        args += _flag("cuda-graph-impl", "full_iteration") + ["--no-check-for-nan-in-loss-and-grad"]
    elif lay.cuda_graph_modules:  # per-module graphs, captured by Transformer Engine
        args += _flag("cuda-graph-impl", "transformer_engine") \
            + ["--cuda-graph-modules", *lay.cuda_graph_modules]
    return args


def _sharding_args(plan: Plan) -> list[str]:
    """Megatron-FSDP (ZeRO-3) and main-grad precision, as NVIDIA/Megatron-LM@d98e8a64 spells
    them: --use-megatron-fsdp with --data-parallel-sharding-strategy optim_grads_params (params,
    grads and optimizer sharded) or optim_grads (ZeRO-2, `Layout.fsdp_strategy`); HSDP as --num-distributed-optimizer-instances R (the outer,
    replicated dp dimension, --outer-dp-sharding-strategy no_shard by default); gradient
    accumulation fusion off (Megatron-Bridge's perf recipes switch it off with Megatron-FSDP);
    bf16 main grads as --grad-reduce-in-bf16; Megatron-FSDP asserts --ckpt-format fsdp_dtensor."""
    lay, args = plan.layout, []
    if lay.fsdp:
        args += ["--use-megatron-fsdp", *_flag("data-parallel-sharding-strategy",
                                               lay.fsdp_strategy),
                 "--no-gradient-accumulation-fusion", *_flag("ckpt-format", "fsdp_dtensor")]
        if lay.dp_replicate > 1:
            args += _flag("num-distributed-optimizer-instances", lay.dp_replicate)
    if not lay.grad_reduce_fp32:
        args.append("--grad-reduce-in-bf16")
    return args


def _precision_args(plan: Plan) -> list[str]:
    """bf16, plus fp8 per-tensor current scaling (hybrid E4M3/E5M2), or MXFP8: E4M3 with one
    E8M0 scale per 32 elements (TransformerConfig.fp8_recipe 'mxfp8', fp8 'e4m3'), with the
    fp8 parameter all-gather of Megatron-Bridge's bf16_with_fp8_current_scaling_mixed and
    bf16_with_mxfp8_mixed recipes (both set fp8_param_gather, mixed_precision.py at v0.5.1)
    when the optimizer is distributed (Megatron requires it for --fp8-param-gather): the
    memory model's fp8 weights (`memory.fp8_weight_bytes`)."""
    args = ["--bf16"]
    if plan.layout.dtype == "fp8":
        args += _flag("fp8-format", "hybrid") + _flag("fp8-recipe", FP8_RECIPE)
        if plan.layout.distributed_optimizer:
            args += ["--fp8-param-gather"]
    elif plan.layout.dtype == "mxfp8":
        args += _flag("fp8-format", "e4m3") + _flag("fp8-recipe", "mxfp8")
        if plan.layout.distributed_optimizer:
            args += ["--fp8-param-gather", "--reuse-grad-buf-for-mxfp8-param-ag"]
    return args


def _shape_args(plan: Plan, arch: Architecture) -> list[str]:
    m = plan.model
    args = (_flag("num-layers", m.num_layers) + _flag("hidden-size", m.hidden_size)
            + _flag("ffn-hidden-size", m.ffn_hidden_size)
            + _flag("num-attention-heads", m.num_heads) + _flag("kv-channels", m.head_dim))
    if m.num_kv_heads != m.num_heads and arch.mla is None:
        args += ["--group-query-attention"] + _flag("num-query-groups", m.num_kv_heads)
    if not m.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    return args


def _position_args(arch: Architecture) -> list[str]:
    if arch.position_embedding != "rope":
        return _flag("position-embedding-type", arch.position_embedding)
    args = _flag("position-embedding-type", "rope") + _flag("rotary-base", _num(arch.rope_theta))
    if arch.rotary_fraction != 1.0:
        args += _flag("rotary-percent", arch.rotary_fraction)
    scaling = arch.rope_scaling
    if scaling is not None and scaling.kind == "llama3":
        args += ["--use-rope-scaling"] + _flag("rope-scaling-factor", _num(scaling.factor))
    return args


def _layer_args(arch: Architecture, plan: Plan) -> list[str]:
    norm = "LayerNorm" if arch.norm == "LayerNorm1p" else arch.norm
    args = _flag("normalization", norm) + _flag("norm-epsilon", arch.norm_eps)
    if arch.norm == "LayerNorm1p":
        args.append("--apply-layernorm-1p")
    if not arch.linear_bias:
        args.append("--disable-bias-linear")
        if arch.qkv_bias:
            args.append("--add-qkv-bias")
    if arch.qk_norm:
        args.append("--qk-layernorm")
    kind = plan.model.mlp_kind
    if kind == "gated_silu":
        args.append("--swiglu")
    elif kind == "squared_relu":
        args.append("--squared-relu")
    return args + _flag("attention-dropout", arch.dropout) + _flag("hidden-dropout", arch.dropout)


def _mla_args(arch: Architecture) -> list[str]:
    mla = arch.mla
    if mla is None:
        return []
    args = ["--multi-latent-attention"] + _flag("kv-lora-rank", mla.kv_lora_rank)
    if mla.q_lora_rank:
        args += _flag("q-lora-rank", mla.q_lora_rank)
    args += (_flag("qk-head-dim", mla.qk_nope_head_dim)
             + _flag("qk-pos-emb-head-dim", mla.qk_rope_head_dim) + _flag("v-head-dim", mla.v_head_dim))
    scaling = arch.rope_scaling
    if scaling is not None and scaling.kind == "yarn":
        args += (_flag("rope-type", "yarn") + _flag("rotary-scaling-factor", _num(scaling.factor))
                 + _flag("mscale", _num(scaling.mscale))
                 + _flag("mscale-all-dim", _num(scaling.mscale_all_dim)))
    return args


def _moe_args(plan: Plan, arch: Architecture) -> list[str]:
    m = plan.model
    if not m.is_moe:
        return []
    args = (_flag("num-experts", m.num_experts) + _flag("moe-router-topk", m.experts_top_k)
            + _flag("moe-ffn-hidden-size", m.expert_ffn_hidden_size)
            + _dispatcher_args(plan) + ["--moe-grouped-gemm"])
    if plan.layout.moe_a2a_overlap:
        args.append("--overlap-moe-expert-parallel-comm")
    if m.shared_expert_ffn_hidden_size:
        args += _flag("moe-shared-expert-intermediate-size", m.shared_expert_ffn_hidden_size)
    if m.num_dense_layers and m.moe_layer_every == 1:
        pattern = f"([0]*{m.num_dense_layers}+[1]*{m.num_moe_layers})"
        args += _flag("moe-layer-freq", pattern)
    elif m.moe_layer_every > 1:  # every n-th layer after the dense ones (Llama 4 Maverick)
        d, e = m.num_dense_layers, m.moe_layer_every
        flags = [int(i >= d and (i - d + 1) % e == 0) for i in range(m.num_layers)]
        args += _flag("moe-layer-freq", "[" + ",".join(map(str, flags)) + "]")
    if arch.moe_router_score == "sigmoid":
        args += _flag("moe-router-score-function", "sigmoid") + ["--moe-router-enable-expert-bias"]
    return args


HYBRID_SPEC = ("megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec")
"""The layer spec pretrain_hybrid.py builds a hybrid with (`--spec MODULE NAME`; Megatron-LM's
examples/mamba/train.sh)."""


def hybrid_layer_pattern(plan: Plan) -> str:
    """The model's layer pattern with '|' between the plan's pipeline stages in model order
    (Megatron-Core `select_pipeline_segment` gives segment v·pp + r to pp rank r, virtual
    stage v, as `planner.planfile.stage_ranges` orders them); no '|' with one stage."""
    pattern, stages = plan.model.layer_pattern, sorted(plan.stages, key=lambda s: s.first_layer)
    if len(stages) == 1:
        return pattern
    return "|".join(pattern[s.first_layer:s.first_layer + s.num_layers] for s in stages)


def _hybrid_args(plan: Plan) -> list[str]:
    """Hybrid (Mamba) models: the layer pattern (stages as '|'), the Mamba-2 shape and the
    hybrid layer spec; Megatron derives --num-layers from the pattern."""
    m = plan.model
    if not m.layer_pattern:
        return []
    return (_flag("hybrid-layer-pattern", hybrid_layer_pattern(plan))
            + _flag("mamba-num-heads", m.mamba_num_heads)
            + _flag("mamba-head-dim", m.mamba_head_dim)
            + _flag("mamba-state-dim", m.mamba_state_dim)
            + _flag("mamba-num-groups", m.mamba_groups) + ["--spec", *HYBRID_SPEC])


def _dispatcher_args(plan: Plan) -> list[str]:
    """alltoall, or the flex dispatcher with its node-deduplicating backend."""
    kind = plan.layout.moe_dispatcher
    if kind == "alltoall":
        return _flag("moe-token-dispatcher-type", "alltoall")
    return _flag("moe-token-dispatcher-type", "flex") + _flag("moe-flex-dispatcher-backend", kind)


def _num(value: float) -> str:
    """A float as Megatron's argparse reads it back exactly ('500000', '0.5')."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def megatron_args(plan: Plan) -> list[str]:
    """Megatron-LM pretrain_gpt.py arguments: layout, batch, recompute, overlaps, precision,
    and the complete network of the planned model."""
    arch, _ = architecture(plan.model)
    return (_parallel_args(plan) + _batch_args(plan) + _recompute_args(plan) + _offload_args(plan)
            + _overlap_args(plan) + _precision_args(plan) + _shape_args(plan, arch)
            + _position_args(arch) + _layer_args(arch, plan) + _mla_args(arch)
            + _moe_args(plan, arch) + _hybrid_args(plan)
            + (_flag("mtp-num-layers", plan.model.mtp_layers) if plan.model.mtp_layers else []))


MEGATRON_SCHEDULES = {"1f1b": "1F1B (forward_backward_pipelining_without_interleaving)",
                      "interleaved": "interleaved 1F1B (--num-layers-per-virtual-pipeline-stage)"}
"""The pipeline schedules Megatron-LM (Megatron-Core `pipeline_parallel/schedules.py`) runs;
it picks them from vp, so the arguments name none. It has no zero-bubble or DualPipe
schedule: with vp = 1 those plans run 1F1B, with vp = 2 interleaved 1F1B (looped stages)."""


def megatron_schedule_note(plan: Plan) -> str | None:
    """The line saying Megatron-LM has no such schedule, or None when it runs the plan's."""
    lay = plan.layout
    if lay.pp == 1 or lay.schedule in MEGATRON_SCHEDULES:
        return None
    runs = MEGATRON_SCHEDULES["interleaved" if lay.vp > 1 else "1f1b"]
    note = (f"Megatron-LM has no {lay.schedule} schedule; these arguments run {runs}, with a "
            "larger bubble than planned: re-plan with --schedule 1f1b or interleaved")
    if plan.model.layer_pattern:  # torchtitan has no Mamba layers
        return note
    return note + ", or launch with --framework torchtitan" + (
        " (it runs ZBVZeroBubble / DualPipeV)" if lay.schedule in ("zb-v", "dualpipev") else "")


def megatron_notes(plan: Plan) -> list[str]:
    """What Megatron-LM will run differently from the plan (one line each, for stderr)."""
    arch, guessed = architecture(plan.model)
    notes = [guessed] if guessed else []
    m = plan.model
    if m.layer_pattern:
        notes.append("a hybrid (Mamba) model: run these arguments with Megatron-LM's "
                     "pretrain_hybrid.py, not pretrain_gpt.py")
        if (m.mamba_conv_kernel, m.mamba_chunk_size) != (4, 128):
            notes.append(f"Megatron-Core's MambaMixer builds a convolution of 4 and SSD chunks "
                         f"of 128 (no flags); this model has {m.mamba_conv_kernel} and "
                         f"{m.mamba_chunk_size}")
    schedule = megatron_schedule_note(plan)
    if schedule:
        notes.append(schedule)
    if arch.parallel_residual:
        notes.append(f"Megatron's GPT model has no parallel residual ({arch.family}); "
                     "it builds sequential attention and MLP blocks")
    s = arch.rope_scaling
    if s is not None and s.kind == "llama3" and (s.low_freq_factor, s.high_freq_factor,
                                                 s.original_max_position_embeddings) != (1.0, 4.0, 8192):
        notes.append("Megatron's --use-rope-scaling fixes low/high frequency factors 1/4 and "
                     "original length 8192; this model's rope_scaling differs")
    if plan.layout.te_cross_entropy:
        lay = plan.layout
        extra = (MEGATRON_LOGIT_BYTES - TE_LOGIT_BYTES) * lay.micro_batch_size \
            * lay.seq_len / lay.cp * plan.model.vocab_size / lay.tp / GiB
        notes.append("the plan priced Transformer Engine's fused cross entropy, which "
                     "Megatron-LM@d98e8a64 rejects (--cross-entropy-fusion-impl te): its own loss "
                     f"holds {extra:.1f} GiB more on the last stage (megatron_bridge_override.py "
                     "sets the TE loss)")
    return notes
