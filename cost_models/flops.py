"""FLOP counts of a decoder-only transformer (exact integers for scalar inputs).

Notation (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", SC'21, Sec. 5.1 / Appendix): B micro-batch size, s sequence length, h hidden
size, l layers, V vocabulary, f MLP inner width, a query heads, d head width, g KV heads.

A matmul of (m x k) by (k x n) costs 2·m·k·n FLOPs (one multiply and one add per term).
Backward costs twice the forward (gradients w.r.t. inputs and weights). All functions accept
numpy arrays for the sequence/batch arguments and broadcast.
"""

from __future__ import annotations

import numpy as np

from .specs import ModelSpec


def linear_flops(tokens, in_features, out_features):
    """One dense layer applied to `tokens` rows: 2·tokens·in·out FLOPs (forward)."""
    return 2 * tokens * in_features * out_features


def attention_proj_flops(model: ModelSpec, tokens):
    """Q, K, V and output projections of one layer, forward, FLOPs.

    QKV: 2·T·h·(a·d + 2·g·d) (GQA shrinks K and V to g heads); output: 2·T·(a·d)·h.
    MLA (DeepSeek-V2, Liu et al. 2024, Sec. 2.1.2 eqs. 9-14; keys and values decompressed
    for training, not absorbed): every weight matrix of `attention_weight_shapes` once,
    2·T·in·out each.
    """
    if not model.is_mla:
        qkv = linear_flops(tokens, model.hidden_size, model.q_width + 2 * model.kv_width)
        out = linear_flops(tokens, model.q_width, model.hidden_size)
        return qkv + out
    return sum(linear_flops(tokens, i, o) for i, o in attention_weight_shapes(model))


def attention_weight_shapes(model: ModelSpec) -> tuple[tuple[int, int], ...]:
    """(in, out) of every attention weight matrix of one layer.

    MHA/GQA: W_QKV (h, a·d + 2·g·d), W_O (a·d, h). MLA (DeepSeek-V2 eqs. 9-14, with d_c the
    kv_lora_rank, d_c' the q_lora_rank, d_R the rotary width, d_n = d - d_R, d_v the value
    width): W_DQ (h, d_c') and W_UQ (d_c', a·d) (or W_Q (h, a·d) without a query rank),
    W_DKV with the shared rotary key W_KR (h, d_c + d_R), W_UK with W_UV (d_c, a·(d_n + d_v)),
    W_O (a·d_v, h).
    """
    h, a = model.hidden_size, model.num_heads
    if not model.is_mla:
        return ((h, model.q_width + 2 * model.kv_width), (model.q_width, h))
    q = ((h, model.q_lora_rank), (model.q_lora_rank, a * model.head_dim)) if model.q_lora_rank \
        else ((h, a * model.head_dim),)
    nope = model.head_dim - model.qk_rope_head_dim
    kv = ((h, model.kv_lora_rank + model.qk_rope_head_dim),
          (model.kv_lora_rank, a * (nope + model.value_head_dim)))
    return q + kv + ((a * model.value_head_dim, h),)


def attention_params(model: ModelSpec) -> int:
    """Attention parameters of one layer: the weight matrices of `attention_weight_shapes`,
    Q/K/V biases (a·d + 2·g·d), the output bias (h), qk-norm weights (per head: 2·d; over the
    width: a·d + g·d, OLMo 2), MLA's latent RMSNorms (d_c' + d_c, DeepSeek-V2 modeling code)
    and one sink logit per head (gpt-oss model card Sec. 2.1)."""
    h = model.hidden_size
    total = sum(i * o for i, o in attention_weight_shapes(model))
    if model.qkv_bias:
        total += model.q_width + 2 * model.kv_width
    if model.attn_out_bias:
        total += h
    if model.qk_norm == "head":
        total += 2 * model.head_dim
    elif model.qk_norm == "width":
        total += model.q_width + model.kv_width
    if model.is_mla:
        total += model.q_lora_rank + model.kv_lora_rank
    if model.attention_sinks:
        total += model.num_heads
    return total


