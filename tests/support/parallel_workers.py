"""Worker functions for tests/test_parallel.py, run in 2 processes (gloo, CPU) by torch
multiprocessing spawn. Each worker computes the single-process reference itself (it needs no
collectives), runs the distributed version, and rank 0 writes the max differences as JSON.
"""

from __future__ import annotations

import json
import os

import torch

from effilm.config import ModelConfig
from effilm.models.moe import MoE, experts_sorted
from effilm.train.parallel import (
    all_reduce_routing_stats,
    apply_expert_parallel,
    apply_fsdp,
    clip_grad_norm_,
    full_optim_state_dict,
    full_state_dict,
    init_distributed,
    load_full_optim_state_dict,
    load_full_state_dict,
    moe_losses,
)


def setup(rank: int, world: int, port: int):
    """Set the torchrun environment for this process and join through init_distributed."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    return init_distributed()


def _maxdiff(a, b) -> float:
    """Max absolute difference relative to the reference's max magnitude."""
    if not b.numel():
        return 0.0
    b = b.detach().double()
    return float((a.detach().double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _grad(p):
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _layer_case(dist, moe_cfg, d_model: int, T: int, skew: bool, seed: int) -> dict:
    """One MoE layer: single process on all T tokens vs expert parallel on this rank's T/N."""
    torch.manual_seed(seed)
    ref = MoE(d_model, moe_cfg)
    with torch.no_grad():
        ref.router.weight.normal_(0, 0.5)
        ref.experts.w_gate_up.normal_(0, 0.1)
        ref.experts.w_down.normal_(0, 0.1)
    x_all = torch.randn(T, d_model)
    g_all = torch.randn(T, d_model)
    if skew:  # every token prefers experts 0 and 1 (all on rank 0); the other ranks' experts get none
        common = torch.randn(d_model)
        x_all = x_all * 0.1 + common
        with torch.no_grad():
            ref.router.weight.mul_(0.01)
            ref.router.weight[0] += 2 * common / common.norm() ** 2 * 5
            ref.router.weight[1] += 2 * common / common.norm() ** 2 * 4
    ref.train()
    xr = x_all.clone().requires_grad_(True)
    y_ref, stats_ref = ref(xr)
    (y_ref * g_all).sum().backward()

    ep = MoE(d_model, moe_cfg)
    ep.load_state_dict(ref.state_dict())
    ep.train()
    apply_expert_parallel(ep, dist)
    n = T // dist.world_size
    rows = slice(dist.rank * n, (dist.rank + 1) * n)
    xl = x_all[rows].clone().requires_grad_(True)
    y_ep, _ = ep(xl)
    (y_ep * g_all[rows]).sum().backward()

    sl = ep.expert_parallel
    N = dist.world_size  # expert grads are divided by N (data-parallel averaging semantics)
    diffs = {
        "out": _maxdiff(y_ep, y_ref[rows]),
        "x_grad": _maxdiff(xl.grad, xr.grad[rows]),
        "router_grad": _maxdiff(dist.all_reduce_sum(ep.router.weight.grad), ref.router.weight.grad),
        "w_gate_up_grad": _maxdiff(N * _grad(ep.experts.w_gate_up), _grad(ref.experts.w_gate_up)[sl]),
        "w_down_grad": _maxdiff(N * _grad(ep.experts.w_down), _grad(ref.experts.w_down)[sl]),
    }
    counts = stats_ref.counts_E
    diffs["min_expert_count"] = float(counts.min())
    diffs["rank_min_count"] = float(counts.view(N, -1).sum(1).min())
    # capacity mask: the dispatch function with a random keep mask vs the sorted path
    ids = torch.randint(0, moe_cfg.num_experts, (n, moe_cfg.top_k))
    w = torch.rand(n, moe_cfg.top_k)
    keep = torch.rand(n, moe_cfg.top_k) > 0.3
    xk = x_all[rows]
    want = experts_sorted(xk, ids, w, ref.experts.w_gate_up, ref.experts.w_down, keep)
    diffs["keep_out"] = _maxdiff(ep.experts_fn(xk, ids, w, keep), want)
    return diffs


def ep_layer_worker(rank: int, world: int, port: int, out_path: str) -> None:
    dist = setup(rank, world, port)
    results = {}
    try:
        for preset in ("tiny-moe", "tiny-arctic"):
            cfg = ModelConfig.from_name(preset)
            for skew in (False, True):
                d = _layer_case(dist, cfg.moe, cfg.d_model, T=64, skew=skew, seed=1 + skew)
                for k, v in d.items():
                    key = f"{preset}/{'skewed' if skew else 'random'}/{k}"
                    results[key] = dist.all_reduce_float(v, "max") if not k.endswith("count") else v
        if dist.is_main:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy()


# ----- training --------------------------------------------------------------------------------
def _config(preset: str) -> ModelConfig:
    cfg = ModelConfig.from_name(preset, n_layers=2)
    if cfg.moe is not None:
        cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef = 0.01, 0.001  # make the router losses matter
    return cfg


def _batches(cfg, n: int, B: int, T: int):
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(n)]


def _loss(model, batch, dist=None):
    """(training loss, global loss value, aux loss value): CE mean over the (local) batch plus the
    MoE losses from routing stats (global ones under dist)."""
    import torch.nn.functional as F

    out = model(batch[:, :-1])
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
    report = dist.all_reduce_mean(ce) if dist is not None else ce.detach()
    if not out.routing:
        return ce, report, 0.0
    stats = all_reduce_routing_stats(out.routing, dist) if dist is not None else out.routing
    aux, _, moe_loss = moe_losses(stats, model.cfg.moe)
    return ce + moe_loss, report + moe_loss.detach(), float(aux)


def _grad_diffs(model, ref_grads: dict, dist) -> dict:
    """Per parameter: the wrapped model's full gradient vs the reference's (rank 0; a collective)."""
    from effilm.train.parallel import _ep_keys, _gather_full

    ep = _ep_keys(model)
    out = {}
    for name, p in model.named_parameters():
        g = _gather_full(p.grad, name in ep, dist)
        out[name] = _maxdiff(g, ref_grads[name])
    return out


CLIP = 1.0  # gradient clipping threshold: the first steps' norms exceed it, so clipping acts


def _optimizer(model):
    # eps well above float noise: an expert whose gradient is ~0 in both runs must not be pushed to +-lr
    # by rounding differences in the sign of that ~0 (Adam divides by sqrt(v) + eps)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-6)


def train_worker(rank: int, world: int, port: int, out_path: str, preset: str, ep: bool, steps: int) -> None:
    from effilm.formats.checkpoint import model_state
    from effilm.models.transformer import build_model
    from effilm.train.parallel import Dist

    dist = setup(rank, world, port)
    try:
        cfg = _config(preset)
        batches = _batches(cfg, 2, B=4, T=16)
        train_batch, probe_batch = batches  # the same batch every step, so the loss must fall
        # one process, full batch
        ref = build_model(cfg, seed=0)
        ref_opt = _optimizer(ref)
        ref_losses = []
        ref_norms, norms, ref_aux, auxes = [], [], [], []
        for b in [train_batch] * steps:
            loss, rep, aux = _loss(ref, b)
            ref_aux.append(aux)
            ref_opt.zero_grad()
            loss.backward()
            if not ref_norms:
                ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
            # the norm in float64: torch's fp32 total norm is itself off by ~4e-5 relative here
            ref_norms.append(float(sum(p.grad.double().pow(2).sum() for p in ref.parameters()).sqrt()))
            torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
            ref_opt.step()
            ref_losses.append(float(rep))
        # two processes, half the batch each
        model = build_model(cfg, seed=0)
        if ep:
            apply_expert_parallel(model, dist)
        apply_fsdp(model, dist)
        opt = _optimizer(model)
        n = batches[0].shape[0] // world
        rows = slice(rank * n, (rank + 1) * n)
        losses = []
        for b in [train_batch] * steps:
            loss, rep, aux = _loss(model, b[rows], dist)
            auxes.append(aux)
            opt.zero_grad()
            loss.backward()
            if not norms:  # first step, identical weights: every gradient equals the reference's
                grad_diffs = _grad_diffs(model, ref_grads, dist)
            norms.append(float(clip_grad_norm_(model, CLIP, dist)))
            opt.step()
            losses.append(float(rep))
        res = {"ref_losses": ref_losses, "losses": losses, "ref_norms": ref_norms, "norms": norms, "clip": CLIP}
        if dist.is_main:
            res["grad_max"], res["grad_worst"] = max((v, k) for k, v in grad_diffs.items())
        res["norm_rel_first"] = abs(norms[0] - ref_norms[0]) / ref_norms[0]  # identical weights
        res["norm_rel"] = max(abs(a - b) / b for a, b in zip(norms, ref_norms))
        res["ref_aux"], res["aux"] = ref_aux, auxes
        res["aux_rel_first"] = abs(auxes[0] - ref_aux[0]) / max(abs(ref_aux[0]), 1e-30)
        res["aux_rel"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(auxes, ref_aux))
        res["loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))

        # world size 2 -> 1: the gathered state equals the reference and gives its logits
        state = full_state_dict(model, dist)
        ostate = full_optim_state_dict(model, opt, dist)
        probe = probe_batch[:, :-1]
        wrapped_logits = model(probe[rows]).logits  # a collective: every rank runs it
        single = Dist()
        if dist.is_main:
            ref_state = model_state(ref)
            res["state_keys_match"] = sorted(state) == sorted(ref_state)
            res["state_max"], res["state_worst"] = max((_maxdiff(state[k], ref_state[k]), k) for k in ref_state)
            fresh = build_model(cfg, seed=99)
            load_full_state_dict(fresh, state, single)
            res["logits_2to1"] = _maxdiff(fresh(probe).logits, ref(probe).logits)
            res["logits_gathered"] = _maxdiff(fresh(probe[rows]).logits, wrapped_logits)
            ref_ostate = full_optim_state_dict(ref, ref_opt, single)
            res["optim_max"], res["optim_worst"] = max(
                (_maxdiff(ostate["state"][k][s], ref_ostate["state"][k][s]), f"{k}/{s}")
                for k in ref_ostate["state"] for s in ref_ostate["state"][k]
            )  # fmt: skip

        # world size 1 -> 2: load the reference's model and optimizer, take one more step on both
        ref_state, ref_ostate = model_state(ref), full_optim_state_dict(ref, ref_opt, single)
        model2 = build_model(cfg, seed=7)
        if ep:
            apply_expert_parallel(model2, dist)
        apply_fsdp(model2, dist)
        opt2 = _optimizer(model2)
        load_full_state_dict(model2, ref_state, dist)
        load_full_optim_state_dict(model2, opt2, ref_ostate, dist)
        logits = model2(probe[rows]).logits
        res["logits_1to2"] = dist.all_reduce_float(_maxdiff(logits, ref(probe[rows]).logits), "max")
        b = probe_batch
        for m, o, bb, d in ((ref, ref_opt, b, None), (model2, opt2, b[rows], dist)):
            loss, rep, _ = _loss(m, bb, d)
            o.zero_grad()
            loss.backward()
            o.step()
            res["resume_ref" if d is None else "resume"] = float(rep)
        after = full_state_dict(model2, dist)
        if dist.is_main:
            ref_after = model_state(ref)
            res["resume_state_max"] = max(_maxdiff(after[k], ref_after[k]) for k in ref_after)
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy()
