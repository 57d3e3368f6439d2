"""Expert parallelism: each rank holds E/N experts of every MoE layer; tokens travel to their
experts and back by ``all_to_all``, with backward.

Wraps the plain model from outside (DESIGN rule 1): :func:`apply_expert_parallel` replaces each
``MoE.experts`` parameter by this rank's slice and sets ``MoE.experts_fn`` to
:class:`ExpertParallelDispatch`. Routing, capacity masks, routing statistics and the auxiliary
losses stay computed locally by ``MoE.forward``; only the expert computation moves.

One forward of the dispatch, on each rank (L = E/N local experts):

1. sort the kept (token, slot) assignments by global expert id, so rows are grouped by
   destination rank (``id // L``) and, within it, by local expert;
2. exchange the per-(rank, local expert) counts with one ``all_to_all_single``;
3. ``all_to_all_single`` the token rows (an autograd Function: its backward is the reverse
   ``all_to_all``), reorder the received rows source-major -> expert-major and run
   :func:`effilm.models.moe.grouped_expert_ffn`, the same kernel as the single-device path;
4. reorder back, ``all_to_all`` the outputs home, weight them by the router weights and add them
   into their tokens.

Gradient semantics (documented in docs/ARCHITECTURE.md): the backward ``all_to_all`` brings every
rank's output gradient to the expert's owner, so an expert's gradient is the *sum* over every
rank's loss. Data-parallel training averages rank losses (FSDP divides gradients by N), so
:func:`apply_expert_parallel` registers a hook that divides the local expert gradients by the
data-parallel degree: the result equals one process's gradient on the global batch, with no
all-reduce over expert weights (they differ per rank).
"""

from __future__ import annotations

import torch
from torch import nn