def causal_key_pairs(seq_len, window: int = 0, chunk: int = 0):
    """Query-key pairs one head scores in one causal sequence of s tokens (continuous form).

    Full causal attention: s²/2 (half the square; flash kernels skip masked blocks).
    Sliding window w (a query sees the w latest keys, itself included): Σ_i min(i, w)
    = w²/2 + (s - w)·w = s·w - w²/2 for s > w, else s²/2 (our derivation; the O(s·w) cost of
    Beltagy et al. 2020, Longformer, Sec. 3.1). Chunked attention with chunks of c tokens
    (Llama 4: causal inside a chunk only): ⌊s/c⌋·c²/2 + r²/2 with r = s mod c.
    """
    if window:
        return np.where(seq_len > window, seq_len * window - window * window / 2,
                        seq_len * seq_len / 2)
    if chunk:
        whole, rest = np.floor_divide(seq_len, chunk), np.mod(seq_len, chunk)
        return (whole * chunk * chunk + rest * rest) / 2
    return seq_len * seq_len / 2


def mean_causal_key_pairs(model: ModelSpec, seq_len):
    """`causal_key_pairs` averaged over the attention layers: full_attention_layers layers at
    s²/2, the others with the model's sliding window or chunk."""
    local = causal_key_pairs(seq_len, model.sliding_window, model.attention_chunk_size)
    n, a = model.windowed_layers, model.attention_layers
    return ((a - n) * (seq_len * seq_len / 2) + n * local) / a


def attention_core_flops(model: ModelSpec, batch, seq_len, causal: bool = True):
    """Scores Q·K^T and the weighted sum of V for one layer, forward, FLOPs.

    Full (non-causal) count: 2·B·s²·a·d for Q·K^T plus the same for scores·V = 4·B·s²·a·d
    (= 4·B·s²·h for MHA, Narayanan et al. 2021 Appendix). A causal mask needs only half:
    flash attention skips the masked blocks, so `causal=True` counts 2·B·s²·a·d.
    Generally 2·B·P·a·(d_qk + d_v) with P the query-key pairs: s² non-causal, else
    `mean_causal_key_pairs` (sliding-window and chunked layers averaged over the layer
    pattern); MLA has d_qk = nope + rope and its own d_v (DeepSeek-V2 Sec. 2.1). A hybrid
    pattern's layers without attention count zero in the average (`ModelSpec.attention_share`).
    """
    if model.layer_pattern:
        return _attention_layer_core_flops(model, batch, seq_len, causal) \
            * model.attention_share
    return _attention_layer_core_flops(model, batch, seq_len, causal)


def _attention_layer_core_flops(model: ModelSpec, batch, seq_len, causal: bool = True):
    """`attention_core_flops` of one attention layer (exact integers for scalar inputs)."""
    if not model.is_mla and not model.windowed_layers:
        full = 4 * batch * seq_len * seq_len * model.q_width
        return full // 2 if causal else full
    per_pair = model.num_heads * attention_flops_per_score(model)  # all heads, one pair
    if not causal:
        return batch * seq_len * seq_len * per_pair
    if not model.windowed_layers:
        return batch * seq_len * seq_len * per_pair // 2
    return batch * mean_causal_key_pairs(model, seq_len) * per_pair


def attention_flops_per_score(model: ModelSpec) -> int:
    """Matmul FLOPs of the attention core per query-key score and head, forward: 2·d_qk for
    Q·K^T plus 2·d_v for scores·V (`attention_core_flops` over the scored pairs). 512 at head
    dim 128; 256 at 64 (gpt-oss); 640 for MLA's 192 / 128 (DeepSeek-V3). Each score also
    costs one softmax exponential, so the exponentials weigh more where this is small."""
    return 2 * (model.head_dim + model.value_head_dim)


