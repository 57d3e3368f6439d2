"""Hugging Face ``config.json`` <-> ``ModelConfig``: the architecture fields, both ways.

Plain data, no tensors: the config layer reads an HF model's architecture (``init_from``,
``effilm params DIR``) without the weight maps of :mod:`effilm.formats.hf`, which imports this.
"""

from __future__ import annotations

from effilm.config.model import ModelConfig, MoEConfig, _linspace_round, longrope_mscale
from effilm.errors import ConfigError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
                 "PhimoeForCausalLM", "ArcticForCausalLM", "OpenELMForCausalLM")  # fmt: skip
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
               "mixtral": "MixtralForCausalLM", "phimoe": "PhimoeForCausalLM", "arctic": "ArcticForCausalLM",
               "openelm": "OpenELMForCausalLM"}  # fmt: skip
# OpenELM's own modeling code (apple/OpenELM-* on the Hub) fixes every RMSNorm's epsilon at 1e-6;
# mlx-lm reads ``rms_norm_eps``, which effilm writes too.
OPENELM_NORM_EPS = 1e-6


def choose_architecture(cfg: ModelConfig) -> str:
    if cfg.hf_architecture:
        return cfg.hf_architecture
    kinds = {s.kind for s in cfg.layers}
    if cfg.qkv_multipliers is not None:
        return "OpenELMForCausalLM"
    if "H" in kinds:
        return "ArcticForCausalLM"
    if kinds == {"M"}:
        return "PhimoeForCausalLM" if cfg.moe.router == "sparsemixer" else "MixtralForCausalLM"
    if cfg.rope_type == "longrope" or (cfg.sliding_window is not None):
        return "Phi3ForCausalLM"
    return "LlamaForCausalLM"


def _require(ok: bool, arch: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"cannot export to {arch}: {what}")


def _rope_params(cfg: ModelConfig, arch: str) -> dict:
    rp: dict = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_partial_factor != 1.0:
        rp["partial_rotary_factor"] = cfg.rope_partial_factor
    if cfg.rope_type == "longrope":
        rp.update(rope_type="longrope", short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor),
                  original_max_position_embeddings=cfg.rope_original_max_seq_len)  # fmt: skip
        if arch == "PhimoeForCausalLM":
            default = longrope_mscale(cfg.max_seq_len / cfg.rope_original_max_seq_len, cfg.rope_original_max_seq_len)
            rp["short_mscale"] = cfg.rope_short_mscale if cfg.rope_short_mscale is not None else default
            rp["long_mscale"] = cfg.rope_long_mscale if cfg.rope_long_mscale is not None else default
        else:
            _require(cfg.rope_short_mscale == cfg.rope_long_mscale, arch, "separate short/long LongRoPE mscales")
            if cfg.rope_short_mscale is not None:
                rp["attention_factor"] = cfg.rope_short_mscale
    return rp


