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

Kernels. Each quantized module has a ``kernel``: ``"exact"`` (the default) computes in the
activation dtype (fp32) with the dequantized values, the reference every parity test and report
checks; ``"fast"`` runs PyTorch's packed CPU kernels (``torch._weight_int8pack_mm``,
``torch._weight_int4pack_mm_for_cpu``), which read the int8 / int4 codes directly but take bf16
activations and scales (results within bf16 rounding, about 0.3% of a projection's output, of the
exact path). :func:`set_kernel` switches a model; the generation engine does so by default. The
packed int4 layout depends on the CPU, so it is built on first use, held beside the codes (not a
buffer: never in a state dict or checkpoint; 0.5 byte a weight more in memory) and rebuilt when the
codes change; saving and exporting read the original codes. Whatever the kernels cannot run
(asymmetric or grouped int8, an input width not a multiple of 32, int4 with an output width not a
multiple of 16, non-CPU tensors) takes the exact path. The exact path does not cache dequantized
weights, which would hold the fp32 matrix the format exists to avoid: int8 per channel multiplies
the codes and scales the rows, other formats dequantize per call (per chosen expert in decode).
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
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
# "exact": fp32 arithmetic on the dequantized values; "fast": packed CPU kernels, bf16 activations
KERNELS = ("exact", "fast")
FAST_INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 CPU kernel takes
FAST_DTYPE = torch.bfloat16  # the activation / scale dtype the fast CPU kernels run fast in


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

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        """The fp32 weight (``dequantize_codes(self.codes())``, bit for bit, in one float buffer
        updated in place); ``index`` picks one matrix of a stacked (expert) weight."""
        q = self.q if index is None else self.q[index]
        s = self.scales if index is None else self.scales[index]
        z = None if self.zeros is None else (self.zeros if index is None else self.zeros[index])
        if self.bits == 4:
            q = unpack_int4(q)
        w = q.reshape(*q.shape[:-1], s.shape[-1], -1).float()  # [..., groups, g]
        if z is not None:
            w.sub_(z.float()[..., None])
        elif self.bits == 4:
            w.sub_(8)
        return w.mul_(s.float()[..., None]).reshape(*q.shape[:-1], -1)

    # ----- the fast CPU kernels --------------------------------------------------------------
    def fast_unsupported(self) -> str | None:
        """Why the fast CPU kernels cannot run this weight (None: they can)."""
        n_out, n_in = self.shape[-2:]
        g = n_in // self.scales.shape[-1]
        if self.q.device.type != "cpu":
            return f"weights on {self.q.device.type}, the fast kernels are CPU kernels"
        if n_in % 32:
            return f"input width {n_in} is not a multiple of 32"
        if self.bits == 8:
            if self.asym:
                return "asymmetric int8"
            return None if g == n_in else "int8 with groups"
        if n_out % 16:
            return f"int4 output width {n_out} is not a multiple of 16"
        return None if g in FAST_INT4_GROUPS else f"int4 group size {g} is not one of {FAST_INT4_GROUPS}"

    def fast_form(self):
        """What the fast kernel reads, built on first use and rebuilt when the codes change (or None
        when unsupported): int8 ``(q, bf16 scales [..., out])``; int4 ``(packed [..., out, in/2],
        bf16 scales-and-zeros [..., in/g, out, 2], g)``, where the kernel computes (u - 8) * s + zero
        for unsigned codes u, so effilm's (u - z) * s has zero = (8 - z) * s."""
        key = (self.q.device, self.q.data_ptr(), _version(self.q), _version(self.scales), _version(self.zeros))
        cached = self.__dict__.get("_fast")
        if cached is not None and cached[0] == key:
            return cached[1]
        form = None
        if self.fast_unsupported() is None:
            try:
                form = self._build_fast_form()
            except (RuntimeError, NotImplementedError):  # an older torch / a CPU without the kernels
                form = None
        self.__dict__["_fast"] = (key, form)  # a plain attribute: never in the state dict
        return form

    @torch.no_grad()
    def _build_fast_form(self):
        s = self.scales.float()
        if self.bits == 8:
            return (self.q, s[..., 0].to(FAST_DTYPE).contiguous())
        n_out, n_in = self.shape[-2:]
        g = n_in // s.shape[-1]
        u = unpack_int4(self.q).reshape(-1, n_out, n_in).to(torch.int32)
        packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(m.contiguous(), 1) for m in u])
        zero = (8 - self.zeros.float()) * s if self.asym else torch.zeros_like(s)
        sz = torch.stack([s, zero], dim=-1).transpose(-3, -2)  # [..., in/g, out, 2]
        lead = self.shape[:-2]
        return (packed.reshape(*lead, *packed.shape[1:]), sz.to(FAST_DTYPE).contiguous(), g)

    def linear(self, x: torch.Tensor, index: int | None = None, fast: bool = False) -> torch.Tensor:
        """x @ W^T (W = the weight, or matrix ``index`` of a stacked one), in ``x``'s dtype: the fast
        CPU kernel when ``fast`` and this weight and ``x`` allow it, else the exact path."""
        if fast and x.device.type == "cpu" and x.is_floating_point() and x.numel():
            form = self.fast_form()
            if form is not None:
                return _fast_linear(x, form, index)
        if self.int8_rows:
            q, s = (self.q, self.scales) if index is None else (self.q[index], self.scales[index])
            return int8_rows_linear(x, q, s[..., 0])
        return F.linear(x, self.dequantize(index).to(x.dtype))

    @property
    def int8_rows(self) -> bool:
        """Symmetric int8 with one scale per output row: the exact path multiplies the codes and
        scales the rows (``int8_rows_linear``) instead of dequantizing the matrix."""
        return self.bits == 8 and not self.asym and self.scales.shape[-1] == 1

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, asym={self.asym}, groups={self.scales.shape[-1]}"


