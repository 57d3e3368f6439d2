"""effilm.models.fused_ops (hand-written backward passes) against autograd through the plain formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effilm.models.moe_kernels
import effilm.models.transformer
from effilm.config import ModelConfig
from effilm.models.fused_ops import rms_norm, rotary, signed_sin, swiglu, wants_fused
from effilm.models.transformer import build_model


def _grads(fn, *inputs):
    for t in inputs:
        t.grad = None
    y = fn()
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)  # a non-uniform upstream gradient
    y.backward(g)
    return y.detach(), [t.grad.clone() for t in inputs]


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_rms_norm():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, generator=gen)).requires_grad_()
    plain = _grads(lambda: w * F.rms_norm(x, (16,), eps=1e-5), x, w)
    _close(_grads(lambda: rms_norm(x, w, 1e-5), x, w), plain)


def test_rms_norm_bf16_input_keeps_the_plain_dtypes():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = rms_norm(x, w, 1e-6)
    ref = w * F.rms_norm(x.float(), (8,), eps=1e-6).to(torch.bfloat16)
    assert y.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_rotary_is_rope_and_its_backward_the_inverse_rotation():
    from effilm.models.transformer import apply_rotary

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 8, generator=gen, requires_grad=True)  # [B, H, T, hd]
    ang = torch.randn(2, 7, 4, generator=gen)
    cos, sin = torch.cat([ang, ang], -1).cos() * 1.3, torch.cat([ang, ang], -1).sin() * 1.3  # scaled, as LongRoPE
    with torch.no_grad():
        plain_y = apply_rotary(x, cos, sin)  # no gradient wanted: the plain formula
    plain = _grads(lambda: (lambda c, s: x * c + torch.cat([-x[..., 4:], x[..., :4]], -1) * s)(cos[:, None], sin[:, None]), x)
    torch.testing.assert_close(plain_y, plain[0])
    _close(_grads(lambda: rotary(x, cos[:, None], signed_sin(sin)[:, None]), x), plain)


def test_swiglu():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(3, 4, 10, generator=gen, requires_grad=True)
    plain = _grads(lambda: F.silu(h[..., :5]) * h[..., 5:], h)
    _close(_grads(lambda: swiglu(h), h), plain, tol=0)


def test_only_cpu_training_uses_them():
    x = torch.randn(2, 3, requires_grad=True)
    assert wants_fused(x)
    with torch.no_grad():
        assert not wants_fused(x)
    assert not wants_fused(x.detach()) and wants_fused(x.detach(), torch.ones(3, requires_grad=True))


@pytest.mark.parametrize("name, over", [
    ("tiny-dense", {}), ("tiny-moe", {}), ("tiny-arctic", {}), ("tiny-openelm", {}),
    ("tiny-dense", {"head_dim": 32, "rope_partial_factor": 0.5}),
])  # fmt: skip
def test_model_gradients_equal_the_plain_formulas(name, over, monkeypatch):
    """A whole training forward/backward with the fused ops and with them switched off."""
    cfg = ModelConfig.from_name(name, **over)
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids[:, :-1], targets=ids[:, 1:])
        loss = out.ce_sum + (out.moe_loss if out.moe_loss is not None else 0)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused = run()
    for mod in (effilm.models.transformer, effilm.models.moe_kernels):
        monkeypatch.setattr(mod, "wants_fused", lambda *a: False)
    plain = run()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == plain[1].keys()
    for n in plain[1]:
        scale = float(plain[1][n].abs().max()) + 1e-12
        torch.testing.assert_close(fused[1][n], plain[1][n], rtol=1e-4, atol=1e-5 * scale, msg=n)
