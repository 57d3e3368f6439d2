"""The transformer: norms, RoPE (with LongRoPE), GQA attention over SDPA, gated MLPs, the
dense / MoE / Arctic-hybrid block, the LM head, the KV cache and ``init_weights``.

Plain single-device PyTorch: only torch and the config are imported. Parallelism wraps the model
from outside (``effilm.train.parallel``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effilm.config.model import LayerShape, ModelConfig, longrope_mscale
from effilm.models.fused_ce import linear_cross_entropy
from effilm.models.fused_ops import rms_norm, rotary, signed_sin, swiglu, wants_fused
from effilm.models.moe import MoE, RoutingStats, moe_losses


# ----- norms ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_fused(x, self.weight):
            return rms_norm(x, self.weight, self.eps)  # same values, a cheaper backward on the CPU
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
    return RMSNorm(dim, cfg.norm_eps)


# ----- rotary embeddings ---------------------------------------------------------------------
class Rotary(nn.Module):
    """RoPE over the first ``rotary_dim`` dims of each head, rotate-half layout, with LongRoPE.

    LongRoPE divides each frequency by a per-frequency factor: the short factors while the
    sequence (max position + 1) fits the original context, the long factors past it, and scales
    cos/sin by the attention factor sqrt(1 + ln(s)/ln(original)) (or the configured mscale).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        rot = cfg.rotary_dim
        # computed on the CPU even inside a meta-device build (reset_buffers recomputes after to_empty)
        base = cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.int64, device="cpu").float() / rot)
        self.register_buffer("inv_freq", 1.0 / base, persistent=False)
        if cfg.rope_type == "longrope":
            self.register_buffer(
                "inv_freq_short", 1.0 / (torch.tensor(cfg.rope_short_factor, dtype=torch.float32, device="cpu") * base), persistent=False
            )
            self.register_buffer(
                "inv_freq_long", 1.0 / (torch.tensor(cfg.rope_long_factor, dtype=torch.float32, device="cpu") * base), persistent=False
            )
            default = longrope_mscale(cfg.max_seq_len / cfg.rope_original_max_seq_len, cfg.rope_original_max_seq_len)
            self.mscale_short = cfg.rope_short_mscale if cfg.rope_short_mscale is not None else default
            self.mscale_long = cfg.rope_long_mscale if cfg.rope_long_mscale is not None else default

    def reset_buffers(self, device=None) -> None:
        """Recompute the frequency buffers (after a meta-device build and ``to_empty``)."""
        fresh = Rotary(self.cfg)
        for name, buf in fresh.named_buffers():
            setattr(self, name, buf.to(device if device is not None else buf.device))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin of shape [B or 1, T, rotary_dim] for integer ``positions`` [B or 1, T]."""
        inv_freq, scale = self.inv_freq, 1.0
        if self.cfg.rope_type == "longrope":
            long = int(positions.max()) + 1 > self.cfg.rope_original_max_seq_len
            inv_freq = self.inv_freq_long if long else self.inv_freq_short
            scale = self.mscale_long if long else self.mscale_short
        freqs = positions[..., None].float() * inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [B, T, rot]."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if wants_fused(x):  # same values, a backward that saves nothing but cos/sin
        out = rotary(x_rot, cos, signed_sin(sin))
    else:
        half = rot // 2
        rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        out = x_rot * cos + rotated * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


# ----- KV cache ------------------------------------------------------------------------------
class KVCache:
    """Preallocated per-layer key/value buffers [B, H_kv, max_len, hd] and the filled length."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        self.max_len = max_len
        self.length = 0
        self.k = [torch.zeros(batch, s.n_kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype) for s in cfg.layers]
        self.v = [torch.zeros_like(k) for k in self.k]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ----- attention and MLP ---------------------------------------------------------------------