def _version(t: torch.Tensor | None) -> int | None:
    """``t``'s version counter (bumped by in-place writes); None for inference tensors, which have
    none (and cannot be written outside inference mode)."""
    return None if t is None or t.is_inference() else t._version


def _fast_linear(x: torch.Tensor, form, index: int | None) -> torch.Tensor:
    """x @ W^T through the packed CPU kernels (bf16 in, fp32 accumulation, bf16 out), in x's dtype."""
    xb = x.reshape(-1, x.shape[-1]).to(FAST_DTYPE).contiguous()
    if len(form) == 2:
        q, s = form if index is None else (form[0][index], form[1][index])
        y = torch._weight_int8pack_mm(xb, q, s)
    else:
        packed, sz, g = form if index is None else (form[0][index], form[1][index], form[2])
        y = torch._weight_int4pack_mm_for_cpu(xb, packed, g, sz)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def int8_rows_linear(x: torch.Tensor, q: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """x @ (q * s)^T for int8 codes ``q`` [out, in] with one scale per output row, computed as
    x @ q^T * s: the codes converted to x's dtype, the dequantized matrix never built."""
    return F.linear(x, q.to(x.dtype)).mul_(row_scales.to(x.dtype))


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized (``QuantWeight.linear``). Exact kernel: int8 symmetric
    per-channel weights multiply the int8 codes (converted to the activation dtype) and scale the
    output rows, x @ q^T * s, which is x @ (q * s)^T without building the dequantized matrix; other
    formats dequantize on the fly. Fast kernel: the packed CPU kernels (see the module docstring)."""

    kernel = "exact"  # one of KERNELS; set_kernel() switches a model

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig, name: str = "linear"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = QuantWeight((out_features, in_features), cfg, name)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @property
    def int8_fast(self) -> bool:
        """Whether the exact kernel takes the int8 per-row path (``QuantWeight.int8_rows``)."""
        return self.qweight.int8_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.linear(x, fast=self.kernel == "fast")
        return y.add_(self.bias.to(y.dtype)) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class QuantExperts(nn.Module):
    """Stacked quantized experts. ``w_gate_up`` / ``w_down`` dequantize on access (the exact path),
    so the MoE layer's ordinary expert kernels run unchanged. The decode step reads only the chosen
    experts, one at a time, through ``QuantWeight.linear`` (fast or exact, by ``kernel``)."""

    kernel = "exact"  # one of KERNELS

    def __init__(self, shape_gate_up, shape_down, cfg: QuantConfig, name: str = "experts"):
        super().__init__()
        self.gate_up_q = QuantWeight(shape_gate_up, cfg, f"{name}.w_gate_up")
        self.down_q = QuantWeight(shape_down, cfg, f"{name}.w_down")

    @property
    def w_gate_up(self) -> torch.Tensor:
        return self.gate_up_q.dequantize()

    @property
    def w_down(self) -> torch.Tensor:
        return self.down_q.dequantize()


def quant_modules(model: nn.Module) -> list[nn.Module]:
    """The quantized modules of ``model`` (those with a ``kernel``)."""
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts))]


def set_kernel(model: nn.Module, kernel: str) -> int:
    """Switch every quantized module of ``model`` to ``kernel`` (one of KERNELS), in place; returns
    how many weights the fast kernels will run (the others take the exact path)."""
    if kernel not in KERNELS:
        raise ConfigError(f"quantized kernel {kernel!r} is not one of {list(KERNELS)}")
    n = 0
    for m in quant_modules(model):
        m.kernel = kernel
        if kernel == "fast":
            weights = (m.qweight,) if isinstance(m, QuantLinear) else (m.gate_up_q, m.down_q)
            n += sum(w.fast_unsupported() is None for w in weights)
    return n


@contextmanager
def using_kernel(model: nn.Module, kernel: str):
    """``set_kernel`` for the duration of a ``with`` block, restoring each module's kernel after."""
    before = [(m, m.kernel) for m in quant_modules(model)]
    set_kernel(model, kernel)
    try:
        yield model
    finally:
        for m, k in before:
            m.kernel = k


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
