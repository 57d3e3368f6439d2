"""Parity with transformers: tiny random HF models -> effilm -> logits match -> export -> match."""

import json

import pytest
import torch
from hf_models import PHI3_LONG, PHI3_SHORT, build_hf, hf_logits

import effilm
from effilm.config import ModelConfig
from effilm.config.hf import config_from_hf, config_to_hf
from effilm.errors import CheckpointError, ConfigError
from effilm.models.transformer import build_model

transformers = pytest.importorskip("transformers")
TOL = 1e-4

CASES = [
    ("llama", {}),
    ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),  # MHA, biases
    ("llama", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=20)),  # odd heads, head_dim != D/H
    ("llama", dict(num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=True)),  # MQA, tied
    ("phi3", {}),
    ("phi3", dict(sliding_window=8)),
    ("phi3", dict(num_key_value_heads=4, max_position_embeddings=128, original_max_position_embeddings=32,
                  rope_scaling={"type": "longrope", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG})),
    ("mixtral", {}),
    ("mixtral", dict(num_local_experts=5, num_experts_per_tok=1, num_key_value_heads=1, sliding_window=8)),
    ("mixtral", dict(num_local_experts=8, num_experts_per_tok=4, rope_theta=1e6)),
    ("phimoe", {}),
    ("phimoe", dict(attention_bias=True, lm_head_bias=True, num_key_value_heads=4)),
    ("phimoe", dict(num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                    rope_scaling={"type": "longrope", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG,
                                  "short_mscale": 1.1, "long_mscale": 1.3, "original_max_position_embeddings": 64})),
]  # fmt: skip
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CASES)]


