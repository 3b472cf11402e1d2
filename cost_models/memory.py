"""Memory per GPU: parameters, gradients, optimizer states, activations, buffers (bytes).

Sources:
- Bytes per parameter: Megatron-LM docs, "Distributed Optimizer" (docs/source/api-guide/
  dist_optimizer.md), table for bf16 params with fp32 gradients: 18 bytes plain, 6 + 12/d
  with the distributed optimizer over d data-parallel ranks.
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", Sec. 4 (Eq. 1-2, Table 2) and Sec. 4.2.3 for pipeline in-flight counts.

All functions broadcast over numpy arrays of layout fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import recompute_modules, schedules
from .flops import (
    attention_params,
    dense_mlp_params,
    mamba_params,
    moe_shared_params,
    norm_params,
    routed_expert_params,
)
from .specs import FP8_DTYPES, ModelSpec

WEIGHT_BYTES = 2
"""bf16 parameters used by the forward/backward pass."""
GRAD_BYTES = 4
"""fp32 main gradients (Megatron-LM accumulates and reduces gradients in fp32 with bf16)."""
OPTIMIZER_BYTES = 12
"""fp32 master weights + Adam first and second moments (4 + 4 + 4)."""
FP8_EXTRA_WEIGHT_BYTES = 0
"""FP8 recipes (Transformer Engine with fp8_param_gather) keep primary weights in fp8 plus a
transposed fp8 copy for the backward GEMM on Hopper: 2 bytes, the same as bf16
(`fp8_weight_bytes` has the per-GPU and MXFP8 cases)."""
MXFP8_SCALE_BYTES = 1 / 32
"""One E8M0 scale per 32 elements (OCP Microscaling spec v1.0), per quantized copy."""


def fp8_weight_bytes(dtype: str, transpose_copy, param_gather):
    """Bytes per weight element a GPU holds for fp8 training with Transformer Engine.

    fp8 (per-tensor scaling): the fp8 data (1) plus its transpose where fp8 GEMMs need TN
    (`GpuSpec.fp8_transpose_copy`, Hopper: 1). mxfp8: rowwise and columnwise copies (the
    32-element scaling blocks run along different axes), each 1 byte + 1/32 of scales.
    With fp8_param_gather (Megatron-Bridge's fp8 and mxfp8 recipes set it; Megatron needs the
    distributed optimizer for it) these are the parameters; without it the bf16 weights (2)
    are kept besides the fp8 copies TE caches over the micro-batches."""
    quantized = np.where(dtype == "mxfp8", 2 * (1 + MXFP8_SCALE_BYTES),
                         1 + np.where(transpose_copy, 1, 0))
    return quantized + np.where(param_gather, 0, WEIGHT_BYTES)

BUFFER_FIXED_BYTES = 1.25 * (1 << 30)
"""Allowance: NCCL communicator buffers, cuBLAS/cuDNN workspaces and gradient-reduction
buckets, measured at 1-1.5 GiB per GPU on Megatron-Core jobs."""
FRAGMENTATION = 0.10
"""Allocator fragmentation allowance, as a fraction of activation memory."""
BF16_GRAD_BYTES = 2
"""bf16 main gradients: Megatron-Core DDP with grad_reduce_in_fp32 = False (the grad buffers
take the parameter dtype; megatron/core/distributed/distributed_data_parallel_config.py),
as the Megatron-Bridge performance recipes set (scripts/performance/configs/llama/
llama31_llm_pretrain.py, set_llama31_common_configs: cfg.ddp.grad_reduce_in_fp32 = False)."""

# FSDP2 as torchtitan 0.3.0 applies it (torchtitan/distributed/fsdp.py apply_fsdp_to_decoder;
# torchtitan/config/configs.py: mixed_precision_param = bfloat16, mixed_precision_reduce =
# float32). fully_shard keeps the sharded parameters in their original fp32 and casts to bf16
# only in the all-gather (torch.distributed.fsdp.MixedPrecisionPolicy); the sharded gradient
# takes the parameter dtype; Adam's two moments follow the parameter (Rajbhandari et al. 2020,
# ZeRO, Sec. 5: 16 bytes per parameter over N_d ranks, K = 12 with the fp32 copy as the param).
FSDP_PARAM_BYTES = 4
"""Sharded fp32 parameters (they are the master weights: no separate copy)."""
FSDP_GRAD_BYTES = 4
"""Sharded fp32 gradients (reduce-scattered in fp32: mixed_precision_reduce)."""
FSDP_ADAM_BYTES = 8
"""Adam first and second moments, fp32, sharded."""
FSDP_GATHER_BYTES = 2
"""Bytes per unsharded parameter after the all-gather (mixed_precision_param bf16)."""
FSDP_FP8_GATHER_BYTES = 1
"""With torchao float8 and enable_fsdp_float8_all_gather, linear weights are all-gathered in
fp8 (1 byte; torchtitan float8 converter docs); counted for every layer weight."""
FSDP_UNSHARDED_GRAD_BYTES = 2 + 4
"""One layer's unsharded gradients in backward: autograd's bf16 gradient (2) and the fp32
reduce-scatter input FSDP2 copies it into when reduce dtype != param dtype (4). Megatron-FSDP
copies it into an unreduced bucket of its main-grad dtype instead (`fsdp_unsharded_grad_bytes`)."""
FSDP_PREFETCH_LAYERS = 2
"""Unsharded layers alive at once with resharding after forward: the one computing and the
one FSDP2's implicit prefetch has all-gathered (one module ahead, forward and backward)."""


