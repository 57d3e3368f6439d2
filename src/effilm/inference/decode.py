"""Inference-only prefill and one-token decode steps over a model's own weights.

``Transformer.forward`` serves training and evaluation too: it returns logits for every position
and computes the MoE losses and routing statistics on each call. At one token per step on a CPU a
small model is bound by memory traffic (its weights) and per-operator overhead, so the engine runs
its own step, with the same weights and the same arithmetic up to float rounding, built to launch
as few operators as it can:

* logits for the last position only (the prefill of a long prompt skips T-1 LM-head rows);
* no routing statistics or auxiliary losses for MoE layers; for a decode step's few tokens on a
  CPU the chosen experts are read back to the host and only their weights are touched, each once
  (quantized experts one chosen expert at a time, ``QuantWeight.linear``: fast or exact kernel);
* fp32 RMSNorm as five small operators (a vector norm, then scale) instead of the library kernel,
  which on a CPU decomposes into more;
* residual additions fused into the output projections (``addmm``);
* attention for a single query: Q and K are rotated together in one pass over the fused QKV
  output (rotate-half as a flip and one multiply-add), the new key/value are written straight into
  the preallocated cache, a sliding window is a slice of the cache (no mask), and the
  [B, H, 1, hd] output is already in the layout ``o`` reads.

``DecodePlan`` collects, once per generation, the weight views and constants a step needs; it
copies nothing but the norm weights and the cos/sin table. A projection that is not a plain
``nn.Linear`` (e.g. a quantized one) is called as a module. Anything else this module does not
recognise (a subclassed block, replaced expert weights) makes ``supports(model)`` false and the
engine falls back to ``Transformer.forward``. ``tests/test_engine.py`` checks both paths give the
same logits and tokens, fp32 and int8.

``use_cpu_layout`` (called by the engine on the CPU) stores the weights transposed in memory, the
layout MKL's matrix-vector product reads fastest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effilm.models.moe import Experts, MoE
from effilm.models.quantized import QuantExperts
from effilm.models.transformer import MLP, Attention, Block, KVCache, RMSNorm, Transformer


def supports(model) -> bool:
    """Whether ``model`` is built from the exact module types the fast steps understand."""
    if type(model) is not Transformer:
        return False
    for blk in model.layers:
        if type(blk) is not Block or type(blk.attn) is not Attention:
            return False
        if blk.kind in "DH" and type(blk.mlp) is not MLP:
            return False
        if blk.kind in "MH" and (type(blk.moe) is not MoE or not _known_experts(blk.moe.experts)):
            return False
    return True


def _known_experts(experts: nn.Module) -> bool:
    """Plain stacked expert weights, or quantized ones (effilm.models.quantized.QuantExperts)."""
    if type(experts) is QuantExperts:
        return True
    return type(experts) is Experts and isinstance(experts.w_gate_up, nn.Parameter)


def use_cpu_layout(model: Transformer) -> int:
    """Store every linear and expert weight of ``model`` transposed in memory (column-major), in
    place, keeping shapes, values, dtypes and Parameter objects (so tied weights stay tied).

    ``F.linear(x, W)`` then multiplies by a row-major [in, out] matrix. On the x86 CPU builds of
    PyTorch (MKL) that product is up to twice as fast for one row (decode) and about 1.2x for many
    (prefill), for the same bytes read: a decode step is bound by reading its weights. Only fp32
    weights on the CPU are touched (bf16 is several times slower in that layout); returns how many
    tensors were re-laid.
    """
    seen, n = set(), 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                params = [mod.weight]
            elif isinstance(mod, Experts):
                params = [mod.w_gate_up, mod.w_down]
            else:
                continue
            for p in params:
                if (not isinstance(p, nn.Parameter) or id(p) in seen or p.device.type != "cpu"
                        or p.dtype != torch.float32 or p.dim() < 2):
                    continue
                seen.add(id(p))
                if p.transpose(-1, -2).is_contiguous():
                    continue
                p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
                n += 1
    return n


class _Norm:
    """A norm module as a callable. An fp32 RMSNorm becomes x * rsqrt(|x|^2 + D*eps) * (w * sqrt(D)),
    which equals x * rsqrt(mean(x^2) + eps) * w; anything else calls the module."""

    __slots__ = ("module", "ws", "c")

    def __init__(self, module: nn.Module):
        self.module, self.ws, self.c = module, None, None
        w = getattr(module, "weight", None)
        if type(module) is RMSNorm and w is not None and w.dtype == torch.float32:
            D = w.shape[0]
            self.ws = (w.detach() * math.sqrt(D)).contiguous()
            self.c = torch.full((1,), D * module.eps, dtype=torch.float32, device=w.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.ws is None or x.dtype != torch.float32:
            return self.module(x)
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        r = torch.addcmul(self.c, n, n).rsqrt_()
        return torch.mul(x, r).mul_(self.ws)


class _Proj:
    """One projection. A plain ``nn.Linear`` runs as F.linear / addmm on its weight (the residual
    add fused into the product); anything else (e.g. a quantized linear) is called as a module."""

    __slots__ = ("mod", "w", "wt", "b")

    def __init__(self, mod: nn.Module):
        plain = type(mod) is nn.Linear
        self.mod = mod
        self.w = mod.weight if plain else None
        self.wt = mod.weight.t() if plain else None
        self.b = mod.bias if plain else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b) if self.w is not None else self.mod(x)

    def add_to(self, res: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """res + proj(x), as a new tensor."""
        if self.w is None:
            return res + self.mod(x)
        out = torch.addmm(res, x, self.wt)
        return out if self.b is None else out.add_(self.b)


class _Layer:
    """What one block's decode step reads: projections, shapes and norms."""

    __slots__ = ("kind", "attn_norm", "qkv", "o", "H", "Hkv", "hd", "att",
                 "mlp_norm", "mlp", "gate_up", "down", "width", "act", "moe_norm", "moe", "experts")

    def __init__(self, blk: Block):
        att = blk.attn
        self.kind, self.att = blk.kind, att
        self.attn_norm = _Norm(blk.attn_norm)
        self.qkv, self.o = _Proj(att.qkv), _Proj(att.o)
        self.H, self.Hkv, self.hd = att.n_heads, att.n_kv, att.hd
        self.mlp = self.moe = self.experts = None
        if blk.kind in "DH":
            mlp = blk.mlp
            self.mlp_norm, self.mlp = _Norm(blk.mlp_norm), mlp
            self.gate_up, self.down = _Proj(mlp.gate_up), _Proj(mlp.down)
            self.width, self.act = mlp.gate_up.out_features // 2, mlp.activation
        if blk.kind in "MH":
            self.moe_norm, self.moe = _Norm(blk.moe_norm), blk.moe


