"""Hugging Face interop: declarative key maps and config conversion, both ways.

Supported: LlamaForCausalLM (and Mistral's identical layout), Phi3ForCausalLM, MixtralForCausalLM,
PhimoeForCausalLM, and Snowflake's ArcticForCausalLM (key layout and config.json field names of
Snowflake's modeling_arctic.py). MoE experts use the per-expert ``experts.{e}.w1/w2/w3`` layout
that Hub checkpoints use (transformers 5 converts it to its fused layout on load).

Each rule maps one effilm tensor to a list of HF tensors: ``parts`` are concatenated along dim 0
(Q|K|V, gate|up), and ``per_expert`` rules repeat the parts for every expert and stack them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from effilm.config.model import ModelConfig, MoEConfig
from effilm.errors import CheckpointError, ConfigError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
                 "PhimoeForCausalLM", "ArcticForCausalLM")  # fmt: skip
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
               "mixtral": "MixtralForCausalLM", "phimoe": "PhimoeForCausalLM", "arctic": "ArcticForCausalLM"}  # fmt: skip


@dataclass(frozen=True)
class Rule:
    ours: str
    parts: tuple[str, ...]  # HF names; with per_expert, templates holding "{e}"
    sizes: tuple[int, ...]  # rows of each part (dim 0)
    num_experts: int = 0  # > 0: stacked over experts


# ----- key maps --------------------------------------------------------------------------------
def key_rules(cfg: ModelConfig, arch: str) -> list[Rule]:
    d, hd = cfg.d_model, cfg.head_dim
    layernorm_bias = cfg.norm == "layernorm" and cfg.norm_bias
    rules: list[Rule] = []

    def norm(ours: str, theirs: str) -> None:
        rules.append(Rule(f"{ours}.weight", (f"{theirs}.weight",), (d,)))
        if layernorm_bias:
            rules.append(Rule(f"{ours}.bias", (f"{theirs}.bias",), (d,)))

    def linear(ours: str, parts: list[str], sizes: list[int], bias: bool) -> None:
        rules.append(Rule(f"{ours}.weight", tuple(f"{p}.weight" for p in parts), tuple(sizes)))
        if bias:
            rules.append(Rule(f"{ours}.bias", tuple(f"{p}.bias" for p in parts), tuple(sizes)))

    moe_prefix = "block_sparse_moe"
    for i, s in enumerate(cfg.layers):
        o, p = f"layers.{i}", f"model.layers.{i}"
        q, kv = s.n_heads * hd, s.n_kv_heads * hd
        norm(f"{o}.attn_norm", f"{p}.input_layernorm")
        if arch == "Phi3ForCausalLM":
            linear(f"{o}.attn.qkv", [f"{p}.self_attn.qkv_proj"], [q + 2 * kv], cfg.attn_bias)
        else:
            linear(f"{o}.attn.qkv", [f"{p}.self_attn.{n}_proj" for n in "qkv"], [q, kv, kv], cfg.attn_bias)
        linear(f"{o}.attn.o", [f"{p}.self_attn.o_proj"], [d], cfg.attn_out_bias)
        if s.kind == "D":
            norm(f"{o}.mlp_norm", f"{p}.post_attention_layernorm")
            if arch == "Phi3ForCausalLM":
                linear(f"{o}.mlp.gate_up", [f"{p}.mlp.gate_up_proj"], [2 * s.ffn_dim], cfg.mlp_bias)
                linear(f"{o}.mlp.down", [f"{p}.mlp.down_proj"], [d], cfg.mlp_bias)
            elif arch == "ArcticForCausalLM":
                mp = f"{p}.{moe_prefix}.mlp"
                linear(f"{o}.mlp.gate_up", [f"{mp}.w1", f"{mp}.w3"], [s.ffn_dim, s.ffn_dim], False)
                linear(f"{o}.mlp.down", [f"{mp}.w2"], [d], False)
            else:
                linear(f"{o}.mlp.gate_up", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [s.ffn_dim] * 2, cfg.mlp_bias)
                linear(f"{o}.mlp.down", [f"{p}.mlp.down_proj"], [d], cfg.mlp_bias)
        if s.kind == "H":
            norm(f"{o}.mlp_norm", f"{p}.residual_layernorm")
            rp = f"{p}.residual_mlp"
            linear(f"{o}.mlp.gate_up", [f"{rp}.w1", f"{rp}.w3"], [s.ffn_dim, s.ffn_dim], False)
            linear(f"{o}.mlp.down", [f"{rp}.w2"], [d], False)
        if s.kind in "MH":
            m = cfg.moe
            norm(f"{o}.moe_norm", f"{p}.post_attention_layernorm")
            rules.append(Rule(f"{o}.moe.router.weight", (f"{p}.{moe_prefix}.gate.weight",), (m.num_experts,)))
            ep = f"{p}.{moe_prefix}.experts.{{e}}"
            f_ = m.expert_ffn_dim
            rules.append(Rule(f"{o}.moe.experts.w_gate_up", (f"{ep}.w1.weight", f"{ep}.w3.weight"), (f_, f_), m.num_experts))
            rules.append(Rule(f"{o}.moe.experts.w_down", (f"{ep}.w2.weight",), (d,), m.num_experts))
    rules.append(Rule("embed.weight", ("model.embed_tokens.weight",), (cfg.vocab_size,)))
    norm("norm", "model.norm")
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",), (cfg.vocab_size,)))
    if cfg.lm_head_bias:
        rules.append(Rule("lm_head.bias", ("lm_head.bias",), (cfg.vocab_size,)))
    return rules


def to_hf_state(model, arch: str) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for r in key_rules(model.cfg, arch):
        t = sd[r.ours].detach().cpu()
        if r.num_experts:
            for e in range(r.num_experts):
                for name, piece in zip(r.parts, t[e].split(list(r.sizes), dim=0)):
                    out[name.format(e=e)] = piece.contiguous()
        else:
            for name, piece in zip(r.parts, t.split(list(r.sizes), dim=0)):
                out[name] = piece.contiguous()
    return out


def from_hf_state(cfg: ModelConfig, arch: str, hf: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    rules = key_rules(cfg, arch)
    wanted = []
    for r in rules:
        names = [n.format(e=e) for e in range(r.num_experts) for n in r.parts] if r.num_experts else list(r.parts)
        wanted.extend(names)
    missing = [n for n in wanted if n not in hf]
    ignorable = ("rotary_emb.inv_freq",)
    unexpected = sorted(set(hf) - set(wanted) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    unexpected = [n for n in unexpected if not n.endswith(ignorable)]
    from effilm.formats.checkpoint import raise_tensor_problems

    raise_tensor_problems(f"{source} ({arch})", missing, unexpected)
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        try:
            if r.num_experts:
                out[r.ours] = torch.stack(
                    [torch.cat([_checked(hf, n.format(e=e), rows, source) for n, rows in zip(r.parts, r.sizes)])
                     for e in range(r.num_experts)]
                )  # fmt: skip
            else:
                out[r.ours] = torch.cat([_checked(hf, n, rows, source) for n, rows in zip(r.parts, r.sizes)])
        except RuntimeError as exc:  # concatenating mismatched widths
            raise CheckpointError(f"{source}: mis-shaped tensors for {r.ours} ({', '.join(r.parts)}): {exc}") from None
    return out


def _checked(hf: dict, name: str, rows: int, source: str) -> torch.Tensor:
    t = hf[name]
    if t.shape[0] != rows:
        raise CheckpointError(f"{source}: mis-shaped tensor {name}: {tuple(t.shape)}, expected {rows} rows")
    return t


# ----- config conversion ---------------------------------------------------------------------
def choose_architecture(cfg: ModelConfig) -> str:
    if cfg.hf_architecture:
        return cfg.hf_architecture
    kinds = {s.kind for s in cfg.layers}
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
            from effilm.config.model import longrope_mscale

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
    _require(cfg.qkv_multipliers is None and not cfg.qk_norm, arch, "OpenELM layer-wise scaling / QK norm")
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
            from effilm.config.model import longrope_mscale

            s = longrope_mscale(float(rp["factor"]), int(orig))
            out.update(rope_short_mscale=s, rope_long_mscale=s)
    elif kind != "default":
        raise ConfigError(f"RoPE scaling type {kind!r} is not supported (default and longrope are)")
    return out


def config_from_hf(h: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    arch = (h.get("architectures") or [None])[0] or MODEL_TYPES.get(h.get("model_type", ""))
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: architecture {arch!r} is not supported; effilm reads {list(ARCHITECTURES)}")
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


# ----- public API ------------------------------------------------------------------------------
def save_hf(model, path: str | os.PathLike, arch: str | None = None, dtype: torch.dtype | None = None,
            tokenizer_dir: str | os.PathLike | None = None, mark: str | None = None) -> Path:
    """Write a directory that transformers' AutoModelForCausalLM loads (config.json + safetensors),
    with the tokenizer files of ``tokenizer_dir`` when given."""
    from safetensors.torch import save_file

    from effilm.io import atomic_dir

    cfg = model.cfg
    arch = arch or choose_architecture(cfg)
    hf_cfg = config_to_hf(cfg, arch)
    state = to_hf_state(model, arch)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
        hf_cfg["dtype"] = str(dtype).replace("torch.", "")
    path = Path(path)
    with atomic_dir(path, mark=mark) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_dir is not None:
            from effilm.data.tokenizer import copy_tokenizer_files

            copy_tokenizer_files(tokenizer_dir, tmp)
    return path


def load_hf(path: str | os.PathLike, device=None, dtype=None):
    """Load a Hugging Face model directory into an effilm model (eval mode)."""
    from effilm.formats.checkpoint import load_safetensors_dir, load_state_checked, read_config
    from effilm.models.transformer import build_model

    path = Path(path)
    h = read_config(path)
    cfg, arch = config_from_hf(h, f"{path}/config.json")
    state = from_hf_state(cfg, arch, load_safetensors_dir(path), str(path))
    model = build_model(cfg, device=device, init=False)
    load_state_checked(model, state, str(path))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


