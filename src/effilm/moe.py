"""Mixture-of-experts: router, auxiliary losses, experts (reference and fast paths), statistics.

Shapes are named by suffix: T tokens, D model width, E experts, K top-k, F expert width.
Expert weights are stacked 3-D tensors in nn.Linear layout: ``w_gate_up_E2FD`` is
[E, 2F, D] with the gate in the first half, ``w_down_EDF`` is [E, D, F].

The router always runs in fp32, whatever the model's dtype, so that low-precision runs pick the
same experts as fp32 ones. Only torch and the config are imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effilm.config.model import MoEConfig


@dataclass
class RoutingStats:
    """Sufficient statistics of one MoE layer's routing over a batch.

    They add up across micro-batches and ranks, so the auxiliary loss can be defined over the
    global batch: sum ``counts_E``, ``prob_sum_E`` and ``n_tokens`` first, then call
    :func:`load_balancing_loss`.
    """

    counts_E: torch.Tensor  # assignments routed to each expert (before capacity drops), no grad
    prob_sum_E: torch.Tensor  # sum over tokens of router probabilities (carries grad)
    z_sum: torch.Tensor  # sum over tokens of logsumexp(logits)^2 (carries grad)
    entropy_sum: torch.Tensor  # sum over tokens of the router entropy, no grad
    dropped: torch.Tensor  # assignments dropped by the capacity limit, no grad
    n_tokens: int
    top_k: int


def load_balancing_loss(
    counts_E: torch.Tensor, prob_sum_E: torch.Tensor, n_tokens: int, top_k: int, convention: str = "switch"
) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e * P_e.

    f_e is the fraction of assignments sent to expert e (``switch``: divided by T*K, so 1.0 at
    perfect balance) or of tokens (``hf``: divided by T, so K at perfect balance, matching
    transformers' load_balancing_loss_func). P_e is the mean router probability of e.
    """
    E = counts_E.shape[-1]
    denom = n_tokens * top_k if convention == "switch" else n_tokens
    f_E = counts_E.detach().float() / max(denom, 1)
    P_E = prob_sum_E.float() / max(n_tokens, 1)
    return E * (f_E * P_E).sum()


def z_loss(stats: RoutingStats) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return stats.z_sum / max(stats.n_tokens, 1)


# ----- routing ------------------------------------------------------------------------------
def route_softmax_topk(logits_TE: torch.Tensor, top_k: int, renormalize: bool):
    probs_TE = logits_TE.softmax(dim=-1)
    topk_w_TK, topk_ids_TK = probs_TE.topk(top_k, dim=-1)
    if renormalize:
        topk_w_TK = topk_w_TK / topk_w_TK.sum(dim=-1, keepdim=True)
    return topk_w_TK, topk_ids_TK, probs_TE


def _sparsemixer_pick(scores_TE: torch.Tensor, masked_TE: torch.Tensor, eps: float):
    """One sparsemixer step: keep experts whose relative logit gap to the best is within 2*eps."""
    with torch.no_grad():
        best_T1, ids_T1 = masked_TE.max(dim=-1, keepdim=True)
        factor_TE = scores_TE.abs().clamp(min=best_T1)
        too_far_TE = (best_T1 - scores_TE) / factor_TE > 2 * eps
    gates_TE = masked_TE.masked_fill(too_far_TE, float("-inf")).softmax(dim=-1)
    return gates_TE.gather(-1, ids_T1), ids_T1


