"""Megatron-Core's selective recompute modules (`--recompute-granularity selective
--recompute-modules ...`): which activations each frees and what it costs to recompute.

Megatron-Core (NVIDIA/Megatron-LM@d98e8a64, megatron/core/transformer/transformer_config.py,
`recompute_modules`; default ["core_attn"]):
    core_attn       the attention core (scores, softmax, dropout; nothing with flash kernels,
                    which keep only the output and log-sum-exp: Megatron warns it is useless)
    layernorm       input_layernorm and pre_mlp_layernorm, output discarded: their outputs
                    (the QKV and first-MLP-matrix inputs) are recomputed from the kept inputs
    mlp             the dense MLP submodule, checkpointed: only its input is kept
    moe_act         the routed experts' activation function, output discarded (needs
                    grouped GEMM, which meshplan always assumes): the second matrix's input
    moe             the whole MoE layer (router, dispatch, experts, shared experts, combine)
    shared_experts  the shared experts
    mla_up_proj     MLA's up projections and RoPE, output discarded: the decompressed
                    per-head Q, K, V are recomputed from the latents
Every figure is per layer and micro-batch, averaged over the model's dense and MoE layers as
`memory._activation_bytes_per_layer` does, and uses the same terms (its docstring).
"""

from __future__ import annotations

import numpy as np

from . import memory  # memory imports this module too: used at call time only
from .specs import ModelSpec

MODULES: tuple[str, ...] = ("core_attn", "layernorm", "mlp", "moe_act", "moe",
                            "shared_experts", "mla_up_proj")
BIT = {name: 1 << i for i, name in enumerate(MODULES)}
DEFAULT: tuple[str, ...] = ("core_attn",)
DEFAULT_MASK = BIT["core_attn"]


def mask_of(modules: tuple[str, ...] | list[str]) -> int:
    """The bitmask of a module list (names checked by `check`)."""
    out = 0
    for name in modules:
        out |= BIT[name]
    return out


def names_of(mask: int) -> tuple[str, ...]:
    """The module names of a bitmask, in `MODULES` order."""
    return tuple(n for n in MODULES if mask & BIT[n])


def check(model: ModelSpec, modules: tuple[str, ...]) -> str | None:
    """Why `modules` is not a valid module list for `model` (Megatron's own rules plus
    "the model has nothing for it to do"), or None."""
    unknown = [m for m in modules if m not in BIT]
    if unknown:
        return f"unknown recompute module {unknown[0]!r}; choose from {', '.join(MODULES)}"
    if len(set(modules)) != len(modules):
        return "a recompute module is listed twice"
    if not modules:
        return "give at least one recompute module"
    needs = {"mlp": (model.dense_mlp_layers > 0, "the model has no dense MLP layer"),
             "moe_act": (model.is_moe, "the model has no MoE layer"),
             "moe": (model.is_moe, "the model has no MoE layer"),
             "shared_experts": (model.shared_expert_ffn_hidden_size > 0,
                                "the model has no shared experts"),
             "mla_up_proj": (model.is_mla, "Megatron allows it only with multi-latent attention")}
    for name in modules:
        ok, why = needs.get(name, (True, ""))
        if not ok:
            return f"recompute module {name}: {why}"
    return None


def search_sets(model: ModelSpec) -> tuple[tuple[str, ...], ...]:
    """Module lists the search tries with selective recompute.

    Dense models: every non-empty subset of {layernorm, mlp} and Megatron's default
    (core_attn). With flash attention core_attn frees nothing and only adds time, so a list
    with it is dominated by the same list without it (or by no recompute): these are all
    the lists worth trying, and the search is exact over Megatron's modules.
    MoE models (a curated family, not every subset): the default; the cheap output-discarding
    set (norms, the experts' activation, MLA up projections: elementwise work and small GEMMs
    recomputed, the widest tensors freed); the whole MoE layer (+ MLA up projections); and
    everything (norms, dense MLPs, whole MoE layers, MLA up projections)."""
    mla = ("mla_up_proj",) if model.is_mla else ()
    dense_mlp = ("mlp",) if model.dense_mlp_layers else ()
    if not model.is_moe:
        if not dense_mlp:  # a hybrid pattern without MLP layers
            return (DEFAULT, ("layernorm",))
        return (DEFAULT, ("layernorm",), ("mlp",), ("layernorm", "mlp"))
    return (DEFAULT, ("layernorm", "moe_act", *mla), ("moe", *mla),
            ("layernorm", *dense_mlp, "moe", *mla))


def _has(mask, name: str):
    return (np.asarray(mask) & BIT[name]) != 0