MX_BLOCK = 32
"""Elements sharing one E8M0 (1-byte) scale in MXFP8 (OCP Microscaling spec v1.0, Sec. 5)."""


def gemm_input_bytes(dtype: str) -> float:
    """Bytes per saved GEMM input element: 2 (bf16), 1 (fp8: one scale per tensor),
    1 + 1/32 (mxfp8: an E8M0 scale per 32-element block)."""
    return {"fp8": 1.0, "mxfp8": 1.0 + 1.0 / MX_BLOCK}.get(dtype, 2.0)


def bytes_per_parameter(distributed_optimizer, dp, dtype_fp8=False):
    """Weights + gradients + optimizer bytes per parameter (Megatron-LM dist-optimizer table).

    Plain: 2 (bf16 weight) + 4 (fp32 grad) + 12 (fp32 master, Adam m, v) = 18.
    Distributed (ZeRO-1 over d ranks): 2 + 4 + 12/d = 6 + 12/d.
    """
    weights = WEIGHT_BYTES + (FP8_EXTRA_WEIGHT_BYTES if dtype_fp8 else 0)
    opt = np.where(distributed_optimizer, OPTIMIZER_BYTES / dp, OPTIMIZER_BYTES)
    return weights + GRAD_BYTES + opt


def dense_layer_params(model: ModelSpec) -> float:
    """Parameters of one layer that every expert-parallel rank holds, averaged over layers:
    attention, norms, the dense MLP (dense layers) or shared experts + router (MoE layers)."""
    attn = attention_params(model) + norm_params(model)
    dense_mlp = dense_mlp_params(model)
    if not (model.is_moe or model.layer_pattern):
        return attn + dense_mlp
    if model.layer_pattern:  # a hybrid's layers hold one module each
        attn = model.attention_share * attention_params(model) + norm_params(model) \
            + model.mamba_share * mamba_params(model)
    shared = moe_shared_params(model) if model.is_moe else 0
    return attn + (model.dense_mlp_layers * dense_mlp + model.num_moe_layers * shared) \
        / model.num_layers


def expert_layer_params(model: ModelSpec) -> float:
    """Routed-expert parameters of one layer averaged over layers (split over ep ranks)."""
    if not model.is_moe:
        return 0.0
    experts = model.num_experts * routed_expert_params(model)
    return experts * model.num_moe_layers / model.num_layers


DEDUPE_ROWS = 4096
"""Grids larger than this evaluate the activation formula once per distinct input row."""


def activation_bytes_per_layer(model: ModelSpec, micro_batch, seq_len, tp, cp=1,
                               sequence_parallel=False, recompute="none",
                               flash_attention=True, fp8=False, etp=None):
    """`_activation_bytes_per_layer`, computed once per distinct (micro-batch, tp, cp, sp,
    recompute, flash, etp) row of a large grid: a search grid of 500,000 layouts has a few
    hundred distinct rows, and the formula is the search's most expensive term."""
    args = (micro_batch, tp, cp, sequence_parallel, _recompute_code(recompute),
            flash_attention, tp if etp is None else etp)
    if np.size(micro_batch) <= DEDUPE_ROWS:
        return _activation_bytes_per_layer(model, micro_batch, seq_len, tp, cp,
                                           sequence_parallel, recompute, flash_attention, fp8, etp)
    cols = [np.broadcast_to(np.asarray(a, dtype=np.int64), np.shape(micro_batch)) for a in args]
    key = np.ravel_multi_index(cols, [int(col.max()) + 1 for col in cols])  # one int per row
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    mb, t, c, sp, rec, fl, e = (col[first] for col in cols)
    small = _activation_bytes_per_layer(model, mb, seq_len, t, c, sp.astype(bool), rec,
                                        fl.astype(bool), fp8, e)
    return np.broadcast_to(small, first.shape)[np.asarray(inverse).ravel()]


