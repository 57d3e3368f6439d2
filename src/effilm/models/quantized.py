"""Quantized layers: int8 per output channel, int4 group-wise (sym or asym), stored compactly.

The number format, round-to-nearest codes and the modules a quantized checkpoint is built from
(the loader builds them without importing the quantization pipeline, :mod:`effilm.quant`).

What is quantized: every block's attention projections (``attn.qkv``, ``attn.o``), dense MLP
projections (``mlp.gate_up``, ``mlp.down``) and stacked 3-D expert weights (``moe.experts``).
What stays in full precision: embeddings, the LM head, every norm and the MoE router (kept in fp32
so the quantized model picks experts as the fp32 model does).

Format (per weight ``[..., out, in]``, groups of ``G`` along ``in``; int8 per channel is G = in):

* ``q``       int8 ``[..., out, in]`` (8-bit symmetric), uint8 ``[..., out, in]`` (8-bit asym) or
              uint8 ``[..., out, in / 2]`` (4-bit: two unsigned nibbles per byte, even index low);
* ``scales``  ``[..., out, in / G]`` in ``scale_dtype`` (fp16 by default, rounded *up* so that
              no value clips);
* ``zeros``   uint8 ``[..., out, in / G]`` (asymmetric only).

Symmetric: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)`` with ``s = max|w| / (2^(b-1) - 1)``.
Asymmetric: ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` with ``s = (max - min) / (2^b - 1)`` and
``z = round(-min / s)``. Either way ``|w - dq(q(w))| <= s / 2`` element-wise.

A quantized checkpoint is an ordinary effilm checkpoint whose ``config.json`` holds a
``quantization`` entry; :func:`build_quantized` builds the model with these modules in place of the
fp32 ones, so it runs in the ordinary ``Transformer.forward``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effilm.config.quant import QuantConfig
from effilm.config.reader import build
from effilm.errors import ConfigError
from effilm.models.transformer import Transformer

# Module names (relative to the Transformer) whose weights are quantized.
TARGET_PATTERNS = ("layers.*.attn.qkv", "layers.*.attn.o", "layers.*.mlp.gate_up", "layers.*.mlp.down", "layers.*.moe.experts")
FULL_PRECISION = "embeddings, LM head, norms and MoE router stay in full precision"


# ----- the number format ---------------------------------------------------------------------
def qrange(bits: int, asym: bool) -> tuple[int, int]:
    return (0, 2**bits - 1) if asym else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _round_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s`` cast to ``dtype``, nudged up one ulp where the cast rounded down (so nothing clips)."""
    low = s.to(dtype)
    below = low.float() < s
    return torch.where(below, torch.nextafter(low, torch.full_like(low, float("inf"))), low)


def group_params(w_g: torch.Tensor, bits: int, asym: bool, scale_dtype: torch.dtype):
    """Scale (and zero point) for groups along the last dim of ``w_g`` [..., G]; returns [..., 1] each."""
    lo, hi = qrange(bits, asym)
    if asym:
        wmin = w_g.amin(-1, keepdim=True).clamp(max=0)
        wmax = w_g.amax(-1, keepdim=True).clamp(min=0)
        s = (wmax - wmin) / hi
    else:
        s = w_g.abs().amax(-1, keepdim=True) / hi
    s = _round_up(torch.where(s > 0, s, torch.ones_like(s)), scale_dtype).float()
    z = torch.round(-wmin / s).clamp(lo, hi) if asym else None
    return s, z


