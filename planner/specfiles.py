"""Reading and writing specs: model presets and HuggingFace configs, GPU and cluster presets,
and `cluster.yaml` files (read by the planner, written by the profiler: `write_cluster_yaml`).

Everything a user can point at goes through here, and every mistake comes back as one
`SpecError` line naming the file, the key and what to do.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from cost_models.specs import (
    MAX_GPUS,
    MAX_GPUS_PER_NODE,
    ClusterSpec,
    GemmEfficiency,
    GpuSpec,
    LinkSpec,
    ModelSpec,
    NodeSpec,
    SpecError,
)

from .fileio import read_text, write_atomic

DATA_DIR = Path(__file__).parent / "data"
MODELS_DIR = DATA_DIR / "models"
CLUSTER_FORMAT = 1


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def closest(name: str, options: list[str]) -> str:
    """' (closest: a, b)' or '' — for unknown-name errors."""
    hits = difflib.get_close_matches(name.lower(), [o.lower() for o in options], n=3, cutoff=0.4)
    lookup = {o.lower(): o for o in options}
    return f" (closest: {', '.join(lookup[h] for h in hits)})" if hits else ""


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a spec file has no use for them, and nested aliases
    expand a kilobyte into gigabytes ("billion laughs")."""

    def compose_node(self, parent, index):  # noqa: D102 - PyYAML's hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor[:40]}) are not allowed in "
                                 f"meshplan files (line {event.start_mark.line + 1}); write the "
                                 "values out")
        return super().compose_node(parent, index)


_SHIPPED_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""Loader of meshplan's own preset files: libyaml's C parser where PyYAML has it (the
pure-Python one took 60 ms of every `plan` for gpus.yaml and clusters.yaml); the same safe
types. Files from users go through `_NoAliasLoader`."""


def load_yaml(text: str, shipped: bool = False):
    """Parse YAML text (safe types only; no aliases unless `shipped`: a file of DATA_DIR)."""
    if shipped:
        return yaml.load(text, Loader=_SHIPPED_LOADER)  # noqa: S506 - SafeLoader or CSafeLoader
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def read_mapping(path: Path, what: str, shipped: bool = False) -> dict:
    """Parse a JSON or YAML file that must hold a mapping; SpecError otherwise. `shipped`:
    one of meshplan's preset files (`load_yaml`)."""
    text = read_text(path, what)
    try:
        data = json.loads(text, parse_constant=_reject_constant) if path.suffix == ".json" \
            else load_yaml(text, shipped)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SpecError(f"{what} file {path} is not valid {path.suffix[1:] or 'YAML'}: {first}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{what} file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _reject_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a number JSON allows; write a finite value", name, 0)


_REPLACED_KEYS = {
    "grouped_gemm_half_rows": "grouped_gemm_half_gflop (GFLOP of one expert's GEMMs per "
                              "micro-batch at which grouped GEMMs run at half efficiency)",
}


def _replaced_hint(unknown: list[str]) -> str:
    """' (old was replaced by new ...)' for the keys in `unknown` that an older meshplan
    knew, so a file written for it is told what to rename; '' if none."""
    hints = [f"{k} was replaced by {_REPLACED_KEYS[k]}" for k in unknown if k in _REPLACED_KEYS]
    return f" ({'; '.join(hints)})" if hints else ""


