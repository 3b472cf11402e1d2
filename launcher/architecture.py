"""What a framework needs to build the planned model beyond its shape: positions, norm, biases.

`ModelSpec` holds what the cost model needs (layers, widths, heads, experts). Building the
same network in Megatron-LM or torchtitan also needs the rotary base and scaling, the norm
kind, biases, qk-norm, dropout and multi-head latent attention dims, which do not change the
cost. They come from the model's HuggingFace config.json: the preset file (planner/data/models/)
or the config path the plan was made from. Defaults per `model_type` are those of the
transformers config classes (LlamaConfig, Qwen2Config, NemotronConfig, GPT2Config...).

The preset files are trimmed; `PRESET_ADDITIONS` restores the keys they leave out that change
the network, with the values of the published config.json of each model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cost_models.specs import ModelSpec, SpecError
from planner.specfiles import SAME_AS, model_presets, read_mapping

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PRESET_ADDITIONS: dict[str, dict] = {
    # meta-llama/Llama-3.1-{8B,70B,405B}/config.json
    "llama3.1-8b": {"rope_scaling": _LLAMA3_SCALING},
    "llama3.1-70b": {"rope_scaling": _LLAMA3_SCALING},
    "llama3.1-405b": {"rope_scaling": _LLAMA3_SCALING},
    # Qwen/Qwen2.5-{7B,72B}, Qwen/Qwen3-8B, mistralai/Mixtral-8x7B-v0.1
    "qwen2.5-7b": {"rope_theta": 1e6},
    "qwen2.5-72b": {"rope_theta": 1e6},
    "qwen3-8b": {"rope_theta": 1e6},
    "mixtral-8x7b": {"rope_theta": 1e6},
    # deepseek-ai/DeepSeek-V3/config.json
    "deepseek-v3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "rope_scaling": {
        "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}},
}

# model_type -> (norm, default eps, linear bias, qkv bias, qk norm, rotary fraction)
_FAMILY = {
    "llama": ("RMSNorm", 1e-6, False, False, False, 1.0),
    "mistral": ("RMSNorm", 1e-6, False, False, False, 1.0),
    "mixtral": ("RMSNorm", 1e-5, False, False, False, 1.0),
    "qwen2": ("RMSNorm", 1e-6, False, True, False, 1.0),
    "qwen2_moe": ("RMSNorm", 1e-6, False, True, False, 1.0),
    "qwen3": ("RMSNorm", 1e-6, False, False, True, 1.0),
    "qwen3_moe": ("RMSNorm", 1e-6, False, False, True, 1.0),
    "nemotron": ("LayerNorm1p", 1e-5, False, False, False, 0.5),
    "gpt_neox": ("LayerNorm", 1e-5, True, True, False, 0.25),
    "gpt2": ("LayerNorm", 1e-5, True, True, False, 1.0),
    "deepseek_v3": ("RMSNorm", 1e-6, False, False, False, 1.0),
    "deepseek_v2": ("RMSNorm", 1e-6, False, False, False, 1.0),
    "nemotron_h": ("RMSNorm", 1e-5, False, False, False, 1.0),
}
_NO_POSITIONS = {"nemotron_h"}
"""Families whose attention layers use no position embedding (Nemotron-H: the Mamba layers
carry position; Megatron-Bridge's NemotronH providers set position_embedding_type "none")."""
_SIGMOID_ROUTER = {"deepseek_v3", "nemotron_h"}
"""Families whose router scores are sigmoids with a load-balancing expert bias."""
_DEFAULT_THETA = {"mixtral": 1e6}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary frequency scaling: Llama 3.1 ("llama3") or YaRN ("yarn", DeepSeek-V3)."""

    kind: str
    factor: float
    original_max_position_embeddings: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True, slots=True)
class Mla:
    """Multi-head latent attention widths (DeepSeek-V2/V3)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True, slots=True)
class Architecture:
    """The network details of a ModelSpec that frameworks need to build it."""

    family: str
    """HuggingFace model_type (llama, mixtral, qwen2, gpt2, ...)."""
    position_embedding: str
    """rope | learned_absolute | none."""
    rope_theta: float
    rotary_fraction: float
    """Fraction of each head's width that is rotated (Nemotron 0.5, GPT-NeoX 0.25)."""
    rope_scaling: RopeScaling | None
    norm: str
    """RMSNorm | LayerNorm | LayerNorm1p (weight stored as w - 1, Nemotron)."""
    norm_eps: float
    linear_bias: bool
    """Biases on the attention output and MLP projections."""
    qkv_bias: bool
    qk_norm: bool
    dropout: float
    """Hidden/attention dropout probability during training."""
    parallel_residual: bool
    """Attention and MLP read the same input (GPT-NeoX)."""
    mla: Mla | None
    moe_router_score: str
    """softmax | sigmoid (DeepSeek-V3)."""
    source: str
    """Where the details were read from."""


