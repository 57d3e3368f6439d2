"""Training-time RMSNorm, RoPE and SwiGLU with hand-written backward passes, for the CPU.

Autograd through the plain formulas saves every intermediate and runs one kernel per elementwise
step, forwards and backwards; on a CPU, where each of those is a pass over memory, that is a large
share of a small model's step. These functions compute the same values with fewer passes and save
only what their backward needs:

* ``rms_norm``: saves x and one scale per row (not the normalised copy); the backward is the
  closed form dx = r * (g*w - xhat * mean(g*w * xhat)), dw = sum(g * xhat);
* ``rotary``: RoPE is a rotation, so its backward is the inverse rotation of the gradient; it
  saves nothing but cos/sin. rotate_half(x) * sin is written as swap_halves(x) * (sin with its
  first half negated), one multiply-add;
* ``swiglu``: silu(gate) * up of a fused [gate | up] projection, saving only that projection
  (silu is recomputed backwards) and writing its gradient as one buffer.

``Transformer`` uses them on the CPU when a gradient is wanted; elsewhere (CUDA, inference) it
uses the plain formulas. ``tests/test_fused_ops.py`` checks values and gradients against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def wants_fused(x: torch.Tensor, *params) -> bool:
    """Whether the hand-written backward is worth it: on the CPU, with a gradient wanted."""
    return x.device.type == "cpu" and torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in params))


# ----- RMSNorm --------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))  # [..., 1]
        y = (xf * r).to(x.dtype)
        ctx.save_for_backward(x, r, weight)
        return weight * y

    @staticmethod
    def backward(ctx, g):
        x, r, weight = ctx.saved_tensors
        xhat = x.float() * r
        gw = (g * weight).float()
        dx = None
        if ctx.needs_input_grad[0]:
            dot = (gw * xhat).mean(-1, keepdim=True)
            dx = gw.sub_(xhat * dot).mul_(r).to(x.dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * xhat.to(x.dtype)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back to x's dtype."""
    return _RMSNorm.apply(x, weight, eps)


# ----- RoPE -------------------------------------------------------------------------------------
def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin_signed):
        ctx.save_for_backward(cos, sin_signed)
        return torch.addcmul(x * cos, _swap_halves(x), sin_signed)

    @staticmethod
    def backward(ctx, g):
        cos, sin_signed = ctx.saved_tensors
        # the transpose of the rotation: swap_halves(g * sin_signed), and sin_signed's halves are
        # sin's halves with opposite signs, so it is -swap_halves(g) * sin_signed
        return torch.addcmul(g * cos, _swap_halves(g), sin_signed, value=-1.0), None, None


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with the first half of its last dimension negated: rotate_half(x) * sin ==
    swap_halves(x) * signed_sin(sin) when sin's two halves are equal (as RoPE's are)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half layout) over all of x's last dimension; cos/sin broadcast against x."""
    return _Rotary.apply(x, cos, sin_signed)


# ----- SwiGLU -----------------------------------------------------------------------------------
def swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dimension (the fused gate-up output)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def swiglu_backward(h: torch.Tensor, d_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient w.r.t. h = [gate | up] (one buffer, no assembly of two halves) and the
    recomputed activation silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    F_ = gate.shape[-1]
    silu = F.silu(gate)
    d_h = torch.empty_like(h)
    torch.mul(d_act, silu, out=d_h[..., F_:])
    # the fused kernel autograd uses for F.silu, so results match the plain formula bit for bit
    d_h[..., :F_] = torch.ops.aten.silu_backward(d_act * up, gate)
    return d_h, silu.mul_(up)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return swiglu_forward(h)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        return swiglu_backward(h, g)[0]


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up], saving only h for the backward pass."""
    return _SwiGLU.apply(h)