def _strict(cls, data: dict, where: str, renames: dict | None = None):
    """Build dataclass `cls` from `data`, rejecting unknown keys (Calculon-style strict load)."""
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    data = {(renames or {}).get(k, k): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"{where}: unknown keys {unknown}{_replaced_hint(unknown)}; "
                        f"allowed: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise SpecError(f"{where}: {exc}") from None
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------


def _gpu_from_dict(name: str, data: dict, where: str) -> GpuSpec:
    data = dict(data)
    eff = data.pop("efficiency", None)
    if not isinstance(eff, dict):
        raise SpecError(f"{where}: GPU {name} needs an efficiency mapping per dtype")
    effs = {d: _strict(GemmEfficiency, e, f"{where}: {name}.efficiency.{d}") for d, e in eff.items()}
    return _strict(GpuSpec, {"name": name, **data, "efficiency": effs}, f"{where}: GPU {name}")


@cache
def gpu_presets() -> dict[str, GpuSpec]:
    """GPU types shipped in planner/data/gpus.yaml."""
    raw = read_mapping(DATA_DIR / "gpus.yaml", "GPU preset", shipped=True)
    return {name: _gpu_from_dict(name, spec, "gpus.yaml") for name, spec in raw.items()}


def gpu_preset(name: str) -> GpuSpec:
    presets = gpu_presets()
    if name in presets:
        return presets[name]
    lowered = {k.lower(): v for k, v in presets.items()}
    if name.lower() in lowered:
        return lowered[name.lower()]
    raise SpecError(f"unknown GPU type {name!r}{closest(name, list(presets))}; known: {sorted(presets)}")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def model_presets() -> dict[str, Path]:
    """Preset name -> config file under planner/data/models/ (package data)."""
    if not MODELS_DIR.is_dir():
        return {}
    return {
        p.stem: p for p in sorted(MODELS_DIR.iterdir()) if p.suffix in (".json", ".yaml", ".yml")
    }


def load_model(name_or_path: str) -> ModelSpec:
    """A ModelSpec from a preset name or a HuggingFace config.json / YAML path."""
    presets = model_presets()
    if name_or_path in presets:
        return model_from_config(read_mapping(presets[name_or_path], "model config"), name_or_path)
    path = Path(name_or_path)
    if path.suffix in (".json", ".yaml", ".yml") or path.exists():
        if path.is_dir():
            path = path / "config.json"
        return model_from_config(read_mapping(path, "model config"), str(path))
    raise SpecError(
        f"unknown model {name_or_path!r}{closest(name_or_path, list(presets))}; "
        "give a preset (meshplan models) or a path to a HuggingFace config.json"
    )


def _get(cfg: dict, where: str, *keys: str, default: Any = None, required: bool = True) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if required and default is None:
        raise SpecError(f"model config {where} lacks {' or '.join(repr(k) for k in keys)}")
    return default


def _int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value <= 0:
        raise SpecError(f"model config {where}: {key} must be a positive integer, got {value!r}")
    return int(value)


_MLP_FROM_ACT = {
    "silu": "gated_silu", "swiglu": "gated_silu", "swish": "gated_silu",
    "gelu": "gelu", "gelu_new": "gelu", "gelu_fast": "gelu", "gelu_pytorch_tanh": "gelu",
    "relu2": "squared_relu", "squared_relu": "squared_relu",
}
_GEMMA = {"gemma", "gemma2", "gemma3", "gemma3_text"}
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "nemotron", "gpt_neox", "mixtral",
               "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "phi3", "olmo2",
               "internlm2", "glm", "glm4", "glm4_moe", "starcoder2", "gpt_oss", "llama4",
               "llama4_text",
               "falcon", "phi", "chatglm", "gptj", "nemotron_h"} | _GEMMA

# Defaults of the HuggingFace config classes for keys real configs leave out
# (transformers src/transformers/models/<family>/configuration_<family>.py).
_MLA_DEFAULTS = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                 "qk_nope_head_dim": 128, "v_head_dim": 128}
_HF_DEFAULTS: dict[str, dict] = {
    "deepseek_v2": _MLA_DEFAULTS, "deepseek_v3": _MLA_DEFAULTS,
    "gemma2": {"head_dim": 256, "sliding_window": 4096, "vocab_size": 256000,
               "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "head_dim": 256, "max_position_embeddings": 131072, "sliding_window": 4096,
                    "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh"},
    "llama4_text": {"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
                    "intermediate_size_mlp": 16384, "num_hidden_layers": 48,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                    "num_local_experts": 16, "num_experts_per_tok": 1,
                    "interleave_moe_layer_step": 1, "attention_chunk_size": 8192,
                    "no_rope_layer_interval": 4, "max_position_embeddings": 131072},
    "gpt_oss": {"num_local_experts": 128, "num_experts_per_tok": 4, "vocab_size": 201088,
                "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64,
                "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
                "num_hidden_layers": 36, "max_position_embeddings": 131072},
    "starcoder2": {"use_bias": True, "hidden_act": "gelu_pytorch_tanh"},
    "internlm2": {"bias": True},
    "glm": {"attention_bias": True, "head_dim": 128},
    "glm4": {"attention_bias": True, "head_dim": 128},
    "glm4_moe": {"attention_bias": False, "head_dim": 128, "use_qk_norm": False},
    "falcon": {"bias": False, "parallel_attn": True, "new_decoder_architecture": False,
               "hidden_act": "gelu", "max_position_embeddings": 2048},
    "phi": {"hidden_act": "gelu_new", "max_position_embeddings": 2048},
    "gptj": {"hidden_act": "gelu_new", "n_positions": 2048, "tie_word_embeddings": False},
}
_KEY_ALIASES = {  # config key -> the llama-style key it stands for
    "falcon": {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
               "n_head_kv": "num_kv_heads", "num_kv_heads": "num_key_value_heads"},
    "gptj": {"n_embd": "hidden_size", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads", "n_inner": "intermediate_size",
             "n_positions": "max_position_embeddings", "activation_function": "hidden_act"},
    "nemotron_h": {"attention_head_dim": "head_dim"},  # Nemotron-H 8B/47B/56B configs
    "chatglm": {"num_layers": "num_hidden_layers", "ffn_hidden_size": "intermediate_size",
                "kv_channels": "head_dim", "multi_query_group_num": "num_key_value_heads",
                "padded_vocab_size": "vocab_size", "seq_length": "max_position_embeddings"},
}