def _config_for(model: ModelSpec) -> tuple[dict | None, str]:
    presets = model_presets()
    if model.name in presets:
        cfg = dict(read_mapping(presets[model.name], "model config"))
        cfg.update(PRESET_ADDITIONS.get(model.name, {}))
        return cfg, f"preset {model.name}"
    path = Path(model.name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return read_mapping(path, "model config"), str(path)
    return None, ""


def _guess_family(model: ModelSpec) -> str:
    if model.layer_pattern:
        return "nemotron_h"
    if model.mlp_kind == "squared_relu":
        return "nemotron"
    if model.mlp_kind == "gelu":
        return "gpt2"
    return "mixtral" if model.is_moe else "llama"


def _rope_scaling(cfg: dict) -> RopeScaling | None:
    raw = cfg.get("rope_scaling")
    if not raw:
        return None
    kind = str(raw.get("rope_type") or raw.get("type"))
    if kind not in ("llama3", "yarn"):
        raise SpecError(f"rope_scaling type {kind!r} is not supported by the launcher; "
                        "use llama3 or yarn, or drop rope_scaling from the config")
    return RopeScaling(
        kind=kind, factor=float(raw["factor"]),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        beta_fast=float(raw.get("beta_fast", 32.0)), beta_slow=float(raw.get("beta_slow", 1.0)),
        mscale=float(raw.get("mscale", 1.0)), mscale_all_dim=float(raw.get("mscale_all_dim", 0.0)))


def _mla(cfg: dict) -> Mla | None:
    if "kv_lora_rank" not in cfg:
        return None
    return Mla(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=int(cfg["kv_lora_rank"]),
               qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
               qk_rope_head_dim=int(cfg["qk_rope_head_dim"]), v_head_dim=int(cfg["v_head_dim"]))


def architecture(model: ModelSpec) -> tuple[Architecture, str | None]:
    """The model's Architecture, and a note for stderr when it had to be guessed."""
    cfg, source = _config_for(model)
    note = None
    if cfg is None:
        cfg = {"model_type": _guess_family(model)}
        source = "guessed from the MLP kind"
        note = (f"model config {model.name} is not readable here; the launch files assume a "
                f"{cfg['model_type']}-style network (norm, rope, biases); check them")
    family = SAME_AS.get(str(cfg.get("model_type")), str(cfg.get("model_type")))
    if family not in _FAMILY:
        raise SpecError(f"model {model.name}: model_type {family!r} has no launcher mapping; "
                        f"supported: {sorted(_FAMILY)}")
    norm, eps, bias, qkv_bias, qk_norm, rotary = _FAMILY[family]
    if family == "gpt2":
        dropout = float(cfg.get("resid_pdrop", 0.1))
    else:
        dropout = float(cfg.get("hidden_dropout", 0.0) or cfg.get("attention_dropout", 0.0))
    arch = Architecture(
        family=family,
        position_embedding="learned_absolute" if family == "gpt2"
        else "none" if family in _NO_POSITIONS else "rope",
        rope_theta=float(cfg.get("rope_theta", _DEFAULT_THETA.get(family, 10000.0))),
        rotary_fraction=float(cfg.get("partial_rotary_factor", cfg.get("rotary_pct", rotary))),
        rope_scaling=_rope_scaling(cfg),
        norm=norm,
        norm_eps=float(cfg.get("rms_norm_eps", cfg.get("layer_norm_epsilon",
                                                       cfg.get("norm_eps", eps)))),
        linear_bias=bool(cfg.get("mlp_bias", bias)),
        qkv_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", qkv_bias))),
        qk_norm=qk_norm,
        dropout=dropout,
        parallel_residual=bool(cfg.get("use_parallel_residual", family == "gpt_neox")),
        mla=_mla(cfg) if family.startswith("deepseek") else None,
        moe_router_score="sigmoid" if family in _SIGMOID_ROUTER else "softmax",
        source=source,
    )
    return arch, note


def transformer_config_fields(model: ModelSpec, arch: Architecture) -> dict[str, object]:
    """Megatron-Core TransformerConfig fields that describe the network itself (MLP gating,
    norm, biases, qk-norm, dropout): what the Megatron-LM flags must produce and what the
    Megatron-Bridge override sets."""
    return {
        "gated_linear_unit": model.mlp_kind == "gated_silu",
        "normalization": "LayerNorm" if arch.norm == "LayerNorm1p" else arch.norm,
        "layernorm_zero_centered_gamma": arch.norm == "LayerNorm1p",
        "layernorm_epsilon": arch.norm_eps, "add_bias_linear": arch.linear_bias,
        "add_qkv_bias": arch.qkv_bias or arch.linear_bias, "qk_layernorm": arch.qk_norm,
        "hidden_dropout": arch.dropout, "attention_dropout": arch.dropout,
    }