def config_to_hf(cfg: ModelConfig, arch: str | None = None) -> dict:
    arch = arch or choose_architecture(cfg)
    _require(arch in ARCHITECTURES, arch, f"supported architectures are {list(ARCHITECTURES)}")
    if arch == "OpenELMForCausalLM":
        return _openelm_to_hf(cfg)
    _require(cfg.qkv_multipliers is None and not cfg.qk_norm, arch, "OpenELM layer-wise scaling / QK norm "
             "(export as OpenELMForCausalLM)")
    _require(cfg.activation == "silu", arch, f"activation {cfg.activation!r} (only silu/SwiGLU)")
    kinds = {s.kind for s in cfg.layers}
    rms = cfg.norm == "rmsnorm"
    base = {
        "architectures": [arch], "model_type": {v: k for k, v in MODEL_TYPES.items()}[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "rope_theta": cfg.rope_theta, "rope_parameters": _rope_params(cfg, arch), "dtype": "float32",
        "attention_dropout": 0.0, "use_cache": True,
    }  # fmt: skip
    standard_head = cfg.head_dim * cfg.n_heads == cfg.d_model
    _require(not cfg.lm_head_bias or arch == "PhimoeForCausalLM", arch, "an LM-head bias")
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        _require(kinds == {"D"} and rms, arch, "needs dense layers and RMSNorm")
        _require(cfg.attn_bias == cfg.attn_out_bias, arch, "attention biases must be on all of q, k, v, o or none")
        _require(cfg.rope_type == "default", arch, "LongRoPE (use Phi3ForCausalLM)")
        _require(arch == "MistralForCausalLM" or cfg.sliding_window is None, arch, "a sliding window (use Phi3/Mistral)")
        base.update(intermediate_size=cfg.ffn_dim, head_dim=cfg.head_dim, attention_bias=cfg.attn_bias,
                    mlp_bias=cfg.mlp_bias, sliding_window=cfg.sliding_window)  # fmt: skip
        if arch == "LlamaForCausalLM":
            base.pop("sliding_window")
    elif arch == "Phi3ForCausalLM":
        _require(kinds == {"D"} and rms and standard_head, arch, "needs dense layers, RMSNorm, head_dim = hidden/heads")
        _require(not (cfg.attn_bias or cfg.attn_out_bias or cfg.mlp_bias), arch, "biases")
        base.update(intermediate_size=cfg.ffn_dim, sliding_window=cfg.sliding_window,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len)  # fmt: skip
        base["rope_parameters"].setdefault("partial_rotary_factor", cfg.rope_partial_factor)
    elif arch == "MixtralForCausalLM":
        m = cfg.moe
        _require(kinds == {"M"} and rms and m.router == "softmax_topk" and m.renormalize, arch,
                 "needs MoE layers, RMSNorm and a renormalised softmax top-k router")  # fmt: skip
        _require(not (cfg.attn_bias or cfg.attn_out_bias), arch, "attention biases")
        _require(cfg.rope_type == "default", arch, "LongRoPE")
        base.update(intermediate_size=m.expert_ffn_dim, num_local_experts=m.num_experts, head_dim=cfg.head_dim,
                    num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef, sliding_window=cfg.sliding_window)  # fmt: skip
    elif arch == "PhimoeForCausalLM":
        m = cfg.moe
        _require(kinds == {"M"} and cfg.norm == "layernorm" and cfg.norm_bias and m.router == "sparsemixer", arch,
                 "needs MoE layers, LayerNorm with bias and the sparsemixer router")  # fmt: skip
        _require(cfg.attn_bias == cfg.attn_out_bias and standard_head, arch, "attention biases on all of q, k, v, o or none")
        base.update(intermediate_size=m.expert_ffn_dim, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                    router_aux_loss_coef=m.aux_loss_coef, router_jitter_noise=m.router_jitter_eps,
                    input_jitter_noise=0.0, attention_bias=cfg.attn_bias, lm_head_bias=cfg.lm_head_bias,
                    sliding_window=cfg.sliding_window)  # fmt: skip
    else:  # Arctic
        m = cfg.moe
        _require(rms and standard_head and not (cfg.attn_bias or cfg.attn_out_bias or cfg.mlp_bias), arch,
                 "needs RMSNorm, no biases and head_dim = hidden/heads")  # fmt: skip
        _require(m is not None and m.router == "softmax_topk" and m.renormalize == (m.top_k > 1), arch,
                 "Arctic's router is softmax top-k, renormalised when k > 1")  # fmt: skip
        freq, parallel = _arctic_layout(cfg)
        for s in cfg.layers:
            _require(s.kind != "H" or s.ffn_dim == cfg.d_model, arch, "the residual MLP width must equal hidden size")
            _require(s.kind != "D" or s.ffn_dim == m.expert_ffn_dim, arch, "dense layers must have the expert width")
        base.update(intermediate_size=m.expert_ffn_dim, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                    router_aux_loss_coef=m.aux_loss_coef, moe_layer_frequency=freq, parallel_attn_mlp_res=parallel,
                    moe_train_capacity_factor=m.capacity_factor or 1, moe_eval_capacity_factor=1,
                    moe_token_dropping=m.capacity_factor is not None, moe_min_capacity=0,
                    enable_expert_tensor_parallelism=False, sliding_window=cfg.sliding_window, quantization=None)  # fmt: skip
        base.pop("rope_parameters")
    return base


def _openelm_to_hf(cfg: ModelConfig) -> dict:
    """Apple's OpenELM ``config.json`` (configuration_openelm.py's field names), with the per-layer
    lists its saved configs carry: ``num_query_heads``, ``num_kv_heads`` and ``ffn_multipliers``."""
    arch = "OpenELMForCausalLM"
    _require(cfg.qkv_multipliers is not None, arch, "needs OpenELM layer-wise scaling (qkv_multipliers, ffn_multipliers)")
    _require({s.kind for s in cfg.layers} == {"D"} and cfg.norm == "rmsnorm", arch, "needs dense layers and RMSNorm")
    _require(cfg.activation == "silu", arch, f"activation {cfg.activation!r} (OpenELM's FFN is SwiGLU)")
    _require(not (cfg.attn_bias or cfg.attn_out_bias or cfg.mlp_bias or cfg.lm_head_bias), arch, "biases")
    _require(cfg.rope_type == "default" and cfg.rope_partial_factor == 1.0, arch, "LongRoPE or partial RoPE")
    _require(cfg.sliding_window is None, arch, "a sliding window")
    theta = int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta
    return {
        "architectures": [arch], "model_type": "openelm", "vocab_size": cfg.vocab_size,
        "max_context_length": cfg.max_seq_len, "num_transformer_layers": cfg.n_layers, "model_dim": cfg.d_model,
        "head_dim": cfg.head_dim, "qkv_multipliers": list(cfg.qkv_multipliers), "num_gqa_groups": cfg.num_gqa_groups,
        "num_query_heads": [s.n_heads for s in cfg.layers], "num_kv_heads": [s.n_kv_heads for s in cfg.layers],
        "ffn_multipliers": _linspace_round(*cfg.ffn_multipliers, cfg.n_layers), "ffn_with_glu": True,
        "ffn_dim_divisor": cfg.ffn_dim_divisor, "activation_fn_name": "swish", "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": cfg.qk_norm, "share_input_output_layers": cfg.tie_embeddings,
        "rope_freq_constant": theta, "rope_max_length": 2 * cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "use_cache": True, "dtype": "float32",
    }  # fmt: skip


def _openelm_pair(h: dict, key: str, n: int, source: str) -> list[float]:
    """An OpenELM multiplier field as effilm's (lo, hi): a number, a pair, or the per-layer list
    Apple's saved configs hold (which must be the rounded linspace between its ends)."""
    v = h.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v), float(v)]
    if isinstance(v, list) and len(v) == 2:
        return [float(x) for x in v]
    if isinstance(v, list) and len(v) == n and v:
        pair = [float(v[0]), float(v[-1])]
        if [round(float(x), 2) for x in v] == _linspace_round(*pair, n):
            return pair
    raise ConfigError(f"{source}: {key}={v!r} is not a number, a (lo, hi) pair or {n} per-layer values evenly "
                      "spaced between two ends; effilm reads OpenELM's layer-wise scaling only")  # fmt: skip


