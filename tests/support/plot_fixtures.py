"""Hand-built run directories (metrics.jsonl + config.json) for the plot and report tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

from effilm.config import ModelConfig

TOKENS_PER_STEP = 1024
LOG_EVERY = 5
SEQ_LEN = 64


def train_rec(step: int, stage: str, flops_per_token: int, load=None, layers=None) -> dict:
    tokens = step * TOKENS_PER_STEP
    return {
        "kind": "train", "step": step, "tokens": tokens, "stage": stage,
        "loss": 8.0 * math.exp(-step / 40) + 2.0, "lr": 1e-3 * min(1.0, step / 10),
        "grad_norm": 1.0, "tok_per_s": 5000.0, "aux_loss": None if load is None else 1.01,
        "z_loss": None, "dropped_frac": None if load is None else 0.0,
        "expert_load": load, "moe_layers": layers,
        "active_flops": float(tokens * 3 * flops_per_token), "elapsed_s": step * 0.2,
    }  # fmt: skip


def skewed_load(num_experts: int, step: int, hot: int) -> list[float]:
    """Expert ``hot`` takes a share that shrinks over time; the rest split what is left."""
    hot_share = 0.5 / (1 + step / 50)
    rest = (1 - hot_share) / (num_experts - 1)
    return [hot_share if e == hot else rest for e in range(num_experts)]


def make_run(root: Path, preset: str, steps: int = 60, stages=("web", "textbook"), val_sources=("web", "textbook"),
             moe_layers=None, truncated_tail: bool = False) -> Path:  # fmt: skip
    """A run directory with train records every LOG_EVERY steps over ``stages`` (equal shares),
    a val record at each stage end, stage_start and checkpoint events. MoE presets get expert_load."""
    cfg = ModelConfig.from_name(preset)
    per_token = cfg.flops_per_token(SEQ_LEN)
    run = root / preset
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {"steps": steps}, "data": {"seq_len": SEQ_LEN}}))
    E = cfg.moe.num_experts if cfg.has_moe else 0
    layers = moe_layers if moe_layers is not None else ([i for i, s in enumerate(cfg.layers) if s.kind in "MH"] if E else None)
    lines = []
    per_stage = steps // len(stages)
    for si, stage in enumerate(stages):
        first = si * per_stage + 1
        lines.append({"kind": "event", "step": first, "event": "stage_start", "stage": stage})
        for step in range(first + LOG_EVERY - 1, (si + 1) * per_stage + 1, LOG_EVERY):
            load = [skewed_load(E, step, hot=j % E) for j in range(len(layers))] if E else None
            lines.append(train_rec(step, stage, per_token, load, layers))
        end = (si + 1) * per_stage
        lines.append({"kind": "val", "step": end, "tokens": end * TOKENS_PER_STEP,
                      "val_loss": {s: 3.0 - 0.1 * si + 0.05 * k for k, s in enumerate(val_sources)}})  # fmt: skip
        lines.append({"kind": "event", "step": end, "event": "checkpoint"})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if truncated_tail:
        text += json.dumps(train_rec(steps + 1, stages[-1], per_token))[:40]  # killed mid-write
    (run / "metrics.jsonl").write_text(text)
    return run
