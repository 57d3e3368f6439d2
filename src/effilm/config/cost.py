"""Analytical cost accounting: parameters, active parameters, FLOPs, memory and KV cache.

The counts are exact: a test builds every preset on the meta device and compares with ``numel``.

FLOPs convention: a multiply-add is 2 FLOPs. Forward FLOPs per token are twice the weights of
every matmul the token passes through (attention projections, dense MLPs, the router, the top-k
experts it is routed to, the LM head), plus attention scores and the weighted sum of values,
4 * n_heads * head_dim * ctx per layer, where ctx is the mean causal context of a sequence of
``seq_len`` tokens, (seq_len + 1) / 2, capped by the sliding window. Norms, biases, activations
and softmax are left out: they are well under 1% for every preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: ModelConfig's cost methods call into this module
    from effilm.config.model import ModelConfig


@dataclass(frozen=True)
class LayerParams:
    dense: int  # everything every token uses
    experts_per_expert: int  # one expert's parameters (0 for dense layers)
    num_experts: int
    top_k: int
    matmul_dense: int  # matmul weights every token uses
    router: int


def _norm(cfg: ModelConfig, dim: int) -> int:
    return dim * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)


def _mlp(cfg: ModelConfig, width: int, bias: bool) -> tuple[int, int]:
    w = cfg.d_model * 2 * width + width * cfg.d_model
    b = (2 * width + cfg.d_model) if bias else 0
    return w + b, w


def layer_params(cfg: ModelConfig, i: int) -> LayerParams:
    s = cfg.layers[i]
    d, hd = cfg.d_model, cfg.head_dim
    qkv_out = (s.n_heads + 2 * s.n_kv_heads) * hd
    attn_w = d * qkv_out + s.n_heads * hd * d
    attn = attn_w + (qkv_out if cfg.attn_bias else 0) + (d if cfg.attn_out_bias else 0)
    attn += 2 * hd if cfg.qk_norm else 0
    dense = _norm(cfg, d) + attn
    matmul = attn_w
    expert, router, E, K = 0, 0, 0, 0
    if s.kind in "DH":
        p, w = _mlp(cfg, s.ffn_dim, cfg.mlp_bias)
        dense += _norm(cfg, d) + p
        matmul += w
    if s.kind in "MH":
        m = cfg.moe
        E, K = m.num_experts, m.top_k
        router = d * E
        expert = 3 * d * m.expert_ffn_dim
        dense += _norm(cfg, d) + router
    return LayerParams(dense, expert, E, K, matmul, router)


def _outer(cfg: ModelConfig) -> int:
    v, d = cfg.vocab_size, cfg.d_model
    head = 0 if cfg.tie_embeddings else v * d
    return v * d + head + (v if cfg.lm_head_bias else 0) + _norm(cfg, d)


def _count(cfg: ModelConfig, active: bool) -> int:
    total = _outer(cfg)
    for i in range(cfg.n_layers):
        lp = layer_params(cfg, i)
        total += lp.dense + (lp.top_k if active else lp.num_experts) * lp.experts_per_expert
    return total


def num_params(cfg: ModelConfig) -> int:
    return _count(cfg, active=False)


def num_active_params(cfg: ModelConfig) -> int:
    """Parameters one token touches: everything except the experts it is not routed to."""
    return _count(cfg, active=True)


def num_expert_params(cfg: ModelConfig) -> int:
    return sum(layer_params(cfg, i).num_experts * layer_params(cfg, i).experts_per_expert for i in range(cfg.n_layers))


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    ctx = (seq_len + 1) / 2
    if cfg.sliding_window is not None:
        ctx = min(ctx, cfg.sliding_window)
    matmul = cfg.vocab_size * cfg.d_model  # LM head
    attn = 0.0
    for i in range(cfg.n_layers):
        lp = layer_params(cfg, i)
        matmul += lp.matmul_dense + lp.router + lp.top_k * lp.experts_per_expert
        attn += 4 * cfg.layers[i].n_heads * cfg.head_dim * ctx
    return int(round(2 * matmul + attn))


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    return sum(2 * s.n_kv_heads * cfg.head_dim * bytes_per_value for s in cfg.layers)


def weight_bytes(cfg: ModelConfig, bits: int) -> int:
    """Weight memory at ``bits`` per parameter (quantization scales not included)."""
    return num_params(cfg) * bits // 8


def cost_summary(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    return {
        "name": cfg.name,
        "total_params": num_params(cfg),
        "active_params": num_active_params(cfg),
        "expert_params": num_expert_params(cfg),
        "flops_per_token": flops_per_token(cfg, seq_len),
        "seq_len": seq_len,
        "weight_bytes": {k: weight_bytes(cfg, b) for k, b in (("fp32", 32), ("bf16", 16), ("int8", 8), ("int4", 4))},
        "kv_cache_bytes_per_token": {"bf16": kv_cache_bytes_per_token(cfg, 2), "fp32": kv_cache_bytes_per_token(cfg, 4)},
        "layers": cfg.n_layers,
        "layer_pattern": cfg.layer_pattern,
    }


def human_count(n: float, unit: str = "") -> str:
    """1234567 -> '1.235M' (K, M, B, T)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    """Binary units: 1536 -> '1.50 KiB'."""
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"