SAME_AS = {"kimi_k2": "deepseek_v3"}
"""model_types whose configs are another family's (Moonshot's Kimi K2 ships DeepSeek-V3's
network and config keys under its own name)."""

MODEL_FILE_FORMAT = 1
"""`meshplan_model: 1`: a model file holding ModelSpec's own keys (docs/models.md)."""


def model_from_config(cfg: dict, where: str) -> ModelSpec:
    """Parse a HuggingFace config (every family in `_LLAMA_LIKE` and gpt2, nested
    `text_config` unpacked) or a meshplan model file into a ModelSpec."""
    if "meshplan_model" in cfg:
        return model_from_file(cfg, where)
    kind = cfg.get("model_type")
    if kind is None:
        raise SpecError(f"model config {where} lacks 'model_type' (e.g. llama, gpt2, mixtral)")
    if isinstance(cfg.get("text_config"), dict):
        text = dict(cfg["text_config"])
        text.setdefault("model_type", {"llama4": "llama4_text", "gemma3": "gemma3_text"}
                        .get(kind, kind))
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in cfg:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        return model_from_config(text, where)
    kind = SAME_AS.get(kind, kind)
    if kind == "gpt2":
        return _gpt2(cfg, where)
    if kind not in _LLAMA_LIKE:
        raise SpecError(
            f"model config {where}: model_type {str(kind)[:40]!r} is not supported"
            f"{closest(str(kind), sorted(_LLAMA_LIKE | {'gpt2'}))}; write a meshplan model "
            "file (see docs/models.md), where the supported families are listed"
        )
    cfg = {**_HF_DEFAULTS.get(kind, {}), **cfg}
    for old, new in _KEY_ALIASES.get(kind, {}).items():
        if cfg.get(old) is not None and cfg.get(new) is None:
            cfg[new] = cfg[old]
    g = lambda *k, **kw: _get(cfg, where, *k, **kw)  # noqa: E731
    hidden = _int(g("hidden_size"), "hidden_size", where)
    heads = _int(g("num_attention_heads"), "num_attention_heads", where)
    kv = _int(g("num_key_value_heads", default=heads), "num_key_value_heads", where)
    head_dim = g("head_dim", "kv_channels", default=hidden // heads)
    if kind == "falcon" and not cfg.get("new_decoder_architecture"):
        kv = 1 if cfg.get("multi_query", True) else heads  # FalconConfig's multi_query default
    if kind in ("deepseek_v3", "deepseek_v2"):
        # MLA: per-head query/key width is the no-position part plus the rotary part.
        head_dim = g("qk_nope_head_dim") + g("qk_rope_head_dim")
        kv = heads
    act_keys = ("mlp_hidden_act",) if kind == "nemotron_h" else ()  # its Mamba act is separate
    act = str(g(*act_keys, "hidden_act", "activation", default="silu")).lower()
    mlp = _MLP_FROM_ACT.get(act)
    if mlp is None:
        raise SpecError(f"model config {where}: hidden_act {act!r} is not supported")
    if kind in ("gpt_neox", "nemotron", "falcon", "phi", "starcoder2", "gptj") \
            and mlp == "gated_silu":
        mlp = "gelu"
    if kind in _GEMMA:  # Gemma's MLP is GeGLU (gate, up, down), whatever hidden_act says
        act = str(g("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")).lower()
        mlp = "gated_gelu" if act.startswith("gelu") else _MLP_FROM_ACT.get(act, mlp)
    if kind in ("gpt_oss", "llama4_text", "chatglm"):  # SwiGLU whatever the key says
        mlp = "gated_silu"
    ffn_keys = ("intermediate_size_mlp",) if kind == "llama4_text" else ()
    default_ffn = 4 * hidden if kind in ("falcon", "gptj") else None
    ffn = _int(g(*ffn_keys, "intermediate_size", "ffn_hidden_size", default=default_ffn),
               "intermediate_size", where)
    spec = dict(
        name=where, num_layers=_int(g("num_hidden_layers"), "num_hidden_layers", where),
        hidden_size=hidden, ffn_hidden_size=ffn, num_heads=heads, num_kv_heads=kv,
        head_dim=_int(head_dim, "head_dim", where),
        vocab_size=_int(g("vocab_size"), "vocab_size", where),
        max_seq_len=_int(g("max_position_embeddings", "max_seq_len", default=4096),
                         "max_position_embeddings", where),
        # HF defaults: Gemma and Falcon tie their embeddings unless told otherwise
        tied_embeddings=bool(cfg.get("tie_word_embeddings",
                                     kind in _GEMMA or kind in ("falcon", "starcoder2"))),
        mlp_kind=mlp,
        dropout=bool(cfg.get("hidden_dropout", 0) or cfg.get("attention_dropout", 0)),
    )
    spec.update(_moe_fields(cfg, kind, where))
    spec.update(_attention_fields(cfg, kind, spec["num_layers"], where))
    if kind == "nemotron_h":
        spec.update(_hybrid_fields(cfg, spec["num_layers"], where))
    if cfg.get("num_nextn_predict_layers"):  # DeepSeek-V3's multi-token prediction modules
        spec["mtp_layers"] = _int(cfg["num_nextn_predict_layers"], "num_nextn_predict_layers",
                                  where)
    return ModelSpec(**spec)


def _layer_count(cfg: dict, kind_of_layer: str, num_layers: int) -> int | None:
    """Layers of `layer_types` equal to kind_of_layer, None when the config has no list."""
    types = cfg.get("layer_types")
    if not isinstance(types, list):
        return None
    return sum(1 for t in types[:num_layers] if t == kind_of_layer)


def _attention_fields(cfg: dict, kind: str, num_layers: int, where: str) -> dict:
    """MLA, window pattern, biases, norms, qk-norm and sinks of each family (HF semantics)."""
    g = lambda *k, **kw: _get(cfg, where, *k, **kw)  # noqa: E731
    out: dict[str, Any] = {}
    if kind in ("deepseek_v3", "deepseek_v2"):
        out.update(q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=g("kv_lora_rank"),
                   qk_rope_head_dim=g("qk_rope_head_dim"), v_head_dim=g("v_head_dim"))
    window = cfg.get("sliding_window")
    if kind == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    if kind in ("mistral", "mixtral", "qwen2", "phi3", "starcoder2", "gemma2", "gemma3_text",
                "gpt_oss") and window:
        window = _int(window, "sliding_window", where)
        full = _layer_count(cfg, "full_attention", num_layers)
        if full is None:
            period = {"gemma2": 2, "gpt_oss": 2}.get(kind)
            if kind == "gemma3_text":
                period = _int(g("sliding_window_pattern", default=6), "sliding_window_pattern",
                              where)
            full = num_layers // period if period else 0
        out.update(sliding_window=window, full_attention_layers=full)
    if kind == "llama4_text" and cfg.get("attention_chunk_size"):
        chunk = _int(cfg["attention_chunk_size"], "attention_chunk_size", where)
        nope = cfg.get("no_rope_layers")  # 1: rotary + chunked; 0: NoPE, global attention
        if isinstance(nope, list) and nope:
            full = sum(1 for x in nope[:num_layers] if not x)
        else:
            full = num_layers // _int(g("no_rope_layer_interval", default=4),
                                      "no_rope_layer_interval", where)
        out.update(attention_chunk_size=chunk, full_attention_layers=full)
    if kind in ("gemma3_text", "qwen3", "qwen3_moe"):
        out["qk_norm"] = "head"
    if kind == "olmo2":
        out["qk_norm"] = "width"
    if kind in ("gemma2", "gemma3_text", "glm4"):
        out["norms_per_layer"] = 4
    if kind == "gpt_oss":
        out.update(attention_sinks=True, qkv_bias=True, attn_out_bias=True, expert_bias=True)
    if kind in ("glm", "glm4", "glm4_moe"):
        out["qkv_bias"] = bool(cfg.get("attention_bias"))
    if kind == "glm4_moe" and cfg.get("use_qk_norm"):  # Glm4MoeAttention: q_norm, k_norm per head
        out["qk_norm"] = "head"
    if kind == "chatglm":
        out["qkv_bias"] = bool(cfg.get("add_qkv_bias", False))
    if kind == "internlm2" and cfg.get("bias"):
        out.update(qkv_bias=True, attn_out_bias=True)
    if kind == "starcoder2":
        bias = bool(cfg.get("use_bias"))
        out.update(qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias, norm_bias=True)
    if kind == "gptj":  # one LayerNorm feeds the parallel attention (no biases) and MLP
        out.update(mlp_bias=True, norm_bias=True, norms_per_layer=1, parallel_attention_mlp=True)
    if kind == "phi":
        out.update(qkv_bias=True, attn_out_bias=True, mlp_bias=True, norm_bias=True,
                   norms_per_layer=1, parallel_attention_mlp=True)
    if kind == "falcon":
        bias = bool(cfg.get("bias"))
        new_arch = bool(cfg.get("new_decoder_architecture"))
        norms = (cfg.get("num_ln_in_parallel_attn") or 2) if new_arch else \
            (1 if cfg.get("parallel_attn") else 2)
        out.update(qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias, norm_bias=True,
                   norms_per_layer=_int(norms, "num_ln_in_parallel_attn", where),
                   parallel_attention_mlp=bool(cfg.get("parallel_attn")) or new_arch)
    return out