def _activation_bytes_per_layer(model: ModelSpec, micro_batch, seq_len, tp, cp=1,
                                sequence_parallel=False, recompute="none",
                                flash_attention=True, fp8=False, etp=None):
    """Activation bytes one layer keeps for backward, per micro-batch, per GPU (fp16/bf16).

    Korthikanti et al. 2022 Sec. 4.1 for GPT (MHA, 4h GELU MLP, dropout), per layer:
      no parallelism: s·b·h·(34 + 5·a·s/h)
      tensor parallel t:           s·b·h·(10 + 24/t + 5·a·s/(h·t))        (Eq. 1)
      + sequence parallel:         s·b·h/t·(34 + 5·a·s/h)                 (Eq. 2)
      selective recompute (+SP):   34·s·b·h/t   (attention core recomputed, as² terms gone)
      full recompute:              2·s·b·h (/t with SP): only the layer input is kept.
    Generalised here term by term (labels below) to GQA (K, V with g heads), gated MLPs
    (gate and up outputs kept) and models without dropout; with flash attention the a·s² score
    terms are never stored (only the output and the fp32 log-sum-exp, 4·s·b·a bytes).
    Context parallelism divides s by cp everywhere. With `fp8`, Transformer Engine saves the
    inputs of the four GEMMs (QKV, output projection, both MLP matrices) in fp8: 1 byte.
    `recompute` may be an array of codes 0/1/2 (none/selective/full) or a string.
    MLA (DeepSeek-V2 Sec. 2.1) keeps decompressed per-head Q, K (d_qk) and V (d_v) plus its
    latents; sliding-window and chunked layers store the same per-token tensors (the window
    only shortens the key loop), so only the unfused a·s² score terms would depend on it and
    unfused kernels compute the whole square anyway.
    """
    s = seq_len / cp
    etp = tp if etp is None else etp  # expert tensor parallel (Megatron-Core default: tp)
    sbh = s * micro_batch * model.hidden_size
    sb = s * micro_batch
    drop = 1 if model.dropout else 0
    # bytes per saved GEMM input element (`fp8` may be a dtype name or a bool)
    gemm_in = gemm_input_bytes(fp8) if isinstance(fp8, str) else np.where(fp8, 1, 2)
    # Terms outside the tensor-parallel region (replicated over tp unless sequence parallel):
    outside = (
        4 * sbh            # two norm inputs (2 bytes each)
        + norm_outputs_kept(model) * gemm_in * sbh  # inputs of the QKV and first MLP matrix
        + 2 * drop * sbh   # two dropout masks (1 byte each)
    )
    if model.parallel_attention_mlp:  # one layer input feeds both branches: one norm input
        outside = outside - 2 * sbh
    attn = model.attention_share  # 1 but for hybrid patterns (layers without attention)
    if model.layer_pattern:  # one pre-norm block per layer: its input and the module's input
        outside = (2 + gemm_in + drop) * sbh
    # Terms inside the tensor-parallel region (split over tp):
    qkv = 2 * sb * model.qkv_width * attn                # Q, K, V kept for the core
    proj_in = gemm_in * sb * model.attn_out_width * attn  # input of the output projection
    if model.is_mla:
        # MLA's latents c_Q, c_KV (+ the shared rotary key) are computed on every tp rank
        # (Megatron-Core's MLA keeps the down projections unsplit): each is kept as its
        # RMSNorm input (2 bytes) and as the input of its up projection (gemm_in bytes).
        latent = model.q_lora_rank + model.kv_lora_rank
        outside = outside + ((2 + gemm_in) * sb * latent + 2 * sb * model.qk_rope_head_dim) * attn
    mlp = mlp_kept_bytes(model, sb, model.active_ffn_width, gemm_in)  # f for dense models
    flash_core = 4 * sb * model.num_heads  # fp32 log-sum-exp; the output O is proj_in above
    score_core = score_bytes(model, s, micro_batch)
    core = np.where(flash_attention, flash_core, score_core) * attn
    # Korthikanti's GPT: outside 10sbh; inside Q,K,V 6 + proj 2 + MLP 16 = 24sbh (/t).
    inside_no_core = qkv + proj_in + mlp
    if model.mamba_layers:
        inside_no_core = inside_no_core + model.mamba_share * mamba_kept_bytes(model, sb, gemm_in)
    if model.is_moe:
        # The top-k permuted copies of each token are the routed experts' GEMM input. A GPU
        # dispatches its local tokens (1/tp of them with sequence parallelism); its expert
        # tensor-parallel group of etp ranks receives etp x those copies on average and every
        # member keeps them all (Megatron-Core all-gathers over etp before the expert GEMMs).
        # Counted here x tp because `inside_no_core` is divided by tp below.
        moe_share = model.num_moe_layers / model.num_layers
        local = np.where(sequence_parallel, sbh / tp, sbh)
        # The busiest expert rank holds `expert_load_imbalance` x the mean.
        inside_no_core = inside_no_core + moe_share * permuted_copy_bytes(model, local, etp,
                                                                          gemm_in) * tp
    split_outside = np.where(sequence_parallel, outside / tp, outside)
    none = split_outside + (inside_no_core + core) / tp
    selective = split_outside + inside_no_core / tp + np.where(flash_attention, core / tp, 0.0)
    full = np.where(sequence_parallel, 2 * sbh / tp, 2 * sbh)
    code = _recompute_code(recompute)
    return np.where(code == 2, full, np.where(code == 1, selective, none))


