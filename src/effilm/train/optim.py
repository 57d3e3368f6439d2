"""AdamW with parameter groups, and the learning-rate schedules (warmup + cosine / WSD / constant).

The schedule is a pure function of the optimizer step, so it has no state to save: a resumed run
recomputes the same learning rate from the step it resumes at.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effilm.config.run import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: weight-decayed matrices, and everything else (norms, biases, embeddings).

    Expert weights (3-D stacks) count as matrices. The router is a matrix too. A tied LM head is
    the embedding and follows ``decay_embeddings``.
    """
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embed_ids
        if p.dim() >= 2 and (not is_embedding or cfg.decay_embeddings):
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    kwargs = {"foreach": cfg.foreach} if cfg.foreach is not None else {}
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs
    )


def _decay_curve(frac: float, shape: str) -> float:
    """1 -> 0 as frac goes 0 -> 1."""
    frac = min(max(frac, 0.0), 1.0)
    if shape == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if shape == "sqrt":
        return 1 - math.sqrt(frac)
    return 1 - frac


class Schedule:
    """``lr(step)`` for 0-based optimizer steps.

    ``spans`` lists (first_step, end_step) segments: one for the whole run (scope 'run') or one per
    stage (scope 'stage'), each with its own warmup and decay.
    """

    def __init__(self, cfg: OptimConfig, spans: list[tuple[int, int]]):
        self.cfg = cfg
        self.spans = spans

    def _span(self, step: int) -> tuple[int, int]:
        for a, b in self.spans:
            if a <= step < b:
                return a, b
        return self.spans[-1]

    def factor(self, step: int) -> float:
        c = self.cfg
        a, b = self._span(step)
        n = max(b - a, 1)
        i = step - a
        floor = c.min_lr_ratio
        if c.warmup_steps and i < c.warmup_steps:
            return (i + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        if c.schedule == "cosine":
            span = max(n - c.warmup_steps, 1)
            return floor + (1 - floor) * _decay_curve((i - c.warmup_steps) / span, "cosine")
        # warmup-stable-decay
        decay_steps = max(int(round(n * c.decay_fraction)), 1)
        start = n - decay_steps
        if i < start:
            return 1.0
        return floor + (1 - floor) * _decay_curve((i - start + 1) / decay_steps, c.decay_shape)

    def lr(self, step: int) -> float:
        return self.cfg.lr * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr


def make_schedule(cfg: OptimConfig, stage_bounds: list[tuple[str, int, int]], total_steps: int) -> Schedule:
    """The schedule over ``total_steps``; with scope 'stage', one segment per stage (clipped to the run)."""
    if cfg.scope == "stage":
        spans = [(a, min(b, total_steps)) for _, a, b in stage_bounds if a < total_steps]
    else:
        spans = [(0, total_steps)]
    return Schedule(cfg, spans or [(0, total_steps)])