def _hybrid_fields(cfg: dict, num_layers: int, where: str) -> dict:
    """Nemotron-H's layer pattern and Mamba-2 shape (HF NemotronHConfig): one pre-norm block
    per layer, the pattern's M / * / - / E naming its module."""
    g = lambda *k, **kw: _get(cfg, where, *k, **kw)  # noqa: E731
    if cfg.get("moe_latent_size"):
        raise SpecError(f"model config {where}: latent MoE (moe_latent_size, Nemotron 3 Super "
                        "and Ultra) is not modelled yet; write a meshplan model file without it "
                        "(see docs/models.md) for an estimate of the plain-MoE equivalent")
    pattern = g("hybrid_override_pattern")
    if not isinstance(pattern, str) or len(pattern) != num_layers:
        raise SpecError(f"model config {where}: hybrid_override_pattern must be a string of "
                        f"num_hidden_layers={num_layers} characters, got {str(pattern)[:40]!r}")
    return dict(layer_pattern=pattern, norms_per_layer=1,
                mamba_num_heads=_int(g("mamba_num_heads"), "mamba_num_heads", where),
                mamba_head_dim=_int(g("mamba_head_dim"), "mamba_head_dim", where),
                mamba_state_dim=_int(g("ssm_state_size"), "ssm_state_size", where),
                mamba_groups=_int(g("n_groups", default=8), "n_groups", where),
                mamba_conv_kernel=_int(g("conv_kernel", default=4), "conv_kernel", where),
                mamba_chunk_size=_int(g("chunk_size", default=128), "chunk_size", where))


