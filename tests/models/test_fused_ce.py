"""effilm.models.fused_ce against the plain LM head + F.cross_entropy, and the trainer using it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effilm.config import ModelConfig
from effilm.models.fused_ce import default_chunk, linear_cross_entropy
from effilm.models.transformer import build_model


def _plain(h, w, b, t, ignore_index=-100):
    return F.cross_entropy(F.linear(h, w, b).float().reshape(-1, w.shape[0]), t.reshape(-1),
                           reduction="sum", ignore_index=ignore_index)


@pytest.mark.parametrize("bias, ignore, chunk", [(False, False, 7), (True, True, 5), (False, True, 64), (True, False, None)])
def test_loss_and_gradients_equal_the_plain_loss(bias, ignore, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, requires_grad=True)  # rows not a multiple of the chunk
    w = (torch.randn(40, 16, generator=g) * 0.3).requires_grad_()
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 40, (3, 11), generator=g)
    if ignore:
        t[0, :4] = -100
        t[2, 7] = -100
    grads = {}
    for name, fn in (("plain", lambda: _plain(h, w, b, t)), ("fused", lambda: linear_cross_entropy(h, w, b, t, chunk=chunk))):
        for p in (h, w, b):
            if p is not None:
                p.grad = None
        loss = fn()
        (loss * 0.37).backward()  # a scale on the way back: the stored gradients get multiplied by it
        grads[name] = (loss.detach(), h.grad.clone(), w.grad.clone(), None if b is None else b.grad.clone())
    for a, c in zip(grads["plain"], grads["fused"]):
        if a is not None:
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no-grad path: the loss alone
        torch.testing.assert_close(linear_cross_entropy(h, w, b, t, chunk=chunk), grads["plain"][0], rtol=1e-5, atol=1e-5)


def test_only_the_weight_needs_a_gradient():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 8, generator=g)
    w = torch.randn(12, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 12, (9,), generator=g)
    linear_cross_entropy(h, w, None, t, chunk=4).backward()
    w_fused, w.grad = w.grad.clone(), None
    _plain(h, w, None, t).backward()
    torch.testing.assert_close(w_fused, w.grad)


def test_bad_targets_shape():
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), None, torch.zeros(5, dtype=torch.long))


def test_chunk_size_keeps_a_chunk_of_logits_near_32_mib():
    assert default_chunk(4096) == 1024 and default_chunk(32064) == 261 and default_chunk(10**7) == 128


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_model_forward_with_targets_equals_logits_then_loss(name):
    cfg = ModelConfig.from_name(name)
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    inp, tgt = ids[:, :-1], ids[:, 1:]
    out = model(inp, targets=tgt)
    assert out.logits is None
    out.ce_sum.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = model(inp)
    ce = F.cross_entropy(ref.logits.float().reshape(-1, cfg.vocab_size), tgt.reshape(-1), reduction="sum")
    torch.testing.assert_close(out.ce_sum.detach(), ce.detach(), rtol=1e-5, atol=1e-4)
    ce.backward()
    assert fused.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(inp, targets=tgt[:, :-1])


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_logits_at_gives_the_selected_positions_logits_and_gradients(name):
    cfg = ModelConfig.from_name(name)
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(3))
    at = torch.rand(3, 12, generator=torch.Generator().manual_seed(4)) < 0.3
    out = model(ids, logits_at=at)
    assert out.logits.shape == (int(at.sum()), cfg.vocab_size)
    out.logits.float().logsumexp(-1).sum().backward()
    picked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    full = model(ids).logits
    torch.testing.assert_close(out.logits, full[at], rtol=1e-5, atol=1e-5)
    full[at].float().logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(picked[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    with pytest.raises(ValueError, match="logits_at must be a bool tensor"):
        model(ids, logits_at=at[:, :-1])