def dense_mlp_flops(model: ModelSpec, tokens):
    """Dense MLP of one layer, forward, FLOPs: 2·T·h·f per weight matrix
    (3 matrices for gated SwiGLU: gate, up, down; 2 for GELU / squared ReLU)."""
    return model.mlp_matrices * linear_flops(tokens, model.hidden_size, model.ffn_hidden_size)


def moe_mlp_flops(model: ModelSpec, tokens):
    """Mixture-of-experts MLP of one layer, forward, FLOPs: the router (2·T·h·E), each token's
    top-k routed experts (k · matrices · 2·T·h·f_e) and the shared experts (matrices ·
    2·T·h·f_shared). Only active experts count (Fedus et al. 2022, Switch Transformers Sec. 2)."""
    h, m = model.hidden_size, model.mlp_matrices
    return (linear_flops(tokens, h, model.num_experts)
            + model.experts_top_k * m * linear_flops(tokens, h, model.expert_ffn_hidden_size)
            + m * linear_flops(tokens, h, model.shared_expert_ffn_hidden_size))


def mlp_flops(model: ModelSpec, tokens):
    """MLP FLOPs of one layer, forward: the dense MLP, or for MoE and hybrid models the
    average over layers of dense (the first num_dense_layers and, with moe_layer_every > 1,
    the layers between MoE layers; a pattern's - layers) and MoE layers."""
    if not (model.is_moe or model.layer_pattern):
        return dense_mlp_flops(model, tokens)
    return (model.dense_mlp_layers * dense_mlp_flops(model, tokens)
            + model.num_moe_layers * moe_mlp_flops(model, tokens)) / model.num_layers


def mamba_proj_flops(model: ModelSpec, tokens):
    """Weight matmuls of one Mamba-2 mixer, forward: the input projection h -> z, x, B, C, dt
    (2·T·h·(2·H·P + 2·G·N + H)) and the output projection H·P -> h (Dao & Gu 2024, "Transformers
    are SSMs", Sec. 7.1: the parallel projections of the Mamba-2 block)."""
    return (linear_flops(tokens, model.hidden_size, model.mamba_in_proj_width)
            + linear_flops(tokens, model.mamba_inner, model.hidden_size))


def mamba_scan_flops(model: ModelSpec, tokens):
    """The Mamba-2 mixer's work besides its projections, one layer, forward, FLOPs: the causal
    depthwise convolution (2·T·(H·P + 2·G·N)·K) and the SSD chunked scan with chunk Q (Dao & Gu
    2024 Sec. 6): per chunk and group C·B^T (2·Q²·N), per head the masked product with x
    (2·Q²·P), the chunk state B^T·x (2·Q·N·P) and the output from the passed states C·h
    (2·Q·N·P): per token 2·G·Q·N + H·(2·Q·P + 4·N·P). Tensor-core work in small tiles; the
    fp32 states between chunks are memory traffic (`mamba.mixer_times`)."""
    q, n, p = model.mamba_chunk_size, model.mamba_state_dim, model.mamba_head_dim
    conv = 2 * tokens * model.mamba_conv_channels * model.mamba_conv_kernel
    ssd = tokens * (2 * model.mamba_groups * q * n + model.mamba_num_heads * (2 * q * p + 4 * n * p))
    return conv + ssd


def layer_gemm_flops(model: ModelSpec, tokens):
    """All matmuls with weights in one layer, forward: projections + MLP, FLOPs (averaged over
    a hybrid pattern: attention projections on its * layers, Mamba projections on its M
    layers)."""
    if not model.layer_pattern:
        return attention_proj_flops(model, tokens) + mlp_flops(model, tokens)
    return (model.attention_share * attention_proj_flops(model, tokens) + mlp_flops(model, tokens)
            + model.mamba_share * mamba_proj_flops(model, tokens))