def route_sparsemixer(logits_TE: torch.Tensor, eps: float):
    """PhiMoE's sparsemixer routing, inference path (deterministic top-2).

    The first expert is the arg-max; its weight is its softmax share among the experts whose
    logits lie within a relative gap of 2*eps of the best. The second expert is the arg-max once
    the first is masked out, weighted the same way. The weights are not renormalised. Training
    uses the same deterministic selection (PhiMoE's Gumbel sampling and Heun-step gradient
    estimator are not reproduced).
    """
    w1_T1, id1_T1 = _sparsemixer_pick(logits_TE, logits_TE, eps)
    masked_TE = logits_TE.scatter(-1, id1_T1, float("-inf"))
    w2_T1, id2_T1 = _sparsemixer_pick(logits_TE, masked_TE, eps)
    probs_TE = logits_TE.softmax(dim=-1)
    return torch.cat([w1_T1, w2_T1], -1), torch.cat([id1_T1, id2_T1], -1), probs_TE


def capacity_keep_mask(topk_ids_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit in each expert's capacity; top-1 choices take priority over top-2."""
    T, K = topk_ids_TK.shape
    ids_N = topk_ids_TK.t().reshape(-1)  # slot-major: every token's first choice, then second...
    order_N = torch.argsort(ids_N, stable=True)
    counts_E = torch.bincount(ids_N, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[ids_N[order_N]]
    rank_N = torch.empty_like(rank_sorted_N).scatter_(0, order_N, rank_sorted_N)
    return (rank_N < capacity).reshape(K, T).t()


# ----- experts ------------------------------------------------------------------------------
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def experts_reference(x_TD, topk_ids_TK, topk_w_TK, w_gate_up_E2FD, w_down_EDF, keep_TK=None):
    """Readable reference: for each expert, gather its tokens, run its SwiGLU MLP, add back weighted."""
    out_TD = torch.zeros_like(x_TD)
    E = w_gate_up_E2FD.shape[0]
    for e in range(E):
        hit_TK = topk_ids_TK == e
        if keep_TK is not None:
            hit_TK = hit_TK & keep_TK
        tok_N, slot_N = torch.nonzero(hit_TK, as_tuple=True)
        if tok_N.numel() == 0:
            continue
        gate_NF, up_NF = F.linear(x_TD[tok_N], w_gate_up_E2FD[e]).chunk(2, dim=-1)
        y_ND = F.linear(_swiglu(gate_NF, up_NF), w_down_EDF[e])
        out_TD.index_add_(0, tok_N, y_ND * topk_w_TK[tok_N, slot_N, None].to(y_ND.dtype))
    return out_TD


def grouped_expert_ffn(x_ND, counts_E, w_gate_up_E2FD, w_down_EDF, use_grouped_mm=False):
    """The expert kernel: rows of ``x_ND`` are sorted by expert, ``counts_E[e]`` rows for expert e.

    Returns each row's SwiGLU expert output (unweighted). Both the single-device fast path and the
    expert-parallel path (which runs it on the tokens received from other ranks) call this.
    """
    if use_grouped_mm:
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        h_N2F = F.grouped_mm(x_ND, w_gate_up_E2FD.transpose(-2, -1), offs=offs_E)
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        return F.grouped_mm(_swiglu(gate_NF, up_NF).contiguous(), w_down_EDF.transpose(-2, -1), offs=offs_E)
    outs = []
    gate_ups, downs = w_gate_up_E2FD.unbind(0), w_down_EDF.unbind(0)
    for e, x_nD in enumerate(x_ND.split(counts_E.tolist())):
        if x_nD.shape[0] == 0:
            continue
        gate_nF, up_nF = F.linear(x_nD, gate_ups[e]).chunk(2, dim=-1)
        outs.append(F.linear(_swiglu(gate_nF, up_nF), downs[e]))
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_down_EDF.shape[1])


def experts_sorted(x_TD, topk_ids_TK, topk_w_TK, w_gate_up_E2FD, w_down_EDF, keep_TK=None, use_grouped_mm=False):
    """Fast path: sort assignments by expert, run contiguous per-expert matmuls, scatter-add back.

    The stacked weights are split once with ``unbind`` (indexing ``w[e]`` in the loop would make
    autograd build a full-size gradient per expert). With ``use_grouped_mm`` the per-expert loop
    becomes one ``grouped_mm`` call with int32 offsets and no host sync.
    """
    T, K = topk_ids_TK.shape
    E = w_gate_up_E2FD.shape[0]
    ids_N = topk_ids_TK.reshape(-1)
    w_N = topk_w_TK.reshape(-1)
    tok_N = torch.arange(T * K, device=x_TD.device) // K
    if keep_TK is not None:
        sel_N = keep_TK.reshape(-1).nonzero().squeeze(1)
        ids_N, w_N, tok_N = ids_N[sel_N], w_N[sel_N], tok_N[sel_N]
    order_N = torch.argsort(ids_N, stable=True)
    tok_N = tok_N[order_N]
    w_N = w_N[order_N]
    counts_E = torch.bincount(ids_N, minlength=E)
    x_ND = x_TD.index_select(0, tok_N)
    y_ND = grouped_expert_ffn(x_ND, counts_E, w_gate_up_E2FD, w_down_EDF, use_grouped_mm)
    y_ND = y_ND * w_N[:, None].to(y_ND.dtype)
    return torch.zeros_like(x_TD).index_add_(0, tok_N, y_ND)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        E, F_ = cfg.num_experts, cfg.expert_ffn_dim
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * F_, d_model))
        self.w_down = nn.Parameter(torch.empty(E, d_model, F_))


