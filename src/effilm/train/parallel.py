"""Distributed training from outside the model: torchrun init, FSDP2, full (single-device layout)
state dicts for any world size, global routing statistics and gradient clipping.

Expert parallelism itself lives in :mod:`effilm.train.expert_parallel`. The semantics, shared by both:

* Each rank's loss is the mean over its local share of the global batch (equal shares), as in
  one process: data parallelism averages gradients over ranks (FSDP2's default), which gives the
  gradient of the global-batch mean.
* Expert weights under expert parallelism are not data-parallel: each rank holds different
  experts, FSDP leaves them alone (``ignored_params``), and their gradients, which arrive summed
  over every rank's loss through the backward ``all_to_all``, are divided by the world size.
* :func:`all_reduce_routing_stats` makes each MoE layer's statistics global, so the auxiliary
  and z losses are over the global batch: their value is the global one on every rank and their
  gradient is scaled so that FSDP's averaging yields the global gradient.

Call sequence for a training loop (see :func:`apply_expert_parallel` and :func:`apply_fsdp`)::

    dist = init_distributed()
    model = build_model(cfg, seed=seed)                 # full weights on every rank
    if dist.world_size > 1 and cfg.moe: apply_expert_parallel(model, dist)
    apply_fsdp(model, dist)                             # no-op in one process
    opt = AdamW(model.parameters(), ...)
    ...local batch = rows [rank::world_size] or a contiguous 1/N of the global batch...
    out = model(x); stats = all_reduce_routing_stats(out.routing, dist)
    aux, z, moe_loss = moe_losses(stats, cfg.moe)
    loss = ce_local_mean + moe_loss; loss.backward()
    clip_grad_norm_(model, max_norm, dist); opt.step()
    state = full_state_dict(model, dist)                # rank 0 gets it, others {}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from effilm.errors import CheckpointError, ConfigError
from effilm.models.moe import moe_losses  # noqa: F401 (re-export: the losses from all-reduced stats)
from effilm.train.expert_parallel import apply_expert_parallel, expert_slice, moe_layers  # noqa: F401 (re-export)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CLIP_EPS = 1e-6  # added to the gradient norm before dividing, as torch.nn.utils.clip_grad_norm_


@dataclass
class Dist:
    """Where this process stands: rank, world size, device, and the collective helpers.

    A single-process ``Dist`` (world_size 1) makes every helper a no-op, so one training loop
    serves both cases.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    group: object = None  # the process group for collectives (None: the default group)
    _mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def mesh(self):
        """A 1-D DeviceMesh over all ranks (built on first use), for FSDP2."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        return self._mesh

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as td

            td.barrier(group=self.group)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor; ``t`` is left unchanged)."""
        out = t.detach().clone()
        if self.distributed:
            import torch.distributed as td

            td.all_reduce(out, op=td.ReduceOp.SUM, group=self.group)
        return out

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (a new tensor)."""
        return self.all_reduce_sum(t.float()) / self.world_size

    def all_reduce_float(self, x: float, op: str = "sum") -> float:
        """A Python float summed (``op='sum'``), averaged (``'mean'``) or maxed (``'max'``) over ranks."""
        if op not in ("sum", "mean", "max"):
            raise ValueError(f"op must be sum, mean or max, got {op!r}")
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        if self.distributed:
            import torch.distributed as td

            td.all_reduce(t, op=td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM, group=self.group)
        return float(t) / (self.world_size if op == "mean" else 1)

    def destroy(self) -> None:
        if self.distributed:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


def init_distributed(backend: str | None = None) -> Dist:
    """Join the torchrun job described by the environment, or return a single-process Dist.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The backend is nccl
    when CUDA is available and gloo otherwise, unless ``backend`` names one. On CUDA each process
    uses the GPU ``LOCAL_RANK``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        from effilm.device import resolve_device

        return Dist(device=resolve_device("auto"))
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"distributed launch: environment variables {', '.join(missing)} are not set (use torchrun)")
    try:
        rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError("distributed launch: RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise ConfigError(f"distributed launch: RANK={rank} is outside WORLD_SIZE={world}")
    import torch.distributed as td

    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not td.is_initialized():
        td.init_process_group(backend=backend, rank=rank, world_size=world, device_id=device if use_cuda else None)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


# ----- FSDP2 ---------------------------------------------------------------------------------
def _expert_params(model: nn.Module) -> set:
    """The expert-parallel (rank-local) expert weights: FSDP must not shard or average them."""
    return {
        p for _, moe in moe_layers(model) if getattr(moe, "expert_parallel", None) is not None
        for p in moe.experts.parameters()
    }  # fmt: skip


def apply_fsdp(model: nn.Module, dist: Dist, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 ``fully_shard`` on every block, then on the root. A no-op in one process.

    Apply :func:`apply_expert_parallel` first: its expert weights are passed as
    ``ignored_params`` (they are already split over ranks and must not be averaged).
    ``mp_policy`` is a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 params, fp32
    reduction on GPU). Build the optimizer after this call.
    """
    if not dist.distributed:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mesh=dist.mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    ignored = _expert_params(model)
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, ignored_params=ignored & set(block.parameters()), **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None, **kw)
    return model


# ----- full state dicts ----------------------------------------------------------------------
def _ep_keys(model: nn.Module) -> dict[str, object]:
    """Parameter name -> MoE module, for expert-parallel expert weights."""
    return {
        f"{name}.experts.{p}": moe for name, moe in moe_layers(model)
        if getattr(moe, "expert_parallel", None) is not None for p in ("w_gate_up", "w_down")
    }  # fmt: skip


def _gather_full(t: torch.Tensor, is_ep: bool, dist: Dist) -> torch.Tensor:
    """The full tensor of a DTensor shard or an expert-parallel slice (a collective), else ``t``."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor()
    if is_ep and dist.distributed:
        import torch.distributed as td

        parts = [torch.empty_like(t) for _ in range(dist.world_size)]
        td.all_gather(parts, t.detach().contiguous(), group=dist.group)
        return torch.cat(parts, 0)
    return t


def _local_part(full: torch.Tensor, like: torch.Tensor, moe, dist: Dist) -> torch.Tensor:
    """This rank's part of ``full`` laid out like ``like`` (DTensor shard, expert slice or whole)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    if moe is not None:
        full = full[moe.expert_parallel]
    return full.to(like.device, like.dtype)


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.cfg, "tie_embeddings", False))


def full_state_dict(model: nn.Module, dist: Dist) -> dict[str, torch.Tensor]:
    """The single-device state (keys and shapes of ``effilm.formats.checkpoint.model_state``) on rank 0.

    Every rank must call it (it gathers FSDP shards and expert slices); ranks other than 0 get {}.
    """
    ep = _ep_keys(model)
    out = {}
    for k, v in model.state_dict().items():
        if _tied(model) and k == "lm_head.weight":
            continue
        full = _gather_full(v, k in ep, dist)
        if dist.is_main:
            out[k] = full.detach().contiguous().cpu()
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], dist: Dist, source: str = "state") -> None:
    """Load a single-device state (as saved by one process or by :func:`full_state_dict`) into a
    model wrapped at any world size. Every rank passes the full state."""
    from effilm.formats.checkpoint import raise_tensor_problems

    ep = _ep_keys(model)
    expected = model.state_dict(keep_vars=True)
    if _tied(model):
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    full_shape = {k: _full_shape(v, ep.get(k)) for k, v in expected.items()}
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {full_shape[k]}"
        for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != full_shape[k]
    ]  # fmt: skip
    raise_tensor_problems(source, sorted(set(expected) - set(state)), sorted(set(state) - set(expected)), shapes)
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(_local_part(state[k], p, ep.get(k), dist))


def _full_shape(t: torch.Tensor, moe) -> tuple:
    shape = tuple(t.shape)  # a DTensor reports its global shape
    if moe is not None:
        shape = (moe.cfg.num_experts,) + shape[1:]
    return shape


# ----- optimizer state -----------------------------------------------------------------------
def _param_names(model: nn.Module, optimizer) -> list[list[tuple[str, nn.Parameter]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in optimizer.param_groups:
        missing = [i for i, p in enumerate(g["params"]) if id(p) not in names]
        if missing:
            raise ConfigError("optimizer holds parameters that are not in the model (build it after apply_fsdp)")
        groups.append([(names[id(p)], p) for p in g["params"]])
    return groups


def full_optim_state_dict(model: nn.Module, optimizer, dist: Dist) -> dict:
    """The optimizer state keyed by parameter name, with full (single-device) tensors, on rank 0.

    ``{"state": {name: {key: tensor}}, "param_groups": [{hyperparameters..., "params": [names]}]}``;
    every rank must call it; ranks other than 0 get {}. Per-parameter tensors shaped like the
    parameter (Adam's moments) are gathered; others (``step``) are taken as they are.
    """
    ep = _ep_keys(model)
    state, groups = {}, []
    for g, named in zip(optimizer.param_groups, _param_names(model, optimizer)):
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [n for n, _ in named]})
        for name, p in named:
            st = optimizer.state.get(p, {})
            # every rank holds the same keys: expert weights always get a (possibly zero) gradient
            full_st = {}
            for key in sorted(st):
                v = st[key]
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                    v = _gather_full(v, name in ep, dist)
                if dist.is_main:
                    full_st[key] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
            if st and dist.is_main:
                state[name] = full_st
    return {"state": state, "param_groups": groups} if dist.is_main else {}


def load_full_optim_state_dict(model: nn.Module, optimizer, full: dict, dist: Dist) -> None:
    """Load a name-keyed full optimizer state (from :func:`full_optim_state_dict` at any world
    size) into ``optimizer``, slicing each tensor like its parameter. Every rank passes it."""
    ep = _ep_keys(model)
    named_groups = _param_names(model, optimizer)
    saved_groups = full.get("param_groups", [])
    if [g["params"] for g in saved_groups] != [[n for n, _ in named] for named in named_groups]:
        raise CheckpointError("optimizer state: its parameter groups do not match the optimizer's (names or order differ)")
    for g, saved in zip(optimizer.param_groups, saved_groups):
        g.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.state.clear()
    for named in named_groups:
        for name, p in named:
            st = full["state"].get(name)
            if st is None:
                continue
            new = {}
            for key, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == _full_shape(p, ep.get(name)):
                    new[key] = _local_part(v, p, ep.get(name), dist)  # in the parameter's dtype, as AdamW keeps it
                else:
                    new[key] = v.clone() if isinstance(v, torch.Tensor) else v
            optimizer.state[p] = new


# ----- routing statistics and losses ---------------------------------------------------------
def all_reduce_routing_stats(stats_list: list, dist: Dist) -> list:
    """Routing statistics over the global batch (one all_reduce for every layer).

    counts_E, dropped, entropy_sum and n_tokens are summed over ranks. prob_sum_E and z_sum get
    the global value too, but their gradient flows only into this rank's router, scaled by the
    world size: after FSDP averages the rank gradients, the router gradient is exactly the
    gradient of the global-batch loss. In one process the stats are returned unchanged.
    """
    from effilm.models.moe import RoutingStats

    if not dist.distributed or not stats_list:
        return list(stats_list)
    flat = torch.cat([
        torch.cat([s.counts_E.float().reshape(-1), s.prob_sum_E.detach().float().reshape(-1),
                   torch.stack([s.z_sum.detach().float(), s.entropy_sum.float(), s.dropped.float().to(s.z_sum.device),
                                torch.tensor(float(s.n_tokens), device=s.z_sum.device)])])
        for s in stats_list
    ])  # fmt: skip
    total = dist.all_reduce_sum(flat)
    out, i, N = [], 0, dist.world_size
    for s in stats_list:
        E = s.counts_E.numel()
        counts, probs, rest = total[i : i + E], total[i + E : i + 2 * E], total[i + 2 * E : i + 2 * E + 4]
        i += 2 * E + 4
        prob_sum = probs.to(s.prob_sum_E.dtype) + N * (s.prob_sum_E - s.prob_sum_E.detach())
        z_sum = rest[0].to(s.z_sum.dtype) + N * (s.z_sum - s.z_sum.detach())
        out.append(
            RoutingStats(
                counts_E=counts.to(s.counts_E.dtype), prob_sum_E=prob_sum, z_sum=z_sum,
                entropy_sum=rest[1].to(s.entropy_sum.dtype), dropped=rest[2].round().to(s.dropped.dtype),
                n_tokens=int(rest[3].round()), top_k=s.top_k,
            )
        )  # fmt: skip
    return out


# ----- the trainer's interface: the same calls at any world size ------------------------------
def parallelize(model: nn.Module, parallelism: str, dist: Dist) -> nn.Module:
    """One process: the model itself. Under torchrun: experts spread over the ranks (MoE models,
    when ``parallelism`` allows and the experts split evenly), then FSDP2 over every block."""
    if not dist.distributed:
        return model
    cfg = model.cfg
    has_moe = cfg.has_moe
    if parallelism == "fsdp+ep" and not has_moe:
        raise ConfigError("train.parallelism='fsdp+ep' needs a model with MoE layers")
    if parallelism == "fsdp+ep" and cfg.moe.num_experts % dist.world_size:
        raise ConfigError(
            f"train.parallelism='fsdp+ep': {cfg.moe.num_experts} experts do not split evenly over {dist.world_size} ranks"
        )
    if parallelism == "fsdp+ep" or (parallelism == "auto" and has_moe and cfg.moe.num_experts % dist.world_size == 0):
        apply_expert_parallel(model, dist)
    return apply_fsdp(model, dist)


def gather_state(model: nn.Module, optimizer, dist: Dist, with_optimizer: bool = True):
    """``(weights, named optimizer state or None)`` in the single-device layout on rank 0, None on
    the other ranks. Every rank must call it (it gathers shards and expert slices)."""
    weights = full_state_dict(model, dist)
    optim = full_optim_state_dict(model, optimizer, dist) if with_optimizer else None
    return (weights, optim) if dist.is_main else None


def load_state(model: nn.Module, optimizer, weights: dict, optim: dict | None, dist: Dist, source: str) -> None:
    """Load a single-device checkpoint (saved at any world size) into the wrapped model and its
    optimizer. Every rank passes the full state."""
    load_full_state_dict(model, weights, dist, source)
    if optim is not None:
        load_full_optim_state_dict(model, optimizer, optim, dist)


# ----- gradient clipping ---------------------------------------------------------------------
def clip_grad_norm_(model: nn.Module, max_norm: float | None, dist: Dist) -> torch.Tensor:
    """Clip gradients by their global L2 norm across ranks and return that norm (before clipping).

    FSDP shards and expert-parallel slices are distinct per rank, so their squares are summed over
    ranks; plain replicated parameters count once. ``max_norm=None`` only measures. In one process
    this is torch's own ``clip_grad_norm_``.
    """
    from torch.distributed.tensor import DTensor

    if not dist.distributed:
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))

    ep = set(_ep_keys(model))
    dev = dist.device
    split_sq = torch.zeros((), dtype=torch.float64, device=dev)
    repl_sq = torch.zeros((), dtype=torch.float64, device=dev)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grads.append(g)
        sq = g.detach().double().pow(2).sum().to(dev)
        if isinstance(p.grad, DTensor) or name in ep:
            split_sq = split_sq + sq
        else:
            repl_sq = repl_sq + sq
    total = (dist.all_reduce_sum(split_sq) + repl_sq).sqrt()
    if max_norm is not None:
        coef = (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype).to(g.device))
    return total.float()