def _moe_fields(cfg: dict, kind: str, where: str) -> dict:
    g = lambda *k, **kw: _get(cfg, where, *k, **kw)  # noqa: E731
    if kind == "nemotron_h":
        if not cfg.get("n_routed_experts"):
            return {}
        shared = (cfg.get("n_shared_experts") or 0) and \
            g("moe_shared_expert_intermediate_size")
        return dict(num_experts=g("n_routed_experts"), experts_top_k=g("num_experts_per_tok"),
                    expert_ffn_hidden_size=g("moe_intermediate_size"),
                    num_shared_experts=cfg.get("n_shared_experts") or 0,
                    shared_expert_ffn_hidden_size=shared)
    if kind == "mixtral":
        return dict(num_experts=g("num_local_experts"), experts_top_k=g("num_experts_per_tok"),
                    expert_ffn_hidden_size=g("intermediate_size"))
    if kind in ("qwen2_moe", "qwen3_moe"):
        shared = cfg.get("shared_expert_intermediate_size") or 0
        return dict(num_experts=g("num_experts"), experts_top_k=g("num_experts_per_tok"),
                    expert_ffn_hidden_size=g("moe_intermediate_size"),
                    num_shared_experts=1 if shared else 0, shared_expert_ffn_hidden_size=shared,
                    num_dense_layers=len(cfg.get("mlp_only_layers") or []))
    if kind in ("deepseek_v3", "deepseek_v2", "glm4_moe"):  # GLM-4.5 keeps DeepSeek's keys
        shared = g("n_shared_experts", default=0, required=False) or 0
        expert_ffn = g("moe_intermediate_size")
        return dict(num_experts=g("n_routed_experts"), experts_top_k=g("num_experts_per_tok"),
                    expert_ffn_hidden_size=expert_ffn, num_shared_experts=shared,
                    shared_expert_ffn_hidden_size=shared * expert_ffn,
                    num_dense_layers=g("first_k_dense_replace", default=0, required=False) or 0,
                    moe_layer_every=g("moe_layer_freq", default=1, required=False) or 1)
    if kind == "gpt_oss":
        return dict(num_experts=g("num_local_experts"),
                    experts_top_k=g("num_experts_per_tok", "experts_per_token"),
                    expert_ffn_hidden_size=g("intermediate_size"))
    if kind == "llama4_text":
        # Every MoE layer also runs one shared expert as wide as a routed one (HF Llama4TextMoe).
        expert_ffn = g("intermediate_size")
        return dict(num_experts=g("num_local_experts"), experts_top_k=g("num_experts_per_tok"),
                    expert_ffn_hidden_size=expert_ffn, num_shared_experts=1,
                    shared_expert_ffn_hidden_size=expert_ffn,
                    moe_layer_every=g("interleave_moe_layer_step", default=1))
    return {}