def lm_head_flops(model: ModelSpec, tokens):
    """Output projection to the vocabulary, forward: 2·T·h·V FLOPs."""
    return linear_flops(tokens, model.hidden_size, model.vocab_size)


def mtp_projection_flops(model: ModelSpec, tokens):
    """One multi-token prediction module's projection of the concatenated normed hidden state
    and normed next-token embedding (2h -> h), forward: 2·T·2h·h FLOPs (DeepSeek-AI 2024,
    DeepSeek-V3 Technical Report, Sec. 2.2, Eq. 21)."""
    return linear_flops(tokens, 2 * model.hidden_size, model.hidden_size)


def model_flops_per_step(model: ModelSpec, global_batch, seq_len, causal: bool = True,
                         mtp_layers: int | None = None):
    """Model FLOPs of one training step (forward + backward = 3x forward), no recompute.

    This is the numerator of MFU (Chowdhery et al. 2022, PaLM, Appendix B): FLOPs the model
    needs, not what the hardware executed. Each multi-token prediction module (`mtp_layers`,
    default the model's `ModelSpec.mtp_layers`) adds its projection, one more layer and the
    shared LM head (DeepSeek-V3 Sec. 2.2); Megatron-LM counts them the same way
    (`num_floating_point_operations`, mtp_num_layers).
    """
    tokens = global_batch * seq_len
    per_layer = layer_gemm_flops(model, tokens) + attention_core_flops(
        model, global_batch, seq_len, causal
    ) + model.mamba_share * mamba_scan_flops(model, tokens)
    mtp = model.mtp_layers if mtp_layers is None else mtp_layers
    head = lm_head_flops(model, tokens)
    return 3 * (model.num_layers * per_layer + head
                + mtp * (per_layer + head + mtp_projection_flops(model, tokens)))


def hardware_flops_per_step(model: ModelSpec, global_batch, seq_len, recompute: str,
                            causal: bool = True, mtp_layers: int | None = None):
    """FLOPs executed per step including activation recomputation.

    full: every layer's forward runs twice (4x forward in all); selective: only the attention
    core is recomputed (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", Sec. 5); the LM head is never recomputed.
    """
    base = model_flops_per_step(model, global_batch, seq_len, causal, mtp_layers)
    tokens = global_batch * seq_len
    core = attention_core_flops(model, global_batch, seq_len, causal)
    if recompute == "full":
        return base + model.num_layers * (layer_gemm_flops(model, tokens) + core
                                          + model.mamba_share * mamba_scan_flops(model, tokens))
    if recompute == "selective":
        return base + model.num_layers * core
    return base


def megatron_paper_flops(batch, seq_len, layers, hidden, vocab):
    """Narayanan et al. 2021 Eq. (3): 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)).

    Counts a GPT layer (MHA, 4h MLP) with full activation recomputation (4 forward-equivalents
    of the layers, 3 of the LM head) and non-causal attention. Used by Megatron-LM papers,
    MT-NLG and BLOOM to report TFLOP/s; exact for integer inputs.
    """
    # 96·B·s·l·h² + 16·B·s²·l·h + 6·B·s·h·V, the expanded form keeps integer arithmetic.
    return 96 * batch * seq_len * layers * hidden**2 + 16 * batch * seq_len**2 * layers * hidden \
        + 6 * batch * seq_len * hidden * vocab


def norm_params(model: ModelSpec) -> int:
    """Weights (and LayerNorm biases) of one layer's norms: norms_per_layer · h (· 2 with bias)."""
    return model.norms_per_layer * model.hidden_size * (2 if model.norm_bias else 1)


