"""Named presets, as data: the real Arctic, Phi-3, Mixtral and OpenELM architectures, and tiny CPU models.

Each preset is a plain dict of ``ModelConfig`` fields (a nested ``moe`` dict for MoE models);
``ModelConfig.from_name(NAME)`` builds it. Figures and key facts come from the published configs
(HF Hub config.json files, Snowflake's modeling_arctic.py and vLLM's arctic.py, Apple's OpenELM
configs). ``effilm params NAME`` prints each preset's cost; tests check the counts against a
meta-device build and the published totals.
"""

from __future__ import annotations

import copy

from effilm.errors import ConfigError, closest

# The real architectures whose cost the demo and its report show beside the tiny models.
REAL_PRESETS = ("arctic", "phi-3-mini-4k", "openelm-270m")
# The context at which cost tables compare models (FLOPs per token depend on it).
COST_SEQ_LEN = 2048

# Phi-3-mini-128k (June 2024 revision) / Phi-3.5-mini LongRoPE factors, one per rotary frequency.
_PHI3_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]  # fmt: skip
_PHI3_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]  # fmt: skip


def _arctic() -> dict:
    return dict(
        name="arctic", vocab_size=32000, d_model=7168, n_layers=35, n_heads=56, n_kv_heads=8, head_dim=128,
        ffn_dim=4864, residual_ffn_dim=7168, layer_pattern="H", rope_theta=1e4, max_seq_len=4096,
        norm_eps=1e-5, moe=dict(num_experts=128, top_k=2, expert_ffn_dim=4864, aux_loss_coef=0.001),
        hf_architecture="ArcticForCausalLM", bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _phi3(name: str, d: int, layers: int, heads: int, kv: int, ffn: int, **kw) -> dict:
    base = dict(
        name=name, vocab_size=32064, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
        rope_theta=1e4, max_seq_len=4096, norm_eps=1e-5, hf_architecture="Phi3ForCausalLM",
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    )  # fmt: skip
    base.update(kw)
    return base


def _phi3_mini_128k() -> dict:
    return _phi3(
        "phi-3-mini-128k", 3072, 32, 32, 32, 8192, max_seq_len=131072, rope_type="longrope",
        rope_original_max_seq_len=4096, rope_short_factor=_PHI3_SHORT, rope_long_factor=_PHI3_LONG,
        sliding_window=262144,
    )  # fmt: skip


def _phi3_small() -> dict:
    # Phi-3-small-8k: GeGLU (gegelu, limit 20), 100352-token tiktoken vocabulary, LayerNorm with
    # biases, biases on every projection, tied embeddings, block-sparse attention in alternate layers.
    return dict(
        name="phi-3-small-8k", vocab_size=100352, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        ffn_dim=14336, activation="gegelu", gegelu_limit=20.0, norm="layernorm", norm_bias=True,
        attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, rope_theta=1e6,
        max_seq_len=8192, attention_block_sparse=True, bos_token_id=100257, eos_token_id=100257,
    )  # fmt: skip


def _phi35_moe() -> dict:
    # Phi-3.5-MoE. Its LongRoPE factor tables are checkpoint data not bundled here: loading the
    # real config.json brings them; the preset describes the model at its 4k original context.
    return dict(
        name="phi-3.5-moe", vocab_size=32064, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        ffn_dim=6400, layer_pattern="M", norm="layernorm", norm_bias=True, norm_eps=1e-5, attn_bias=True,
        attn_out_bias=True, lm_head_bias=True, rope_theta=1e4, max_seq_len=4096,
        moe=dict(num_experts=16, top_k=2, expert_ffn_dim=6400, router="sparsemixer", renormalize=False,
                      router_jitter_eps=0.01, aux_loss_coef=0.0),
        hf_architecture="PhimoeForCausalLM", bos_token_id=1, eos_token_id=32000,
    )  # fmt: skip


def _mixtral() -> dict:
    return dict(
        name="mixtral-8x7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        ffn_dim=14336, layer_pattern="M", rope_theta=1e6, max_seq_len=32768, norm_eps=1e-5,
        moe=dict(num_experts=8, top_k=2, expert_ffn_dim=14336, aux_loss_coef=0.02),
        hf_architecture="MixtralForCausalLM", bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _openelm(name: str, layers: int, d: int, head_dim: int) -> dict:
    return dict(
        name=name, vocab_size=32000, d_model=d, n_layers=layers, n_heads=d // head_dim, head_dim=head_dim,
        ffn_dim=0, qkv_multipliers=[0.5, 1.0], ffn_multipliers=[0.5, 4.0], num_gqa_groups=4,
        ffn_dim_divisor=256, qk_norm=True, tie_embeddings=True, norm_eps=1e-6, rope_theta=1e4,
        max_seq_len=2048, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


# Tiny models for CPU work. tiny-dense and tiny-arctic have the same active MLP width
# (576 = 192 residual + 2 x 192 experts), so they match in active parameters. tiny-arctic keeps
# Arctic's own constraint (residual MLP width = hidden size) so it exports to Arctic's format.
def _tiny(name: str, **kw) -> dict:
    base = dict(
        name=name, vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=576,
        max_seq_len=512, rope_theta=1e4, tie_embeddings=True, norm_eps=1e-5,
    )  # fmt: skip
    base.update(kw)
    return base


PRESETS: dict[str, dict] = {
    "arctic": _arctic(),
    "phi-3-mini-4k": _phi3("phi-3-mini-4k", 3072, 32, 32, 32, 8192, sliding_window=2047),
    "phi-3-mini-128k": _phi3_mini_128k(),
    "phi-3-small-8k": _phi3_small(),
    "phi-3-medium-4k": _phi3("phi-3-medium-4k", 5120, 40, 40, 10, 17920, sliding_window=2047),
    "phi-3.5-moe": _phi35_moe(),
    "mixtral-8x7b": _mixtral(),
    "openelm-270m": _openelm("openelm-270m", 16, 1280, 64),
    "openelm-450m": _openelm("openelm-450m", 20, 1536, 64),
    "openelm-1.1b": _openelm("openelm-1.1b", 28, 2048, 64),
    "openelm-3b": _openelm("openelm-3b", 36, 3072, 128),
    "tiny-dense": _tiny("tiny-dense"),
    "tiny-moe": _tiny(
        "tiny-moe", layer_pattern="M", moe=dict(num_experts=8, top_k=2, expert_ffn_dim=288)
    ),
    "tiny-arctic": _tiny(
        "tiny-arctic", layer_pattern="H", ffn_dim=192, residual_ffn_dim=192,
        moe=dict(num_experts=32, top_k=2, expert_ffn_dim=192), hf_architecture="ArcticForCausalLM",
    ),
    "tiny-openelm": _tiny(
        "tiny-openelm", n_heads=6, n_kv_heads=None, head_dim=32, ffn_dim=0, qkv_multipliers=[0.5, 1.0],
        ffn_multipliers=[0.5, 4.0], num_gqa_groups=4, ffn_dim_divisor=64, qk_norm=True,
        norm_eps=1e-6,  # as OpenELM's own code fixes it, so the HF export runs the same there
    ),
}

DESCRIPTIONS = {
    "arctic": "Snowflake Arctic: 128 experts top-2 beside a dense residual MLP in every layer",
    "phi-3-mini-4k": "Phi-3-mini 3.8B, 4k context, sliding window 2047",
    "phi-3-mini-128k": "Phi-3-mini 3.8B with LongRoPE to 128k",
    "phi-3-small-8k": "Phi-3-small 7B: GeGLU, 100k vocab (effilm runs dense attention for block-sparse)",
    "phi-3-medium-4k": "Phi-3-medium 14B, GQA 40/10",
    "phi-3.5-moe": "Phi-3.5-MoE: 16 experts top-2, sparsemixer router, LayerNorm with biases",
    "mixtral-8x7b": "Mixtral 8x7B: 8 experts top-2",
    "openelm-270m": "Apple OpenELM 270M, layer-wise scaling",
    "openelm-450m": "Apple OpenELM 450M, layer-wise scaling",
    "openelm-1.1b": "Apple OpenELM 1.1B, layer-wise scaling",
    "openelm-3b": "Apple OpenELM 3B, layer-wise scaling",
    "tiny-dense": "tiny Llama-style dense model for CPU work",
    "tiny-moe": "tiny Mixtral-style MoE, 8 experts top-2",
    "tiny-arctic": "tiny Arctic hybrid, 32 experts top-2, same active params as tiny-dense",
    "tiny-openelm": "tiny OpenELM with layer-wise scaling",
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_dict(name: str) -> dict:
    """A copy of preset ``name``'s fields; ``ModelConfig.from_name`` builds the config from it."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        near = closest(name, PRESETS)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (see `effilm presets`)") from None