def _openelm_from_hf(h: dict, source: str) -> ModelConfig:
    try:
        n, d, hd = h["num_transformer_layers"], h["model_dim"], h["head_dim"]
        vocab = h["vocab_size"]
    except KeyError as exc:
        raise ConfigError(f"{source}: missing field {exc.args[0]!r}") from None
    act, norm = h.get("activation_fn_name", "swish"), h.get("normalization_layer_name", "rms_norm")
    if act not in ("swish", "silu") or not h.get("ffn_with_glu", True) or norm != "rms_norm":
        raise ConfigError(f"{source}: OpenELM with activation_fn_name={act!r}, ffn_with_glu="
                          f"{h.get('ffn_with_glu', True)!r}, normalization_layer_name={norm!r} is not supported "
                          "(swish, true, rms_norm)")  # fmt: skip
    cfg = ModelConfig(
        name=h.get("_name_or_path") or "openelm", vocab_size=vocab, d_model=d, n_layers=n, n_heads=d // hd,
        head_dim=hd, ffn_dim=0, qkv_multipliers=_openelm_pair(h, "qkv_multipliers", n, source),
        ffn_multipliers=_openelm_pair(h, "ffn_multipliers", n, source), num_gqa_groups=h.get("num_gqa_groups") or 1,
        ffn_dim_divisor=h.get("ffn_dim_divisor", 256), qk_norm=bool(h.get("normalize_qk_projections", False)),
        tie_embeddings=bool(h.get("share_input_output_layers", False)), norm_eps=h.get("rms_norm_eps", OPENELM_NORM_EPS),
        rope_theta=float(h.get("rope_freq_constant", 10000)), max_seq_len=h.get("max_context_length", 2048),
        init_std=h.get("initializer_range", 0.02), hf_architecture="OpenELMForCausalLM",
        bos_token_id=h.get("bos_token_id"), eos_token_id=_first(h.get("eos_token_id")), pad_token_id=h.get("pad_token_id"),
    )  # fmt: skip
    for key, got in (("num_query_heads", [s.n_heads for s in cfg.layers]), ("num_kv_heads", [s.n_kv_heads for s in cfg.layers])):
        if isinstance(h.get(key), list) and h[key] != got:
            raise ConfigError(f"{source}: {key}={h[key]} disagrees with the heads its multipliers give ({got})")
    return cfg


def _arctic_pattern(n_layers: int, freq: int, parallel: bool) -> str:
    return "".join(("H" if parallel else "M") if (i + 1) % freq == 0 else "D" for i in range(n_layers))


