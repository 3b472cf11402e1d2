"""The vocabulary of meshplan: model, GPU, cluster, layout and estimate.

Everything here is a frozen, slotted dataclass with units in field names. Bytes and seconds
inside; `*_GBps` is 10^9 bytes/s per direction; `*_GiB` is 2^30 bytes; FLOP counts are exact.

Two kinds of error leave this module:
- `SpecError` (a `ValueError`): the user asked for something malformed (a negative size, a tp
  that does not divide the heads...). Its message says what is wrong and what to change.
- `InfeasibleLayout`: a well-formed layout that cannot run (does not fit in memory). The
  search counts these; `estimate` reports them with the memory breakdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from .dims import DEGREES, ParallelDims
from .errors import InfeasibleLayout, SpecError  # noqa: F401 - InfeasibleLayout re-exported
from .schedules import SCHEDULES, default_schedule, schedule_problem

GiB = 1 << 30

MAX_GPUS = 1_000_000
"""Largest cluster meshplan plans (the largest built today are ~200,000 GPUs)."""
MAX_GPUS_PER_NODE = 1000
"""Largest GPU (or process) count of one node."""
MAX_MODEL_DIM = 100_000_000
"""Largest value of any model size field (layers, widths, heads, vocabulary, experts)."""
MAX_SEQ_LEN = 100_000_000
"""Longest sequence, tokens (10x the longest context trained today)."""
MAX_GLOBAL_BATCH = 100_000_000
"""Largest global batch, sequences."""

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_KINDS: tuple[str, ...] = ("none", "selective", "full")
Dtype = Literal["bf16", "fp8", "mxfp8"]
DTYPES: tuple[str, ...] = ("bf16", "fp8", "mxfp8")
"""bf16; fp8: E4M3/E5M2 with one scale per tensor (Transformer Engine current/delayed
scaling, torchao tensorwise); mxfp8: OCP Microscaling FP8, one E8M0 scale per 32 elements
(Blackwell tensor cores; OCP MX spec v1.0, 2023)."""
FP8_DTYPES: tuple[str, ...] = ("fp8", "mxfp8")
"""Dtypes whose GEMM inputs are 8-bit (saved activations, casts, fp8 GEMM peak)."""
LAYER_SYMBOLS: tuple[str, ...] = ("M", "*", "-", "E")
"""Hybrid layer pattern symbols (Megatron-Core `hybrid_layer_allocation.Symbols`): Mamba,
attention, MLP, MoE."""
MlpKind = Literal["gated_silu", "gated_gelu", "gelu", "squared_relu"]
MLP_KINDS: tuple[str, ...] = ("gated_silu", "gated_gelu", "gelu", "squared_relu")
Schedule = Literal["1f1b", "interleaved", "zb-h1", "zb-v", "dualpipe", "dualpipev"]
MoeDispatcher = Literal["alltoall", "deepep", "hybridep"]
MOE_DISPATCHERS: tuple[str, ...] = ("alltoall", "deepep", "hybridep")
Framework = Literal["megatron", "torchtitan"]
FRAMEWORKS: tuple[str, ...] = ("megatron", "torchtitan")
FsdpStrategy = Literal["optim_grads_params", "optim_grads"]
FSDP_STRATEGIES: tuple[str, ...] = ("optim_grads_params", "optim_grads")
ReshardPolicy = Literal["default", "always", "never"]
RESHARD_POLICIES: tuple[str, ...] = ("default", "always", "never")
"""Whose memory conventions an estimate follows (selective recompute, loss, FSDP states)."""
NicKind = Literal["infiniband", "roce", "ethernet", "nvlink", "loopback"]
NIC_KINDS: tuple[str, ...] = ("infiniband", "roce", "ethernet", "nvlink", "loopback")


def _is_number(value: object) -> bool:
    """A finite int or float (bool, NaN and infinities are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require_positive(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not _is_number(value) or value <= 0:
            raise SpecError(f"{name} must be a finite positive number, got {_short(value)}")


def _require_range(obj: object, names: tuple[str, ...], low: float, high: float,
                   low_open: bool = False) -> None:
    """Each named field a finite number in [low, high] ((low, high] with low_open)."""
    for name in names:
        value = getattr(obj, name)
        ok = _is_number(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            bracket = "(" if low_open else "["
            raise SpecError(f"{name} must be a finite number in {bracket}{low:g}, {high:g}], "
                            f"got {_short(value)}")


def _short(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (error messages stay one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer's shape (what the cost model needs, nothing more)."""

    name: str
    """Preset name or the config file it came from."""
    num_layers: int
    """Transformer blocks."""
    hidden_size: int
    """Model width h."""
    ffn_hidden_size: int
    """MLP inner width f of dense layers (per branch for gated MLPs)."""
    num_heads: int
    """Query heads a."""
    num_kv_heads: int
    """Key/value heads (GQA); equals num_heads for MHA."""
    head_dim: int
    """Per-head width d (usually h / a)."""
    vocab_size: int
    """Vocabulary V (as trained, i.e. padded if the framework pads)."""
    max_seq_len: int = 4096
    """Longest sequence the model was configured for (informative; not a hard limit)."""
    tied_embeddings: bool = False
    """Input embedding and LM head share one matrix."""
    mlp_kind: MlpKind = "gated_silu"
    """gated_silu (SwiGLU: 3 matrices), gated_gelu (GeGLU, Gemma: 3 matrices), gelu (2 matrices),
    squared_relu (Nemotron, 2 matrices)."""
    dropout: bool = False
    """Dropout after attention/MLP (GPT-2/3 era); adds mask bytes to activations."""
    num_experts: int = 0
    """Routed experts per MoE layer (0: dense model)."""
    experts_top_k: int = 0
    """Experts each token is routed to."""
    expert_ffn_hidden_size: int = 0
    """MLP inner width of one routed expert."""
    num_shared_experts: int = 0
    """Always-active experts (Qwen2-MoE, DeepSeek)."""
    shared_expert_ffn_hidden_size: int = 0
    """MLP inner width of the shared expert block (all shared experts together)."""
    num_dense_layers: int = 0
    """Leading layers that use the dense MLP in an MoE model (DeepSeek first_k_dense_replace)."""
    moe_layer_every: int = 1
    """After the leading dense layers, every n-th layer is MoE and the others dense (Llama 4
    Maverick interleave_moe_layer_step 2); 1: all of them are MoE."""
    expert_bias: bool = False
    """Routed experts and the router have bias vectors (gpt-oss)."""
    q_lora_rank: int = 0
    """Multi-head latent attention (DeepSeek-V2/V3): rank of the query down-projection; 0 with
    kv_lora_rank > 0: queries projected directly from h (DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 0
    """MLA: rank of the joint key/value latent c_KV (0: ordinary multi-/grouped-query attention).
    With MLA, head_dim is the query/key width per head (no-position + rotary parts)."""
    qk_rope_head_dim: int = 0
    """MLA: rotary part of each query/key head; the rotary key is one head shared by all."""
    v_head_dim: int = 0
    """Value (and attention output) width per head; 0: head_dim."""
    sliding_window: int = 0
    """Keys each query sees on sliding-window layers (Mistral, Gemma 2/3, gpt-oss); 0: none."""
    attention_chunk_size: int = 0
    """Tokens per block of chunked-attention layers (Llama 4: a query sees only its own chunk,
    causally); 0: none."""
    full_attention_layers: int = 0
    """With sliding_window or attention_chunk_size set: layers that still attend to every
    earlier key (Gemma 2 and gpt-oss every 2nd, Gemma 3 every 6th, Llama 4 every 4th)."""
    attention_sinks: bool = False
    """A learned sink logit per head (gpt-oss): one parameter per head, no extra keys."""
    qk_norm: Literal["none", "head", "width"] = "none"
    """RMSNorm on queries and keys: per head (Qwen3, Gemma 3: head_dim weights each) or over
    the whole projection (OLMo 2: q_width and kv_width weights)."""
    qkv_bias: bool = False
    """Q, K and V projections have biases (Qwen2, GLM, gpt-oss, StarCoder 2)."""
    attn_out_bias: bool = False
    """The attention output projection has a bias (gpt-oss, StarCoder 2)."""
    mlp_bias: bool = False
    """Dense MLP matrices have biases (StarCoder 2, Phi-2, GPT-J)."""
    norms_per_layer: int = 2
    """Norm weight vectors per layer: 2 (pre-attention, pre-MLP), 4 (Gemma 2/3, GLM-4-0414:
    also after each), 1 (Falcon-7B: one norm before the parallel attention and MLP)."""
    norm_bias: bool = False
    """Norms are LayerNorms with a bias (Falcon, StarCoder 2, Phi-2), else RMSNorm/no bias."""
    parallel_attention_mlp: bool = False
    """Attention and MLP read the same layer input and their outputs are added (GPT-J, Falcon,
    Phi-2): one tensor-parallel all-reduce per pass instead of two (Wang & Komatsuzaki 2021,
    GPT-J; Chowdhery et al. 2022, PaLM Sec. 2 "Parallel Layers")."""
    mtp_layers: int = 0
    """Multi-token prediction modules (DeepSeek-V3 Sec. 2.2; HF num_nextn_predict_layers,
    Megatron --mtp-num-layers): each joins the normed hidden state with the normed embedding of
    the next token (a 2h x h projection), runs one more transformer block and the shared LM
    head + loss, on the last pipeline stage. Not counted in `flops.parameter_count` (DeepSeek
    reports 671B without it)."""
    layer_pattern: str = ""
    """Hybrid models (Nemotron-H / Nemotron 3; HF `hybrid_override_pattern`, Megatron-LM
    `--hybrid-layer-pattern`): one character per layer, each layer one pre-norm residual block
    around a single module: M a Mamba-2 mixer, * self-attention, - a dense MLP, E a
    mixture-of-experts MLP. Empty: every layer is attention + MLP (dense or MoE as the fields
    above say)."""
    mamba_num_heads: int = 0
    """Mamba-2 heads H of an M layer (the SSM's inner width is H·P)."""
    mamba_head_dim: int = 0
    """Mamba-2 head width P."""
    mamba_state_dim: int = 0
    """Mamba-2 state size N per group (HF ssm_state_size)."""
    mamba_groups: int = 0
    """Mamba-2 B/C groups G (HF n_groups): heads of a group share B and C."""
    mamba_conv_kernel: int = 4
    """Width of the Mamba-2 causal depthwise convolution over x, B and C."""
    mamba_chunk_size: int = 128
    """Chunk length Q of the SSD algorithm (Dao & Gu 2024, Sec. 6)."""
    expert_load_imbalance: float = 1.0
    """MoE: tokens of the busiest expert over the mean (1.0: perfectly balanced, as in
    force-balanced benchmarks); the busiest expert rank sets every MoE layer's pace. A training
    property rather than a shape: `--expert-imbalance` sets it (default 1.1, see docs/models.md)."""

    def __post_init__(self) -> None:
        _require_positive(
            self,
            ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads",
             "head_dim", "vocab_size", "max_seq_len"),
        )
        for f in fields(self):
            value = getattr(self, f.name)
            if _is_number(value) and not isinstance(value, bool) and value > MAX_MODEL_DIM:
                raise SpecError(f"model {self.name}: {f.name}={value} is over the "
                                f"{MAX_MODEL_DIM:,} limit; check the config")
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"model {self.name}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}; fix num_key_value_heads in the config"
            )
        if self.mlp_kind not in MLP_KINDS:
            raise SpecError(f"model {self.name}: mlp_kind {self.mlp_kind!r} is not one of {MLP_KINDS}")
        if self.num_experts and not (0 < self.experts_top_k <= self.num_experts):
            raise SpecError(
                f"model {self.name}: experts_top_k={self.experts_top_k} must be in 1..num_experts"
            )
        self._check_attention_variants()
        self._check_layer_pattern()
        _require_range(self, ("expert_load_imbalance",), 1, 100)

    def _check_layer_pattern(self) -> None:
        """SpecError for a hybrid layer pattern that does not fit the other fields."""
        p = self.layer_pattern
        if not isinstance(p, str) or set(p) - set(LAYER_SYMBOLS):
            raise SpecError(f"model {self.name}: layer_pattern must be a string of "
                            f"{' '.join(LAYER_SYMBOLS)} (Mamba, attention, MLP, MoE), got "
                            f"{_short(p)}")
        if not p:
            if self.mamba_num_heads:
                raise SpecError(f"model {self.name}: mamba_num_heads is set but layer_pattern "
                                "is empty; give the pattern (M for each Mamba layer)")
            return
        if len(p) != self.num_layers:
            raise SpecError(f"model {self.name}: layer_pattern has {len(p)} layers but "
                            f"num_layers={self.num_layers}; make them agree")
        if ("E" in p) != self.is_moe:
            raise SpecError(f"model {self.name}: layer_pattern {'has' if 'E' in p else 'lacks'} "
                            f"E (MoE) layers but num_experts={self.num_experts}")
        if self.num_dense_layers or self.moe_layer_every != 1:
            raise SpecError(f"model {self.name}: with a layer_pattern, leave num_dense_layers "
                            "and moe_layer_every unset (the pattern places the MoE layers)")
        if "M" in p and not (self.mamba_num_heads and self.mamba_head_dim
                             and self.mamba_state_dim and self.mamba_groups
                             and self.mamba_conv_kernel and self.mamba_chunk_size):
            raise SpecError(f"model {self.name}: M (Mamba) layers need mamba_num_heads, "
                            "mamba_head_dim, mamba_state_dim and mamba_groups > 0")
        if "M" in p and self.mamba_num_heads % self.mamba_groups:
            raise SpecError(f"model {self.name}: mamba_num_heads={self.mamba_num_heads} is not "
                            f"a multiple of mamba_groups={self.mamba_groups}")
        if self.full_attention_layers > self.attention_layers:
            raise SpecError(f"model {self.name}: full_attention_layers="
                            f"{self.full_attention_layers} exceeds the pattern's "
                            f"{self.attention_layers} attention layers")
        if self.parallel_attention_mlp:
            raise SpecError(f"model {self.name}: a layer_pattern model has one module per "
                            "layer; parallel_attention_mlp does not apply")
        if self.mtp_layers:
            raise SpecError(f"model {self.name}: multi-token prediction on a hybrid pattern is "
                            "not modelled (its modules have their own pattern); set "
                            "mtp_layers 0 (--mtp-layers 0)")

    def _check_attention_variants(self) -> None:
        """SpecError for MLA, window, norm and layer-pattern fields out of range."""
        for name in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                     "sliding_window", "attention_chunk_size", "full_attention_layers",
                     "norms_per_layer", "mtp_layers", "mamba_num_heads", "mamba_head_dim",
                     "mamba_state_dim", "mamba_groups", "mamba_conv_kernel",
                     "mamba_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"model {self.name}: {name} must be a non-negative integer, "
                                f"got {_short(value)}")
        if isinstance(self.moe_layer_every, bool) or not isinstance(self.moe_layer_every, int) \
                or not 1 <= self.moe_layer_every <= self.num_layers:
            raise SpecError(f"model {self.name}: moe_layer_every must be an integer in "
                            f"1..num_layers, got {_short(self.moe_layer_every)}")
        if self.kv_lora_rank and not 0 < self.qk_rope_head_dim < self.head_dim:
            raise SpecError(f"model {self.name}: MLA needs 0 < qk_rope_head_dim < head_dim "
                            f"(head_dim = qk_nope_head_dim + qk_rope_head_dim), got "
                            f"{self.qk_rope_head_dim} and {self.head_dim}")
        if self.sliding_window and self.attention_chunk_size:
            raise SpecError(f"model {self.name}: set sliding_window or attention_chunk_size, "
                            "not both")
        if self.full_attention_layers > self.num_layers:
            raise SpecError(f"model {self.name}: full_attention_layers="
                            f"{self.full_attention_layers} exceeds num_layers={self.num_layers}")
        for name in ("expert_bias", "attention_sinks", "qkv_bias", "attn_out_bias", "mlp_bias",
                     "norm_bias", "parallel_attention_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"model {self.name}: {name} must be true or false, "
                                f"got {_short(getattr(self, name))}")
        if self.qk_norm not in ("none", "head", "width"):
            raise SpecError(f"model {self.name}: qk_norm must be none, head or width, "
                            f"got {_short(self.qk_norm)}")
        if self.num_dense_layers > self.num_layers:
            raise SpecError(f"model {self.name}: num_dense_layers={self.num_dense_layers} "
                            f"exceeds num_layers={self.num_layers}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        """Layers whose MLP is a mixture of experts (the rest use the dense MLP)."""
        if self.layer_pattern:
            return self.layer_pattern.count("E")
        if not self.is_moe:
            return 0
        return (self.num_layers - self.num_dense_layers) // self.moe_layer_every

    @property
    def dense_mlp_layers(self) -> int:
        """Layers with a dense MLP: every non-MoE layer, or a hybrid pattern's - layers."""
        if self.layer_pattern:
            return self.layer_pattern.count("-")
        return self.num_layers - self.num_moe_layers

    @property
    def attention_layers(self) -> int:
        """Layers with self-attention: all of them, or a hybrid pattern's * layers."""
        return self.layer_pattern.count("*") if self.layer_pattern else self.num_layers

    @property
    def mamba_layers(self) -> int:
        """Mamba-2 mixer layers (a hybrid pattern's M layers)."""
        return self.layer_pattern.count("M")

    @property
    def blocks_per_layer(self) -> int:
        """Residual blocks (norm, module, residual add) per layer: 2 (attention, MLP), 1 in a
        hybrid pattern, whose layer holds one module. Per-layer kernel counts, norm passes
        and tensor-parallel all-reduces scale with it."""
        return 1 if self.layer_pattern else 2

    @property
    def attention_share(self) -> float:
        """Share of layers with attention (1.0 but for hybrid patterns): per-layer attention
        costs, averaged over the layers, are scaled by it."""
        return self.attention_layers / self.num_layers

    @property
    def mamba_share(self) -> float:
        """Share of layers that are Mamba-2 mixers."""
        return self.mamba_layers / self.num_layers

    @property
    def mamba_inner(self) -> int:
        """Mamba-2 inner width H·P (x, z and the SSM output y are this wide)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_channels(self) -> int:
        """Channels of the Mamba-2 convolution: x (H·P), B and C (G·N each)."""
        return self.mamba_inner + 2 * self.mamba_groups * self.mamba_state_dim

    @property
    def mamba_in_proj_width(self) -> int:
        """Output width of the Mamba-2 input projection: z (H·P), x, B, C and dt (H)."""
        return self.mamba_inner + self.mamba_conv_channels + self.mamba_num_heads

    @property
    def active_ffn_width(self) -> float:
        """MLP inner width one token passes through, averaged over layers: f for dense layers,
        top_k·f_expert + f_shared for MoE layers, 0 for a hybrid pattern's Mamba and attention
        layers (the width activations and FLOPs scale with)."""
        if not (self.is_moe or self.layer_pattern):
            return float(self.ffn_hidden_size)
        moe = self.experts_top_k * self.expert_ffn_hidden_size + self.shared_expert_ffn_hidden_size
        return (self.dense_mlp_layers * self.ffn_hidden_size + self.num_moe_layers * moe) \
            / self.num_layers

    @property
    def gated_mlp(self) -> bool:
        """The MLP multiplies an activated gate by an up projection (SwiGLU, GeGLU)."""
        return self.mlp_kind in ("gated_silu", "gated_gelu")

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices in one MLP: 3 for gated (gate, up, down), else 2."""
        return 3 if self.gated_mlp else 2

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2 Sec. 2.1)."""
        return self.kv_lora_rank > 0

    @property
    def value_head_dim(self) -> int:
        """Width of one value head (v_head_dim, else head_dim)."""
        return self.v_head_dim or self.head_dim

    @property
    def qkv_width(self) -> int:
        """Q, K and V widths per token as the attention core reads them: a·d + 2·g·d, or for
        MLA (keys and values decompressed per head) a·d_qk + a·d_qk + a·d_v."""
        if self.is_mla:
            return self.num_heads * (2 * self.head_dim + self.value_head_dim)
        return self.q_width + 2 * self.kv_width

    @property
    def attn_out_width(self) -> int:
        """Input width of the attention output projection: a·d_v (= q_width without MLA)."""
        return self.num_heads * self.value_head_dim if self.is_mla else self.q_width

    @property
    def windowed_layers(self) -> int:
        """Layers whose queries see a sliding window or one chunk of keys."""
        if not (self.sliding_window or self.attention_chunk_size):
            return 0
        return self.attention_layers - self.full_attention_layers


# --------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GemmEfficiency:
    """How close dense matmuls get to peak on one GPU type and dtype (calibrated).

    Time of one GEMM of F FLOPs = F / (max_fraction * peak) + overhead_s: the sustained
    throughput of large tiles plus a fixed cost per kernel (launch, wave quantisation tail).
    """

    max_fraction: float
    """Sustained fraction of dense peak on large GEMMs (0..1)."""
    overhead_s: float
    """Fixed time per GEMM kernel, seconds."""
    attention_fraction: float
    """Fraction of dense peak the matmuls of fused (flash) attention reach (0..1); its
    softmax exponentials add their own time where `GpuSpec.tensor_flops_per_exp` is set."""

    def __post_init__(self) -> None:
        _require_range(self, ("max_fraction", "attention_fraction"), 0, 1, low_open=True)
        _require_range(self, ("overhead_s",), 0, 1)


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One accelerator type (per GCD for multi-die parts)."""

    name: str
    memory_GiB: float
    """HBM capacity as the framework sees it."""
    peak_tflops: dict[str, float]
    """Dense peak TFLOP/s per dtype (no sparsity), e.g. {"bf16": 989, "fp8": 1979}."""
    hbm_bandwidth_GBps: float
    """Peak HBM bandwidth, 10^9 bytes/s."""
    efficiency: dict[str, GemmEfficiency]
    """Calibrated GEMM/attention efficiency per dtype."""
    hbm_efficiency: float = 0.7
    """Achieved fraction of HBM bandwidth by memory-bound kernels (norms, activations, Adam)."""
    tp_comm_overlap: float = 0.0
    """Fraction of tensor-parallel communication hidden behind GEMMs by the software stack
    usually run on this GPU (Megatron-Core/TE userbuffers on Hopper; none on 2021 A100 runs)."""
    dp_comm_overlap: float = 0.9
    """Fraction of the data-parallel reduction that overlaps the last micro-batch's backward."""
    grouped_gemm_half_gflop: float = 18.8
    """Forward GFLOP of one local expert's matrices per micro-batch (`megatron.
    expert_gemm_flops`: rows x 2·h·f_e per matrix) at which a grouped expert GEMM reaches half
    its large-GEMM throughput: efficiency W/(W + this), a fixed cost per expert problem (tile
    tail, prologue, scheduling) that small problems cannot amortise. Calibrated on the MoE
    rows (benchmarks/calibrate_moe_blackwell.py)."""
    ep_comm_overlap: float = 0.0
    """Fraction of the expert-parallel all-to-all hidden behind compute by the software stack
    (Megatron-Core: overlap of one micro-batch's dispatch with another's expert compute;
    calibrated on the MoE rows)."""

    moe_layer_overhead_s: float = 0.0
    """Fixed seconds per MoE layer per pass (forward or backward) of a micro-batch, whatever
    its size: the dropless token dispatcher's device-to-host sync of per-expert token counts,
    and the router, permute and dispatch kernels' launches (calibrated on the MoE rows)."""
    host_link_GBps: float = 55.0
    """GPU <-> host memory, achieved per direction, 10^9 bytes/s (activation offload): PCIe
    Gen5 x16 (64 GB/s peak) on HGX H100/H200/B200; NVLink-C2C on Grace superchips (GB200,
    GB300: 900 GB/s bidirectional, 450 each way); PCIe Gen4 x16 on A100 (32 peak)."""
    tdp_W: float = 0.0
    """Board power the fitted efficiencies hold at (datasheet TDP; 0: unknown)."""
    power_limit_W: float = 0.0
    """A lower power cap the GPUs run at (nvidia-smi -pl, e.g. 500 W H100s); 0: none. Tensor
    kernels then run at `clock_fraction` of their calibrated rate."""
    sdpa_attention_factor: float = 1.0
    """Throughput of PyTorch SDPA's fused attention (what torchtitan calls, `Layout.framework`
    torchtitan) relative to the fused attention Megatron-Core runs through Transformer Engine
    (`GemmEfficiency.attention_fraction`). On Hopper SDPA's flash backend is
    FlashAttention-2 while TE runs cuDNN's Hopper kernels; FlashAttention-3 reports 1.5-2x
    FA2 on H100 (Shah et al. 2024, Sec. 4.1). Fitted on the torchtitan rows (README)."""
    tensor_flops_per_exp: float = 0.0
    """Dense bf16 tensor-core FLOPs an SM issues in the time its special-function units
    (MUFU.EX2) issue one softmax exponential: tensor FLOPs per SM per clock over exponentials
    per SM per clock (MUFU.EX2: 16 on Ampere and Hopper, CUDA C++ Programming Guide,
    "Arithmetic Instructions"; still 16 on B200 while its tensor rate doubled, the forward
    bottleneck FlashAttention-4 designs around, Zadouri et al. 2026; 32 on Blackwell Ultra,
    NVIDIA "Making Softmax More Efficient with Blackwell Ultra", 2025). A100 2048/16 = 128,
    H100 4096/16 = 256, B200 8192/16 = 512, B300 8192/32 = 256. Flash attention spends one
    exponential per score besides its matmuls (`compute.attention_time`), so heads with fewer
    FLOPs per score (head dim 64) run further below the matmul rate. 0: not modelled (the
    attention fraction absorbs it). The backward's shared-memory limit (FlashAttention-4) is
    in the fitted fraction, not modelled apart."""
    fp8_transpose_copy: bool = True
    """Per-tensor-scaled fp8 GEMMs need the TN layout (Hopper), so Transformer Engine keeps a
    transposed fp8 copy of each weight for the backward; False where fp8 GEMMs take any
    layout (Blackwell: TE 2.x runs non-TN fp8 GEMMs there and keeps rowwise data only)."""

    def __post_init__(self) -> None:
        _require_positive(self, ("memory_GiB", "hbm_bandwidth_GBps", "grouped_gemm_half_gflop",
                                 "host_link_GBps"))
        _require_range(self, ("moe_layer_overhead_s",), 0, 1)
        _require_range(self, ("tdp_W", "power_limit_W"), 0, 100_000)
        if self.power_limit_W and not self.tdp_W:
            raise SpecError(f"GPU {self.name}: power_limit_W needs tdp_W (the power the "
                            "efficiencies were calibrated at)")
        _require_range(self, ("hbm_efficiency",), 0, 1, low_open=True)
        _require_range(self, ("tp_comm_overlap", "dp_comm_overlap", "ep_comm_overlap"), 0, 1)
        _require_range(self, ("sdpa_attention_factor",), 0, 1, low_open=True)
        _require_range(self, ("tensor_flops_per_exp",), 0, 1e6)
        if not isinstance(self.peak_tflops, dict) or not isinstance(self.efficiency, dict):
            raise SpecError(f"GPU {self.name}: peak_tflops and efficiency must map dtype names")
        for dtype, peak in self.peak_tflops.items():
            if not _is_number(peak) or peak <= 0:
                raise SpecError(f"GPU {self.name}: peak_tflops.{dtype} must be a finite positive "
                                f"number, got {_short(peak)}")
        if "bf16" not in self.peak_tflops:
            raise SpecError(f"GPU {self.name}: peak_tflops needs a bf16 entry")
        for dtype in self.peak_tflops:
            if dtype not in self.efficiency:
                raise SpecError(f"GPU {self.name}: no efficiency entry for dtype {dtype}")

    @property
    def clock_fraction(self) -> float:
        """Sustained tensor-core clock under `power_limit_W` relative to `tdp_W`: dynamic
        power P ~ C·V²·f with the voltage scaling with the frequency in the DVFS range, so
        f ~ P^(1/3) (static power ignored: an approximation that errs towards too little
        slowdown). 1.0 without a cap. Memory-bound kernels keep their speed (HBM clock)."""
        if not self.power_limit_W or not self.tdp_W or self.power_limit_W >= self.tdp_W:
            return 1.0
        return (self.power_limit_W / self.tdp_W) ** (1 / 3)

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`; SpecError if the GPU has none (e.g. fp8 on A100)."""
        if dtype not in self.peak_tflops:
            raise SpecError(
                f"GPU {self.name} has no {dtype} peak (supports {sorted(self.peak_tflops)}); "
                f"use --dtype {next(iter(self.peak_tflops))}"
            )
        return self.peak_tflops[dtype] * 1e12


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """A link class (NVLink inside a node, a NIC across nodes), per GPU and per direction."""

    kind: str
    """nvlink | infiniband | roce | ethernet | loopback."""
    bandwidth_GBps: float
    """Peak unidirectional bandwidth available to one GPU, 10^9 bytes/s."""
    latency_s: float
    """One-message latency (alpha), seconds."""
    efficiency: float = 0.85
    """Achieved fraction of bandwidth for large messages (bus bandwidth / peak)."""

    def __post_init__(self) -> None:
        _require_positive(self, ("bandwidth_GBps",))
        _require_range(self, ("latency_s",), 0, 1)
        _require_range(self, ("efficiency",), 0, 1, low_open=True)

    @property
    def effective_Bps(self) -> float:
        return self.bandwidth_GBps * 1e9 * self.efficiency


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One host."""

    name: str
    gpus: int
    gpu: str
    """Key into ClusterSpec.gpu_types."""
    nic: str = "infiniband"
    """NIC kind used across nodes: infiniband | roce | ethernet | loopback."""
    rack: str = "rack0"
    domain: str = ""
    """NVLink domain: nodes with the same non-empty name share one scale-up NVLink fabric
    (the 18 compute trays of a GB200 NVL72 rack); "" means the node is its own domain
    (DGX H100/B200: NVLink stops at the node)."""

    def __post_init__(self) -> None:
        if not isinstance(self.domain, str) or len(self.domain) > 253:
            raise SpecError(f"node {self.name}: domain must be a string of at most 253 "
                            f"characters, got {_short(self.domain)}")
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 253:
            raise SpecError(f"node name must be a non-empty string of at most 253 characters, "
                            f"got {_short(self.name)}")
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) \
                or not 0 < self.gpus <= MAX_GPUS_PER_NODE:
            raise SpecError(f"node {self.name}: gpus must be an integer in 1..{MAX_GPUS_PER_NODE}, "
                            f"got {_short(self.gpus)}")
        if self.nic not in NIC_KINDS:
            raise SpecError(f"node {self.name}: nic {self.nic!r} is not one of {NIC_KINDS}")


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """Nodes, GPU types and links; optionally measured per-node-pair links.

    `bandwidth_GBps[i][j]` / `latency_s[i][j]` (when present) are measured node-to-node values
    per GPU pair and direction; they override `inter_node` for that pair.
    """

    name: str
    nodes: tuple[NodeSpec, ...]
    gpu_types: dict[str, GpuSpec]
    intra_node: LinkSpec
    inter_node: LinkSpec
    nic_links: dict[str, LinkSpec] = field(default_factory=dict)
    """Per NIC kind inter-node link (heterogeneous fabrics); falls back to inter_node."""
    bandwidth_GBps: tuple[tuple[float, ...], ...] | None = None
    latency_s: tuple[tuple[float, ...], ...] | None = None
    domain_link: LinkSpec | None = None
    """Link between GPUs of different nodes of one NVLink domain (NVL72: NVLink 5 through the
    rack's NVLink switches, 900 GB/s per GPU per direction); None: `intra_node`'s."""
    _world_size: int = field(default=0, init=False, repr=False, compare=False)
    """GPUs over all nodes, computed once (planning 100,000 GPUs asks for it often)."""
    _gpu_counts: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    _gpu_kinds: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    _nodes_per_domain: int = field(default=1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise SpecError(f"cluster {self.name}: has no nodes")
        object.__setattr__(self, "_world_size", sum(n.gpus for n in self.nodes))
        object.__setattr__(self, "_gpu_counts", frozenset(n.gpus for n in self.nodes))
        object.__setattr__(self, "_gpu_kinds", frozenset(n.gpu for n in self.nodes))
        object.__setattr__(self, "_nodes_per_domain", _nodes_per_domain(self.name, self.nodes))
        if self.world_size > MAX_GPUS:
            raise SpecError(f"cluster {self.name}: {self.world_size:,} GPUs is over meshplan's "
                            f"limit of {MAX_GPUS:,}; plan a part of it")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise SpecError(f"cluster {self.name}: node names must be unique")
        for node in self.nodes:
            if node.gpu not in self.gpu_types:
                raise SpecError(
                    f"cluster {self.name}: node {node.name} uses GPU type {node.gpu!r} with no "
                    f"spec; add it under gpu_types (known: {sorted(self.gpu_types)})"
                )
        n = len(self.nodes)
        for label, matrix in (("bandwidth_GBps", self.bandwidth_GBps), ("latency_s", self.latency_s)):
            if matrix is None:
                continue
            if len(matrix) != n or any(len(row) != n for row in matrix):
                raise SpecError(
                    f"cluster {self.name}: {label} must be a {n}x{n} matrix matching the node "
                    f"list, got {len(matrix)} rows"
                )
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    if i != j and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                        raise SpecError(
                            f"cluster {self.name}: {label}[{i}][{j}] = {value!r} must be a "
                            "positive number"
                        )

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def gpus_per_node(self) -> int:
        """GPUs per node; SpecError if nodes differ (the homogeneous cost model needs one)."""
        counts = set(self._gpu_counts)
        if len(counts) != 1:
            raise SpecError(f"cluster {self.name}: nodes have different GPU counts {sorted(counts)}")
        return counts.pop()

    @property
    def nodes_per_domain(self) -> int:
        """Nodes per NVLink domain (1: NVLink stops at the node). Domains are runs of
        consecutive nodes of equal size, as racks are listed (checked at construction)."""
        return self._nodes_per_domain

    @property
    def domain_gpus(self) -> int:
        """GPUs of one NVLink domain: what a collective can span at NVLink speed."""
        return self.gpus_per_node * self._nodes_per_domain

    @property
    def domain_link_spec(self) -> LinkSpec:
        """The link between nodes of one domain (`domain_link`, else `intra_node`)."""
        return self.domain_link if self.domain_link is not None else self.intra_node

    @property
    def homogeneous(self) -> bool:
        return (
            len({(n.gpu, n.gpus, n.nic) for n in self.nodes}) == 1 and self.bandwidth_GBps is None
        )

    @property
    def gpu(self) -> GpuSpec:
        """The GPU type when all nodes share one; SpecError otherwise."""
        kinds = set(self._gpu_kinds)
        if len(kinds) != 1:
            raise SpecError(
                f"cluster {self.name} mixes GPU types {sorted(kinds)}; use --cost-model "
                "holmes or pipette, which model per-stage GPU types"
            )
        return self.gpu_types[kinds.pop()]

    def link_between(self, i: int, j: int) -> LinkSpec:
        """The link one GPU on node i uses to reach node j (measured if available)."""
        if i == j:
            return self.intra_node
        a, b = self.nodes[i], self.nodes[j]
        if a.domain and a.domain == b.domain:
            return self.domain_link_spec
        base = self.nic_links.get(a.nic, self.inter_node) if a.nic == b.nic else self._common_link(a, b)
        if self.bandwidth_GBps is None:
            return base
        latency = self.latency_s[i][j] if self.latency_s is not None else base.latency_s
        # Measured values are already achieved bandwidth: efficiency 1.
        return LinkSpec(base.kind, float(self.bandwidth_GBps[i][j]), float(latency), 1.0)

    def _common_link(self, a: NodeSpec, b: NodeSpec) -> LinkSpec:
        """Two NIC kinds meet on the slowest common transport (Holmes: RDMA kinds fall back to TCP)."""
        la = self.nic_links.get(a.nic, self.inter_node)
        lb = self.nic_links.get(b.nic, self.inter_node)
        slow = min((la, lb), key=lambda link: link.effective_Bps)
        eth = self.nic_links.get("ethernet")
        return eth if eth is not None and eth.effective_Bps < slow.effective_Bps else slow


def _nodes_per_domain(cluster: str, nodes: tuple[NodeSpec, ...]) -> int:
    """Nodes per NVLink domain; SpecError unless domains are contiguous runs of one size."""
    if not any(n.domain for n in nodes):
        return 1
    sizes: list[int] = []
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        if i and node.domain == nodes[i - 1].domain and node.domain:
            sizes[-1] += 1
            continue
        if node.domain in seen:
            raise SpecError(f"cluster {cluster}: the nodes of NVLink domain {node.domain!r} "
                            "must be listed together (one run of consecutive nodes)")
        if node.domain:
            seen.add(node.domain)
        sizes.append(1)
    if len(set(sizes)) != 1 and len(sizes) > 1:
        full = set(sizes[:-1])  # the last rack may be partly used
        if len(full) != 1 or sizes[-1] > sizes[0]:
            raise SpecError(f"cluster {cluster}: NVLink domains have different node counts "
                            f"{sorted(set(sizes))}; meshplan needs one domain size "
                            "(list a whole number of racks, or set domain on every node)")
    return sizes[0]


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """One way to split a training step over GPUs; its degrees are `dims` (`ParallelDims`,
    which owns the rank order, the groups and the rules they obey)."""

    tp: int
    """Tensor-parallel degree (splits heads and MLP columns)."""
    pp: int
    """Pipeline-parallel degree (splits layers into stages)."""
    dp: int
    """Data-parallel degree (replicas)."""
    micro_batch_size: int
    """Sequences per micro-batch per replica."""
    global_batch_size: int
    """Sequences per optimizer step over all replicas."""
    seq_len: int
    """Tokens per sequence."""
    cp: int = 1
    """Context-parallel degree (splits the sequence; ring attention)."""
    ep: int = 1
    """Expert-parallel degree (MoE only; folds into dp for expert layers)."""
    vp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank; > 1 means interleaved 1F1B."""
    etp: int | None = None
    """Expert tensor-parallel degree (MoE): splits each routed expert over etp ranks; None
    means tp (Megatron-Core's default). Folded with ep over the stage's tp·cp·dp ranks."""
    recompute: Recompute = "none"
    """Activation recomputation: none | selective (attention core) | full (whole layer)."""
    recompute_modules: tuple[str, ...] = ()
    """With selective recompute (Megatron): the submodules recomputed, Megatron-Core's
    `--recompute-modules` names (`cost_models.recompute_modules.MODULES`); () means its
    default, ("core_attn",)."""
    torch_compile: bool = False
    """torchtitan: the model under torch.compile (`--compile.enable`), which fuses the
    norms, rotary and activation elementwise ops; eager PyTorch runs each as its own kernel
    (`megatron.EAGER_EXTRA_PASSES_*`). Megatron-Core always runs Transformer Engine's fused
    kernels, so it is ignored there."""
    async_tp: bool = False
    """torchtitan: async tensor parallelism (`--compile.enable_async_tensor_parallel`, needs
    torch_compile): TP collectives pipelined with the matmuls. Without it torchtitan's TP
    communication is exposed (no Transformer Engine userbuffer overlap)."""
    offload_activation_layers: int = 0
    """Megatron-Core activation offload (`--cpu-offloading-num-layers N`): the activations of
    N layers go to host memory in the forward and come back for the backward, overlapped with
    the other layers' compute over `GpuSpec.host_link_GBps`. Megatron allows it with pp = 1
    and no recompute only."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (norms/dropout split over tp; RS+AG instead of AR)."""
    distributed_optimizer: bool = True
    """Shard optimizer state and fp32 master weights over dp (ZeRO-1)."""
    dtype: Dtype = "bf16"
    """Matmul dtype; parameters, gradients and optimizer are always mixed-precision bf16/fp32."""
    flash_attention: bool = True
    """Fused attention (FlashAttention / cuDNN); False: scores materialised (pre-2022 stacks)."""
    layers_per_stage: tuple[int, ...] | None = None
    """Layers per (virtual) stage in model order, length pp*vp; None means as even as possible."""
    cuda_graphs: bool = False
    """Whole-iteration CUDA graphs (Megatron-Core --cuda-graph-impl full_iteration): the host
    launches one graph per step, so the per-MoE-layer host cost (`GpuSpec.moe_layer_overhead_s`:
    the dropless dispatcher's device-to-host sync and kernel launches) disappears."""
    cuda_graph_modules: tuple[str, ...] = ()
    """Megatron-Core per-module CUDA graphs (`--cuda-graph-impl transformer_engine
    --cuda-graph-modules ...`, names in `CUDA_GRAPH_MODULES`): the captured modules' launches
    replay as graphs. Capturing the MoE router and the dispatcher's preprocess removes the
    share `megatron.PARTIAL_GRAPH_HOST_SAVED` of the per-MoE-layer host cost; () captures
    nothing. Exclusive with `cuda_graphs` (Megatron: modules must be empty with
    full_iteration)."""
    te_cross_entropy: bool = False
    """Megatron-Core's loss through Transformer Engine's fused cross entropy
    (`cross_entropy_loss_fusion` with `cross_entropy_fusion_impl = "te"`, what the
    Megatron-Bridge performance recipes run: scripts/performance/utils/overrides.py at v0.2.2-
    v0.5.1): an online softmax over the bf16 logits that writes the gradient in place, 2 bytes
    per logit instead of the fp32 softmax copy of Megatron's vocab-parallel loss
    (`memory.TE_LOGIT_BYTES`). Megatron-LM@d98e8a64's argument check rejects the combination,
    so only the Megatron-Bridge override launches it."""
    moe_dispatcher: MoeDispatcher = "alltoall"
    """Megatron-Core's MoE token dispatcher: alltoall (`--moe-token-dispatcher-type
    alltoall`, the default: one copy per routed expert over the wire) or a node-deduplicating
    flex backend (`--moe-token-dispatcher-type flex --moe-flex-dispatcher-backend deepep |
    hybridep`: one copy per remote node, forwarded over NVLink; `comm.node_dedup_scale`)."""
    moe_a2a_overlap: bool = False
    """Megatron-Core `--overlap-moe-expert-parallel-comm`: each micro-batch's expert
    all-to-all runs under another micro-batch's compute (1F1B A2A overlap; the share
    `GpuSpec.ep_comm_overlap` hidden). Off (Megatron's default), the dispatch and combine are
    exposed. Megatron needs ep > 1, vp > 1 when pp > 1, no full recompute and no "moe" in the
    recompute modules."""
    pipeline_schedule: Schedule | None = None
    """Pipeline schedule (`cost_models.schedules.SCHEDULES`); None: Megatron-LM's default for
    vp (interleaved when vp > 1, else 1f1b). Read it as `schedule`."""
    fsdp: bool = False
    """Fully sharded data parallelism (ZeRO-3; torchtitan FSDP2, Megatron-FSDP): parameters,
    gradients and optimizer state sharded over the shard group (dp/dp_replicate x cp), each
    layer's parameters all-gathered before its forward and backward and its gradients
    reduce-scattered after; `distributed_optimizer` is then moot."""
    dp_replicate: int = 1
    """HSDP: dp = dp_replicate x dp_shard; shard within a group of dp/dp_replicate ranks,
    replicate (all-reduce the sharded gradients) across the dp_replicate groups. Needs fsdp."""
    fsdp_strategy: FsdpStrategy = "optim_grads_params"
    """Megatron-FSDP's `--data-parallel-sharding-strategy` with fsdp: optim_grads_params
    (ZeRO-3, the default: parameters, gradients and optimizer state sharded; each layer's
    parameters gathered before its forward and backward) or optim_grads (ZeRO-2: parameters
    whole on every rank, no per-layer gather; gradients reduce-scattered into their shard,
    and the updated parameters all-gathered once per step). Megatron only."""
    fsdp_reshard_after_forward: ReshardPolicy = "default"
    """torchtitan's `parallelism.fsdp_reshard_after_forward` with fsdp: default (reshard each
    block after its forward unless pipeline parallelism is on), always (reshard even with
    pp: one more gather per block in backward, only two blocks unsharded at a time) or never
    (keep every block's gathered parameters from the forward to the backward: no backward
    gather, the stage's parameters unsharded at the peak). torchtitan only."""
    grad_reduce_fp32: bool = True
    """Main gradients (grad buffers) in fp32 (Megatron-LM's bf16 default forces
    accumulate_allreduce_grads_in_fp32; torchtitan's FSDP2 reduce dtype fp32); False: bf16
    grad buffers (Megatron-Bridge perf recipes set ddp.grad_reduce_in_fp32 = False)."""
    framework: Framework = "megatron"
    """Whose memory conventions apply. megatron: Megatron-Core + Transformer Engine (selective
    = attention core recomputed, fused vocab-parallel loss, Megatron-FSDP states 2 + g + 12
    bytes per sharded parameter). torchtitan: selective = per-op SAC (every other matmul
    output saved), fp32 cross entropy on upcast logits, FSDP2 states 4 + 4 + 8."""

    def __post_init__(self) -> None:
        if self.etp is None:  # Megatron-Core: expert_tensor_parallel_size defaults to tp
            object.__setattr__(self, "etp", self.tp)

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims.of(self)

    @property
    def world(self) -> int:
        return self.dims.world

    @property
    def schedule(self) -> Schedule:
        """The schedule this layout runs (`pipeline_schedule`, or the default for its vp)."""
        return self.pipeline_schedule or default_schedule(self.vp)

    @property
    def num_microbatches(self) -> int:
        """m = gbs / (dp * mbs): micro-batches each pipeline processes per step."""
        return self.global_batch_size // (self.dp * self.micro_batch_size)

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers of each (virtual) stage, model order, length pp*vp."""
        if self.layers_per_stage is not None:
            return self.layers_per_stage
        return even_split(num_layers, self.pp * self.vp)

    def validate(self, model: ModelSpec, num_gpus: int | None = None) -> None:
        """Raise SpecError explaining the first rule this layout breaks."""
        for name in (*DEGREES, "micro_batch_size", "global_batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SEQ_LEN:
                raise SpecError(f"{name.replace('_', '-')} must be an integer in 1..{MAX_SEQ_LEN:,}, "
                                f"got {_short(value)}")
        if self.seq_len > MAX_SEQ_LEN or self.global_batch_size > MAX_GLOBAL_BATCH:
            raise SpecError(f"seq-len {self.seq_len} / global-batch-size {self.global_batch_size} "
                            f"over the limits ({MAX_SEQ_LEN:,} tokens, {MAX_GLOBAL_BATCH:,} sequences)")
        if self.recompute not in RECOMPUTE_KINDS:
            raise SpecError(f"recompute must be one of {RECOMPUTE_KINDS}, got {self.recompute!r}")
        if self.recompute_modules:
            self._validate_modules(model)
        if model.layer_pattern and self.framework != "megatron":
            raise SpecError(f"model {model.name} is a hybrid (Mamba) model; torchtitan has no "
                            "Mamba layers: use --framework megatron")
        if self.offload_activation_layers:
            self._validate_offload(model)
        for name in ("torch_compile", "async_tp"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, got {_short(getattr(self, name))}")
        if self.async_tp and not (self.torch_compile and self.framework == "torchtitan"):
            raise SpecError("async TP is torchtitan's and needs torch.compile: add "
                            "--framework torchtitan --torch-compile, or drop --async-tp")
        if not isinstance(self.cuda_graphs, bool):
            raise SpecError(f"cuda_graphs must be true or false, got {_short(self.cuda_graphs)}")
        if self.cuda_graph_modules:
            self._validate_graph_modules()
        if self.moe_a2a_overlap:
            self._validate_a2a_overlap(model)
        if not isinstance(self.te_cross_entropy, bool):
            raise SpecError(f"te_cross_entropy must be true or false, got {_short(self.te_cross_entropy)}")
        if self.te_cross_entropy and self.framework != "megatron":
            raise SpecError("--te-cross-entropy is Megatron-Core's fused loss; drop it with "
                            "--framework torchtitan")
        if self.moe_dispatcher not in MOE_DISPATCHERS:
            raise SpecError(f"moe-dispatcher must be one of {MOE_DISPATCHERS}, got "
                            f"{_short(self.moe_dispatcher)}")
        if self.moe_dispatcher != "alltoall" and not (model.is_moe and self.framework == "megatron"):
            raise SpecError(f"--moe-dispatcher {self.moe_dispatcher} is Megatron-Core's flex "
                            "dispatcher and needs a mixture-of-experts model under --framework "
                            "megatron; drop it")
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        ends = self.layers_per_stage or (1,)
        self.dims.validate(model, num_gpus, self.seq_len,
                           end_chunks=int(ends[0] == 0) + int(len(ends) > 1 and ends[-1] == 0))
        for name in ("fsdp", "grad_reduce_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, got {_short(getattr(self, name))}")
        if not isinstance(self.dp_replicate, int) or isinstance(self.dp_replicate, bool) \
                or self.dp_replicate < 1:
            raise SpecError(f"dp-replicate must be a positive integer, got {_short(self.dp_replicate)}")
        if self.framework not in FRAMEWORKS:
            raise SpecError(f"framework must be one of {FRAMEWORKS}, got {_short(self.framework)}")
        if self.fsdp_strategy not in FSDP_STRATEGIES:
            raise SpecError(f"fsdp-strategy must be one of {FSDP_STRATEGIES}, got "
                            f"{_short(self.fsdp_strategy)}")
        if self.fsdp_reshard_after_forward not in RESHARD_POLICIES:
            raise SpecError("fsdp-reshard-after-forward must be one of "
                            f"{RESHARD_POLICIES}, got {_short(self.fsdp_reshard_after_forward)}")
        problem = fsdp_option_problem(self.fsdp, self.framework, self.fsdp_strategy,
                                      self.fsdp_reshard_after_forward)
        if problem:
            raise SpecError(problem[1])
        if self.dp_replicate > 1 and not self.fsdp:
            raise SpecError("dp-replicate > 1 is HSDP and needs --fsdp; add --fsdp or drop "
                            "--dp-replicate")
        if self.dp % self.dp_replicate:
            raise SpecError(f"dp-replicate {self.dp_replicate} must divide dp = {self.dp} "
                            "(HSDP shards over dp/dp_replicate ranks); choose a divisor of dp")
        if self.sequence_parallel and self.tp == 1:
            raise SpecError("sequence parallel needs tp > 1; drop --sequence-parallel or raise --tp")
        if self.sequence_parallel and (self.seq_len // self.cp) % self.tp:
            raise SpecError(
                f"seq-len/cp = {self.seq_len // self.cp} must be divisible by tp = {self.tp} "
                "with sequence parallelism"
            )
        chunks = self.pp * self.vp
        if self.layers_per_stage is not None:
            if len(self.layers_per_stage) != chunks or sum(self.layers_per_stage) != model.num_layers:
                raise SpecError(
                    f"layers_per_stage {self.layers_per_stage} must have pp*vp = {chunks} "
                    f"entries summing to {model.num_layers}"
                )
            # The first / last chunk may hold only the embedding / the loss (Megatron-Core
            # --account-for-embedding-in-pipeline-split, --account-for-loss-in-pipeline-split).
            if min(self.layers_per_stage[1:-1] or (1,)) < 1 or min(self.layers_per_stage) < 0 \
                    or (chunks == 1 and self.layers_per_stage[0] < 1):
                raise SpecError("every pipeline stage but the first and the last needs at least "
                                "one layer (those two may hold only the embedding / the loss)")
        if self.global_batch_size % (self.dp * self.micro_batch_size):
            raise SpecError(
                f"global-batch-size {self.global_batch_size} is not divisible by dp*mbs = "
                f"{self.dp}*{self.micro_batch_size} = {self.dp * self.micro_batch_size}; use a "
                f"multiple of {self.dp * self.micro_batch_size}"
            )
        if self.pipeline_schedule is not None and self.pipeline_schedule not in SCHEDULES:
            raise SpecError(f"schedule must be one of {list(SCHEDULES)}, got "
                            f"{_short(self.pipeline_schedule)}")
        problem = schedule_problem(self.schedule, self.pp, self.vp, self.num_microbatches)
        if problem:
            raise SpecError(problem)

    def _validate_offload(self, model: ModelSpec) -> None:
        n = self.offload_activation_layers
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < model.num_layers:
            raise SpecError(f"offload-activation-layers must be an integer in 0..{model.num_layers - 1} "
                            f"(fewer than the model's layers), got {_short(n)}")
        if self.pp > 1 or self.recompute != "none" or self.framework != "megatron":
            raise SpecError("activation offload (Megatron --cpu-offloading-num-layers) needs pp = 1, "
                            "no recompute and the megatron framework")

    def _validate_graph_modules(self) -> None:
        mods = self.cuda_graph_modules
        if not isinstance(mods, tuple) or not all(isinstance(m, str) for m in mods):
            raise SpecError(f"cuda_graph_modules must be a list of names, got {_short(mods)}")
        bad = [m for m in mods if m not in CUDA_GRAPH_MODULES]
        if bad:
            raise SpecError(f"unknown CUDA graph module {_short(bad[0])}; Megatron's "
                            f"--cuda-graph-modules takes {', '.join(CUDA_GRAPH_MODULES)}")
        if self.cuda_graphs:
            raise SpecError("--cuda-graph-modules must be empty with whole-iteration CUDA graphs "
                            "(Megatron --cuda-graph-impl full_iteration); drop one of them")
        if self.framework != "megatron":
            raise SpecError("--cuda-graph-modules is Megatron-Core's (transformer_engine graphs); "
                            "drop it with --framework torchtitan")

    def _validate_a2a_overlap(self, model: ModelSpec) -> None:
        if not isinstance(self.moe_a2a_overlap, bool):
            raise SpecError(f"moe_a2a_overlap must be true or false, got {_short(self.moe_a2a_overlap)}")
        problem = a2a_overlap_problem(model, self.framework, self.ep, self.pp, self.vp,
                                      self.recompute, self.recompute_modules)
        if problem:
            raise SpecError(f"--moe-a2a-overlap (Megatron --overlap-moe-expert-parallel-comm) "
                            f"{problem}")

    def _validate_modules(self, model: ModelSpec) -> None:
        from .recompute_modules import check  # the module imports ModelSpec from here

        if not isinstance(self.recompute_modules, tuple) or \
                not all(isinstance(m, str) for m in self.recompute_modules):
            raise SpecError(f"recompute_modules must be a list of names, got "
                            f"{_short(self.recompute_modules)}")
        if self.recompute != "selective":
            raise SpecError("recompute modules need --recompute selective (Megatron's "
                            "--recompute-granularity selective)")
        if self.framework != "megatron":
            raise SpecError("recompute modules are Megatron-Core's; torchtitan's selective AC "
                            "is per-op (drop --recompute-modules)")
        problem = check(model, self.recompute_modules)
        if problem:
            raise SpecError(problem)

    def to_dict(self) -> dict:
        """The JSON/YAML form of DESIGN.md (schedule added, layers_per_stage and
        recompute_modules when set)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("layers_per_stage", "pipeline_schedule", "recompute_modules",
                                 "cuda_graph_modules")}
        out["schedule"] = self.schedule
        if self.layers_per_stage is not None:
            out["layers_per_stage"] = list(self.layers_per_stage)
        if self.recompute_modules:
            out["recompute_modules"] = list(self.recompute_modules)
        if self.cuda_graph_modules:
            out["cuda_graph_modules"] = list(self.cuda_graph_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"schedule"}
        if unknown:
            raise SpecError(f"layout has unknown keys {sorted(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        named = data.get("schedule", kwargs.pop("pipeline_schedule", None))
        # the default for the layout's vp is stored as None, so a layout round-trips equal
        if named is not None and named != default_schedule(data.get("vp", 1)):
            kwargs["pipeline_schedule"] = named
        if kwargs.get("layers_per_stage") is not None:
            kwargs["layers_per_stage"] = tuple(int(x) for x in kwargs["layers_per_stage"])
        for name in ("recompute_modules", "cuda_graph_modules"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SpecError(f"layout is incomplete: {exc}") from None


def fsdp_option_problem(fsdp: bool, framework: str, strategy: str, reshard: str
                        ) -> tuple[str, str] | None:
    """(option, message) for a framework-specific FSDP option given where it cannot apply:
    Megatron-FSDP's sharding strategy off --fsdp / Megatron, torchtitan's reshard policy off
    --fsdp / torchtitan; None when both hold (`Layout.validate` and the CLI ask this)."""
    if strategy != "optim_grads_params" and not (fsdp and framework == "megatron"):
        return ("--fsdp-strategy", f"--fsdp-strategy {strategy} is Megatron-FSDP's and needs "
                "--fsdp under --framework megatron; add --fsdp or drop it")
    if reshard != "default" and not (fsdp and framework == "torchtitan"):
        return ("--fsdp-reshard-after-forward",
                f"--fsdp-reshard-after-forward {reshard} is torchtitan's FSDP2 policy and needs "
                "--fsdp --framework torchtitan; add them or drop it")
    return None


CUDA_GRAPH_MODULES = ("attn", "mlp", "moe", "moe_router", "moe_preprocess", "mamba")
"""Megatron-Core's `--cuda-graph-modules` choices (megatron/training/arguments.py @ d98e8a64)."""


def a2a_overlap_problem(model: ModelSpec, framework, ep, pp, vp, recompute,
                        recompute_modules=()) -> str | None:
    """Which of Megatron-Core's rules for `--overlap-moe-expert-parallel-comm`
    (TransformerConfig.__post_init__ @ d98e8a64) a layout breaks, or None."""
    if not model.is_moe or framework != "megatron":
        return "needs a mixture-of-experts model under Megatron-Core"
    if ep <= 1:
        return "needs expert parallelism (ep > 1)"
    if pp > 1 and vp <= 1:
        return "needs an interleaved pipeline (vp > 1) when pp > 1"
    if recompute == "full" or "moe" in recompute_modules:
        return "is not allowed with full recompute or 'moe' in the recompute modules"
    return None


def a2a_overlap_mask(ep, pp, vp, full_recompute, moe_recomputed):
    """`a2a_overlap_problem` is None, as arrays over a grid of MoE Megatron layouts (the
    search's form of the same rules)."""
    return (ep > 1) & ((pp == 1) | (vp > 1)) & ~full_recompute & ~moe_recomputed


def even_split(total: int, parts: int) -> tuple[int, ...]:
    """`total` layers in `parts` contiguous groups, sizes differing by at most one.

    The extra layers go to middle groups first, then the first, then the last: the first stage
    holds the embedding and the most in-flight activations, the last the LM head and loss.
    """
    base, extra = divmod(total, parts)
    order = list(range(1, parts - 1)) + [0, parts - 1] if parts > 1 else [0]
    sizes = [base] * parts
    for i in order[:extra]:
        sizes[i] += 1
    return tuple(sizes)


# --------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Peak bytes on the most loaded GPU."""

    weights_bytes: float
    grads_bytes: float
    optimizer_state_bytes: float
    """Optimizer moments and fp32 master weights (the JSON's optimizer_GiB)."""
    activations_bytes: float
    buffers_bytes: float
    """Allowance for communication buffers, workspaces and allocator fragmentation."""
    unsharded_inflight_bytes: float = 0.0
    """FSDP only: parameters all-gathered (and their unsharded gradients) alive at the peak;
    weights/grads/optimizer are then the rank's shards."""

    @property
    def peak_bytes(self) -> float:
        return (self.weights_bytes + self.grads_bytes + self.optimizer_state_bytes
                + self.activations_bytes + self.buffers_bytes + self.unsharded_inflight_bytes)

    def to_dict(self) -> dict:
        """weights_GiB, grads_GiB, optimizer_GiB, activations_GiB, buffers_GiB, peak_GiB."""
        out = {_MEMORY_JSON.get(f.name, f.name.removesuffix("_bytes")) + "_GiB":
               round(getattr(self, f.name) / GiB, 3) for f in fields(self)}
        out["peak_GiB"] = round(self.peak_bytes / GiB, 3)
        return out


_MEMORY_JSON = {"optimizer_state_bytes": "optimizer"}
"""Field -> JSON name where they differ (the JSON names are DESIGN.md's contract)."""
_TIME_JSON = {"optimizer_step_s": "optimizer_s"}
COMM_FIELDS = ("tp_comm_s", "cp_comm_s", "ep_comm_s", "pp_p2p_s", "dp_comm_s")
"""The communication parts of a step (TimeBreakdown fields and JSON keys alike): the "comm"
column of every report."""


@dataclass(frozen=True, slots=True)
class TimeBreakdown:
    """Seconds of one step on the critical path, by cause (they add up to the step time)."""

    compute_s: float
    """Forward, backward and recompute of the slowest stage, all micro-batches."""
    tp_comm_s: float
    """Exposed tensor-parallel collectives."""
    cp_comm_s: float
    """Exposed context-parallel K/V exchange."""
    pp_bubble_s: float
    """Pipeline fill and drain idle time."""
    pp_p2p_s: float
    """Exposed pipeline point-to-point transfers."""
    dp_comm_s: float
    """Exposed data-parallel gradient reduction / parameter gather."""
    optimizer_step_s: float
    """Optimizer step (the JSON's optimizer_s)."""
    ep_comm_s: float = 0.0
    """Exposed expert-parallel all-to-all (token dispatch and combine; MoE only)."""

    @property
    def total_s(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def comm_s(self) -> float:
        """Exposed communication of every kind (`COMM_FIELDS`)."""
        return sum(getattr(self, name) for name in COMM_FIELDS)

    def to_dict(self) -> dict:
        return {_TIME_JSON.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}



@dataclass(frozen=True, slots=True)
class Estimate:
    """Predicted step time and memory of one layout."""

    layout: Layout
    time: TimeBreakdown
    memory: MemoryBreakdown
    capacity_GiB: float
    """Usable memory per GPU the fit was checked against."""
    model_flops: float
    """Model FLOPs per step (no recompute; causal attention counted once)."""
    hardware_flops: float
    """FLOPs the GPUs execute per step (with recompute)."""
    peak_flops_per_gpu: float
    """Dense peak FLOP/s of the layout's dtype."""
    cost_model: str = "megatron"

    @property
    def step_time_s(self) -> float:
        return self.time.total_s

    @property
    def tokens_per_s(self) -> float:
        return self.layout.global_batch_size * self.layout.seq_len / self.step_time_s

    @property
    def tflops_per_gpu(self) -> float:
        """Model TFLOP/s per GPU."""
        return self.model_flops / self.step_time_s / self.layout.world / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation against the dense peak of the layout's dtype."""
        return self.model_flops / self.step_time_s / self.layout.world / self.peak_flops_per_gpu

    @property
    def peak_GiB(self) -> float:
        return self.memory.peak_bytes / GiB

    @property
    def fits(self) -> bool:
        return self.peak_GiB <= self.capacity_GiB

    @property
    def over_GiB(self) -> float:
        return max(0.0, self.peak_GiB - self.capacity_GiB)

    def to_dict(self) -> dict:
        """The `estimate --json` object of DESIGN.md."""
        return {
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "tflops_per_gpu": self.tflops_per_gpu,
            "fits": self.fits,
            "capacity_GiB": self.capacity_GiB,
            "memory": self.memory.to_dict(),
            "breakdown": self.time.to_dict(),
            "layout": self.layout.to_dict(),
            "cost_model": self.cost_model,
            "mfu_note": "model FLOPs (no recompute, causal attention) / dense "
            f"{self.layout.dtype} peak",
        }