def model_from_file(data: dict, where: str) -> ModelSpec:
    """A meshplan model file: `meshplan_model: 1` and ModelSpec's own keys, strictly (unknown
    keys rejected); `name` defaults to the file (docs/models.md)."""
    data = dict(data)
    version = data.pop("meshplan_model")
    if version != MODEL_FILE_FORMAT:
        raise SpecError(f"model file {where}: meshplan_model {version!r} is not supported "
                        f"(want {MODEL_FILE_FORMAT})")
    data.setdefault("name", where)
    return _strict(ModelSpec, data, f"model file {where}")


def _gpt2(cfg: dict, where: str) -> ModelSpec:
    g = lambda *k, **kw: _get(cfg, where, *k, **kw)  # noqa: E731
    hidden = _int(g("n_embd"), "n_embd", where)
    heads = _int(g("n_head"), "n_head", where)
    ffn = cfg.get("n_inner") or 4 * hidden
    return ModelSpec(
        name=where, num_layers=_int(g("n_layer"), "n_layer", where), hidden_size=hidden,
        ffn_hidden_size=_int(ffn, "n_inner", where), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, vocab_size=_int(g("vocab_size"), "vocab_size", where),
        max_seq_len=_int(g("n_positions", "n_ctx", default=1024), "n_positions", where),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)), mlp_kind="gelu",
        dropout=bool(cfg.get("resid_pdrop", 0.1)),
    )


def model_to_dict(model: ModelSpec) -> dict:
    return asdict(model)


def model_from_dict(data: dict, where: str = "plan") -> ModelSpec:
    return _strict(ModelSpec, data, f"{where}: model")


# --------------------------------------------------------------------------------------------
# Clusters
# --------------------------------------------------------------------------------------------


@cache
def _cluster_presets_raw() -> dict:
    return read_mapping(DATA_DIR / "clusters.yaml", "cluster preset", shipped=True)


def cluster_presets() -> list[str]:
    return sorted(_cluster_presets_raw())


def load_cluster(name_or_path: str, nodes: int | None = None,
                 gpus_per_node: int | None = None) -> ClusterSpec:
    """A ClusterSpec from a preset (scaled to `nodes` x `gpus_per_node`) or a cluster.yaml."""
    if nodes is not None and nodes <= 0:
        raise SpecError(f"--nodes must be a positive integer, got {nodes}")
    if gpus_per_node is not None and gpus_per_node <= 0:
        raise SpecError(f"--gpus-per-node must be a positive integer, got {gpus_per_node}")
    presets = _cluster_presets_raw()
    if name_or_path in presets:
        return _preset_cluster(name_or_path, presets[name_or_path], nodes or 1, gpus_per_node)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if nodes is not None or gpus_per_node is not None:
            raise SpecError(
                "--nodes/--gpus-per-node scale presets only; a cluster.yaml lists its nodes"
            )
        return cluster_from_dict(read_mapping(path, "cluster"), str(path))
    raise SpecError(
        f"unknown cluster {name_or_path!r}{closest(name_or_path, list(presets))}; give a preset "
        "(meshplan clusters) or a path to a cluster.yaml"
    )