def _arctic_layout(cfg: ModelConfig) -> tuple[int, bool]:
    pattern = "".join(s.kind for s in cfg.layers)
    for freq in range(1, cfg.n_layers + 1):
        for parallel in (True, False):
            if _arctic_pattern(cfg.n_layers, freq, parallel) == pattern:
                return freq, parallel
    raise ConfigError(f"cannot export to ArcticForCausalLM: layer pattern {pattern!r} is not Arctic's every-Nth-layer MoE")


def _rope_from_hf(h: dict) -> dict:
    rp = dict(h.get("rope_parameters") or {})
    legacy = h.get("rope_scaling") or {}
    if legacy and rp.get("rope_type", "default") == "default":
        rp.update(legacy)
    theta = rp.get("rope_theta", h.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", rp.get("type", "default")) or "default"
    out: dict = {"rope_theta": float(theta)}
    partial = rp.get("partial_rotary_factor", h.get("partial_rotary_factor", 1.0))
    out["rope_partial_factor"] = float(partial)
    if kind in ("longrope", "su"):
        orig = rp.get("original_max_position_embeddings", h.get("original_max_position_embeddings"))
        out.update(rope_type="longrope", rope_short_factor=rp["short_factor"], rope_long_factor=rp["long_factor"],
                   rope_original_max_seq_len=int(orig))  # fmt: skip
        if "short_mscale" in rp:
            out.update(rope_short_mscale=rp["short_mscale"], rope_long_mscale=rp["long_mscale"])
        elif rp.get("attention_factor") is not None:
            out.update(rope_short_mscale=rp["attention_factor"], rope_long_mscale=rp["attention_factor"])
        elif rp.get("factor") is not None:
            s = longrope_mscale(float(rp["factor"]), int(orig))
            out.update(rope_short_mscale=s, rope_long_mscale=s)
    elif kind != "default":
        raise ConfigError(f"RoPE scaling type {kind!r} is not supported (default and longrope are)")
    return out


def config_from_hf(h: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    arch = (h.get("architectures") or [None])[0] or MODEL_TYPES.get(h.get("model_type", ""))
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: architecture {arch!r} is not supported; effilm reads {list(ARCHITECTURES)}")
    if arch == "OpenELMForCausalLM":
        return _openelm_from_hf(h, source), arch
    try:
        d, heads = h["hidden_size"], h["num_attention_heads"]
        common = dict(
            name=h.get("_name_or_path") or arch, vocab_size=h["vocab_size"], d_model=d, n_layers=h["num_hidden_layers"],
            n_heads=heads, n_kv_heads=h.get("num_key_value_heads") or heads, head_dim=h.get("head_dim") or d // heads,
            max_seq_len=h.get("max_position_embeddings", 4096), norm_eps=h.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(h.get("tie_word_embeddings", False)), init_std=h.get("initializer_range", 0.02),
            sliding_window=h.get("sliding_window"), hf_architecture=arch, bos_token_id=h.get("bos_token_id"),
            eos_token_id=_first(h.get("eos_token_id")), pad_token_id=h.get("pad_token_id"), **_rope_from_hf(h),
        )  # fmt: skip
        inter = h["intermediate_size"]
    except KeyError as exc:
        raise ConfigError(f"{source}: missing field {exc.args[0]!r}") from None
    act = h.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (silu)")
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        bias = bool(h.get("attention_bias", False))
        cfg = ModelConfig(ffn_dim=inter, attn_bias=bias, attn_out_bias=bias, mlp_bias=bool(h.get("mlp_bias", False)), **common)
    elif arch == "Phi3ForCausalLM":
        cfg = ModelConfig(ffn_dim=inter, **common)
    elif arch == "MixtralForCausalLM":
        moe = MoEConfig(num_experts=h["num_local_experts"], top_k=h["num_experts_per_tok"], expert_ffn_dim=inter,
                        aux_loss_coef=h.get("router_aux_loss_coef", 0.001))  # fmt: skip
        cfg = ModelConfig(ffn_dim=inter, layer_pattern="M", moe=moe, **common)
    elif arch == "PhimoeForCausalLM":
        moe = MoEConfig(num_experts=h["num_local_experts"], top_k=h["num_experts_per_tok"], expert_ffn_dim=inter,
                        router="sparsemixer", renormalize=False, router_jitter_eps=h.get("router_jitter_noise", 0.01),
                        aux_loss_coef=h.get("router_aux_loss_coef", 0.001))  # fmt: skip
        bias = bool(h.get("attention_bias", False))
        cfg = ModelConfig(ffn_dim=inter, layer_pattern="M", moe=moe, norm="layernorm", norm_bias=True, attn_bias=bias,
                          attn_out_bias=bias, lm_head_bias=bool(h.get("lm_head_bias", False)), **common)  # fmt: skip
    else:
        k = h.get("num_experts_per_tok", 1)
        moe = MoEConfig(num_experts=h.get("num_local_experts", 8), top_k=k, expert_ffn_dim=inter, renormalize=k > 1,
                        aux_loss_coef=h.get("router_aux_loss_coef", 0.001))  # fmt: skip
        pattern = _arctic_pattern(common["n_layers"], h.get("moe_layer_frequency", 2), bool(h.get("parallel_attn_mlp_res")))
        cfg = ModelConfig(ffn_dim=inter, residual_ffn_dim=d, layer_pattern=pattern, moe=moe, **common)
    return cfg, arch


def _first(v):
    return v[0] if isinstance(v, list) else v


# ----- starting from weights ([model] init_from) --------------------------------------------------
# What a run may still set when the architecture comes from init_from (anything else must agree)
INIT_FROM_MAY_SET = ("name", "init_from", "hf_architecture", "upcycle")
INIT_FROM_MOE_MAY_SET = ("aux_loss_coef", "z_loss_coef", "aux_loss_convention", "capacity_factor", "impl", "balance",
                         "bias_update_rate")


def architecture_of(path) -> dict:
    """The ``ModelConfig`` fields of the model directory ``path`` (effilm checkpoint or HF)."""
    import os
    from pathlib import Path

    from effilm.config.reader import read_file

    d = Path(os.path.expanduser(str(path)))
    if not d.is_dir():
        what = "is not a directory" if d.exists() else "does not exist"
        raise ConfigError(f"model.init_from={str(path)!r}: {what} (an effilm checkpoint or HF model directory)")
    meta = read_file(d / "config.json", "model config")
    if meta.get("format") == "effilm":
        if meta.get("quantization"):
            raise ConfigError(f"model.init_from={str(path)!r}: a quantized model; start from full-precision weights")
        if not isinstance(meta.get("model"), dict):
            raise ConfigError(f"{d / 'config.json'}: no model config")
        return dict(meta["model"])
    return config_from_hf(meta, str(d / "config.json"))[0].to_dict()


def expand_init_from(table: dict) -> dict:
    """A ``[model]`` table with ``init_from = DIR``: the architecture read from DIR, with the
    fields a run may change (``INIT_FROM_MAY_SET``, the MoE loss and kernel settings, a larger
    ``vocab_size`` for a grown tokenizer); any other field must agree with DIR or is an error naming
    it. Tables without ``init_from`` come back unchanged."""
    if not table.get("init_from"):
        return table
    src = table["init_from"]
    if "preset" in table:
        raise ConfigError(f"model.preset and model.init_from={src!r}: give one (the architecture comes from init_from)")
    base = architecture_of(src)
    base.pop("upcycle", None)  # an upcycled checkpoint is an MoE model now
    if table.get("upcycle") is not None:
        from effilm.config.model import UpcycleConfig
        from effilm.config.reader import build

        up = table["upcycle"] if isinstance(table["upcycle"], UpcycleConfig) else build(UpcycleConfig, table["upcycle"], "model.upcycle")
        base = up.architecture(base, f"model.upcycle (init_from {str(src)!r})")
    base["moe"] = dict(base["moe"]) if base.get("moe") else base.get("moe")
    if base["moe"] and base["moe"].get("balance") == "loss_free":
        base["moe"]["selection_bias"] = True  # its learned biases stay in use whatever balancing the run picks
    for key, value in table.items():
        if key == "vocab_size":
            if value < base["vocab_size"]:
                raise ConfigError(f"model.vocab_size={value} is smaller than init_from {src!r}'s {base['vocab_size']}; "
                                  "a vocabulary can grow (new rows start at the mean embedding), never shrink")  # fmt: skip
            base[key] = value
        elif key == "moe" and isinstance(value, dict) and isinstance(base.get("moe"), dict):
            for mk, mv in value.items():
                if mk not in INIT_FROM_MOE_MAY_SET and base["moe"].get(mk) != mv:
                    raise _contradiction(f"moe.{mk}", mv, base["moe"].get(mk), src)
                base["moe"][mk] = mv
        elif key in INIT_FROM_MAY_SET or base.get(key) == value:
            base[key] = value
        else:
            raise _contradiction(key, value, base.get(key), src)
    return base


def _contradiction(key: str, value, theirs, src) -> ConfigError:
    return ConfigError(f"model.{key}={value!r} contradicts init_from {str(src)!r}, whose {key} is {theirs!r}; the "
                       "architecture comes from the checkpoint (leave the field out)")
