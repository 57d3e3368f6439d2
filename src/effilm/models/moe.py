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
from effilm.models.moe_kernels import expert_offsets, experts_sorted, grouped_expert_ffn, prefers_grouped_mm

__all__ = ["experts_reference", "experts_sorted", "grouped_expert_ffn", "MoE", "RoutingStats"]


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


def moe_losses(stats_list: list[RoutingStats], cfg: MoEConfig):
    """(aux_loss, z_loss, moe_loss) over MoE layers: the means over layers of each layer's
    load-balancing and z-loss, and ``moe_loss = aux_loss_coef * aux + z_loss_coef * z`` (the aux
    term only under ``balance='aux_loss'``)."""
    aux = torch.stack(
        [load_balancing_loss(s.counts_E, s.prob_sum_E, s.n_tokens, s.top_k, cfg.aux_loss_convention) for s in stats_list]
    ).mean()
    z = torch.stack([z_loss(s) for s in stats_list]).mean()
    return aux, z, cfg.trained_aux_coef * aux + cfg.z_loss_coef * z


# ----- routing ------------------------------------------------------------------------------
def route_softmax_topk(logits_TE: torch.Tensor, top_k: int, renormalize: bool, bias_E: torch.Tensor | None = None):
    """Softmax scores, the top-k experts and their weights. ``bias_E`` (a selection bias) is added to
    the scores only to choose the experts; the weights are the unbiased scores."""
    probs_TE = logits_TE.softmax(dim=-1)
    if bias_E is None:
        topk_w_TK, topk_ids_TK = probs_TE.topk(top_k, dim=-1)
    else:
        topk_ids_TK = (probs_TE.detach() + bias_E.float()).topk(top_k, dim=-1).indices
        topk_w_TK = probs_TE.gather(-1, topk_ids_TK)
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
    sorted_ids_N, order_N = torch.sort(ids_N, stable=True)
    ends_E = expert_offsets(sorted_ids_N, num_experts)  # no host sync, unlike bincount on CUDA
    starts_E = torch.cat([ends_E.new_zeros(1), ends_E[:-1]])
    rank_sorted_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[sorted_ids_N]
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
        if cfg.has_selection_bias:  # a buffer: saved and restored with the weights, never trained by the optimizer
            self.register_buffer("router_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.experts = Experts(d_model, cfg)
        self.impl = cfg.impl  # may be switched at run time (tests, benchmarks)
        # Set from outside (effilm.train.parallel) to replace the local expert computation, e.g. by an
        # expert-parallel all_to_all dispatch: called as fn(x_TD, topk_ids_TK, topk_w_TK, keep_TK).
        self.experts_fn = None

    def route(self, x_TD: torch.Tensor):
        # fp32 router: the same expert choice whatever the activation dtype, also under bf16
        # autocast (which would otherwise run this matmul in bf16 and pick other experts)
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        if self.cfg.router == "sparsemixer":
            topk_w_TK, topk_ids_TK, probs_TE = route_sparsemixer(logits_TE, self.cfg.router_jitter_eps)
        else:
            bias_E = getattr(self, "router_bias", None)
            topk_w_TK, topk_ids_TK, probs_TE = route_softmax_topk(logits_TE, self.cfg.top_k, self.cfg.renormalize, bias_E)
        return logits_TE, probs_TE, topk_w_TK, topk_ids_TK

    def mix(self, x_TD, topk_ids_TK, topk_w_TK, keep_TK=None) -> torch.Tensor:
        """The weighted expert outputs for routed tokens, by ``experts_fn`` or the ``impl`` kernel."""
        if self.experts_fn is not None:
            return self.experts_fn(x_TD, topk_ids_TK, topk_w_TK, keep_TK)
        impl = self.impl
        if impl == "auto":
            impl = "grouped_mm" if prefers_grouped_mm(x_TD) else "sorted"
        w_gu, w_d = self.experts.w_gate_up, self.experts.w_down
        if impl == "reference":
            return experts_reference(x_TD, topk_ids_TK, topk_w_TK, w_gu, w_d, keep_TK)
        return experts_sorted(x_TD, topk_ids_TK, topk_w_TK, w_gu, w_d, keep_TK, impl == "grouped_mm")

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
        y_TD = self.mix(x_TD, topk_ids_TK, topk_w_TK, keep_TK)
        with torch.no_grad():
            ids_N = topk_ids_TK.reshape(-1)  # scatter_add, not bincount: no host sync on CUDA
            counts_E = torch.zeros(E, device=ids_N.device).scatter_add_(0, ids_N, torch.ones_like(ids_N, dtype=torch.float))
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


# ----- loss-free balancing ----------------------------------------------------------------------
@torch.no_grad()
def update_selection_biases(model: nn.Module, counts_LE: torch.Tensor, rate: float) -> None:
    """Loss-free balancing's step: each MoE layer's selection bias moves by
    ``rate * sign(mean load - load)``, from the global batch's routing counts ``counts_LE`` (one row
    per MoE layer, in layer order, summed over micro-batches and ranks, so every rank moves alike)."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if len(layers) != counts_LE.shape[0]:
        raise ValueError(f"{counts_LE.shape[0]} rows of routing counts for {len(layers)} MoE layers")
    for moe, counts_E in zip(layers, counts_LE, strict=True):
        bias_E = moe.router_bias
        c = counts_E.to(device=bias_E.device, dtype=torch.float32)
        bias_E.add_(torch.sign(c.mean() - c), alpha=rate)


def balance_summary(counts_LE: torch.Tensor) -> dict:
    """Per MoE layer: the busiest expert's load over the mean load (1.0 = balanced) and the fraction
    of experts below a quarter of the balanced share."""
    c = counts_LE.float()
    mean_L1 = c.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return {
        "load_max_over_mean": [round(float(v), 4) for v in (c.max(dim=1).values / mean_L1[:, 0])],
        "starved_frac": [round(float(v), 4) for v in (c < 0.25 * mean_L1).float().mean(dim=1)],
    }


# The selection bias upcycling uses to order exactly tied router scores (effilm.models.upcycle): no
# larger than this, a bias changes the choice only where two experts' scores lie within it.
TIE_BREAK = 1e-6


def routing_bias_layers(model: nn.Module) -> list[int]:
    """Indices (among the MoE layers) of the layers whose selection bias steers routing beyond tie
    breaking (any entry larger than ``TIE_BREAK``): formats with no place for the bias (HF
    Mixtral/PhiMoE/Arctic, GGUF) would route them differently."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    return [i for i, m in enumerate(layers) if hasattr(m, "router_bias") and float(m.router_bias.abs().max()) > TIE_BREAK]