def mamba_kept_bytes(model: ModelSpec, tokens, gemm_in):
    """Bytes one Mamba-2 mixer keeps for backward over `tokens` tokens (split over tp with its
    heads), on Megatron-Core MambaMixer's memory-efficient path: the fused convolution + scan
    (mamba_ssm `mamba_split_conv1d_scan_combined`, called without the norm) saves the input
    projection's output z, x, B, C, dt (bf16) and its output y (bf16), recomputing the
    convolution, dt's softplus and the chunk states in backward; the gated RMSNorm saves its
    input (bf16) and one fp32 reciprocal RMS per group; the output projection its input
    (`gemm_in` bytes)."""
    return tokens * (2 * model.mamba_in_proj_width + 4 * model.mamba_inner
                     + gemm_in * model.mamba_inner + 4 * model.mamba_groups)


def norm_outputs_kept(model: ModelSpec) -> int:
    """h-wide norm outputs a layer keeps as GEMM inputs: the QKV and the first MLP matrix
    inputs, or one when a parallel attention+MLP block shares a single norm (GPT-J,
    Falcon-7B); one per block (`ModelSpec.blocks_per_layer`: a hybrid's layer has one)."""
    shared = model.parallel_attention_mlp and model.norms_per_layer == 1
    return 1 if shared else model.blocks_per_layer


def mlp_kept_bytes(model: ModelSpec, tokens, width, gemm_in):
    """Bytes an MLP of inner width `width` keeps for backward over `tokens` tokens: the gate
    and up outputs (gated; bf16) or the activation input, and the second matrix's input
    (`gemm_in` bytes per element)."""
    kept = 2 * tokens * 2 * width if model.gated_mlp else 2 * tokens * width
    return kept + gemm_in * tokens * width


def score_bytes(model: ModelSpec, seq_len, micro_batch):
    """Unfused attention's score tensors per layer: softmax output (2 bytes), dropout mask (1)
    and dropout output (2), a·s²·b each: 5·a·s²·b (2·a·s²·b without dropout)."""
    drop = 1 if model.dropout else 0
    return (2 + 3 * drop) * model.num_heads * seq_len * seq_len * micro_batch


def permuted_copy_bytes(model: ModelSpec, local_elements, etp, gemm_in):
    """The routed experts' GEMM input one GPU keeps per MoE layer: the top-k permuted copies
    of the `local_elements` (tokens x h) its expert tensor-parallel group of etp ranks
    gathers, at the busiest expert rank's load (`expert_load_imbalance`)."""
    return gemm_in * model.experts_top_k * local_elements * etp * model.expert_load_imbalance


def titan_sac_bytes_per_layer(model: ModelSpec, micro_batch, seq_len, tp, cp=1,
                              sequence_parallel=False):
    """Activation bytes one layer keeps under torchtitan's per-op selective AC (bf16).

    torchtitan 0.3.0 torchtitan/distributed/activation_checkpoint.py (`_get_custom_policy`):
    inside each checkpointed block the outputs of ops on the save list (flash SDPA, collectives)
    are kept, matmul outputs alternately (the 1st, 3rd, ... mm of the block forward: count % 2
    == 1 saved), everything else recomputed in backward from the block input and those. Per
    token, in forward order: wq (q width), wk, wv (kv width), wo (h), w1, [w3] (f), w2 (h);
    plus the block input (h; /tp with sequence parallelism) and the SDPA output (q width, 2 B)
    and its fp32 log-sum-exp (4 B per head). Widths split over tp except the row-parallel
    outputs (wo, w2: partial sums of width h before the reduce). Context parallelism divides s.
    """
    sb = micro_batch * (seq_len / cp)
    h, f = model.hidden_size, model.active_ffn_width
    kv = (model.qkv_width - model.attn_out_width) / 2
    mms = [model.attn_out_width / tp, kv / tp, kv / tp, h, f / tp] \
        + ([f / tp] if model.gated_mlp else []) + [h]
    saved_mm = sum(w for i, w in enumerate(mms) if i % 2 == 0)
    block_in = np.where(sequence_parallel, h / tp, h)
    sdpa = 2 * model.attn_out_width / tp + 4 * model.num_heads / tp
    return sb * (2 * (block_in + saved_mm) + sdpa)