def _preset_cluster(name: str, raw: dict, nodes: int, gpus_per_node: int | None) -> ClusterSpec:
    gpn = raw["gpus_per_node"]
    if gpus_per_node is not None:
        if not raw.get("gpus_per_node_adjustable", False) and gpus_per_node > gpn:
            raise SpecError(
                f"cluster preset {name} has {gpn} GPUs per node; --gpus-per-node may only use "
                f"fewer (1..{gpn})"
            )
        gpn = gpus_per_node
    if gpn > MAX_GPUS_PER_NODE:
        raise SpecError(f"--gpus-per-node {gpn} is over the limit of {MAX_GPUS_PER_NODE}")
    if nodes * gpn > MAX_GPUS:
        raise SpecError(f"--nodes {nodes} x {gpn} GPUs = {nodes * gpn:,} GPUs is over meshplan's "
                        f"limit of {MAX_GPUS:,}; plan a part of the cluster")
    gpu = gpu_preset(raw["gpu"])
    per_domain = job_domain_nodes(raw.get("nodes_per_domain", 1), nodes)
    per_rack = per_domain if per_domain > 1 else raw.get("nodes_per_rack", 32)
    node_list = tuple(
        NodeSpec(f"{raw.get('node_prefix', 'node')}{i}", gpn, gpu.name, raw["nic"],
                 f"rack{i // per_rack}", f"nvl{i // per_domain}" if per_domain > 1 else "")
        for i in range(nodes)
    )
    domain = raw.get("domain_link")
    return ClusterSpec(
        name=f"{name}x{nodes}" if nodes > 1 else name, nodes=node_list, gpu_types={gpu.name: gpu},
        intra_node=_strict(LinkSpec, raw["intra_node"], f"clusters.yaml: {name}.intra_node"),
        inter_node=_strict(LinkSpec, raw["inter_node"], f"clusters.yaml: {name}.inter_node"),
        domain_link=(_strict(LinkSpec, domain, f"clusters.yaml: {name}.domain_link")
                     if domain is not None else None),
    )


def job_domain_nodes(rack_nodes: int, nodes: int) -> int:
    """Nodes of one NVLink domain a job of `nodes` nodes gets: the whole job when it fits in one
    rack, else the largest divisor of `nodes` up to a rack (18 trays of an NVL72). This is
    what `meshplan launch` asks SLURM for (`#SBATCH --segment`, launcher/slurm.py): a 64-tray
    job runs as 4 racks x 16 trays, so its domains are 16 trays, not 18."""
    if rack_nodes <= 1:
        return 1
    if nodes <= rack_nodes:
        return nodes
    return max(d for d in range(1, rack_nodes + 1) if nodes % d == 0)


_CLUSTER_KEYS = {"meshplan_cluster", "name", "gpu_types", "intra_node", "inter_node", "nic_links",
                 "nodes", "measured", "domain_link"}
_MEASURED_KEYS = {"bandwidth_GBps", "latency_s", "collectives", "device", "backend",
                  "gpus", "seconds", "notes", "topology", "nics"}


def _gpu_type(name: str, data: Any, where: str) -> GpuSpec:
    """A gpu_types entry: {preset: H100-SXM, ...overrides} or a full spec."""
    if data is None:
        data = {"preset": name}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: gpu_types.{name} must be a mapping")
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is None:
        return _gpu_from_dict(name, data, where)
    base = asdict(gpu_preset(preset))
    base.pop("name")
    unknown = sorted(set(data) - set(base))
    if unknown:
        raise SpecError(f"{where}: gpu_types.{name}: unknown keys {unknown}"
                        f"{_replaced_hint(unknown)}")
    base.update(data)
    return _gpu_from_dict(name, base, where)


def _matrix(value: Any, key: str, where: str) -> tuple[tuple[float, ...], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(r, list) for r in value):
        raise SpecError(f"{where}: measured.{key} must be a list of rows (a square matrix)")
    out = []
    for i, row in enumerate(value):
        cleaned = []
        for j, x in enumerate(row):
            if i == j:
                cleaned.append(0.0)
                continue
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x <= 0:
                raise SpecError(f"{where}: measured.{key}[{i}][{j}] = {x!r} must be a positive number")
            cleaned.append(float(x))
        out.append(tuple(cleaned))
    return tuple(out)


