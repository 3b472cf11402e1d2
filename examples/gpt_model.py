"""A small decoder-only GPT built from a meshplan `ModelSpec`, split into pipeline chunks.

The example trainer (`train_gpt.py`) builds one `GPTChunk` per pipeline (virtual) stage it
owns. A chunk holds the global layers `[first_layer, last_layer)` under the keys
`layers.<global index>`, plus the token embedding on the first chunk and the final norm and
LM head on the last, so parameter names (and therefore checkpoint keys) are the same under
every layout: the single-process model is simply the one chunk holding everything.

Architecture: token embedding, pre-norm blocks (causal self-attention with rotary positions and
grouped-query attention, an MLP of the spec's kind), final norm, LM head (tied to the embedding
when `tied_embeddings`). LayerNorm for GPT-style GELU models, RMSNorm otherwise. No biases, no
dropout, float32. Initialisation draws every parameter from a generator seeded by
`(seed, parameter name)`, so weights do not depend on how the model is split.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cost_models.specs import ModelSpec

INIT_STD = 0.02
"""Standard deviation of weight init (GPT-2); residual output projections are scaled down."""
ROPE_THETA = 10000.0


def _norm(spec: ModelSpec) -> nn.Module:
    """LayerNorm for GELU (GPT-2/3 family), RMSNorm for gated SiLU and squared ReLU models."""
    if spec.mlp_kind == "gelu":
        return nn.LayerNorm(spec.hidden_size, eps=1e-5, bias=False)
    return nn.RMSNorm(spec.hidden_size, eps=1e-5)


def apply_rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, rotate-half form) of x: (batch, seq, heads, d)."""
    seq, dim = x.shape[1], x.shape[-1]
    inv_freq = ROPE_THETA ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=x.device), inv_freq)
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)[None, :, None, :]
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1)[None, :, None, :]
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads.

    Under tensor parallelism wq/wk/wv hold a column slice (whole heads) and wo a row slice, so
    the head counts are inferred from the local projection widths (`view(..., -1, d)`).
    """

    def __init__(self, spec: ModelSpec, selective_recompute: bool):
        super().__init__()
        self.head_dim = spec.head_dim
        self.kv_repeat = spec.num_heads // spec.num_kv_heads
        self.selective_recompute = selective_recompute
        self.wq = nn.Linear(spec.hidden_size, spec.q_width, bias=False)
        self.wk = nn.Linear(spec.hidden_size, spec.kv_width, bias=False)
        self.wv = nn.Linear(spec.hidden_size, spec.kv_width, bias=False)
        self.wo = nn.Linear(spec.q_width, spec.hidden_size, bias=False)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = k.repeat_interleave(self.kv_repeat, dim=1)
        v = v.repeat_interleave(self.kv_repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq = x.shape[0], x.shape[1]
        q = apply_rope(self.wq(x).view(batch, seq, -1, self.head_dim)).transpose(1, 2)
        k = apply_rope(self.wk(x).view(batch, seq, -1, self.head_dim)).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.selective_recompute and torch.is_grad_enabled():
            # Megatron "selective": keep the projections, recompute only the attention core.
            out = checkpoint(self._core, q, k, v, use_reentrant=False)
        else:
            out = self._core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """MLP: gelu / squared_relu use w1 (up) and w2 (down); gated_silu / gated_gelu add w3
    (SwiGLU / GeGLU)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.kind = spec.mlp_kind
        self.w1 = nn.Linear(spec.hidden_size, spec.ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(spec.ffn_hidden_size, spec.hidden_size, bias=False)
        if self.kind in ("gated_silu", "gated_gelu"):
            self.w3 = nn.Linear(spec.hidden_size, spec.ffn_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated_silu":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        if self.kind == "gated_gelu":
            return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))
        if self.kind == "squared_relu":
            return self.w2(F.relu(self.w1(x)).square())
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block; `recompute="full"` checkpoints the whole block."""

    def __init__(self, spec: ModelSpec, recompute: str):
        super().__init__()
        self.full_recompute = recompute == "full"
        self.attention_norm = _norm(spec)
        self.attention = Attention(spec, selective_recompute=recompute == "selective")
        self.ffn_norm = _norm(spec)
        self.feed_forward = FeedForward(spec)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class GPTChunk(nn.Module):
    """Layers [first_layer, last_layer) of the model, with embedding/head at the ends.

    Input: token ids (batch, seq) on the first chunk, hidden states (batch, seq, h) otherwise.
    Output: logits (batch, seq, vocab) on the last chunk, hidden states otherwise. With tied
    embeddings the last chunk also holds `tok_embeddings` (unused in its forward) so the head
    weight keeps the name `tok_embeddings.weight` on every layout; the trainer sums its
    gradient with the first chunk's copy.
    """

    def __init__(self, spec: ModelSpec, first_layer: int, last_layer: int, recompute: str = "none"):
        super().__init__()
        self.is_first = first_layer == 0
        self.is_last = last_layer == spec.num_layers
        self.tied = spec.tied_embeddings
        if self.is_first or (self.is_last and self.tied):
            self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): Block(spec, recompute) for i in range(first_layer, last_layer)}
        )
        if self.is_last:
            self.norm = _norm(spec)
            self.output = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
            self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head (call again after re-wrapping params)."""
        if self.is_last and self.tied:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.is_first else x
        for layer in self.layers.values():
            h = layer(h)
        if not self.is_last:
            return h
        return self.output(self.norm(h))


def _param_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter name (crc32 is stable across runs, unlike hash)."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


@torch.no_grad()
def init_weights(chunk: GPTChunk, seed: int, num_layers: int) -> None:
    """Initialise every parameter from (seed, name): N(0, 0.02) for matrices, with residual
    output projections (wo, w2) scaled by 1/sqrt(2 * layers) (GPT-2); norm weights 1."""
    for name, param in chunk.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0)
            continue
        std = INIT_STD
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            std /= math.sqrt(2 * num_layers)
        gen = torch.Generator(device="cpu").manual_seed(_param_seed(seed, name))
        param.copy_(torch.normal(0.0, std, size=param.shape, generator=gen))


def build_chunk(spec: ModelSpec, first_layer: int, last_layer: int, seed: int,
                recompute: str = "none") -> GPTChunk:
    """A chunk on CPU with its deterministic initial weights (float32)."""
    chunk = GPTChunk(spec, first_layer, last_layer, recompute)
    init_weights(chunk, seed, spec.num_layers)
    return chunk


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all tokens of the micro-batch."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