def _recompute_code(recompute):
    if isinstance(recompute, str):
        return {"none": 0, "selective": 1, "full": 2}[recompute]
    return np.asarray(recompute)


def inflight_microbatches(pp, vp, num_microbatches, pp_rank=0):
    """Micro-batches (in units of a whole rank's layers) whose activations a pipeline rank holds
    at its peak.

    1F1B: rank r runs pp - r warm-up forwards before its first backward: min(m, pp - r).
    Interleaved (vp chunks): Megatron-LM warms up 2·(pp - r - 1) + (vp - 1)·pp chunk-forwards
    plus one in steady state, each chunk 1/vp of the rank's layers; for r = 0 that is
    pp + (pp - 1)/vp whole micro-batches, Korthikanti et al. 2022 Sec. 4.2.3's factor
    (1 + (pp - 1)/(pp·vp)) on L/pp layers per rank.
    """
    one_f_one_b = np.minimum(num_microbatches, pp - pp_rank)
    chunks = np.minimum(num_microbatches * vp, 2 * (pp - pp_rank - 1) + (vp - 1) * pp + 1)
    return np.where(vp > 1, chunks / vp, one_f_one_b)


MEGATRON_LOGIT_BYTES = 6
"""Megatron-LM fused vocab-parallel cross entropy: the LM head's bf16 output (2) and the fp32
softmax (4), whose gradient is written in place (megatron/core/tensor_parallel/
cross_entropy.py)."""
TE_LOGIT_BYTES = 2
"""Transformer Engine's fused cross entropy (transformer_engine/pytorch/triton/
cross_entropy.py): an online softmax reads the bf16 logits, keeps 3 fp32 numbers per token and
writes the gradient into the logits in place, so the logits (2 bytes) are all it holds."""
TITAN_LOGIT_BYTES = 12
"""torchtitan 0.3.0 (torchtitan/components/loss.py cross_entropy_loss): F.cross_entropy on
pred.float(); at the loss backward the fp32 log-softmax output (4, saved), its incoming
gradient (4) and the fp32 gradient of the logits (4) are alive together (the bf16 pred is
deleted before backward; its 2-byte gradient follows once the fp32 copy is freed)."""


def logits_bytes(model: ModelSpec, micro_batch, seq_len, tp, cp=1, per_logit=MEGATRON_LOGIT_BYTES):
    """Logits on the last stage for one micro-batch: `per_logit` bytes per vocabulary entry
    and token (MEGATRON_LOGIT_BYTES or TITAN_LOGIT_BYTES)."""
    return per_logit * micro_batch * (seq_len / cp) * model.vocab_size / tp


def embedding_output_bytes(model: ModelSpec, micro_batch, seq_len, tp, cp=1, sequence_parallel=False):
    """First stage: embedding output (and its dropout mask) kept per in-flight micro-batch."""
    sbh = micro_batch * (seq_len / cp) * model.hidden_size
    per = (2 + (1 if model.dropout else 0)) * sbh
    return np.where(sequence_parallel, per / tp, per)


@dataclass(frozen=True, slots=True)
class ActivationTerms:
    """Activation bytes per GPU of every row of a grid that no pipeline rank changes (the
    rank only scales them by its layers and in-flight micro-batches): `rank_memory` takes
    them computed once for its three rank kinds."""

    per_layer: np.ndarray
    """One layer and micro-batch with the row's recompute (Megatron's selective recompute of
    the row's `recompute_modules`; torchtitan's per-op selective AC for its selective rows)."""
    no_recompute: np.ndarray
    """The same layer without recompute: what the rematerialised layer holds in backward."""
    embedding: np.ndarray
    """Embedding output of one micro-batch (the first rank)."""
    logits: np.ndarray
    """Logits of one micro-batch (the last rank)."""