from effilm.errors import ConfigError


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):
        import torch.distributed as dist

        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        import torch.distributed as dist

        grad_in = grad_out.new_empty((sum(ctx.in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Send ``in_splits[r]`` rows of ``x_ND`` to rank r; receive ``out_splits[r]`` rows from rank r."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


def _tie_to_graph(y: torch.Tensor, *srcs: torch.Tensor) -> torch.Tensor:
    """Keep ``y`` on the autograd graph of ``srcs`` (received rows, expert weights), even empty.

    With no tokens received, the kernel returns a fresh zero-row tensor. Without this tie the rank
    would skip the backward ``all_to_all`` that the other ranks call (a hang), and its expert
    weights would get no gradient at all, so the optimizer would skip them, while in one process
    the unused experts of a stacked weight get a zero gradient and still take an AdamW step.
    """
    if not torch.is_grad_enabled() or y.grad_fn is not None:
        return y
    tie = [s.sum() for s in srcs if s.requires_grad]
    return y + torch.stack(tie).sum().to(y.dtype) * 0 if tie else y


class ExpertParallelDispatch:
    """The ``experts_fn`` of one MoE layer under expert parallelism (see the module docstring)."""

    def __init__(self, moe: nn.Module, rank: int, world_size: int, group=None):
        self.moe, self.rank, self.world_size, self.group = moe, rank, world_size, group
        self.num_experts = moe.cfg.num_experts
        self.local_experts = self.num_experts // world_size

    def __call__(self, x_TD, topk_ids_TK, topk_w_TK, keep_TK=None):
        import torch.distributed as dist

        from effilm.models.moe import grouped_expert_ffn

        N, L = self.world_size, self.local_experts
        T, K = topk_ids_TK.shape
        ids_A = topk_ids_TK.reshape(-1)  # A: (token, slot) assignments
        w_A = topk_w_TK.reshape(-1)
        tok_A = torch.arange(T * K, device=x_TD.device) // K
        if keep_TK is not None:
            sel_A = keep_TK.reshape(-1).nonzero().squeeze(1)
            ids_A, w_A, tok_A = ids_A[sel_A], w_A[sel_A], tok_A[sel_A]
        order_A = torch.argsort(ids_A, stable=True)
        tok_A, w_A = tok_A[order_A], w_A[order_A]
        send_counts_NL = torch.bincount(ids_A, minlength=self.num_experts).view(N, L)
        recv_counts_NL = torch.empty_like(send_counts_NL)
        dist.all_to_all_single(recv_counts_NL.view(-1), send_counts_NL.view(-1).contiguous(), group=self.group)
        in_splits = send_counts_NL.sum(1).tolist()
        out_splits = recv_counts_NL.sum(1).tolist()

        x_recv = all_to_all(x_TD.index_select(0, tok_A), out_splits, in_splits, self.group)
        # received rows are source-major (src, local expert); the kernel wants expert-major
        seg_R = torch.arange(L, device=x_TD.device).repeat(N).repeat_interleave(recv_counts_NL.reshape(-1))
        perm_R = torch.argsort(seg_R, stable=True)
        impl = self.moe.impl
        use_gmm = impl == "grouped_mm" or (impl == "auto" and x_TD.is_cuda)
        # experts are outside FSDP's mixed precision: compute in the activations' dtype
        w_gu = self.moe.experts.w_gate_up.to(x_recv.dtype)
        w_d = self.moe.experts.w_down.to(x_recv.dtype)
        y_R = grouped_expert_ffn(x_recv.index_select(0, perm_R), recv_counts_NL.sum(0), w_gu, w_d, use_gmm)
        y_R = _tie_to_graph(y_R, x_recv, w_gu, w_d)
        y_recv = y_R.index_select(0, torch.argsort(perm_R))
        y_A = all_to_all(y_recv, in_splits, out_splits, self.group)
        y_A = y_A * w_A[:, None].to(y_A.dtype)
        return torch.zeros_like(x_TD).index_add_(0, tok_A, y_A)


def moe_layers(model: nn.Module):
    """(name, MoE module) for every MoE layer of ``model``."""
    from effilm.models.moe import MoE

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def expert_slice(num_experts: int, rank: int, world_size: int) -> slice:
    """The global expert ids [lo, hi) that ``rank`` holds."""
    if num_experts % world_size:
        raise ConfigError(
            f"moe.num_experts={num_experts} is not divisible by the expert-parallel degree (world size "
            f"{world_size}): each rank must hold the same number of experts"
        )
    per = num_experts // world_size
    return slice(rank * per, (rank + 1) * per)


def is_expert_param(name: str) -> bool:
    """Whether a parameter name (``model.named_parameters``) is a stacked expert weight."""
    return ".experts.w_" in name or name.startswith("experts.w_")


def apply_expert_parallel(model: nn.Module, dist) -> nn.Module:
    """Keep this rank's E/N experts of every MoE layer and route tokens by ``all_to_all``.

    ``dist`` is an :class:`effilm.train.parallel.Dist`; the expert-parallel degree is its world size.
    Call it on a model holding the full (single-device) weights, before :func:`apply_fsdp` and
    before building the optimizer. A no-op in a single process.
    """
    if dist.world_size == 1:
        return model
    for _, moe in moe_layers(model):
        if getattr(moe, "expert_parallel", None) is not None:
            raise ConfigError("apply_expert_parallel was already applied to this model")
        sl = expert_slice(moe.cfg.num_experts, dist.rank, dist.world_size)
        ex = moe.experts
        for pname in ("w_gate_up", "w_down"):
            full = getattr(ex, pname)
            local = nn.Parameter(full.detach()[sl].clone(), requires_grad=full.requires_grad)
            # rank losses are averaged by data parallelism, expert grads arrive summed: undo the sum
            local.register_hook(lambda g, n=dist.world_size: g / n)
            setattr(ex, pname, local)
        moe.expert_parallel = sl  # marks the layer, and records which experts it holds
        moe.experts_fn = ExpertParallelDispatch(moe, dist.rank, dist.world_size, dist.group)
    return model
