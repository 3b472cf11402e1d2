"""HuggingFace config.json parsing for every supported family, and the presets."""

import json

import pytest

from cost_models.specs import SpecError
from planner.specfiles import load_model, model_presets

LLAMA = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
         "hidden_act": "silu"}

CASES = {
    "llama": ({**LLAMA, "model_type": "llama", "num_key_value_heads": 8},
              dict(num_kv_heads=8, mlp_kind="gated_silu", head_dim=128)),
    "mistral": ({**LLAMA, "model_type": "mistral", "num_key_value_heads": 8,
                 "intermediate_size": 14336}, dict(ffn_hidden_size=14336, num_kv_heads=8)),
    "qwen2": ({**LLAMA, "model_type": "qwen2", "num_key_value_heads": 4, "tie_word_embeddings": True},
              dict(tied_embeddings=True, num_kv_heads=4)),
    "qwen3": ({**LLAMA, "model_type": "qwen3", "num_key_value_heads": 8, "head_dim": 128,
               "num_attention_heads": 64}, dict(head_dim=128, num_heads=64)),
    "nemotron": ({**LLAMA, "model_type": "nemotron", "hidden_act": "relu2", "num_key_value_heads": 8},
                 dict(mlp_kind="squared_relu")),
    "gpt_neox": ({"model_type": "gpt_neox", "hidden_size": 6144, "intermediate_size": 24576,
                  "num_hidden_layers": 44, "num_attention_heads": 64, "vocab_size": 50432,
                  "max_position_embeddings": 2048, "hidden_act": "gelu"},
                 dict(mlp_kind="gelu", num_kv_heads=64, num_layers=44)),
    "gpt2": ({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
              "n_positions": 1024}, dict(ffn_hidden_size=3072, tied_embeddings=True, mlp_kind="gelu")),
    "mixtral": ({**LLAMA, "model_type": "mixtral", "num_key_value_heads": 8, "num_local_experts": 8,
                 "num_experts_per_tok": 2, "intermediate_size": 14336},
                dict(num_experts=8, experts_top_k=2, expert_ffn_hidden_size=14336)),
    "qwen2_moe": ({**LLAMA, "model_type": "qwen2_moe", "num_key_value_heads": 16, "num_experts": 60,
                   "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                   "shared_expert_intermediate_size": 5632},
                  dict(num_experts=60, experts_top_k=4, expert_ffn_hidden_size=1408,
                       num_shared_experts=1, shared_expert_ffn_hidden_size=5632)),
    "qwen3_moe": ({**LLAMA, "model_type": "qwen3_moe", "num_key_value_heads": 4, "num_experts": 128,
                   "num_experts_per_tok": 8, "moe_intermediate_size": 768, "head_dim": 128},
                  dict(num_experts=128, experts_top_k=8, num_shared_experts=0)),
    "deepseek_v3": ({**LLAMA, "model_type": "deepseek_v3", "num_attention_heads": 128,
                     "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                     "n_shared_experts": 1, "first_k_dense_replace": 3, "qk_nope_head_dim": 128,
                     "qk_rope_head_dim": 64},
                    dict(num_experts=256, num_dense_layers=3, head_dim=192, num_kv_heads=128,
                         shared_expert_ffn_hidden_size=2048)),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_parses(family, tmp_path):
    cfg, expected = CASES[family]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = load_model(str(path))
    for key, value in expected.items():
        assert getattr(spec, key) == value, (family, key)
    # A directory holding config.json works too (HF checkpoint layout).
    assert load_model(str(tmp_path)) == spec


def test_presets_cover_the_popular_models():
    names = set(model_presets())
    for need in ("llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "qwen2.5-7b", "qwen2.5-72b",
                 "mistral-7b", "mixtral-8x7b", "gpt3-175b", "gpt-1.7b", "gpt-1t"):
        assert need in names
    assert len(names) >= 12
    m = load_model("llama3.1-405b")
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads) == (126, 16384, 128, 8)


@pytest.mark.parametrize("cfg,needle", [
    ({"hidden_size": 1}, "model_type"),
    ({"model_type": "bert"}, "not supported"),
    ({**LLAMA, "model_type": "llama", "num_key_value_heads": 5}, "multiple of num_kv_heads"),
    ({**LLAMA, "model_type": "llama", "num_hidden_layers": -2}, "positive integer"),
    ({**LLAMA, "model_type": "llama", "hidden_act": "tanh"}, "hidden_act"),
])
def test_bad_configs_raise_spec_error(cfg, needle, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match=needle):
        load_model(str(path))


# Gemma Team 2024, "Gemma: Open Models Based on Gemini Research and Technology", Table 2:
# embedding + non-embedding parameters, 2B: 524,550,144 + 1,981,622,272; 7B: 786,432,000 +
# 7,751,248,896. Configs as google/gemma-2b and google/gemma-7b publish them (GeGLU MLP,
# tie_word_embeddings left to its Gemma default, true).
GEMMA = {
    "gemma-2b": ({"hidden_size": 2048, "intermediate_size": 16384, "num_attention_heads": 8,
                  "num_key_value_heads": 1, "num_hidden_layers": 18}, 2_506_172_416),
    "gemma-7b": ({"hidden_size": 3072, "intermediate_size": 24576, "num_attention_heads": 16,
                  "num_key_value_heads": 16, "num_hidden_layers": 28}, 8_537_680_896),
}


@pytest.mark.parametrize("name", sorted(GEMMA))
def test_gemma_is_geglu_with_tied_embeddings(name, tmp_path):
    from cost_models.flops import parameter_count

    shape, params = GEMMA[name]
    cfg = {"model_type": "gemma", "head_dim": 256, "vocab_size": 256000,
           "max_position_embeddings": 8192, "hidden_act": "gelu",
           "hidden_activation": "gelu_pytorch_tanh", **shape}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = load_model(str(path))
    assert spec.mlp_kind == "gated_gelu" and spec.mlp_matrices == 3 and spec.tied_embeddings
    assert parameter_count(spec) == params