def dense_mlp_params(model: ModelSpec) -> int:
    """One dense MLP: matrices · h · f, plus biases when the model has them (f per input
    matrix, h for the output matrix)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    bias = (model.mlp_matrices - 1) * f + h if model.mlp_bias else 0
    return model.mlp_matrices * h * f + bias


def routed_expert_params(model: ModelSpec) -> int:
    """One routed expert: matrices · h · f_e, plus (gpt-oss) the gate/up biases (2·f_e) and the
    down bias (h)."""
    h, fe = model.hidden_size, model.expert_ffn_hidden_size
    bias = (model.mlp_matrices - 1) * fe + h if model.expert_bias else 0
    return model.mlp_matrices * h * fe + bias


def moe_shared_params(model: ModelSpec) -> int:
    """One MoE layer's always-resident part besides attention: the shared experts
    (matrices · h · f_shared) and the router (h·E, plus E biases with expert_bias)."""
    h = model.hidden_size
    router = h * model.num_experts + (model.num_experts if model.expert_bias else 0)
    return model.mlp_matrices * h * model.shared_expert_ffn_hidden_size + router


def parameter_count(model: ModelSpec) -> int:
    """Trainable parameters: per layer attention (`attention_params`: projections, MLA
    latents, biases, qk-norm, sinks) + norms + the dense MLP or every expert, the shared
    experts and the router, then embeddings, final norm, LM head unless tied.

    GPT-3 175B (96 layers, h 12288, V 51200, with biases) gives 174.6B in Narayanan et al.
    2021 Table 1's convention 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)); see
    `megatron_paper_params` for that closed form.
    """
    return _parameters(model, model.num_experts)


def active_parameter_count(model: ModelSpec, count_embedding: bool = True) -> int:
    """Parameters one token passes through: as `parameter_count` with only the top-k routed
    experts of each MoE layer. Model cards differ on the input embedding (a lookup, no
    FLOPs): Llama 4 counts it (17B), gpt-oss (model card Table 1: 5.13B) and DeepSeek (37B,
    21B) round to figures without it; `count_embedding=False` leaves it out (an untied
    LM head stays counted)."""
    total = _parameters(model, model.experts_top_k)
    if not count_embedding and not model.tied_embeddings:
        total -= model.vocab_size * model.hidden_size
    return total


def mamba_params(model: ModelSpec) -> int:
    """One Mamba-2 mixer (HF NemotronHMamba2Mixer, Megatron-Core MambaMixer): the input
    projection h x (2·H·P + 2·G·N + H), the depthwise convolution's weights and biases
    ((H·P + 2·G·N)·(K + 1)), dt_bias, A_log and D (H each), the gated RMSNorm (H·P) and the
    output projection H·P x h; no projection biases."""
    conv = model.mamba_conv_channels * (model.mamba_conv_kernel + 1)
    return (model.hidden_size * model.mamba_in_proj_width + conv + 3 * model.mamba_num_heads
            + model.mamba_inner + model.mamba_inner * model.hidden_size)


def _parameters(model: ModelSpec, experts: int) -> int:
    h = model.hidden_size
    moe = model.num_moe_layers
    total = model.attention_layers * attention_params(model) \
        + model.num_layers * norm_params(model) + model.dense_mlp_layers * dense_mlp_params(model)
    if model.mamba_layers:
        total += model.mamba_layers * mamba_params(model)
    if model.is_moe:  # `experts` routed experts, the shared experts and the router
        total += moe * (experts * routed_expert_params(model) + moe_shared_params(model))
    embed = model.vocab_size * h
    head = 0 if model.tied_embeddings else model.vocab_size * h
    return total + embed + head + h * (2 if model.norm_bias else 1)


def megatron_paper_params(layers: int, hidden: int, vocab: int, seq_len: int) -> int:
    """Narayanan et al. 2021 Sec. 5.1: P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)).

    = 12·l·h² + 13·l·h + (V + s)·h: weights and biases of a GPT layer (with LayerNorms),
    plus token and learned position embeddings (tied LM head).
    """
    return 12 * layers * hidden**2 + 13 * layers * hidden + (vocab + seq_len) * hidden