def activation_terms(model: ModelSpec, g, variants: int = 1) -> ActivationTerms:
    """`ActivationTerms` of the grid `g` (Korthikanti et al. 2022 Sec. 4 per layer, see
    `_activation_bytes_per_layer`). `variants`: runs of recompute variants of one layout
    (`megatron.evaluate`); the recompute-free terms are computed once per run."""
    fp8 = g.dtype if g.dtype in FP8_DTYPES else False
    act_args = (model, g.micro_batch_size, g.seq_len, g.tp, g.cp, g.sequence_parallel)
    titan = g.titan
    per_layer = activation_bytes_per_layer(*act_args, g.recompute, g.flash_attention, fp8, g.etp)
    run = slice(None, None, variants)
    base = (model, g.micro_batch_size[run], g.seq_len, g.tp[run], g.cp[run],
            g.sequence_parallel[run])
    megatron_logit = TE_LOGIT_BYTES if g.te_cross_entropy else MEGATRON_LOGIT_BYTES
    per_logit = np.broadcast_to(np.where(titan, TITAN_LOGIT_BYTES, megatron_logit),
                                g.tp.shape)[run]
    no_recompute, embedding, logits = (np.repeat(x, variants) for x in (
        activation_bytes_per_layer(*base, "none", g.flash_attention[run], fp8, g.etp[run]),
        embedding_output_bytes(*base), logits_bytes(*base[:5], per_logit)))
    masks = g.column("recompute_modules")
    if np.any(masks != recompute_modules.DEFAULT_MASK):  # Megatron's --recompute-modules
        freed = recompute_modules.freed_bytes(
            model, g.micro_batch_size, g.seq_len, g.tp, g.cp, g.sequence_parallel, masks,
            g.flash_attention, gemm_input_bytes(fp8) if fp8 else 2, g.etp)
        per_layer = np.where(g.recompute == 1, no_recompute - freed, per_layer)
    sac = titan & (g.recompute == 1)
    if np.any(sac):
        per_layer = np.where(sac, titan_sac_bytes_per_layer(*act_args), per_layer)
    gathered = titan & g.sequence_parallel & (g.tp > 1)
    if np.any(gathered):
        extra = np.where(gathered, titan_gathered_input_bytes(
            model, g.micro_batch_size, g.seq_len, g.tp, g.cp, gemm_input_bytes(fp8) if fp8 else 2),
            0.0)
        no_recompute = no_recompute + extra
        per_layer = per_layer + np.where(g.recompute == 0, extra, 0.0)
    return ActivationTerms(per_layer, no_recompute, embedding, logits)


def titan_gathered_input_bytes(model: ModelSpec, micro_batch, seq_len, tp, cp, gemm_in):
    """Bytes one layer keeps beyond Megatron's count under torchtitan's sequence parallelism:
    its TP plan (PrepareModuleInput to Replicate before attention and the feed-forward) hands
    the column-parallel linears the all-gathered norm output, and autograd saves that whole
    tensor (torchao float8's fp8 copy with float8 TP); Megatron-Core saves the sequence shard
    and gathers again in backward (Korthikanti et al. 2022 Sec. 4.2.2). The shard counted by
    `activation_bytes_per_layer` is taken off: (1 - 1/tp) of each gathered input."""
    sbh = micro_batch * (seq_len / cp) * model.hidden_size
    return norm_outputs_kept(model) * gemm_in * sbh * (1 - 1 / tp)


@dataclass(frozen=True, slots=True)
class RankStaticMemory:
    """The parts of `rank_memory` that no recompute choice changes (arrays over the grid)."""

    state: dict[str, np.ndarray]
    """Weights, gradients and optimizer state (`state_bytes`)."""
    inflight: np.ndarray
    """Micro-batches whose activations the rank holds (`schedules.inflight_microbatches`)."""
    unsharded: np.ndarray
    """FSDP's unsharded parameters and gradients (`fsdp_inflight_bytes`; 0 without FSDP)."""


def rank_static_memory(g, params, optimizer_params, layers, pp_rank, layer_params=0.0,
                       head_params=0.0, fp8_transpose_copy: bool = True,
                       block_params=None) -> RankStaticMemory:
    """`RankStaticMemory` of pipeline rank `pp_rank` (`rank_memory`'s arguments);
    `block_params`: the heaviest block's parameters (`fsdp_inflight_bytes`), default
    `layer_params`."""
    fsdp = g.column("fsdp")
    inflight = schedules.inflight_microbatches(g.schedule, g.pp, g.vp, g.num_microbatches,
                                               pp_rank)
    unsharded = np.zeros(np.broadcast(fsdp, layers, layer_params).shape)
    if fsdp.any():
        gather = FSDP_FP8_GATHER_BYTES if g.dtype in FP8_DTYPES else FSDP_GATHER_BYTES
        unsharded = np.where(fsdp, fsdp_inflight_bytes(layer_params, head_params, layers, g.pp,
                                                       gather, zero2_rows(g),
                                                       keeps_unsharded(g),
                                                       fsdp_unsharded_grad_bytes(g),
                                                       block_params), 0.0)
    return RankStaticMemory(state_bytes(g, params, optimizer_params, fp8_transpose_copy),
                            inflight, unsharded)


def mtp_modules(model: ModelSpec, g) -> np.ndarray | int:
    """Multi-token prediction modules each row of the grid `g` runs (`ModelSpec.mtp_layers`):
    Megatron-Core runs them (--mtp-num-layers); the pinned torchtitan has none, so its rows
    train without them."""
    if not model.mtp_layers:
        return 0
    return np.where(g.titan, 0, model.mtp_layers)  # one value when the framework is grid-wide


