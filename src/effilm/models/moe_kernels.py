"""Fast expert kernels: dispatch, the per-expert SwiGLU FFN, and combine, each with its own backward.

Layout: the T*K assignments (token t, slot k) are sorted by expert, so the rows of ``x_ND`` that
belong to expert e are contiguous. Two index tensors describe the permutation:

- ``order_N``: for each sorted row, the flat assignment index t*K+k it came from
  (its token is ``order_N // K``);
- ``slot_TK``: the inverse, the sorted row of each assignment.

Dropped assignments (capacity factor) sort after every kept one and are masked by ``keep_TK``.

Why custom autograd functions: autograd's backward of a row gather (``index_select``) is a
scatter-add into T rows, and of ``index_add_`` a gather; both are slow on CPU and the scatter is
non-deterministic on CUDA. Here every backward is a *gather*: the combine's backward gathers the
output gradient by token, the dispatch's backward gathers the row gradients by ``slot_TK`` and
sums the K slots of each token. The FFN saves only its input rows and the pre-activation
``h = x @ W_gate_up^T``; the SwiGLU is recomputed in backward, gate and up stay fused in one
matmul, and per-expert matmuls write into preallocated buffers (``torch.mm(out=)``).

On CUDA the FFN uses ``grouped_mm`` with int32 offsets, and nothing in this module reads a device
value on the host (no ``.tolist()``, ``.item()``, ``nonzero`` or ``bincount`` on that path).
Only torch is imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effilm.models.fused_ops import swiglu, swiglu_backward, swiglu_forward, wants_fused


def expert_offsets(sorted_ids_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """End offset (exclusive) of each expert's rows in ids sorted ascending; ids >= E are ignored.

    A ``searchsorted`` over the sorted ids: no host sync on CUDA, unlike ``bincount``.
    """
    bounds_E = torch.arange(num_experts, device=sorted_ids_N.device, dtype=sorted_ids_N.dtype)
    return torch.searchsorted(sorted_ids_N, bounds_E, right=True)


def sort_assignments(topk_ids_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None):
    """Sort the T*K assignments by expert. Returns ``order_N``, ``slot_TK``, ``counts_E``.

    Dropped assignments (``keep_TK`` false) get the sentinel id E, so they sort last and are not
    counted. The sort is stable, so within an expert rows keep token order (deterministic).
    """
    T, K = topk_ids_TK.shape
    ids_N = topk_ids_TK.reshape(-1)
    if keep_TK is not None:
        ids_N = ids_N.masked_fill(~keep_TK.reshape(-1), num_experts)
    sorted_ids_N, order_N = torch.sort(ids_N, stable=True)
    ends_E = expert_offsets(sorted_ids_N, num_experts)
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    arange_N = torch.arange(T * K, device=ids_N.device, dtype=order_N.dtype)
    slot_N = torch.empty_like(order_N).scatter_(0, order_N, arange_N)
    return order_N, slot_N.view(T, K), counts_E


def _gather_sum(rows_ND: torch.Tensor, slot_TK: torch.Tensor, w_TK: torch.Tensor | None,
                keep_TK: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * rows[slot[t,k]], skipping dropped slots. A gather, never a scatter."""
    T, K = slot_TK.shape
    D = rows_ND.shape[-1]
    g_TKD = rows_ND.index_select(0, slot_TK.reshape(-1)).view(T, K, D)
    if keep_TK is not None:  # dropped rows may hold garbage (grouped_mm leaves them unwritten)
        g_TKD = g_TKD.masked_fill(~keep_TK[..., None], 0)
    if w_TK is not None:
        g_TKD = g_TKD * w_TK[..., None].to(g_TKD.dtype)
    return g_TKD[:, 0] if K == 1 else g_TKD.sum(1)


