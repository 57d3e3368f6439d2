import pytest
import torch

from effilm.config import ModelConfig, MoEConfig, preset_names
from effilm.config.cost import cost_summary, num_active_params, num_params
from effilm.errors import ConfigError
from effilm.models.transformer import Transformer

PUBLISHED = {  # preset: (total, active) from the published models
    "arctic": (478.6e9, 17.32e9),
    "phi-3-mini-4k": (3.821e9, None),
    "phi-3-small-8k": (7.39e9, None),
    "phi-3-medium-4k": (13.96e9, None),
    "phi-3.5-moe": (41.87e9, 6.64e9),
    "openelm-270m": (271.5e6, None),
    "openelm-450m": (457.2e6, None),
    "openelm-1.1b": (1.080e9, None),
    "openelm-3b": (3.037e9, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_figures_within_0_1_percent(name):
    cfg = ModelConfig.from_name(name)
    total, active = PUBLISHED[name]
    assert abs(num_params(cfg) - total) / total < 1e-3
    if active is not None:
        assert abs(num_active_params(cfg) - active) / active < 1e-3


def test_arctic_breakdown():
    cfg = ModelConfig.from_name("arctic")
    s = cost_summary(cfg)
    outside = s["total_params"] - s["expert_params"]
    assert abs(outside - 9.997e9) / 9.997e9 < 1e-3
    one_expert_all_layers = s["expert_params"] / 128
    assert abs(one_expert_all_layers - 3.66e9) / 3.66e9 < 2e-3


@pytest.mark.parametrize("name", preset_names())
def test_analytic_count_equals_meta_numel(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    params = {id(p): p for p in model.parameters()}  # a tied head counts once
    numel = sum(p.numel() for p in params.values())
    assert numel == num_params(cfg)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    if cfg.has_moe:
        per_layer_active = cfg.moe.top_k / cfg.moe.num_experts
        assert num_active_params(cfg) == numel - expert + int(expert * per_layer_active)
    else:
        assert num_active_params(cfg) == numel


def test_openelm_layerwise_scaling():
    cfg = ModelConfig.from_name("openelm-270m")
    heads = [s.n_heads for s in cfg.layers]
    ffn = [s.ffn_dim for s in cfg.layers]
    assert heads[0] == 12 and heads[-1] == 20  # 0.5*1280/64 -> 10 rounded to a multiple of 4 groups; 1.0 -> 20
    assert all(s.n_kv_heads * 4 == s.n_heads for s in cfg.layers)
    assert ffn[0] == 768 and ffn[-1] == 5120 and ffn == sorted(ffn)
    assert all(f % 256 == 0 for f in ffn)


def test_tiny_arctic_matches_tiny_dense_active():
    dense, arctic = ModelConfig.from_name("tiny-dense"), ModelConfig.from_name("tiny-arctic")
    assert arctic.moe.num_experts >= 32 and arctic.moe.top_k == 2
    mlp_active = lambda c: 3 * c.d_model * (c.layers[0].ffn_dim + (c.moe.top_k * c.moe.expert_ffn_dim if c.moe else 0))  # noqa: E731
    assert mlp_active(dense) == mlp_active(arctic)
    assert num_params(arctic) > 4 * num_params(dense)
    assert abs(num_active_params(arctic) - num_active_params(dense)) / num_active_params(dense) < 0.02


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'arctic'"):
        ModelConfig.from_name("artic")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=100, n_heads=7), "n_heads"),
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
        (dict(layer_pattern="DX"), "layer_pattern"),
        (dict(layer_pattern="M"), "moe"),
        (dict(norm="batchnorm"), "norm"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(rope_type="longrope"), "rope_original_max_seq_len"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kwargs)


def test_bad_moe_configs():
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5, expert_ffn_dim=8)
    with pytest.raises(ConfigError, match="router"):
        MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, router="sofmax_topk")
    with pytest.raises(ConfigError, match="unknown model config key.*'n_layer'.*did you mean 'n_layers'"):
        ModelConfig.from_dict({"n_layer": 3})


def test_config_round_trips_through_dict():
    cfg = ModelConfig.from_name("phi-3-mini-128k")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.layers == cfg.layers