def quantize_values(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``w`` under broadcastable scale/zero."""
    lo, hi = qrange(bits, z is not None)
    q = torch.round(w / s)
    if z is not None:
        q = q + z
    return q.clamp(lo, hi)


def dequantize_values(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    return (q - z) * s if z is not None else q * s


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Unsigned nibbles [..., n] (n even) -> uint8 [..., n/2], even index in the low nibble."""
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


@dataclass(frozen=True)
class Codes:
    """A quantized weight before storage: integer codes (float), scales and zeros per group."""

    q: torch.Tensor  # [..., out, in]
    scales: torch.Tensor  # [..., out, n_groups]
    zeros: torch.Tensor | None  # [..., out, n_groups]


def check_shape(name: str, shape, group_size: int | None, bits: int) -> int:
    """The effective group size for a weight of ``shape``; a clear error when it does not divide."""
    n_in = shape[-1]
    g = group_size or n_in
    if n_in % g:
        raise ConfigError(f"{name}: input width {n_in} is not divisible by group_size {g}; use a smaller group")
    if bits == 4 and n_in % 2:
        raise ConfigError(f"{name}: input width {n_in} must be even to pack two 4-bit values per byte")
    return g


def rtn(w: torch.Tensor, cfg: QuantConfig, name: str = "weight") -> Codes:
    """Round-to-nearest quantization of ``w`` [..., out, in] in groups along ``in``."""
    g = check_shape(name, w.shape, cfg.group_size, cfg.bits)
    w_g = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // g, g)
    s, z = group_params(w_g, cfg.bits, cfg.asym, getattr(torch, cfg.scale_dtype))
    q = quantize_values(w_g, s, z, cfg.bits)
    return Codes(q.reshape(w.shape), s.squeeze(-1), None if z is None else z.squeeze(-1))


def dequantize_codes(c: Codes) -> torch.Tensor:
    n_groups = c.scales.shape[-1]
    q_g = c.q.reshape(*c.q.shape[:-1], n_groups, -1)
    z = None if c.zeros is None else c.zeros[..., None]
    return dequantize_values(q_g, c.scales[..., None].float(), z).reshape(c.q.shape)


# ----- modules -------------------------------------------------------------------------------
class QuantWeight(nn.Module):
    """A stored quantized weight: buffers ``q``, ``scales`` and (asym) ``zeros``."""

    def __init__(self, shape, cfg: QuantConfig, name: str = "weight"):
        super().__init__()
        self.shape, self.bits, self.asym = tuple(shape), cfg.bits, cfg.asym
        g = check_shape(name, shape, cfg.group_size, cfg.bits)
        groups = (*shape[:-1], shape[-1] // g)
        if cfg.bits == 4:
            q = torch.empty(*shape[:-1], shape[-1] // 2, dtype=torch.uint8)
        else:
            q = torch.empty(*shape, dtype=torch.uint8 if cfg.asym else torch.int8)
        self.register_buffer("q", q)
        self.register_buffer("scales", torch.empty(groups, dtype=getattr(torch, cfg.scale_dtype)))
        self.register_buffer("zeros", torch.empty(groups, dtype=torch.uint8) if cfg.asym else None)

    @torch.no_grad()
    def set_codes(self, c: Codes) -> None:
        q = c.q
        if self.bits == 4:
            q = pack_int4(q if self.asym else q + 8)
        self.q.copy_(q.to(self.q.dtype))
        self.scales.copy_(c.scales.to(self.scales.dtype))
        if self.asym:
            self.zeros.copy_(c.zeros.to(torch.uint8))

    def codes(self) -> Codes:
        q = self.q
        if self.bits == 4:
            q = unpack_int4(q).float()
            q = q if self.asym else q - 8
        return Codes(q.float(), self.scales.float(), None if self.zeros is None else self.zeros.float())

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, asym={self.asym}, groups={self.scales.shape[-1]}"


def int8_rows_linear(x: torch.Tensor, q: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """x @ (q * s)^T for int8 codes ``q`` [out, in] with one scale per output row, computed as
    x @ q^T * s: the codes converted to x's dtype, the dequantized matrix never built."""
    return F.linear(x, q.to(x.dtype)).mul_(row_scales.to(x.dtype))


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized. int8 symmetric per-channel weights multiply the int8
    codes (converted to the activation dtype) and scale the output rows, x @ q^T * s, which is
    x @ (q * s)^T without building the dequantized matrix (on this project's CPU: 2.5x faster than
    torch's ``_weight_int8pack_mm`` for one row, over 10x for 8 rows); other formats dequantize on
    the fly."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig, name: str = "linear"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = QuantWeight((out_features, in_features), cfg, name)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.int8_fast = cfg.bits == 8 and not cfg.asym and cfg.group_size is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.qweight
        if self.int8_fast and x.is_floating_point():
            y = int8_rows_linear(x, qw.q, qw.scales.squeeze(-1))
            return y.add_(self.bias.to(y.dtype)) if self.bias is not None else y
        return F.linear(x, qw.dequantize().to(x.dtype), self.bias)


class QuantExperts(nn.Module):
    """Stacked quantized experts. ``w_gate_up`` / ``w_down`` dequantize on access, so the MoE
    layer's ordinary expert kernels run unchanged."""

    def __init__(self, shape_gate_up, shape_down, cfg: QuantConfig, name: str = "experts"):
        super().__init__()
        self.gate_up_q = QuantWeight(shape_gate_up, cfg, f"{name}.w_gate_up")
        self.down_q = QuantWeight(shape_down, cfg, f"{name}.w_down")
        # int8 codes with one scale per output row: one expert's product is x @ q[e]^T * s[e], which
        # the decode step uses to read only the chosen experts (effilm.inference.decode)
        self.int8_per_channel = cfg.bits == 8 and not cfg.asym and cfg.group_size is None

    @property
    def w_gate_up(self) -> torch.Tensor:
        return self.gate_up_q.dequantize()

    @property
    def w_down(self) -> torch.Tensor:
        return self.down_q.dequantize()


def target_names(model) -> list[str]:
    """Names of the modules to quantize, in model order."""
    return [n for n, _ in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in TARGET_PATTERNS)]


def weights_of(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The fp weights of a target: (W,) for a Linear, (w_gate_up, w_down) for Experts."""
    if isinstance(module, nn.Linear):
        return (module.weight,)
    return (module.w_gate_up, module.w_down)


def set_module(model, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantized_module(name: str, module: nn.Module, cfg: QuantConfig) -> nn.Module:
    """An empty quantized module shaped like ``module`` (a Linear or stacked Experts)."""
    if isinstance(module, nn.Linear):
        return QuantLinear(module.in_features, module.out_features, module.bias is not None, cfg, name)
    return QuantExperts(tuple(module.w_gate_up.shape), tuple(module.w_down.shape), cfg, name)


def build_quantized(model_cfg, spec: dict, device=None):
    """An empty model with quantized modules in place (the loader fills it from a checkpoint)."""
    cfg = build(QuantConfig, {k: v for k, v in spec.items() if k not in ("targets", "full_precision")}, "quantization")
    with torch.device("meta"):
        model = Transformer(model_cfg)
        targets = spec.get("targets") or target_names(model)
        for name in targets:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"quantization.targets names {name!r}, which this model does not have") from None
            set_module(model, name, quantized_module(name, module, cfg))
    model = model.to_empty(device=device or "cpu")
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.rotary.reset_buffers(model.embed.weight.device)
    return model
