"""Training metrics: the JSONL log, and the per-window and per-step accumulators.

``RUN_DIR/metrics.jsonl`` holds one JSON object per line (``effilm plot`` reads it):

* ``{"kind": "train", "step", "tokens", "stage", "loss", "lr", "grad_norm", "tok_per_s",
  "aux_loss", "z_loss", "dropped_frac", "expert_load", "load_max_over_mean", "starved_frac",
  "moe_layers", "active_flops",
  "elapsed_s"}``: one per logging step, averaged over the steps since the previous record.
  ``expert_load`` is, per MoE layer, each expert's fraction of the window's assignments;
  ``load_max_over_mean`` (1.0 = balanced) and ``starved_frac`` (the fraction of experts under a
  quarter of the balanced share) summarise it per layer.
  DPO runs add ``rewards_chosen``, ``rewards_rejected``, ``rewards_margin`` and
  ``rewards_accuracy`` (global-batch means, averaged over the window).
* ``{"kind": "val", "step", "tokens", "val_loss": {source: loss}}``;
* ``{"kind": "event", "step", "event", ...}``: stage_start, checkpoint, resume, nan_skip, stop.

Records are appended and flushed one line at a time. On resume, records past the checkpoint's
step (and a line cut short by a crash) are dropped, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from effilm.io import atomic_write_text

METRICS = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir, enabled: bool = True):
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self._fh = None

    def truncate_after(self, step: int) -> int:
        """Keep only complete records with step <= ``step``; returns how many were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                kept.append(line)
            else:
                dropped += 1
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        return dropped

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _num(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class Window:
    """Sums over the optimizer steps since the last metrics record."""

    def __init__(self):
        self.reset(0.0)

    def reset(self, now: float) -> None:
        self.t0 = now
        self.steps = 0
        self.loss = 0.0
        self.grad_norm = 0.0
        self.tokens = 0
        self.aux = 0.0
        self.z = 0.0
        self.counts = None  # [L, E] assignments
        self.dropped = 0.0
        self.assignments = 0.0
        self.extras: dict[str, float] = {}

    def add(self, loss: float, grad_norm: float, tokens: int, step_stats, extras: dict | None = None) -> None:
        self.steps += 1
        for k, v in (extras or {}).items():
            self.extras[k] = self.extras.get(k, 0.0) + v
        self.loss += loss
        self.grad_norm += grad_norm
        self.tokens += tokens
        if step_stats is not None:
            self.aux += step_stats["aux_loss"]
            self.z += step_stats["z_loss"]
            c = step_stats["counts"]
            self.counts = c.clone() if self.counts is None else self.counts + c
            self.dropped += step_stats["dropped"]
            self.assignments += step_stats["assignments"]

    def record(self, now: float) -> dict:
        n = max(self.steps, 1)
        dt = max(now - self.t0, 1e-9)
        rec = {
            "loss": _num(self.loss / n),
            "grad_norm": _num(self.grad_norm / n),
            "tok_per_s": self.tokens / dt,
            "aux_loss": None,
            "z_loss": None,
            "dropped_frac": None,
            "expert_load": None,
            "load_max_over_mean": None,
            "starved_frac": None,
        }
        rec.update({k: _num(v / n) for k, v in self.extras.items()})
        if self.counts is not None:
            from effilm.models.moe import balance_summary

            load = self.counts / self.counts.sum(dim=1, keepdim=True).clamp_min(1)
            rec.update(
                aux_loss=_num(self.aux / n),
                z_loss=_num(self.z / n),
                dropped_frac=self.dropped / max(self.assignments, 1.0),
                expert_load=[[round(float(v), 6) for v in row] for row in load],
                **balance_summary(self.counts),
            )
        return rec


def step_routing_stats(per_micro: list[list], cfg_moe, reduce=None) -> dict | None:
    """The global step's routing summary from every micro-batch's RoutingStats (summed over ranks).

    Returns the reported load-balancing and z losses (means over MoE layers, computed from the
    sums, so they do not depend on how the batch was split), counts [L, E], dropped and the
    number of assignments.
    """
    import torch

    from effilm.models.moe import load_balancing_loss

    if not per_micro or not per_micro[0]:
        return None
    L = len(per_micro[0])
    counts = torch.stack([torch.stack([s.counts_E.float() for s in mb]) for mb in per_micro]).sum(0)
    probs = torch.stack([torch.stack([s.prob_sum_E.detach().float() for s in mb]) for mb in per_micro]).sum(0)
    extra = torch.tensor(
        [
            sum(float(s.z_sum.detach()) for mb in per_micro for s in mb),
            sum(float(s.dropped) for mb in per_micro for s in mb),
            float(sum(mb[0].n_tokens for mb in per_micro)),
        ],
        dtype=torch.float64,
    )
    if reduce is not None:
        flat = torch.cat([counts.reshape(-1).double(), probs.reshape(-1).double(), extra])
        flat = reduce(flat)
        n = counts.numel()
        counts = flat[:n].reshape(counts.shape).float()
        probs = flat[n : 2 * n].reshape(probs.shape).float()
        extra = flat[2 * n :]
    z_sum, dropped, n_tokens = float(extra[0]), float(extra[1]), int(round(float(extra[2])))
    top_k = per_micro[0][0].top_k
    aux = torch.stack([
        load_balancing_loss(counts[i], probs[i], n_tokens, top_k, cfg_moe.aux_loss_convention) for i in range(L)
    ]).mean()
    return {
        "aux_loss": float(aux),
        "z_loss": z_sum / L / max(n_tokens, 1),
        "counts": counts,
        "dropped": dropped,
        "assignments": float(n_tokens * top_k),
        "n_tokens": n_tokens,
    }
