"""The LM head and the cross-entropy loss in one pass over row chunks, never holding all the logits.

A training step's plain loss computes ``logits = h @ W^T`` for every token ([N, V], 32 MiB for
2048 tokens of a 4096 vocabulary, 0.5 GiB for one 4096-token sequence of Phi-3's 32064), then a
log-softmax over it, then the same again backwards. ``linear_cross_entropy`` instead walks the rows
in chunks: for each chunk it computes the logits, their log-sum-exp and the loss, and, when a
gradient is wanted, turns the logits in place into softmax - one-hot and immediately multiplies
that into the gradients of ``h`` and ``W`` (and the bias). The backward pass only scales those by
the incoming gradient, which is exact because the loss is a scalar.

Same matmuls as the plain loss (logits, dh, dW), fewer passes over [N, V] memory, and a chunk of
logits that stays in cache. Memory: one [chunk, V] buffer instead of three [N, V] tensors, plus
dh and dW held from the forward to the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk: a chunk of logits of about 32 MiB (fp32), between 128 and 1024 rows. Smaller
    chunks make the dW accumulation (one rank-`chunk` update of [V, D] each) less efficient."""
    return max(128, min(1024, (1 << 23) // max(1, vocab_size)))


def _chunk_loss(z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor | None, want_grad: bool):
    """Summed CE of logits ``z`` [n, V] (fp32, overwritten by softmax - one-hot when ``want_grad``)."""
    m = z.amax(dim=-1, keepdim=True)
    zt = z.gather(1, t[:, None])  # the targets' logits, read before z is overwritten
    if want_grad:
        e = z.sub_(m).exp_()
    else:
        e = (z - m).exp_()
    s = e.sum(dim=-1, keepdim=True)
    lse = m + s.log()
    per_row = (lse - zt)[:, 0]
    if valid is not None:
        per_row = per_row * valid
    if want_grad:
        e.div_(s)
        e.scatter_add_(1, t[:, None], (-valid[:, None]) if valid is not None else torch.full_like(zt, -1.0))
        if valid is not None:
            e.mul_(valid[:, None])
    return per_row.sum()


def _chunks(h, weight, bias, targets, ignore_index, chunk):
    """Per chunk of rows: (start, hidden rows, fp32 logits, targets with ignored ones set to 0,
    the valid-row mask as floats or None)."""
    w = weight.to(h.dtype)
    b = bias.to(h.dtype) if bias is not None else None
    for s in range(0, h.shape[0], chunk):
        hc, tc = h[s:s + chunk], targets[s:s + chunk]
        valid = None
        if ignore_index is not None:
            keep = tc != ignore_index
            valid, tc = keep.float(), tc.masked_fill(~keep, 0)
        yield s, hc, F.linear(hc, w, b).float(), tc, valid


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int, chunk: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s, hc, z, tc, valid in _chunks(h, weight, bias, targets, ignore_index, chunk):
            total += _chunk_loss(z, tc, valid, True)
            g = z.to(h.dtype)
            if need_h:
                torch.mm(g, w, out=grad_h[s:s + chunk])
            if need_w:
                grad_w.addmm_(g.t().float(), hc.float())  # no copies when h is fp32
            if need_b:
                grad_b += z.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         ignore_index: int | None = -100, chunk: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")`` without
    materialising the logits. ``h`` [..., D], ``targets`` [...] (int); rows whose target is
    ``ignore_index`` count for nothing. Returns the fp32 sum over rows."""
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} rows of hidden states but {t.shape[0]} targets")
    t = t.long()
    chunk = chunk or default_chunk(weight.shape[0])
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))
    if grads:
        return _LinearCrossEntropy.apply(h2, weight, bias, t, ignore_index, chunk)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for _, _, z, tc, valid in _chunks(h2, weight, bias, t, ignore_index, chunk):
        total += _chunk_loss(z, tc, valid, False)
    return total