class Attention(nn.Module):
    """GQA attention with a fused [Q|K|V] projection, optional QK norm and a sliding window."""

    def __init__(self, cfg: ModelConfig, shape: LayerShape):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = shape.n_heads, shape.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.hd, bias=cfg.attn_bias)
        self.o = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=cfg.attn_out_bias)
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        gqa = self.n_heads != self.n_kv
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    """Gated MLP with a fused [gate|up] projection (gate first, as Phi-3 and OpenELM store it)."""

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.activation, self.limit = cfg.activation, cfg.gegelu_limit
        self.gate_up = nn.Linear(cfg.d_model, 2 * width, bias=cfg.mlp_bias)
        self.down = nn.Linear(width, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        if self.activation == "silu" and wants_fused(gu):
            return self.down(swiglu(gu))  # same values, a cheaper backward on the CPU
        gate, up = gu.chunk(2, dim=-1)
        if self.activation == "silu":
            h = F.silu(gate) * up
        elif self.activation == "gelu_tanh":
            h = F.gelu(gate, approximate="tanh") * up
        else:  # gegelu: clamped quick-GELU gate times (clamped linear + 1), Phi-3-small
            g = gate.clamp(max=self.limit)
            h = g * torch.sigmoid(1.702 * g) * (up.clamp(-self.limit, self.limit) + 1)
        return self.down(h)


class Block(nn.Module):
    """One layer. D: x + MLP; M: x + MoE; H (Arctic): a = x + Attn(LN1 x);
    out = a + ResidualMLP(LN_res a) + MoE(LN2 x), the MoE reading the block's input."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        shape = cfg.layers[index]
        self.kind, self.index = shape.kind, index
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, shape)
        if self.kind in "DH":
            self.mlp_norm = make_norm(cfg, cfg.d_model)
            self.mlp = MLP(cfg, shape.ffn_dim)
        if self.kind in "MH":
            self.moe_norm = make_norm(cfg, cfg.d_model)
            self.moe = MoE(cfg.d_model, cfg.moe)

    def forward(self, x, cos, sin, mask, cache, start):
        a = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, self.index, start)
        if self.kind == "D":
            return a + self.mlp(self.mlp_norm(a)), None
        if self.kind == "M":
            y, stats = self.moe(self.moe_norm(a))
            return a + y, stats
        y, stats = self.moe(self.moe_norm(x))
        return a + self.mlp(self.mlp_norm(a)) + y, stats


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when forward was given targets; [N, V] with logits_at
    aux_loss: torch.Tensor | None = None  # mean over MoE layers of the load-balancing loss
    z_loss: torch.Tensor | None = None  # mean over MoE layers of the router z-loss
    moe_loss: torch.Tensor | None = None  # aux_loss_coef * aux_loss + z_loss_coef * z_loss
    routing: list[RoutingStats] = field(default_factory=list)
    ce_sum: torch.Tensor | None = None  # summed next-token cross-entropy, when forward was given targets


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg)

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, device=p.device, dtype=p.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        logits_at: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for ``input_ids`` [B, T].

        cache: a KVCache to read and extend (incremental decoding). positions: [B, T] or [T]
        positions (default: continue from the cache). attention_mask: [B, S] bool or 0/1 over
        all keys so far (cached + new), False for padding. doc_ids: [B, T] document ids; when
        given, attention stays within each document (packed training sequences). targets: [B, T]
        next-token ids; when given, the output holds ``ce_sum`` (the summed cross-entropy, fp32,
        ``ignore_index`` rows excluded) instead of logits, computed without materialising them
        (``effilm.models.fused_ce``). logits_at: [B, T] bool; when given, ``logits`` holds only
        those positions' logits, [N, V] in row-major order (DPO needs the answers' few tokens, not
        every position's vocabulary).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {tuple(input_ids.shape)} {input_ids.dtype}")
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)[None]
        elif positions.dim() == 1:
            positions = positions[None]
        x = self.embed(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        mask = self._mask(B, T, start, positions, attention_mask, doc_ids, x.device)
        routing = []
        for block in self.layers:
            x, stats = block(x, cos, sin, mask, cache, start)
            if stats is not None:
                routing.append(stats)
        if cache is not None:
            cache.length = start + T
        if targets is not None:
            h = self.norm(x)
            if targets.shape != (B, T):
                raise ValueError(f"targets must have the shape of input_ids {(B, T)}, got {tuple(targets.shape)}")
            ce = linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias, targets, ignore_index)
            out = ModelOutput(logits=None, routing=routing, ce_sum=ce)
        elif logits_at is not None:
            if logits_at.shape != (B, T) or logits_at.dtype != torch.bool:
                raise ValueError(f"logits_at must be a bool tensor of shape {(B, T)}, got {tuple(logits_at.shape)}")
            out = ModelOutput(logits=self.lm_head(self.norm(x)[logits_at]), routing=routing)
        else:
            out = ModelOutput(logits=self.lm_head(self.norm(x)), routing=routing)
        if routing:
            out.aux_loss, out.z_loss, out.moe_loss = moe_losses(routing, self.cfg.moe)
        return out

    def _mask(self, B, T, start, positions, attention_mask, doc_ids, device):
        """A boolean [B|1, 1, T, S] mask, or None when plain causal attention is exact."""
        window = self.cfg.sliding_window
        S = start + T
        needs_window = window is not None and S > window
        if attention_mask is None and doc_ids is None and not needs_window and (start == 0 or T == 1):
            return None
        q = torch.arange(start, S, device=device)[:, None]
        k = torch.arange(S, device=device)[None, :]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (q - k < window)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :S]
        if doc_ids is not None:
            if start:
                raise ValueError("doc_ids masking is for full-sequence training passes, not cached decoding")
            allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        # a query row with nothing to attend to (left padding) would give NaN: let it see everything
        return allowed | ~allowed.any(dim=-1, keepdim=True)

    # ----- initialisation --------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Set every parameter: normal(0, init_std) for matrices and embeddings (output
        projections scaled by 1/sqrt(2 * n_layers)), zeros for biases and routers' selection
        biases, ones for norm weights."""
        from effilm.models.moe import Experts

        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Linear):
                is_out = name.endswith("attn.o") or name.endswith("mlp.down")
                module.weight.normal_(0.0, out_std if is_out else std, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=gen)
            elif isinstance(module, Experts):
                module.w_gate_up.normal_(0.0, std, generator=gen)
                module.w_down.normal_(0.0, out_std, generator=gen)
            elif isinstance(module, MoE) and hasattr(module, "router_bias"):
                module.router_bias.zero_()
        self.rotary.reset_buffers(self.embed.weight.device)


_TORCH_INITS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "ones_", "zeros_", "constant_")


@contextlib.contextmanager
def _no_module_init():
    """Skip torch's per-module default initialisation while building on the meta device.

    ``init_weights`` sets every parameter afterwards anyway, and running the default initialisers
    on meta tensors goes through torch's reference kernels, whose first use imports torch._dynamo
    (seconds of start-up for every command).
    """
    saved = {name: getattr(nn.init, name) for name in _TORCH_INITS}
    try:
        for name in _TORCH_INITS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(cfg: ModelConfig, device=None, dtype=None, seed: int | None = 0, init: bool = True) -> Transformer:
    """Build on the meta device, materialise on ``device`` and initialise every parameter once."""
    with torch.device("meta"), _no_module_init():
        model = Transformer(cfg)
    model = model.to_empty(device=device or "cpu")
    if dtype is not None:
        model = model.to(dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if init:
        model.init_weights(seed)
    else:
        model.rotary.reset_buffers(model.embed.weight.device)
    return model
