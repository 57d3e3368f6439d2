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
* residual additions fused into the output projections (``addmm``); the larger fp32 products of
  4 rows or more on oneDNN (``onednn_linear``: on this project's AMD CPU 0.55-0.75x MKL's time for
  a decode step's larger projections at 8 rows, half at 160 rows; MKL keeps the rest), on
  oneDNN's blocked copy of the weight where the plan holds one (``DecodePlan(pack_bytes=)``: a
  further 0.55-0.75x at 4 to 16 rows, the same products bit for bit);
* attention for a single query: Q and K are rotated together in one pass over the fused QKV
  output (rotate-half as a swap of halves and one multiply-add), the new key/value are written
  straight into the preallocated cache, a sliding window is a slice of the cache (no mask), and the
  [B, H, 1, hd] output is already in the layout ``o`` reads; fp32 on the CPU the attention is two
  ``bmm`` and a softmax with one additive padding mask per step (``_attend_rows``) instead of
  ``scaled_dot_product_attention``, which converts the boolean mask in every layer;
* a prompt prefix every row shares (``SharedKV``, from the engine's shared prefill) is attended to
  once for the whole batch: one product of all rows' queries with the prefix's keys per KV head,
  the rows' own cache slots read only after it, one softmax over both. A decode step's attention
  reads the cache from memory (it does not stay in the CPU's caches between steps, the weights
  pass through them), so with few-shot prompts most of those reads go.

``prefill`` runs the same layers and projections on all of a batch's prompt tokens at once, with
the masks and windows of ``Transformer.forward``, from the cache's current length (after a
shared prefix the engine copied in). ``prefill_packed`` does the same for a left-padded batch
without running its padding: the rows' real tokens packed into one batch for the projections,
each row's attention over its own real slots (plain causal attention where that is exact).

``DecodePlan`` collects the weight views and constants a step needs (the engine keeps it while the
weights stay the same); it copies nothing but the norm weights, the cos/sin table and, with
``pack_bytes``, oneDNN's blocked copies of the fp32 linear weights. A projection that is not a plain
``nn.Linear`` (e.g. a quantized one) is called as a module. Anything else this module does not
recognise (a subclassed block, replaced expert weights) makes ``supports(model)`` false and the
engine falls back to ``Transformer.forward``. ``tests/inference/test_engine.py`` checks both paths give the
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


# An fp32 CPU projection runs on oneDNN's matrix product (below) from this many rows on, and only
# when rows x inputs x outputs reaches ONEDNN_MIN_MACS (a oneDNN call costs about 12 us more than an
# MKL one: worth it for the larger products only).
ONEDNN_MIN_ROWS = 4
ONEDNN_MIN_MACS = 1 << 21
# A plan may hold oneDNN's own blocked copy of its fp32 CPU weights (``DecodePlan(pack_bytes=)``):
# a further 0.55-0.75x of the time of the plain oneDNN product at 4 to 16 rows (0.9x for a
# prefill's many rows), worth it from this many multiply-adds on. oneDNN reorders a weight once
# for a batch of this many rows (the layout it picks for 8 serves 2 to 1,480 rows alike here).
ONEDNN_PACKED_MIN_MACS = 1 << 20
ONEDNN_PACK_ROWS = 8
_ONEDNN: list = []  # [the oneDNN linear operators, or None], found once per process


def onednn_linear():
    """PyTorch's oneDNN fp32 linear operators, ``(linear, linear + add)``, or None where this build
    has none, ``torch.backends.mkldnn`` is turned off, or a one-off check disagrees with
    ``F.linear``. Measured on this project's CPU (an AMD EPYC, one thread), oneDNN's product of a
    few rows by an fp32 weight takes 0.55-0.75x the time of MKL's from 2M multiply-adds on (e.g. 8
    rows by 1024 x 256) and half at 160 rows (MKL takes its AVX2 path there); smaller products, and
    1 to 3 rows (MKL's matrix-vector product on the ``use_cpu_layout`` weights), stay on MKL. The
    sums are ordered differently: the same values up to float rounding, and deterministic."""
    if not _ONEDNN:
        found = None
        try:
            if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
                op = torch.ops.mkldnn._linear_pointwise
                g = torch.Generator().manual_seed(0)
                x, w = torch.randn(8, 64, generator=g), torch.randn(48, 64, generator=g)
                r = torch.randn(8, 48, generator=g)
                if (torch.allclose(op(x, w, None, "none", [], ""), F.linear(x, w), atol=1e-4)
                        and torch.allclose(op.binary(x, r, w, None, "add"), F.linear(x, w) + r, atol=1e-4)):
                    found = (op.default, op.binary)
        except (AttributeError, RuntimeError):
            found = None
        _ONEDNN.append(found)
    return _ONEDNN[0]