class MoE(nn.Module):
    """Router + experts. ``forward(x)`` returns the expert mixture and the layer's RoutingStats."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.experts = Experts(d_model, cfg)
        self.impl = cfg.impl  # may be switched at run time (tests, benchmarks)
        # Set from outside (effilm.parallel) to replace the local expert computation, e.g. by an
        # expert-parallel all_to_all dispatch: called as fn(x_TD, topk_ids_TK, topk_w_TK, keep_TK).
        self.experts_fn = None

    def route(self, x_TD: torch.Tensor):
        # fp32 router: same expert choice whatever the activation dtype
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        if self.cfg.router == "sparsemixer":
            topk_w_TK, topk_ids_TK, probs_TE = route_sparsemixer(logits_TE, self.cfg.router_jitter_eps)
        else:
            topk_w_TK, topk_ids_TK, probs_TE = route_softmax_topk(logits_TE, self.cfg.top_k, self.cfg.renormalize)
        return logits_TE, probs_TE, topk_w_TK, topk_ids_TK

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        E, K = self.cfg.num_experts, self.cfg.top_k
        logits_TE, probs_TE, topk_w_TK, topk_ids_TK = self.route(x_TD)
        keep_TK = None
        if self.training and self.cfg.capacity_factor is not None:
            capacity = math.ceil(self.cfg.capacity_factor * T * K / E)
            keep_TK = capacity_keep_mask(topk_ids_TK, E, capacity)
        impl = self.impl
        if impl == "auto":
            impl = "grouped_mm" if x_TD.is_cuda else "sorted"
        w_gu, w_d = self.experts.w_gate_up, self.experts.w_down
        if self.experts_fn is not None:
            y_TD = self.experts_fn(x_TD, topk_ids_TK, topk_w_TK, keep_TK)
        elif impl == "reference":
            y_TD = experts_reference(x_TD, topk_ids_TK, topk_w_TK, w_gu, w_d, keep_TK)
        else:
            y_TD = experts_sorted(x_TD, topk_ids_TK, topk_w_TK, w_gu, w_d, keep_TK, impl == "grouped_mm")
        with torch.no_grad():
            counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=E).float()
            entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum()
            dropped = (~keep_TK).sum() if keep_TK is not None else torch.zeros((), dtype=torch.long)
        stats = RoutingStats(
            counts_E=counts_E,
            prob_sum_E=probs_TE.sum(0),
            z_sum=torch.logsumexp(logits_TE, dim=-1).pow(2).sum(),
            entropy_sum=entropy,
            dropped=dropped,
            n_tokens=T,
            top_k=K,
        )
        return y_TD.reshape(shape), stats