@pytest.mark.parametrize("kind, over", CASES, ids=IDS)
def test_parity_load_and_export(kind, over, tmp_path):
    hf = build_hf(kind, **dict(over))
    hf.save_pretrained(tmp_path / "hf")
    model = effilm.load(tmp_path / "hf")
    assert not model.training
    torch.manual_seed(1)
    # 48 tokens: past the sliding window (8) and, for Phi-3, past LongRoPE's original context (32)
    for T in (12, 48):
        ids = torch.randint(0, 97, (2, T))
        ref = hf_logits(hf, ids)
        with torch.no_grad():
            got = model(ids).logits
        assert (got - ref).abs().max().item() < TOL
    effilm.save_hf(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == type(hf).__name__
    assert (hf_logits(back, ids) - ref).abs().max().item() < TOL


def test_parity_detects_a_wrong_weight(tmp_path):
    hf = build_hf("mixtral")
    hf.save_pretrained(tmp_path / "hf")
    model = effilm.load(tmp_path / "hf")
    with torch.no_grad():
        model.layers[1].moe.experts.w_down[2] += 0.05
        ids = torch.randint(0, 97, (2, 30))
        assert (model(ids).logits - hf_logits(hf, ids)).abs().max().item() > TOL


@pytest.mark.parametrize("name", ["tiny-arctic", "tiny-moe", "tiny-dense", "tiny-openelm"])
def test_effilm_to_hf_and_back_round_trip(name, tmp_path):
    cfg = ModelConfig.from_name(name, vocab_size=211)
    model = build_model(cfg, seed=7).eval()
    effilm.save_hf(model, tmp_path / "hf")
    again = effilm.load(tmp_path / "hf")
    ids = torch.randint(0, 211, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_arctic_layout_and_config_names(tmp_path):
    cfg = ModelConfig.from_name("tiny-arctic", vocab_size=211)
    model = build_model(cfg, seed=3)
    effilm.save_hf(model, tmp_path / "arctic")
    h = json.loads((tmp_path / "arctic" / "config.json").read_text())
    assert h["architectures"] == ["ArcticForCausalLM"] and h["model_type"] == "arctic"
    assert h["moe_layer_frequency"] == 1 and h["parallel_attn_mlp_res"] is True
    assert h["num_local_experts"] == 32 and h["num_experts_per_tok"] == 2 and h["intermediate_size"] == 192
    from safetensors import safe_open

    with safe_open(str(tmp_path / "arctic" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    p = "model.layers.0."
    for k in ["input_layernorm.weight", "post_attention_layernorm.weight", "residual_layernorm.weight",
              "residual_mlp.w1.weight", "residual_mlp.w2.weight", "residual_mlp.w3.weight",
              "block_sparse_moe.gate.weight", "block_sparse_moe.experts.31.w1.weight",
              "block_sparse_moe.experts.0.w2.weight", "block_sparse_moe.experts.5.w3.weight",
              "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]:  # fmt: skip
        assert p + k in keys, k
    # Arctic's alternating layout (moe_layer_frequency=2, no residual) reads back as "DM"
    cfg2, arch = config_from_hf(dict(h, moe_layer_frequency=2, parallel_attn_mlp_res=False))
    assert arch == "ArcticForCausalLM" and cfg2.layer_pattern[:4] == "DMDM"
    assert config_to_hf(cfg2)["moe_layer_frequency"] == 2


def test_presets_export_configs_transformers_accepts():
    for name, cls in [("phi-3-mini-128k", "Phi3Config"), ("phi-3.5-moe", "PhimoeConfig"), ("mixtral-8x7b", "MixtralConfig")]:
        h = config_to_hf(ModelConfig.from_name(name))
        c = getattr(transformers, cls)(**{k: v for k, v in h.items() if k not in ("architectures", "model_type")})
        assert c.hidden_size == h["hidden_size"]
        back, _ = config_from_hf(h)
        assert back.num_params() == ModelConfig.from_name(name).num_params()


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = build_hf("llama")
    hf.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("model.layers.1.self_attn.k_proj.weight")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.1.self_attn.k_proj.weight"):
        effilm.load(tmp_path / "hf")
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight"):
        effilm.load(tmp_path / "hf")


def test_unsupported_exports_are_clear():
    with pytest.raises(ConfigError, match="OpenELM layer-wise scaling"):
        config_to_hf(ModelConfig.from_name("tiny-openelm"), "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="activation 'gelu_tanh'"):
        config_to_hf(ModelConfig.from_name("tiny-dense", activation="gelu_tanh"))
    with pytest.raises(ConfigError, match="not supported"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"]})


# ----- OpenELM: Apple's layout (transformers has no class; mlx-lm reads it, tests/formats/test_mlx.py) -----
# apple/OpenELM-270M's config.json, the architecture fields (its saved per-layer lists included)
OPENELM_270M = {
    "architectures": ["OpenELMForCausalLM"], "model_type": "openelm", "vocab_size": 32000, "max_context_length": 2048,
    "num_transformer_layers": 16, "model_dim": 1280, "head_dim": 64, "qkv_multipliers": [0.5, 1.0],
    "num_query_heads": [12] * 5 + [16] * 7 + [20] * 4, "num_kv_heads": [3] * 5 + [4] * 7 + [5] * 4, "num_gqa_groups": 4,
    "ffn_multipliers": [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
    "ffn_with_glu": True, "ffn_dim_divisor": 256, "activation_fn_name": "swish", "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True, "share_input_output_layers": True, "rope_freq_constant": 10000,
    "rope_max_length": 4096, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def test_openelm_config_is_apples():
    h = config_to_hf(ModelConfig.from_name("openelm-270m"))
    assert {k: h[k] for k in OPENELM_270M} == OPENELM_270M
    cfg, arch = config_from_hf(OPENELM_270M)
    assert arch == "OpenELMForCausalLM" and cfg.norm_eps == 1e-6 and cfg.tie_embeddings and cfg.qk_norm
    assert cfg.num_params() == ModelConfig.from_name("openelm-270m").num_params()
    scalar, _ = config_from_hf(dict(OPENELM_270M, qkv_multipliers=1.0, ffn_multipliers=2.0, num_query_heads=None,
                                    num_kv_heads=None))  # fmt: skip
    assert {s.n_heads for s in scalar.layers} == {20} and {s.ffn_dim for s in scalar.layers} == {2560}
    with pytest.raises(ConfigError, match="num_kv_heads=.*disagrees"):
        config_from_hf(dict(OPENELM_270M, num_kv_heads=[4] * 16))
    with pytest.raises(ConfigError, match="ffn_multipliers"):
        config_from_hf(dict(OPENELM_270M, ffn_multipliers=[1.0, 3.0, 2.0] + [4.0] * 13))


def test_openelm_tensor_names(tmp_path):
    from safetensors import safe_open

    model = build_model(ModelConfig.from_name("tiny-openelm", vocab_size=211, tie_embeddings=False), seed=2).eval()
    effilm.save_hf(model, tmp_path / "o")
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("transformer.layers.3.attn.qkv_proj.weight").shape) == ((8 + 2 * 2) * 32, 192)
    p = "transformer.layers.0."
    expected = {"transformer.token_embeddings.weight", "transformer.norm.weight", "lm_head.weight"} | {
        p + k for k in ("attn_norm.weight", "attn.qkv_proj.weight", "attn.q_norm.weight", "attn.k_norm.weight",
                        "attn.out_proj.weight", "ffn_norm.weight", "ffn.proj_1.weight", "ffn.proj_2.weight")}  # fmt: skip
    assert expected <= keys and len(keys) == 3 + 8 * 4
    again = effilm.load(tmp_path / "o")
    ids = torch.randint(0, 211, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