def freed_bytes(model: ModelSpec, micro_batch, seq_len, tp, cp, sequence_parallel, mask,
                flash_attention, gemm_in, etp):
    """Activation bytes the modules in `mask` free per layer and micro-batch on one GPU,
    against no recompute (`memory._activation_bytes_per_layer` terms; `gemm_in`: bytes per
    saved GEMM input element, 1 with fp8)."""
    s = seq_len / cp
    sb = s * micro_batch
    h = model.hidden_size
    moe_share = model.num_moe_layers / model.num_layers
    dense_share = model.dense_mlp_layers / model.num_layers
    outside = lambda x: np.where(sequence_parallel, x / tp, x)  # noqa: E731
    norms = memory.norm_outputs_kept(model)
    out = np.where(_has(mask, "layernorm"), outside(norms * gemm_in * sb * h), 0.0)
    # unfused cores keep the scores; flash kernels nothing to free
    out = out + np.where(_has(mask, "core_attn") & ~np.asarray(flash_attention, bool),
                         memory.score_bytes(model, s, micro_batch) / tp * model.attention_share,
                         0.0)

    def mlp_kept(width):  # what an MLP of inner width `width` keeps inside (split over tp)
        return memory.mlp_kept_bytes(model, sb, width, gemm_in)

    out = out + np.where(_has(mask, "mlp"), dense_share * mlp_kept(model.ffn_hidden_size) / tp, 0.0)
    if model.is_moe:
        routed_w = model.experts_top_k * model.expert_ffn_hidden_size
        shared_w = model.shared_expert_ffn_hidden_size
        local = np.where(sequence_parallel, sb * h / tp, sb * h)
        permuted = memory.permuted_copy_bytes(model, local, etp, gemm_in)
        whole = mlp_kept(routed_w) / tp + permuted + mlp_kept(shared_w) / tp
        act = gemm_in * sb * routed_w / tp
        shared = mlp_kept(shared_w) / tp
        moe = np.where(_has(mask, "moe"), whole,
                       np.where(_has(mask, "moe_act"), act, 0.0)
                       + np.where(_has(mask, "shared_experts"), shared, 0.0))
        out = out + moe_share * moe
    if model.is_mla:
        out = out + np.where(_has(mask, "mla_up_proj"),
                             2 * sb * model.qkv_width / tp * model.attention_share, 0.0)
    return out


def recompute_parts(model: ModelSpec, tokens, tp, mask):
    """What the modules in `mask` recompute per layer and micro-batch on one GPU, averaged
    over layers: (GEMM FLOPs: dense MLP, shared experts, router, MLA up projections;
    elementwise bytes through HBM: norms and activation functions; whether the attention
    core is recomputed; whether the routed experts are). The caller prices them with its own
    GEMM, attention, expert and memory-bound models."""
    h = model.hidden_size
    moe_share = model.num_moe_layers / model.num_layers
    dense_share = model.dense_mlp_layers / model.num_layers
    norms = memory.norm_outputs_kept(model)
    m = model.mlp_matrices
    shape = np.shape(mask)
    gemm = np.where(_has(mask, "mlp"),
                    dense_share * m * 2 * tokens * h * model.ffn_hidden_size / tp, 0.0)
    # a norm reads its bf16 input and writes its bf16 output (Megatron discards the output)
    elem = np.where(_has(mask, "layernorm"), norms * 4 * tokens * h / tp, 0.0)
    moe = np.zeros(shape, dtype=bool)
    if model.is_moe:
        moe = _has(mask, "moe")
        shared = m * 2 * tokens * h * model.shared_expert_ffn_hidden_size / tp
        router = 2 * tokens * h * model.num_experts
        gemm = gemm + moe_share * np.where(
            moe, shared + router, np.where(_has(mask, "shared_experts"), shared, 0.0))
        # SwiGLU/GELU of the routed experts: read gate and up (or the input), write the output
        act_w = model.experts_top_k * model.expert_ffn_hidden_size
        elem = elem + np.where(_has(mask, "moe_act") & ~moe,
                               moe_share * 3 * 2 * tokens * act_w / tp, 0.0)
    if model.is_mla:
        up = (model.q_lora_rank * model.num_heads * model.head_dim
              + model.kv_lora_rank * model.num_heads * (model.head_dim - model.qk_rope_head_dim
                                                        + model.value_head_dim))
        gemm = gemm + np.where(_has(mask, "mla_up_proj"),
                               2 * tokens * up / tp * model.attention_share, 0.0)
    return (np.broadcast_to(gemm, shape), np.broadcast_to(elem, shape), _has(mask, "core_attn"),
            np.broadcast_to(moe, shape))
