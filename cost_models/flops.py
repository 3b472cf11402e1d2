"""FLOP counts of a decoder-only transformer (exact integers for scalar inputs).

Notation (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", SC'21, Sec. 5.1 / Appendix): B micro-batch size, s sequence length, h hidden
size, l layers, V vocabulary, f MLP inner width, a query heads, d head width, g KV heads.

A matmul of (m x k) by (k x n) costs 2·m·k·n FLOPs (one multiply and one add per term).
Backward costs twice the forward (gradients w.r.t. inputs and weights). All functions accept
numpy arrays for the sequence/batch arguments and broadcast.
"""

from __future__ import annotations

from .specs import ModelSpec


def linear_flops(tokens, in_features, out_features):
    """One dense layer applied to `tokens` rows: 2·tokens·in·out FLOPs (forward)."""
    return 2 * tokens * in_features * out_features


def attention_proj_flops(model: ModelSpec, tokens):
    """Q, K, V and output projections of one layer, forward, FLOPs.

    QKV: 2·T·h·(a·d + 2·g·d) (GQA shrinks K and V to g heads); output: 2·T·(a·d)·h.
    """
    qkv = linear_flops(tokens, model.hidden_size, model.q_width + 2 * model.kv_width)
    out = linear_flops(tokens, model.q_width, model.hidden_size)
    return qkv + out


def attention_core_flops(model: ModelSpec, batch, seq_len, causal: bool = True):
    """Scores Q·K^T and the weighted sum of V for one layer, forward, FLOPs.

    Full (non-causal) count: 2·B·s²·a·d for Q·K^T plus the same for scores·V = 4·B·s²·a·d
    (= 4·B·s²·h for MHA, Narayanan et al. 2021 Appendix). A causal mask needs only half:
    flash attention skips the masked blocks, so `causal=True` counts 2·B·s²·a·d.
    """
    full = 4 * batch * seq_len * seq_len * model.q_width
    return full // 2 if causal else full


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
    """MLP FLOPs of one layer, forward: the dense MLP, or for MoE models the average over
    layers of dense (first num_dense_layers) and MoE layers."""
    if not model.is_moe:
        return dense_mlp_flops(model, tokens)
    return (model.num_dense_layers * dense_mlp_flops(model, tokens)
            + model.num_moe_layers * moe_mlp_flops(model, tokens)) / model.num_layers


def layer_gemm_flops(model: ModelSpec, tokens):
    """All matmuls with weights in one layer, forward: projections + MLP, FLOPs."""
    return attention_proj_flops(model, tokens) + mlp_flops(model, tokens)


def lm_head_flops(model: ModelSpec, tokens):
    """Output projection to the vocabulary, forward: 2·T·h·V FLOPs."""
    return linear_flops(tokens, model.hidden_size, model.vocab_size)


def model_flops_per_step(model: ModelSpec, global_batch, seq_len, causal: bool = True):
    """Model FLOPs of one training step (forward + backward = 3x forward), no recompute.

    This is the numerator of MFU (Chowdhery et al. 2022, PaLM, Appendix B): FLOPs the model
    needs, not what the hardware executed.
    """
    tokens = global_batch * seq_len
    per_layer = layer_gemm_flops(model, tokens) + attention_core_flops(
        model, global_batch, seq_len, causal
    )
    return 3 * (model.num_layers * per_layer + lm_head_flops(model, tokens))


def hardware_flops_per_step(model: ModelSpec, global_batch, seq_len, recompute: str,
                            causal: bool = True):
    """FLOPs executed per step including activation recomputation.

    full: every layer's forward runs twice (4x forward in all); selective: only the attention
    core is recomputed (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", Sec. 5); the LM head is never recomputed.
    """
    base = model_flops_per_step(model, global_batch, seq_len, causal)
    tokens = global_batch * seq_len
    core = attention_core_flops(model, global_batch, seq_len, causal)
    if recompute == "full":
        return base + model.num_layers * (layer_gemm_flops(model, tokens) + core)
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


def parameter_count(model: ModelSpec) -> int:
    """Trainable parameters: per layer QKV + output projection + MLP + 2 norms (weight only,
    RMSNorm/LayerNorm without bias), embeddings, final norm, LM head unless tied.

    GPT-3 175B (96 layers, h 12288, V 51200, with biases) gives 174.6B in Narayanan et al.
    2021 Table 1's convention 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)); see
    `megatron_paper_params` for that closed form.
    """
    h = model.hidden_size
    attn = h * (model.q_width + 2 * model.kv_width) + model.q_width * h
    mlp = model.mlp_matrices * h * model.ffn_hidden_size
    total = model.num_layers * (attn + 2 * h) + (model.num_layers - model.num_moe_layers) * mlp
    if model.is_moe:  # every expert's weights, the shared experts and the router
        experts = (model.num_experts * model.expert_ffn_hidden_size
                   + model.shared_expert_ffn_hidden_size) * model.mlp_matrices * h
        total += model.num_moe_layers * (experts + h * model.num_experts)
    embed = model.vocab_size * h
    head = 0 if model.tied_embeddings else model.vocab_size * h
    return total + embed + head + h


def megatron_paper_params(layers: int, hidden: int, vocab: int, seq_len: int) -> int:
    """Narayanan et al. 2021 Sec. 5.1: P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)).

    = 12·l·h² + 13·l·h + (V + s)·h: weights and biases of a GPT layer (with LayerNorms),
    plus token and learned position embeddings (tied LM head).
    """
    return 12 * layers * hidden**2 + 13 * layers * hidden + (vocab + seq_len) * hidden