def rank_memory(model: ModelSpec, g, params, optimizer_params, layers, first, last,
                pp_rank, layer_params=0.0, head_params=0.0,
                fp8_transpose_copy: bool = True,
                acts: ActivationTerms | None = None,
                static: RankStaticMemory | None = None) -> dict[str, np.ndarray]:
    """Peak bytes on one GPU of pipeline rank `pp_rank` of every layout in the grid `g`, by
    part (`MemoryBreakdown` field names). The rank holds `params` parameters and the optimizer
    state of `optimizer_params` of them (sharded over data parallelism with the distributed
    optimizer; with FSDP every state is that shard), `layers` layers' activations for its
    in-flight micro-batches, and the embedding output / logits when it is the first / last
    rank (`first`, `last`). `layer_params` / `head_params`: one block's and the LM head's
    parameters on this GPU before FSDP sharding (for the unsharded in-flight term).
    Gradients: fp32 (4 bytes) or bf16 (2) main grads as `grad_reduce_fp32` says.
    `fp8_transpose_copy`: `GpuSpec.fp8_transpose_copy` (`fp8_weight_bytes`). `acts`:
    `activation_terms(model, g)` and `static`: `rank_static_memory(...)`, when the caller
    already has them (then `params` and `optimizer_params` are not read)."""
    acts = acts if acts is not None else activation_terms(model, g)
    if static is None:
        static = rank_static_memory(g, params, optimizer_params, layers, pp_rank, layer_params,
                                    head_params, fp8_transpose_copy)
    inflight = static.inflight
    per_layer = acts.per_layer
    # offloaded layers' activations live in host memory. Transformer Engine >= 2.10 releases
    # layer i's GPU copy before layer L - N + i runs forward and reloads it only once layer
    # L - N + i has run backward, so L - N layers are resident at any time
    # (transformer_engine/pytorch/cpu_offload.py, DefaultOffloadSynchronizer, v2.13).
    offload = g.column("offload_activation_layers")
    act = per_layer * (layers - offload) * inflight
    act = act + np.where(g.recompute > 0, acts.no_recompute - per_layer, 0.0)  # rematerialised
    act = act + np.where(first, acts.embedding * inflight, 0.0)
    # the last rank's MTP modules: one more layer each per in-flight micro-batch, and their
    # own logits next to the main head's until the losses' backward
    mtp = mtp_modules(model, g)
    act = act + np.where(last, acts.logits * (1 + mtp) + mtp * per_layer * inflight, 0.0)
    return {
        **static.state,
        "activations_bytes": act,
        "buffers_bytes": BUFFER_FIXED_BYTES + FRAGMENTATION * act,
        "unsharded_inflight_bytes": static.unsharded,
    }


def state_bytes(g, params, optimizer_params, fp8_transpose_copy: bool = True
                ) -> dict[str, np.ndarray]:
    """Weights, gradients and optimizer state on one GPU holding `params` parameters and the
    optimizer state of `optimizer_params` of them (`rank_memory`'s arguments), by
    `MemoryBreakdown` field: the part of the memory no micro-batch, recompute or schedule
    choice changes.

    Megatron: bf16 weights 2 (fp8: `fp8_weight_bytes`, the parameters themselves where
    Megatron gathers them in fp8, i.e. with the distributed optimizer or FSDP) + main grads
    (fp32 4 / bf16 2) per parameter, fp32 master + Adam 12 per optimizer-state parameter.
    FSDP states (every one the rank's shard, `optimizer_params`): FSDP2 (torchtitan) fp32
    param 4 + fp32 grad 4 + Adam 8; Megatron-FSDP (optim_grads_params) the distributed
    optimizer's bytes: param + main grad + 12; with optim_grads (ZeRO-2, `zero2_rows`) the
    parameters stay whole: param bytes on every parameter, main grad and 12 on the shard."""
    fp8 = g.dtype in FP8_DTYPES
    fsdp = g.column("fsdp")
    titan = g.titan
    grad_bytes = np.where(g.column("grad_reduce_fp32"), GRAD_BYTES, BF16_GRAD_BYTES)
    weight_bytes = (fp8_weight_bytes(g.dtype, fp8_transpose_copy,
                                     g.distributed_optimizer | fsdp) if fp8 else WEIGHT_BYTES)
    if not fsdp.any():  # the Megatron terms alone (the same values, less work)
        return {"weights_bytes": params * weight_bytes, "grads_bytes": params * grad_bytes,
                "optimizer_state_bytes": optimizer_params * OPTIMIZER_BYTES}
    sharded = optimizer_params  # with FSDP the rank's shard of every parameter
    shard_w = np.where(titan, FSDP_PARAM_BYTES, weight_bytes)
    shard_g = np.where(titan, FSDP_GRAD_BYTES, grad_bytes)
    shard_o = np.where(titan, FSDP_ADAM_BYTES, OPTIMIZER_BYTES)
    whole = zero2_rows(g)  # ZeRO-2: the parameters are not sharded
    return {
        "weights_bytes": np.where(fsdp & ~whole, sharded * shard_w, params * weight_bytes),
        "grads_bytes": np.where(fsdp, sharded * shard_g, params * grad_bytes),
        "optimizer_state_bytes": np.where(fsdp, sharded * shard_o,
                                          optimizer_params * OPTIMIZER_BYTES),
    }


