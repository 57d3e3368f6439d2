"""Reading a run directory for plotting: ``metrics.jsonl`` and ``config.json``, and the series drawn.

This module holds no drawing code, so what the plots show is testable without matplotlib.

``metrics.jsonl`` holds one JSON object per line, with ``kind`` one of:

- ``train``: ``step``, ``tokens``, ``loss``, ``lr`` (required) and optionally ``stage``,
  ``grad_norm``, ``active_flops``, ``expert_load`` (per MoE layer, each expert's share of
  assignments) and ``moe_layers`` (the model layer index of each ``expert_load`` row);
- ``val``: ``step``, ``tokens`` and ``val_loss`` (a mapping from source name to loss);
- ``event``: ``step`` and ``event`` (stage_start, checkpoint, resume, nan_skip...).

A run killed mid-write may leave a truncated last line: it is dropped with a warning. A bad line
anywhere else is an error naming ``file:line``. When a resumed run logs a step again, the later
record supersedes every earlier record at that step or after it (the work they describe was
redone), and the count of superseded records is kept in ``RunMetrics.superseded``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from effilm.errors import EffilmError
from effilm.io import open_text

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
KINDS = ("train", "val", "event")
_REQUIRED = {"train": ("step", "tokens", "loss", "lr"), "val": ("step", "tokens", "val_loss"), "event": ("step", "event")}
TRAIN_FLOPS_PER_FORWARD = 3  # a training step costs a forward and a backward (2 forwards)
_NUMERIC = ("step", "tokens", "loss", "lr", "grad_norm", "active_flops", "tok_per_s", "elapsed_s")


@dataclass
class RunMetrics:
    """The parsed records of one ``metrics.jsonl``. Each record keeps its line number as ``_line``."""

    path: Path
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    superseded: int = 0


@dataclass
class Run:
    """A run directory: its metrics, its resolved config (``{}`` if absent) and a display label."""

    path: Path
    metrics: RunMetrics
    config: dict
    label: str

    @property
    def model_config(self) -> dict:
        model = self.config.get("model")
        return model if isinstance(model, dict) else {}


@dataclass
class Series:
    """One curve, with both x axes: optimizer step and cumulative tokens."""

    steps: list[int]
    tokens: list[float]
    values: list[float]


@dataclass
class LayerLoad:
    """Expert load of one MoE layer over time. ``relative[e][s]`` is expert e's share of the
    assignments at ``steps[s]`` divided by the uniform share 1/E: 1.0 is perfect balance."""

    layer: int
    steps: list[int]
    relative: list[list[float]]

    @property
    def num_experts(self) -> int:
        return len(self.relative)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_record(rec: dict, where: str) -> str:
    kind = rec.get("kind")
    if kind not in KINDS:
        raise EffilmError(f"{where}: 'kind' is {kind!r}; expected one of {', '.join(KINDS)}")
    for key in _REQUIRED[kind]:
        if key not in rec:
            raise EffilmError(f"{where}: {kind} record has no {key!r}")
    for key in _NUMERIC:
        if key in rec and rec[key] is not None and not _is_number(rec[key]):
            raise EffilmError(f"{where}: {key!r} must be a number, got {rec[key]!r}")
    if kind == "val":
        vl = rec["val_loss"]
        if not isinstance(vl, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in vl.items()):
            raise EffilmError(f"{where}: 'val_loss' must map source names to numbers, got {vl!r}")
    if kind == "train" and rec.get("expert_load") is not None:
        load, layers = rec["expert_load"], rec.get("moe_layers")
        ok = isinstance(load, list) and all(isinstance(r, list) and r and all(_is_number(x) for x in r) for r in load)
        if not ok:
            raise EffilmError(f"{where}: 'expert_load' must be a list (one per MoE layer) of lists of numbers")
        bad = not isinstance(layers, list) or len(layers) != len(load)
        if layers is not None and (bad or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise EffilmError(f"{where}: 'moe_layers' must list one layer index per expert_load row ({len(load)})")
    return kind


def _supersede(records: list[dict]) -> tuple[list[dict], int]:
    """Keep, for a resumed run, only the latest record of every step (see the module docstring)."""
    kept: list[dict] = []
    dropped = 0
    for rec in records:
        while kept and kept[-1]["step"] >= rec["step"]:
            kept.pop()
            dropped += 1
        kept.append(rec)
    return kept, dropped


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse a ``metrics.jsonl``. Raises ``EffilmError`` naming file:line for a bad line (except a
    truncated last line, which is dropped with a warning) and for a file with no records."""
    path = Path(path)
    if not path.is_file():
        raise EffilmError(f"{path}: no such metrics file")
    with open_text(path) as fh:
        lines = [(n, line) for n, line in enumerate(fh, 1) if line.strip()]
    out = RunMetrics(path=path)
    by_kind: dict[str, list[dict]] = {k: [] for k in KINDS}
    last = lines[-1][0] if lines else 0
    for lineno, line in lines:
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except ValueError as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            if lineno == last:
                note = f"{where}: ignoring a truncated last line ({msg})"
                warnings.warn(note, stacklevel=2)
                out.warnings.append(note)
                break
            raise EffilmError(f"{where}: not valid JSON ({msg})") from None
        kind = _check_record(rec, where)
        rec["_line"] = lineno
        by_kind[kind].append(rec)
    out.train, dropped_t = _supersede(by_kind["train"])
    out.val, dropped_v = _supersede(by_kind["val"])
    out.events = by_kind["event"]
    out.superseded = dropped_t + dropped_v
    if not out.train and not out.val:
        raise EffilmError(f"{path}: no train or val records (the run logged nothing yet?)")
    return out


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Read a run directory. ``config.json`` is optional; ``metrics.jsonl`` is required."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise EffilmError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise EffilmError(f"{run_dir}: not a directory (expected a run directory holding {METRICS_FILE})")
    if not (run_dir / METRICS_FILE).is_file():
        raise EffilmError(f"{run_dir}: no {METRICS_FILE} in this run directory (has training started?)")
    metrics = read_metrics(run_dir / METRICS_FILE)
    config: dict = {}
    cfg_path = run_dir / CONFIG_FILE
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EffilmError(f"{cfg_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(config, dict):
            raise EffilmError(f"{cfg_path}: expected a JSON object")
    run = Run(path=run_dir, metrics=metrics, config=config, label="")
    run.label = label or default_label(run)
    return run


def default_label(run: Run) -> str:
    name = run.path.resolve().name
    model = run.model_config.get("name")
    return f"{name} ({model})" if model and model != name else name


def train_series(metrics: RunMetrics, key: str) -> Series:
    """``key`` (loss, lr, grad_norm, ...) of every train record where it is a finite number."""
    recs = [r for r in metrics.train if _is_number(r.get(key)) and math.isfinite(r[key])]
    return Series([r["step"] for r in recs], [r["tokens"] for r in recs], [float(r[key]) for r in recs])


def val_series(metrics: RunMetrics) -> dict[str, Series]:
    """Validation loss per source, in order of first appearance."""
    out: dict[str, Series] = {}
    for r in metrics.val:
        for source, v in r["val_loss"].items():
            s = out.setdefault(source, Series([], [], []))
            if math.isfinite(v):
                s.steps.append(r["step"])
                s.tokens.append(r["tokens"])
                s.values.append(float(v))
    return out


def stage_starts(metrics: RunMetrics) -> list[tuple[str, int, float]]:
    """``(stage, step, tokens)`` where each stage begins. A train record covers the logging window
    that ends at its step, so a stage that first appears at record i began where record i-1 ended;
    the first stage begins at the first record."""
    out: list[tuple[str, int, float]] = []
    prev = None
    for r in metrics.train:
        stage = r.get("stage")
        if stage is not None and (not out or out[-1][0] != stage):
            at = prev if prev is not None else r
            out.append((str(stage), at["step"], at["tokens"]))
        prev = r
    return out


def _train_flops(run: Run) -> tuple[list[dict], list[float]]:
    """The train records with a finite loss, and the cumulative active FLOPs at each. Uses each
    record's ``active_flops``; when a run logged none, computes what the trainer logs from
    ``config.json``: tokens * 3 * forward FLOPs per token (forward + backward = 3 forwards) at the
    run's ``data.seq_len`` (the model's max_seq_len if absent)."""
    loss = [r for r in run.metrics.train if _is_number(r.get("loss")) and math.isfinite(r["loss"])]
    if all(_is_number(r.get("active_flops")) for r in loss):
        return loss, [float(r["active_flops"]) for r in loss]
    if not run.model_config:
        missing = next(r for r in loss if not _is_number(r.get("active_flops")))
        raise EffilmError(
            f"{run.metrics.path}:{missing['_line']}: no 'active_flops', and {run.path / CONFIG_FILE} has no "
            "'model' section to compute it from"
        )
    from effilm.config.model import ModelConfig

    data = run.config.get("data")
    seq_len = data.get("seq_len") if isinstance(data, dict) else None
    per_token = TRAIN_FLOPS_PER_FORWARD * ModelConfig.from_dict(run.model_config).flops_per_token(seq_len)
    return loss, [float(r["tokens"]) * per_token for r in loss]


def active_flops_series(run: Run) -> Series:
    """Train loss against cumulative active training FLOPs (held in the ``tokens`` field)."""
    recs, flops = _train_flops(run)
    return Series([r["step"] for r in recs], flops, [float(r["loss"]) for r in recs])


def val_flops_series(run: Run) -> dict[str, Series]:
    """Validation loss per source against active training FLOPs (in the ``tokens`` field): the
    FLOPs at a val record's token count are interpolated linearly between the train records
    (anchored at 0 tokens = 0 FLOPs) and extrapolated at the last rate past them."""
    import numpy as np

    recs, flops = _train_flops(run)
    xs = [0.0] + [float(r["tokens"]) for r in recs]
    ys = [0.0] + flops
    rate = ys[-1] / xs[-1] if xs[-1] else float("nan")
    out = {}
    for source, s in val_series(run.metrics).items():
        f = [float(np.interp(t, xs, ys)) if t <= xs[-1] else t * rate for t in s.tokens]
        out[source] = Series(list(s.steps), f, list(s.values))
    return out


def expert_loads(metrics: RunMetrics) -> list[LayerLoad]:
    """Per MoE layer, each expert's load relative to uniform over the logged steps ([] for a dense run).

    Each row is normalised by its own sum, so counts and fractions give the same picture. A layer
    whose expert count changes mid-run is an error naming the line."""
    layers: dict[int, LayerLoad] = {}
    for r in metrics.train:
        load = r.get("expert_load")
        if load is None:
            continue
        ids = r.get("moe_layers") or list(range(len(load)))
        for layer, row in zip(ids, load):
            ll = layers.setdefault(layer, LayerLoad(layer, [], [[] for _ in row]))
            if len(row) != ll.num_experts:
                raise EffilmError(
                    f"{metrics.path}:{r['_line']}: layer {layer} has {len(row)} experts here but "
                    f"{ll.num_experts} earlier"
                )
            total = float(sum(row))
            ll.steps.append(r["step"])
            for e, x in enumerate(row):
                ll.relative[e].append(x * len(row) / total if total > 0 else float("nan"))
    return [layers[k] for k in sorted(layers)]