def _onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of the fp32 weight ``w`` [out, in] for ``onednn_linear``'s operators
    (the same products, bit for bit, in less time), or None where this build cannot make one."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), ONEDNN_PACK_ROWS)
    except (AttributeError, RuntimeError):
        return None


class _Proj:
    """One projection. A plain ``nn.Linear`` runs on its weight with the residual add fused into the
    product: on oneDNN for fp32 CPU weights from ``dnn_rows`` rows on (``onednn_linear``; with
    ``pack``, on a blocked copy of the weight that oneDNN reads faster), else as ``mm`` / ``addmm``;
    anything else (e.g. a quantized linear) is called as a module."""

    __slots__ = ("mod", "w", "wt", "b", "dnn", "dnn_rows", "dnn_w")

    def __init__(self, mod: nn.Module, pack: bool = False):
        plain = type(mod) is nn.Linear
        self.mod = mod
        self.w = mod.weight if plain else None
        self.wt = mod.weight.t() if plain else None
        self.b = mod.bias if plain else None
        w = mod.weight if plain else None
        self.dnn = (onednn_linear() if plain and w.device.type == "cpu" and w.dtype == torch.float32
                    and (self.b is None or self.b.dtype == torch.float32) else None)
        self.dnn_w = _onednn_pack(w) if self.dnn is not None and pack else None
        macs = ONEDNN_PACKED_MIN_MACS if self.dnn_w is not None else ONEDNN_MIN_MACS
        self.dnn_rows = max(ONEDNN_MIN_ROWS, -(-macs // w.numel())) if self.dnn is not None else 0
        if self.dnn is not None and self.dnn_w is None:
            self.dnn_w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w is None:
            return self.mod(x)
        if self.dnn is not None and x.shape[0] >= self.dnn_rows:
            return self.dnn[0](x, self.dnn_w, self.b, "none", [], "")
        return torch.mm(x, self.wt) if self.b is None else F.linear(x, self.w, self.b)  # mm: what linear runs

    def add_to(self, res: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """res + proj(x), as a new tensor."""
        if self.w is None:
            return res + self.mod(x)
        if self.dnn is not None and x.shape[0] >= self.dnn_rows:
            return self.dnn[1](x, res, self.dnn_w, self.b, "add")
        out = torch.addmm(res, x, self.wt)
        return out if self.b is None else out.add_(self.b)


class _Layer:
    """What one block's decode step reads: projections, shapes and norms."""

    __slots__ = ("kind", "attn_norm", "qkv", "o", "H", "Hkv", "hd", "att",
                 "mlp_norm", "mlp", "gate_up", "down", "width", "act", "moe_norm", "moe", "experts")

    def __init__(self, blk: Block, pack: bool = False):
        att = blk.attn
        self.kind, self.att = blk.kind, att
        self.attn_norm = _Norm(blk.attn_norm)
        self.qkv, self.o = _Proj(att.qkv, pack), _Proj(att.o, pack)
        self.H, self.Hkv, self.hd = att.n_heads, att.n_kv, att.hd
        self.mlp = self.moe = self.experts = None
        if blk.kind in "DH":
            mlp = blk.mlp
            self.mlp_norm, self.mlp = _Norm(blk.mlp_norm), mlp
            self.gate_up, self.down = _Proj(mlp.gate_up, pack), _Proj(mlp.down, pack)
            self.width, self.act = mlp.gate_up.out_features // 2, mlp.activation
        if blk.kind in "MH":
            self.moe_norm, self.moe = _Norm(blk.moe_norm), blk.moe


def _linear_bytes(model: Transformer) -> int:
    """Bytes of the fp32 CPU ``nn.Linear`` weights of ``model`` (what a packed plan copies)."""
    return sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear
               and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu")


class DecodePlan:
    """The per-model constants of the decode step, gathered once per generation (the engine keeps
    it while the weights stay the same). ``pack_bytes``: when the model's fp32 CPU linear weights
    take at most this many bytes, the plan holds oneDNN's blocked copy of each (``_Proj``: that
    much more memory while the plan lives, for 0.55-0.75x of the product's time at a decode
    step's few rows); 0 copies nothing."""

    def __init__(self, model: Transformer, pack_bytes: int = 0):
        self.model = model
        pack = bool(pack_bytes) and onednn_linear() is not None and 0 < _linear_bytes(model) <= pack_bytes
        self.packed = pack
        self.layers = [_Layer(b, pack) for b in model.layers]
        self.norm = _Norm(model.norm)
        self.head = _Proj(model.lm_head, pack)
        self.window = model.cfg.sliding_window
        rot = model.cfg.rotary_dim
        p = model.embed.weight
        # a decode step's attention as bmm (``_attend_rows``): fp32 on the CPU, where it was measured
        self.bmm_attention = p.device.type == "cpu" and p.dtype == torch.float32
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
        table = self.table  # read once: the engine keeps its plan across calls, which may run in threads (serve)
        if table[0].shape[0] < max_len:
            cos, sin = self.model.rotary(torch.arange(max_len, device=self.sign.device)[None], self.sign.dtype)
            table = (cos[0, :, None], (sin * self.sign)[0, :, None])  # [n, 1, rot]
            if self.table[0].shape[0] < max_len:  # only ever grows
                self.table = table
        cos_t, sin_t = table
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


def _rotated_qk(L: _Layer, qkv: torch.Tensor, cos, sin_signed) -> torch.Tensor:
    """The queries and keys of ``qkv`` [..., H + 2 * H_kv, hd] (heads on the second-last axis),
    q/k-normed where the model norms them, rotated on their first ``rot`` dimensions (rotate-half
    as a roll of the halves and one multiply-add; cos, sin broadcast over heads): [..., H + H_kv, hd]."""
    H, Hkv, hd = L.H, L.Hkv, L.hd
    if L.att.q_norm is not None:
        qk = torch.cat([L.att.q_norm(qkv[..., :H, :]), L.att.k_norm(qkv[..., H:H + Hkv, :])], dim=-2)
    else:
        qk = qkv[..., :H + Hkv, :]
    rot = cos.shape[-1]
    x_rot = qk[..., :rot]
    qk_rot = torch.addcmul(x_rot * cos, torch.roll(x_rot, rot // 2, -1), sin_signed)
    return torch.cat([qk_rot, qk[..., rot:]], dim=-1) if rot < hd else qk_rot


class SharedKV:
    """The keys and values of a prompt prefix that every row of a decode batch starts with (at
    positions 0..n-1), held once: per layer [H_kv, n, hd]. With it a decode step reads the rows'
    own cache slots from ``n`` on only, and attends to the prefix with one product for all rows
    (``_attend_shared``): a step's attention reads a batch's prefix once instead of once a row."""

    __slots__ = ("n", "k", "v")

    def __init__(self, n: int, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.n, self.k, self.v = n, k, v


def _attend_shared(q, keys, values, bias, kp, vp):
    """Softmax attention of one query per row and head, q [B, Hkv, G, hd] (contiguous, already
    scaled), over the shared prefix kp, vp [Hkv, n, hd] and then each row's own keys, values
    [B, Hkv, r, hd] (``bias`` [B, r]: 0 or -inf, None when every key is real): one softmax over
    both, as if the prefix were in every row; returns [B, Hkv, G, hd]. Three-dimensional ``bmm``
    throughout (a 4-D ``matmul`` dispatches several more operators on each call)."""
    B, Hkv, G, hd = q.shape
    n, r = kp.shape[1], keys.shape[2]
    s_pre = torch.bmm(q.transpose(0, 1).reshape(Hkv, B * G, hd), kp.transpose(1, 2))  # [Hkv, B*G, n]
    s_own = torch.bmm(q.view(B * Hkv, G, hd), keys.flatten(0, 1).transpose(1, 2)).view(B, Hkv, G, r)
    if bias is not None:
        s_own.add_(bias.view(B, 1, 1, r))
    p = torch.cat([s_pre.view(Hkv, B, G, n).transpose(0, 1), s_own], dim=-1).softmax(dim=-1)  # [B, Hkv, G, n+r]
    y = torch.bmm(p.view(B * Hkv, G, n + r)[:, :, n:], values.flatten(0, 1)).view(B, Hkv, G, hd)
    y_pre = torch.bmm(p[..., :n].transpose(0, 1).reshape(Hkv, B * G, n), vp)  # [Hkv, B*G, hd]
    return y.add_(y_pre.view(Hkv, B, G, hd).transpose(0, 1))


def _attend_rows(q, keys, values, bias):
    """Softmax attention of one query per row and head, q [B, Hkv, G, hd] (contiguous, already
    scaled), over each row's keys, values [B, Hkv, S, hd] (``bias`` [B, S]: 0 or -inf, None when
    every key is real); returns [B, Hkv, G, hd]. Two three-dimensional ``bmm`` and a softmax: on a
    CPU, for one query, about half the time of ``scaled_dot_product_attention`` (whose flash kernel
    is built for blocks of queries, and which turns a boolean mask into an additive one in every
    layer)."""
    B, Hkv, G, hd = q.shape
    S = keys.shape[2]
    s = torch.bmm(q.view(B * Hkv, G, hd), keys.flatten(0, 1).transpose(1, 2)).view(B, Hkv, G, S)
    if bias is not None:
        s.add_(bias.view(B, 1, 1, S))
    p = s.softmax(dim=-1)
    return torch.bmm(p.view(B * Hkv, G, S), values.flatten(0, 1)).view(B, Hkv, G, hd)


def _attend_one(L: _Layer, h, cos, sin_signed, key_mask, cache: KVCache, layer: int, window: int | None,
                shared: SharedKV | None = None, bias: torch.Tensor | None | bool = False):
    """Attention of one new token per row (h: [B, D], normed) against the cache, which it extends;
    returns the attention output before the ``o`` projection, [B, H * hd]. With ``shared`` the
    cache slots before ``shared.n`` are not read (``bias``: the additive mask of the rest).
    Without, ``bias`` False runs ``scaled_dot_product_attention`` with ``key_mask``; else the
    attention is ``_attend_rows`` over the window's slots with ``bias`` (None: no padding)."""
    B = h.shape[0]
    H, Hkv, hd = L.H, L.Hkv, L.hd
    qkv = L.qkv(h).view(B, H + 2 * Hkv, hd)
    qk_rot = _rotated_qk(L, qkv, cos, sin_signed)  # cos, sin: [B|1, 1, rot]
    start = cache.length
    end = start + 1
    kc, vc = cache.k[layer], cache.v[layer]
    kc.select(2, start).copy_(qk_rot[:, H:])
    vc.select(2, start).copy_(qkv[:, H + Hkv:])
    if shared is not None:
        n = shared.n
        q = qk_rot[:, :H].reshape(B, Hkv, H // Hkv, hd) * hd ** -0.5  # a new tensor: qk_rot is not changed
        y = _attend_shared(q, kc.narrow(2, n, end - n), vc.narrow(2, n, end - n), bias, shared.k[layer],
                           shared.v[layer])
        return y.view(B, H * hd)
    lo = end - window if window is not None and end > window else 0
    keys, values = kc.narrow(2, lo, end - lo), vc.narrow(2, lo, end - lo)
    if bias is not False:  # fp32 CPU: three-dimensional bmm (bias: the step's additive mask or None)
        q = qk_rot[:, :H].reshape(B, Hkv, H // Hkv, hd) * hd ** -0.5
        return _attend_rows(q, keys, values, bias).view(B, H * hd)
    mask = None if key_mask is None else key_mask[:, None, None, lo:end]
    q = qk_rot[:, :H, None]  # [B, H, 1, hd]
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != Hkv)
    return y.view(B, H * hd)  # [B, H, 1, hd] has the memory layout of [B, H * hd]


def _block_rest(L: _Layer, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The block after its attention residual ``a`` (``x``: the block's input): dense a + MLP(norm(a));
    MoE a + MoE(norm(a)); Arctic a + ResidualMLP(norm(a)) + MoE(norm(x)), the MoE reading the
    block's input."""
    if L.kind == "D":
        return _mlp_into(L, a)
    if L.kind == "M":
        return _moe_into(L, a, a)
    return _moe_into(L, _mlp_into(L, a), x)


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
                key_mask: torch.Tensor | None, plan: DecodePlan | None = None,
                shared: SharedKV | None = None) -> torch.Tensor:
    """Logits [B, V] for one new token per row (``tokens`` [B]) at ``positions`` [B, 1] (default:
    the cache length); ``key_mask`` [B, >= cache.length + 1] marks real (non-padding) keys.
    ``plan`` (a ``DecodePlan`` of ``model``) saves gathering the weights on every step.

    ``shared``: the rows' common prompt prefix, attended to once for all rows; the cache slots
    before ``shared.n`` are then not read, and ``key_mask`` (if any) marks the real keys from
    ``shared.n`` on (a row's slots that re-hold prefix positions must be False there). Not with
    a sliding window."""
    if plan is None:
        plan = DecodePlan(model)
    if cache.length >= cache.max_len:
        raise ValueError(f"KV cache overflow: {cache.length + 1} positions > max_len {cache.max_len}")
    x = F.embedding(tokens, model.embed.weight)  # [B, D]: one position per row, kept 2-D throughout
    cos, sin = plan.rope(positions, cache.length, cache.max_len)
    window = plan.window
    bias = None
    end = cache.length + 1
    if shared is not None:
        if window is not None and end > window:
            raise ValueError("a shared prefix cannot be attended to once a sliding window cuts into it")
        if key_mask is not None:  # one additive mask for every layer: 0 for a real key, -inf else
            bias = torch.where(key_mask[:, shared.n:end], 0.0, float("-inf")).to(x.dtype)
    elif plan.bmm_attention:
        lo = end - window if window is not None and end > window else 0
        if key_mask is not None:
            bias = torch.where(key_mask[:, lo:end], 0.0, float("-inf")).to(x.dtype)
    else:
        bias = False
    for i, L in enumerate(plan.layers):
        y = _attend_one(L, L.attn_norm(x), cos, sin, key_mask, cache, i, window, shared, bias)
        x = _block_rest(L, L.o.add_to(x, y), x)
    cache.length += 1
    return plan.head(plan.norm(x))


def _attend_prompt(L: _Layer, h, cos, sin_signed, mask, cache: KVCache, layer: int, B: int, T: int):
    """Attention of T new tokens per row (h: [B*T, D], normed) against the cache, which it extends
    by T slots from ``cache.length``; ``mask`` [B|1, 1, T, S] (None: causal, from slot 0). Returns
    the output before the ``o`` projection, [B*T, H * hd]."""
    H, Hkv, hd = L.H, L.Hkv, L.hd
    qkv = L.qkv(h).view(B, T, H + 2 * Hkv, hd)
    qk_rot = _rotated_qk(L, qkv, cos, sin_signed)  # cos, sin: [B|1, T, 1, rot]
    start = cache.length
    end = start + T
    kc, vc = cache.k[layer], cache.v[layer]
    kc[:, :, start:end] = qk_rot[:, :, H:].transpose(1, 2)
    vc[:, :, start:end] = qkv[:, :, H + Hkv:].transpose(1, 2)
    q = qk_rot[:, :, :H].transpose(1, 2)  # [B, H, T, hd]
    y = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask,
                                       is_causal=mask is None and T > 1, enable_gqa=H != Hkv)
    return y.transpose(1, 2).reshape(B * T, H * hd)


@torch.inference_mode()
def prefill(model: Transformer, input_ids: torch.Tensor, cache: KVCache, positions: torch.Tensor | None,
            attention_mask: torch.Tensor | None, plan: DecodePlan | None = None) -> torch.Tensor:
    """Run the prompt through the model into ``cache``, after the ``cache.length`` positions it
    already holds (a shared prefix the engine copied in); logits [B, V] of the last position only.
    ``positions`` [B, T] default to the cache slots; ``attention_mask`` [B, >= cache.length + T]
    marks real keys. The decode step's layers and projections on all B*T tokens at once (the
    masks and windows of ``Transformer.forward``; MoE layers without routing statistics)."""
    if plan is None:
        plan = DecodePlan(model)
    B, T = input_ids.shape
    start = cache.length
    if start + T > cache.max_len:
        raise ValueError(f"KV cache overflow: {start + T} positions > max_len {cache.max_len}")
    if positions is None:
        positions = torch.arange(start, start + T, device=input_ids.device)[None]
    mask = model._mask(B, T, start, positions, attention_mask, None, input_ids.device)
    cos, sin = plan.rope(positions.reshape(-1, 1), start, cache.max_len)  # [N, 1, rot]
    cos, sin = cos.view(positions.shape[0], T, 1, -1), sin.view(positions.shape[0], T, 1, -1)
    x = F.embedding(input_ids.reshape(-1), model.embed.weight)  # [B*T, D]
    for i, L in enumerate(plan.layers):
        y = _attend_prompt(L, L.attn_norm(x), cos, sin, mask, cache, i, B, T)
        x = _block_rest(L, L.o.add_to(x, y), x)
    cache.length = start + T
    return plan.head(plan.norm(x.view(B, T, -1)[:, -1]))


class _Row:
    """One row of a packed prefill: its new tokens fill cache slots [a, end), which are packed
    tokens [off, off + T); its keys are slots [lo, end) (``lo``: its first real slot); ``mask``
    [1, 1, T, end - lo] or None (plain causal attention from slot ``lo``)."""

    __slots__ = ("b", "a", "lo", "off", "T", "mask")

    def __init__(self, b, a, lo, off, T, mask):
        self.b, self.a, self.lo, self.off, self.T, self.mask = b, a, lo, off, T, mask


def _attend_packed(L: _Layer, h, cos, sin_signed, cache: KVCache, layer: int, rows: list[_Row], end: int):
    """Attention of the packed prompt tokens of several rows (h: [N, D], normed, row after row),
    each row against its own real cache slots only; writes their keys and values into the cache
    at each row's slots. Returns the output before the ``o`` projection, [N, H * hd]."""
    H, Hkv, hd = L.H, L.Hkv, L.hd
    N = h.shape[0]
    qkv = L.qkv(h).view(N, H + 2 * Hkv, hd)
    qk_rot = _rotated_qk(L, qkv, cos, sin_signed)  # cos, sin: [N, 1, rot]
    kc, vc = cache.k[layer], cache.v[layer]
    out = torch.empty(N, H, hd, dtype=qkv.dtype, device=qkv.device)
    for r in rows:
        toks = slice(r.off, r.off + r.T)
        kc[r.b, :, r.a:end] = qk_rot[toks, H:].transpose(0, 1)
        vc[r.b, :, r.a:end] = qkv[toks, H + Hkv:].transpose(0, 1)
        q = qk_rot[toks, :H].transpose(0, 1)[None]  # [1, H, T, hd]
        y = F.scaled_dot_product_attention(q, kc[r.b:r.b + 1, :, r.lo:end], vc[r.b:r.b + 1, :, r.lo:end],
                                           attn_mask=r.mask, is_causal=r.mask is None and r.T > 1,
                                           enable_gqa=H != Hkv)
        out[toks] = y[0].transpose(0, 1)
    return out.view(N, H * hd)


@torch.inference_mode()
def prefill_packed(model: Transformer, input_ids: torch.Tensor, cache: KVCache, first: list[int],
                   plan: DecodePlan | None = None) -> torch.Tensor:
    """``prefill`` of a left-padded batch without its padding: row b's real tokens start at cache
    slot ``first[b]`` (its positions count from there), ``input_ids`` [B, T] fill slots
    ``cache.length`` .. ``cache.length + T`` (a row's slots before ``cache.length`` already hold
    its keys and values: a shared prefix the engine copied in). Only real tokens run: the rows'
    tokens are packed into one [N, D] batch for the projections and MLP / MoE layers, and each
    row attends to its own real slots (plain causal attention where that is exact, a mask only
    for a row that continues cached slots or meets the sliding window). The logits [B, V] of each
    row's last position; the cache's padding slots are left as they are (no query reads them).
    The same values as ``prefill`` with the padding mask up to float rounding; for prompts of
    different lengths it skips their padding's share of a prefill's products."""
    if plan is None:
        plan = DecodePlan(model)
    B, T = input_ids.shape
    start = cache.length
    end = start + T
    if end > cache.max_len:
        raise ValueError(f"KV cache overflow: {end} positions > max_len {cache.max_len}")
    dev, window = input_ids.device, plan.window
    rows, toks, pos, off = [], [], [], 0
    for b in range(B):
        lo = first[b]
        a = max(start, lo)
        if a >= end:
            raise ValueError(f"row {b} has no token to prefill (its first real slot is {lo}, the prompt ends at {end})")
        n = end - a
        mask = None
        if a > lo or (window is not None and end - lo > window):
            q = torch.arange(a, end, device=dev)[:, None]
            k = torch.arange(lo, end, device=dev)[None, :]
            allowed = k <= q
            if window is not None:
                allowed &= q - k < window
            mask = allowed[None, None]
        rows.append(_Row(b, a, lo, off, n, mask))
        toks.append(input_ids[b, a - start:])
        pos.append(torch.arange(a - lo, end - lo, device=dev))
        off += n
    positions = torch.cat(pos)
    cos, sin = plan.rope(positions[:, None], start, cache.max_len)  # [N, 1, rot]
    x = F.embedding(torch.cat(toks), model.embed.weight)  # [N, D]
    for i, L in enumerate(plan.layers):
        y = _attend_packed(L, L.attn_norm(x), cos, sin, cache, i, rows, end)
        x = _block_rest(L, L.o.add_to(x, y), x)
    cache.length = end
    last = torch.tensor([r.off + r.T - 1 for r in rows], device=dev)
    return plan.head(plan.norm(x.index_select(0, last)))