class _Dispatch(torch.autograd.Function):
    """x_ND = x_TD[order_N // K]; backward: grad_x[t] = sum_k grad_ND[slot[t,k]] (a gather)."""

    @staticmethod
    def forward(ctx, x_TD, order_N, slot_TK, keep_TK):
        ctx.save_for_backward(slot_TK, keep_TK)
        return x_TD.index_select(0, torch.div(order_N, slot_TK.shape[1], rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_ND):
        slot_TK, keep_TK = ctx.saved_tensors
        return _gather_sum(grad_ND, slot_TK, None, keep_TK), None, None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum_k w[t,k] * y[slot[t,k]] over kept slots.

    Backward: the row gradient is the token's output gradient (gathered) times its weight, and the
    weight gradient is that gathered gradient dotted with the row.
    """

    @staticmethod
    def forward(ctx, y_ND, w_TK, order_N, slot_TK, keep_TK):
        ctx.save_for_backward(y_ND, w_TK, order_N, slot_TK, keep_TK)
        return _gather_sum(y_ND, slot_TK, w_TK, keep_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, w_TK, order_N, slot_TK, keep_TK = ctx.saved_tensors
        K = slot_TK.shape[1]
        grad_TD = grad_TD.contiguous()
        g_ND = grad_TD.index_select(0, torch.div(order_N, K, rounding_mode="floor"))
        grad_w_TK = None
        if ctx.needs_input_grad[1]:
            dot_N = torch.linalg.vecdot(g_ND.float(), y_ND.float())
            grad_w_TK = dot_N.index_select(0, slot_TK.reshape(-1)).view_as(w_TK)
            if keep_TK is not None:
                grad_w_TK = grad_w_TK.masked_fill(~keep_TK, 0)
            grad_w_TK = grad_w_TK.to(w_TK.dtype)
        w_N = w_TK.reshape(-1).index_select(0, order_N)
        if keep_TK is not None:
            w_N = w_N.masked_fill(~keep_TK.reshape(-1).index_select(0, order_N), 0)
        g_ND.mul_(w_N[:, None].to(g_ND.dtype))
        return g_ND, grad_w_TK, None, None, None


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class _LoopFFN(torch.autograd.Function):
    """Per-expert SwiGLU over contiguous row blocks, with preallocated outputs (CPU path).

    Rows past ``sum(counts)`` (dropped assignments) come out as zeros.
    """

    @staticmethod
    def forward(ctx, x_ND, w_gate_up_E2FD, w_down_EDF, counts):
        N, D = x_ND.shape
        two_f = w_gate_up_E2FD.shape[1]
        h_N2F = x_ND.new_empty(N, two_f)
        y_ND = x_ND.new_empty(N, D)
        for e, a, b in _segments(counts):
            torch.mm(x_ND[a:b], w_gate_up_E2FD[e].t(), out=h_N2F[a:b])
        n_kept = sum(counts)
        h_N2F[n_kept:].zero_()
        act_NF = swiglu_forward(h_N2F)
        for e, a, b in _segments(counts):
            torch.mm(act_NF[a:b], w_down_EDF[e].t(), out=y_ND[a:b])
        y_ND[n_kept:].zero_()
        ctx.save_for_backward(x_ND, h_N2F, w_gate_up_E2FD, w_down_EDF)
        ctx.counts = counts
        return y_ND

    @staticmethod
    def backward(ctx, grad_y_ND):
        x_ND, h_N2F, w_gu, w_d = ctx.saved_tensors
        counts = ctx.counts
        grad_y_ND = grad_y_ND.contiguous()
        N, F_ = h_N2F.shape[0], h_N2F.shape[1] // 2
        need_x, need_gu, need_d = ctx.needs_input_grad[:3]
        n_kept = sum(counts)
        d_act_NF = grad_y_ND.new_empty(N, F_)
        d_act_NF[n_kept:].zero_()
        for e, a, b in _segments(counts):
            torch.mm(grad_y_ND[a:b], w_d[e], out=d_act_NF[a:b])
        d_h_N2F, act_NF = swiglu_backward(h_N2F, d_act_NF)
        grad_d = grad_gu = grad_x = None
        if need_d:
            grad_d = _per_expert_outer(w_d, counts, grad_y_ND, act_NF)
        if need_gu:
            grad_gu = _per_expert_outer(w_gu, counts, d_h_N2F, x_ND)
        if need_x:
            grad_x = x_ND.new_empty(x_ND.shape)
            grad_x[n_kept:].zero_()
            for e, a, b in _segments(counts):
                torch.mm(d_h_N2F[a:b], w_gu[e], out=grad_x[a:b])
        return grad_x, grad_gu, grad_d, None


def _per_expert_outer(w_EAB, counts, left_NA, right_NB):
    """grad[e] = left[rows of e]^T @ right[rows of e]; experts with no rows get zeros."""
    grad = torch.empty_like(w_EAB)
    hit = set()
    for e, a, b in _segments(counts):
        torch.mm(left_NA[a:b].t(), right_NB[a:b], out=grad[e])
        hit.add(e)
    for e in range(w_EAB.shape[0]):
        if e not in hit:
            grad[e].zero_()
    return grad


def prefers_grouped_mm(x: torch.Tensor) -> bool:
    """The kernel ``impl='auto'`` picks: grouped_mm on CUDA, and on CPU in fp32 where torch has it
    (bench_moe, T=8192 E=8, CPU time: FFN fwd+bwd 1184 ms with grouped_mm, 1301 ms with the loop);
    the loop otherwise (CPU grouped_mm in bf16 is slow)."""
    if x.is_cuda:
        return True
    # torch.compile cannot trace the CPU fp32 grouped_mm (its meta function wants bf16)
    return x.dtype == torch.float32 and hasattr(F, "grouped_mm") and not torch.compiler.is_compiling()


def grouped_expert_ffn(x_ND, counts_E, w_gate_up_E2FD, w_down_EDF, use_grouped_mm=False):
    """The expert kernel: rows of ``x_ND`` are sorted by expert, ``counts_E[e]`` rows for expert e.

    Returns each row's SwiGLU expert output (unweighted), differentiable in ``x_ND`` and both
    weights. Rows past ``counts_E.sum()`` are not computed: zeros on the loop path, unspecified
    with grouped_mm (mask them). Both the single-device fast path and the expert-parallel path
    (on the tokens received from other ranks) call this.

    ``use_grouped_mm``: one ``grouped_mm`` per projection with int32 offsets and no host sync (the
    CUDA path; autograd through torch's own derivative). Otherwise a loop over contiguous
    per-expert blocks with a hand-written backward (the CPU path: measured faster there).
    """
    if use_grouped_mm:
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h_N2F = F.grouped_mm(x_ND.contiguous(), w_gate_up_E2FD.transpose(-2, -1), offs=offs_E)
        act_NF = (swiglu(h_N2F) if wants_fused(h_N2F) else swiglu_forward(h_N2F)).contiguous()
        return F.grouped_mm(act_NF, w_down_EDF.transpose(-2, -1), offs=offs_E)
    return _LoopFFN.apply(x_ND.contiguous(), w_gate_up_E2FD, w_down_EDF, counts_E.tolist())


def experts_sorted(x_TD, topk_ids_TK, topk_w_TK, w_gate_up_E2FD, w_down_EDF, keep_TK=None, use_grouped_mm=False):
    """Fast path: sort assignments by expert, run the grouped expert kernel, combine by gathering.

    Dispatch, FFN and combine each have a custom backward made of gathers (see the module doc).
    With ``use_grouped_mm`` no step reads a device value on the host.
    """
    E = w_gate_up_E2FD.shape[0]
    order_N, slot_TK, counts_E = sort_assignments(topk_ids_TK, E, keep_TK)
    x_ND = _Dispatch.apply(x_TD, order_N, slot_TK, keep_TK)
    y_ND = grouped_expert_ffn(x_ND, counts_E, w_gate_up_E2FD, w_down_EDF, use_grouped_mm)
    return _Combine.apply(y_ND, topk_w_TK, order_N, slot_TK, keep_TK)
