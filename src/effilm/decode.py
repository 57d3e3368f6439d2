"""Inference-only prefill and one-token decode steps over a model's own modules.

``Transformer.forward`` serves training and evaluation too: it returns logits for every position
and computes the MoE losses and routing statistics on each call. At one token per step on a CPU a
small model is bound by per-operator overhead, so the engine runs its own step, with the same
modules and weights and the same arithmetic, but:

* logits for the last position only (the prefill of a long prompt skips T-1 LM-head rows);
* no routing statistics or auxiliary losses for MoE layers;
* attention for a single query: Q and K are rotated in one pass over the fused QKV output, the new
  key/value are written straight into the preallocated cache, a sliding window is a slice of the
  cache (no mask), and the [B, H, 1, hd] output is already in the layout ``o`` reads.

Anything this module does not recognise (a subclassed block, replaced expert weights, a quantized
module with a different interface) makes ``supports(model)`` false and the engine falls back to
``Transformer.forward``. ``tests/test_engine.py`` checks both paths give the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effilm.model import MLP, Attention, Block, KVCache, RMSNorm, Transformer
from effilm.moe import MoE, experts_reference, experts_sorted


def supports(model) -> bool:
    """Whether ``model`` is built from the exact module types the fast steps understand."""
    if type(model) is not Transformer:
        return False
    for blk in model.layers:
        if type(blk) is not Block or type(blk.attn) is not Attention:
            return False
        if blk.kind in "DH" and type(blk.mlp) is not MLP:
            return False
        if blk.kind in "MH" and (type(blk.moe) is not MoE or not isinstance(blk.moe.experts.w_gate_up, nn.Parameter)):
            return False
    return True


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module) is RMSNorm and x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)
    return module(x)


def _moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE mixture without routing statistics (inference: no capacity, no dropping)."""
    x_TD = x.reshape(-1, x.shape[-1])
    _, _, topk_w_TK, topk_ids_TK = moe.route(x_TD)
    w_gu, w_d = moe.experts.w_gate_up, moe.experts.w_down
    impl = moe.impl if moe.impl != "auto" else ("grouped_mm" if x_TD.is_cuda else "sorted")
    if moe.experts_fn is not None:
        y_TD = moe.experts_fn(x_TD, topk_ids_TK, topk_w_TK, None)
    elif impl == "reference":
        y_TD = experts_reference(x_TD, topk_ids_TK, topk_w_TK, w_gu, w_d)
    else:
        y_TD = experts_sorted(x_TD, topk_ids_TK, topk_w_TK, w_gu, w_d, None, impl == "grouped_mm")
    return y_TD.reshape(x.shape)


def _attend_one(att: Attention, h, cos, sin, key_mask, cache: KVCache, layer: int, window: int | None):
    """Attention of one new token per row (h: [B, D]) against the cache, which it extends."""
    B = h.shape[0]
    H, Hkv, hd = att.n_heads, att.n_kv, att.hd
    qkv = att.qkv(h).view(B, H + 2 * Hkv, hd)
    if att.q_norm is not None:
        q = att.q_norm(qkv[:, :H])
        k = att.k_norm(qkv[:, H:H + Hkv])
        qk = torch.cat([q, k], dim=1)
    else:
        qk = qkv[:, :H + Hkv]
    rot = cos.shape[-1]  # cos, sin: [B|1, 1, rot], broadcast over heads
    half = rot // 2
    x_rot = qk[..., :rot]
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    qk_rot = x_rot * cos + rotated * sin
    if rot < hd:
        qk_rot = torch.cat([qk_rot, qk[..., rot:]], dim=-1)
    start = cache.length
    end = start + 1
    cache.k[layer][:, :, start] = qk_rot[:, H:]
    cache.v[layer][:, :, start] = qkv[:, H + Hkv:]
    lo = end - window if window is not None and end > window else 0
    keys, values = cache.k[layer][:, :, lo:end], cache.v[layer][:, :, lo:end]
    mask = None if key_mask is None else key_mask[:, None, None, lo:end]
    q = qk_rot[:, :H, None]  # [B, H, 1, hd]
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != Hkv)
    return att.o(y.view(B, H * hd))  # [B, H, 1, hd] has the memory layout of [B, H * hd]


def _mlp_or_moe(blk: Block, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if blk.kind == "D":
        return a + blk.mlp(_norm(blk.mlp_norm, a))
    if blk.kind == "M":
        return a + _moe(blk.moe, _norm(blk.moe_norm, a))
    return a + blk.mlp(_norm(blk.mlp_norm, a)) + _moe(blk.moe, _norm(blk.moe_norm, x))


@torch.inference_mode()
def decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None,
                key_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, V] for one new token per row (``tokens`` [B]) at ``positions`` [B, 1] (default:
    the cache length); ``key_mask`` [B, >= cache.length + 1] marks real (non-padding) keys."""
    if positions is None:
        positions = torch.full((1, 1), cache.length, dtype=torch.long, device=tokens.device)
    x = model.embed(tokens)  # [B, D]: one position per row, kept 2-D throughout
    cos, sin = model.rotary(positions, x.dtype)
    window = model.cfg.sliding_window
    for i, blk in enumerate(model.layers):
        a = x + _attend_one(blk.attn, _norm(blk.attn_norm, x), cos, sin, key_mask, cache, i, window)
        x = _mlp_or_moe(blk, a, x)
    cache.length += 1
    return model.lm_head(_norm(model.norm, x))


@torch.inference_mode()
def prefill(model: Transformer, input_ids: torch.Tensor, cache: KVCache, positions: torch.Tensor | None,
            attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Run the prompt through the blocks into ``cache``; logits [B, V] of the last position only."""
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device)[None]
    x = model.embed(input_ids)
    cos, sin = model.rotary(positions, x.dtype)
    mask = model._mask(B, T, 0, positions, attention_mask, None, x.device)
    for blk in model.layers:
        x, _ = blk(x, cos, sin, mask, cache, 0)
    cache.length = T
    return model.lm_head(model.norm(x[:, -1]))