def cluster_from_dict(data: dict, where: str) -> ClusterSpec:
    """Strictly parse the cluster.yaml format (see examples/clusters/ and the README)."""
    unknown = sorted(set(data) - _CLUSTER_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown keys {unknown}; allowed: {sorted(_CLUSTER_KEYS)}")
    version = data.get("meshplan_cluster", CLUSTER_FORMAT)
    if version != CLUSTER_FORMAT:
        raise SpecError(f"{where}: meshplan_cluster format {version!r} is not supported (want 1)")
    for key in ("nodes", "gpu_types", "intra_node", "inter_node"):
        if key not in data:
            raise SpecError(f"{where}: missing required key {key!r}")
    if not isinstance(data["gpu_types"], dict) or not data["gpu_types"]:
        raise SpecError(f"{where}: gpu_types must map GPU type names to specs")
    gpus = {name: _gpu_type(name, spec, where) for name, spec in data["gpu_types"].items()}
    if not isinstance(data["nodes"], list) or not data["nodes"]:
        raise SpecError(f"{where}: nodes must be a non-empty list")
    nodes = tuple(_strict(NodeSpec, n, f"{where}: nodes[{i}]") for i, n in enumerate(data["nodes"]))
    for node in nodes:
        if node.gpu not in gpus:
            raise SpecError(
                f"{where}: node {node.name} uses GPU type {node.gpu!r} with no entry in gpu_types "
                f"(have {sorted(gpus)}); add it, e.g. gpu_types: {{{node.gpu}: {{preset: H100-SXM}}}}"
            )
    measured = data.get("measured") or {}
    if not isinstance(measured, dict):
        raise SpecError(f"{where}: measured must be a mapping")
    unknown = sorted(set(measured) - _MEASURED_KEYS)
    if unknown:
        raise SpecError(f"{where}: measured has unknown keys {unknown}")
    nic_links = {k: _strict(LinkSpec, v, f"{where}: nic_links.{k}")
                 for k, v in (data.get("nic_links") or {}).items()}
    return ClusterSpec(
        name=str(data.get("name", Path(where).stem)), nodes=nodes, gpu_types=gpus,
        intra_node=_strict(LinkSpec, data["intra_node"], f"{where}: intra_node"),
        inter_node=_strict(LinkSpec, data["inter_node"], f"{where}: inter_node"),
        nic_links=nic_links,
        domain_link=(_strict(LinkSpec, data["domain_link"], f"{where}: domain_link")
                     if data.get("domain_link") is not None else None),
        bandwidth_GBps=_matrix(measured.get("bandwidth_GBps"), "bandwidth_GBps", where),
        latency_s=_matrix(measured.get("latency_s"), "latency_s", where),
    )


def cluster_to_dict(cluster: ClusterSpec, extra_measured: dict | None = None) -> dict:
    """The cluster.yaml form (self-contained: GPU specs written out in full)."""
    def gpu(spec: GpuSpec) -> dict:
        d = asdict(spec)
        d.pop("name")
        return d

    out: dict[str, Any] = {
        "meshplan_cluster": CLUSTER_FORMAT,
        "name": cluster.name,
        "gpu_types": {k: gpu(v) for k, v in cluster.gpu_types.items()},
        "intra_node": asdict(cluster.intra_node),
        "inter_node": asdict(cluster.inter_node),
        "nodes": [_node_dict(n) for n in cluster.nodes],
    }
    if cluster.nic_links:
        out["nic_links"] = {k: asdict(v) for k, v in cluster.nic_links.items()}
    if cluster.domain_link is not None:
        out["domain_link"] = asdict(cluster.domain_link)
    measured = dict(extra_measured or {})
    if cluster.bandwidth_GBps is not None:
        measured["bandwidth_GBps"] = [list(r) for r in cluster.bandwidth_GBps]
    if cluster.latency_s is not None:
        measured["latency_s"] = [list(r) for r in cluster.latency_s]
    if measured:
        out["measured"] = measured
    return out


def _node_dict(node: NodeSpec) -> dict:
    """A node's cluster.yaml entry (`domain` only when the node shares an NVLink domain)."""
    out = asdict(node)
    if not out["domain"]:
        del out["domain"]
    return out


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def _plain(value):
    """YAML-safe copy: tuples -> lists, numpy scalars -> float, floats to 6 significant digits."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    number = float(value)
    return float(f"{number:.6g}") if math.isfinite(number) else None


def write_cluster_yaml(path: Path | str, cluster: ClusterSpec, measured: dict) -> None:
    """cluster.yaml (the profiler's output) via a temporary file and rename: an interrupted
    write leaves no file. `measured` adds the profiler's extra keys (backend, notes...)."""
    write_atomic(path, dump_yaml(_plain(cluster_to_dict(cluster, measured))))