def zero2_rows(g) -> np.ndarray:
    """Rows run as Megatron-FSDP optim_grads (ZeRO-2: parameters whole, `Layout.fsdp_strategy`)."""
    return g.column("fsdp") & (g.fsdp_strategy == "optim_grads") & ~g.titan


def keeps_unsharded(g) -> np.ndarray:
    """Rows whose FSDP keeps every block's gathered parameters from its forward to its
    backward: torchtitan's "default" policy with pp > 1 (and Megatron-FSDP's, as modelled),
    or `Layout.fsdp_reshard_after_forward` never; "always" reshards even with pp."""
    policy = g.fsdp_reshard_after_forward
    return (g.pp > 1) & (policy != "always") | (policy == "never")


def fsdp_unsharded_grad_bytes(g) -> np.ndarray:
    """Bytes per parameter of one block's unsharded gradients in backward, per row of `g`.

    torchtitan (FSDP2, reduce dtype fp32): `FSDP_UNSHARDED_GRAD_BYTES`. Megatron-FSDP: the
    autograd bf16 gradient (2) plus the unreduced bucket it is accumulated into, in the main
    grad dtype (param_and_grad_buffer.py `_resolve_group_grad_dtype` at Megatron-LM d98e8a64:
    bf16 for bf16 and fp8 parameters unless asked otherwise; fp32 with `grad_reduce_fp32`)."""
    megatron = WEIGHT_BYTES + np.where(g.column("grad_reduce_fp32"), GRAD_BYTES, BF16_GRAD_BYTES)
    return np.where(g.titan, FSDP_UNSHARDED_GRAD_BYTES, megatron)


def fsdp_inflight_bytes(layer_params, head_params, layers, pp, gather_bytes, zero2, keep,
                        grad_bytes, block_params=None):
    """Unsharded parameters and gradients FSDP holds at the peak on one GPU (bytes).

    torchtitan 0.3.0 (torchtitan/distributed/fsdp.py) wraps each transformer block as one
    FSDP unit that reshards after forward unless pipeline parallelism is on ("default"
    policy: pp keeps the stage's blocks unsharded between its forwards and backwards), and
    keeps the final norm + LM head unsharded from forward to backward. So:
      blocks:   FSDP_PREFETCH_LAYERS x layer_params x gather_bytes   (pp == 1)
                layers x layer_params x gather_bytes                   (pp > 1)
      backward: one block's unsharded gradients, bf16 + the fp32 reduce-scatter input
      LM head:  head_params x gather_bytes (on the rank holding it)
      pp > 1:   torch.distributed.pipelining's stage runs every backward but the last
                without gradient sync or resharding (stage.py backward_maybe_with_nosync), so
                FSDP2 accumulates the stage's unsharded gradients, upcast to the fp32 reduce
                dtype (_fsdp_param.py to_accumulated_grad_if_needed): 4 bytes x stage params.
    `layer_params` are one block's parameters on this GPU before sharding (split over tp):
    the rank's average block (`layers` x it: the parameters the rank holds);
    `block_params` (default `layer_params`) the heaviest block's, which sizes the prefetched
    blocks and the one block's gradients (`megatron.heaviest_block_params`).
    ZeRO-2 rows (`zero2`: Megatron-FSDP optim_grads) gather nothing: only the block's
    gradients in flight to their reduce-scatter (and the pp > 1 accumulation) remain. `keep`
    (`keeps_unsharded`): the rows that keep all the stage's blocks gathered. `grad_bytes`:
    bytes per parameter of the unsharded gradients (`fsdp_unsharded_grad_bytes`).
    """
    block_params = layer_params if block_params is None else block_params
    kept = np.where(zero2, 0.0, np.where(keep, layers * layer_params, 0.0))
    prefetched = np.where(zero2 | keep, 0.0,
                          np.minimum(layers, FSDP_PREFETCH_LAYERS) * block_params)
    head_params_gathered = np.where(zero2, 0.0, head_params)
    accumulated = np.where(pp > 1, (layers * layer_params + head_params) * FSDP_GRAD_BYTES, 0.0)
    return ((kept + prefetched) * gather_bytes + block_params * grad_bytes
            + head_params_gathered * gather_bytes + accumulated)