class DecodePlan:
    """The per-model constants of the decode step, gathered once per generation."""

    def __init__(self, model: Transformer):
        self.model = model
        self.layers = [_Layer(b) for b in model.layers]
        self.norm = _Norm(model.norm)
        self.window = model.cfg.sliding_window
        rot = model.cfg.rotary_dim
        p = model.embed.weight
        # rotate_half(x) * sin == flip_halves(x) * (sin with its first half negated)
        self.sign = torch.cat([-torch.ones(rot // 2), torch.ones(rot - rot // 2)]).to(p.device, p.dtype)
        # cos and signed sin for positions 0..n-1 (grown on demand), unless LongRoPE, whose factors
        # depend on the longest position in the batch
        self.table = None if model.cfg.rope_type == "longrope" else (torch.empty(0), torch.empty(0))

    def rope(self, positions: torch.Tensor | None, start: int, max_len: int):
        """cos, signed sin [B|1, 1, rot] for ``positions`` [B, 1] (None: every row at ``start``);
        every position is below ``max_len`` (the cache's length), so the table needs no host sync."""
        if self.table is None:
            pos = positions if positions is not None else torch.full((1, 1), start, device=self.sign.device)
            cos, sin = self.model.rotary(pos, self.sign.dtype)
            return cos, sin * self.sign
        if self.table[0].shape[0] < max_len:
            cos, sin = self.model.rotary(torch.arange(max_len, device=self.sign.device)[None], self.sign.dtype)
            self.table = (cos[0, :, None], (sin * self.sign)[0, :, None])  # [n, 1, rot]
        cos_t, sin_t = self.table
        if positions is None:
            return cos_t[start:start + 1], sin_t[start:start + 1]
        idx = positions.reshape(-1)
        return cos_t.index_select(0, idx), sin_t.index_select(0, idx)


class _Experts:
    """One MoE layer's router and per-expert weight views, for a few tokens at a time on the CPU."""

    __slots__ = ("moe", "router_w", "gate_up", "down_t", "F", "k", "logit_topk", "quant")

    def __init__(self, moe: MoE):
        self.moe = moe
        ex = moe.experts
        self.quant = type(ex) is QuantExperts
        if self.quant:  # one expert's product: QuantWeight.linear(x, e), fast or exact by ex.kernel
            self.gate_up, self.down_t = ex.gate_up_q, ex.down_q
            self.F = ex.down_q.shape[-1]
        else:
            w_gu, w_d = ex.w_gate_up, ex.w_down
            self.gate_up = list(w_gu.unbind(0))  # views: [2F, D] per expert
            self.down_t = [w.t() for w in w_d.unbind(0)]  # [F, D] per expert
            self.F = w_d.shape[-1]
        self.k = moe.cfg.top_k
        # renormalised softmax top-k == softmax over the top-k logits (softmax is monotonic); a
        # selection bias (loss-free balancing, upcycling) chooses on the scores instead: moe.route
        self.logit_topk = (moe.cfg.router != "sparsemixer" and moe.cfg.renormalize
                           and type(moe.router) is nn.Linear and not hasattr(moe, "router_bias"))
        self.router_w = moe.router.weight.float() if self.logit_topk else None

    def _ffn(self, e: int, x: torch.Tensor, out: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        """Expert e's SwiGLU output for rows ``x``: returned unweighted, or with ``out`` given,
        added into it times ``alpha`` (fp32: fused into the down projection's addmm)."""
        F_ = self.F
        if self.quant:
            fast = self.moe.experts.kernel == "fast"
            h = self.gate_up.linear(x, e, fast)
            y = self.down_t.linear(F.silu(h[:, :F_]).mul_(h[:, F_:]), e, fast)
            return y if out is None else out.add_(y, alpha=alpha)
        h = F.linear(x, self.gate_up[e])
        act = F.silu(h[:, :F_]).mul_(h[:, F_:])
        return torch.mm(act, self.down_t[e]) if out is None else out.addmm_(act, self.down_t[e], alpha=alpha)

    def add_into(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out += the expert mixture of ``x`` ([T, D], normed); each chosen expert is read once."""
        if self.logit_topk:
            vals, ids = F.linear(x.float(), self.router_w).topk(self.k, dim=-1)
            w = vals.softmax(dim=-1)
        else:
            _, _, w, ids = self.moe.route(x)
        if x.shape[0] == 1:  # the decode step of one sequence: no gathers at all
            for e, we in zip(ids[0].tolist(), w[0].tolist()):
                self._ffn(e, x, out, we)
            return out
        groups: dict[int, tuple[list[int], list[float]]] = {}
        for t, (es, ws) in enumerate(zip(ids.tolist(), w.tolist())):
            for e, we in zip(es, ws):
                rows, weights = groups.setdefault(e, ([], []))
                rows.append(t)
                weights.append(we)
        for e, (rows, weights) in groups.items():
            idx = torch.tensor(rows, device=x.device)
            y = self._ffn(e, x.index_select(0, idx))
            out.index_add_(0, idx, y.mul_(torch.tensor(weights, dtype=y.dtype, device=y.device)[:, None]))
        return out


# at most this many (token, expert) assignments go through the per-expert loop of _Experts
SMALL_BATCH_ASSIGNMENTS = 512


def _moe_into(L: _Layer, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out + the MoE mixture of norm(x), without routing statistics (inference: no capacity, no
    dropping). A decode step's few tokens on the CPU read the choice back (free there) and touch
    only the chosen experts' weights, each once: the memory traffic that bounds a decode step."""
    moe = L.moe
    xn = L.moe_norm(x)
    if xn.shape[0] * moe.cfg.top_k <= SMALL_BATCH_ASSIGNMENTS and not xn.is_cuda and moe.experts_fn is None:
        if L.experts is None:
            L.experts = _Experts(moe)
        return L.experts.add_into(out, xn)
    _, _, topk_w_TK, topk_ids_TK = moe.route(xn)
    return out.add_(moe.mix(xn, topk_ids_TK, topk_w_TK))


def _attend_one(L: _Layer, h, cos, sin_signed, key_mask, cache: KVCache, layer: int, window: int | None):
    """Attention of one new token per row (h: [B, D], normed) against the cache, which it extends;
    returns the attention output before the ``o`` projection, [B, H * hd]."""
    B = h.shape[0]
    H, Hkv, hd = L.H, L.Hkv, L.hd
    qkv = L.qkv(h).view(B, H + 2 * Hkv, hd)
    if L.att.q_norm is not None:
        qk = torch.cat([L.att.q_norm(qkv[:, :H]), L.att.k_norm(qkv[:, H:H + Hkv])], dim=1)
    else:
        qk = qkv[:, :H + Hkv]
    rot = cos.shape[-1]  # cos, sin: [B|1, 1, rot], broadcast over heads
    x_rot = qk[..., :rot]
    flipped = x_rot.unflatten(-1, (2, rot // 2)).flip(-2).flatten(-2)
    qk_rot = torch.addcmul(x_rot * cos, flipped, sin_signed)
    if rot < hd:
        qk_rot = torch.cat([qk_rot, qk[..., rot:]], dim=-1)
    start = cache.length
    end = start + 1
    kc, vc = cache.k[layer], cache.v[layer]
    kc.select(2, start).copy_(qk_rot[:, H:])
    vc.select(2, start).copy_(qkv[:, H + Hkv:])
    lo = end - window if window is not None and end > window else 0
    keys, values = kc.narrow(2, lo, end - lo), vc.narrow(2, lo, end - lo)
    mask = None if key_mask is None else key_mask[:, None, None, lo:end]
    q = qk_rot[:, :H, None]  # [B, H, 1, hd]
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != Hkv)
    return y.view(B, H * hd)  # [B, H, 1, hd] has the memory layout of [B, H * hd]


def _mlp_into(L: _Layer, a: torch.Tensor) -> torch.Tensor:
    """a + MLP(norm(a)), the residual add fused into the down projection."""
    n = L.mlp_norm(a)
    if L.act == "gegelu":
        return a + L.mlp(n)
    g = L.gate_up(n)
    W = L.width
    act = F.silu(g[:, :W]) if L.act == "silu" else F.gelu(g[:, :W], approximate="tanh")
    return L.down.add_to(a, act.mul_(g[:, W:]))


@torch.inference_mode()
def decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None,
                key_mask: torch.Tensor | None, plan: DecodePlan | None = None) -> torch.Tensor:
    """Logits [B, V] for one new token per row (``tokens`` [B]) at ``positions`` [B, 1] (default:
    the cache length); ``key_mask`` [B, >= cache.length + 1] marks real (non-padding) keys.
    ``plan`` (a ``DecodePlan`` of ``model``) saves gathering the weights on every step."""
    if plan is None:
        plan = DecodePlan(model)
    if cache.length >= cache.max_len:
        raise ValueError(f"KV cache overflow: {cache.length + 1} positions > max_len {cache.max_len}")
    x = F.embedding(tokens, model.embed.weight)  # [B, D]: one position per row, kept 2-D throughout
    cos, sin = plan.rope(positions, cache.length, cache.max_len)
    window = plan.window
    for i, L in enumerate(plan.layers):
        y = _attend_one(L, L.attn_norm(x), cos, sin, key_mask, cache, i, window)
        a = L.o.add_to(x, y)
        if L.kind == "D":
            x = _mlp_into(L, a)
        elif L.kind == "M":
            x = _moe_into(L, a, a)
        else:  # Arctic: a + ResidualMLP(norm(a)) + MoE(norm(x)), the MoE reading the block's input
            x = _moe_into(L, _mlp_into(L, a), x)
    cache.length += 1
    return model.lm_head(plan.norm(x))


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
