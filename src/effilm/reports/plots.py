"""Training plots: loss and LR curves, the expert-load heatmap, and runs compared at equal compute.

``plot_run(run_dir, out_dir)`` writes, for one run directory:

- ``loss.png``: train loss (raw and smoothed) and validation loss per source, over a second row
  with the learning rate; the left column against optimizer step, the right against tokens; a
  dotted line marks the start of each data stage;
- ``expert_load.png``: one panel per MoE layer, x = step, y = expert, colour = the expert's load
  relative to uniform (1.0 is perfect balance). A dense run gets no heatmap, and a note says so;
- ``balance.png`` (MoE runs): per MoE layer over steps, the busiest expert's load over the mean
  (1.0 = balanced) and the fraction of experts under a quarter of the balanced share;
- ``train_stats.png``: one panel per logged training statistic among ``STATS`` (gradient norm,
  throughput, and for MoE runs the auxiliary loss, router z-loss and dropped-token fraction);
- ``rewards.png`` (DPO runs): the implicit rewards of the chosen and rejected answers and their
  margin, beside the preference accuracy (the fraction of pairs ranked right; 0.5 is chance).

``plot_compare(run_dirs, out_dir)`` writes ``compare_loss.png``: the runs' loss curves overlaid
against tokens and against cumulative active training FLOPs, the axis on which a dense model and
an MoE with the same active parameters are compared.

Drawing uses matplotlib's object API on an explicit Agg canvas (no pyplot, no global backend
switch), and every PNG is written atomically. What is drawn comes from ``effilm.reports.metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from effilm.errors import ConfigError, EffilmError
from effilm.io import atomic_open
from effilm.reports.metrics import (
    LayerLoad,
    Run,
    Series,
    active_flops_series,
    expert_loads,
    load_run,
    stage_starts,
    train_series,
    val_flops_series,
    val_series,
)

# Training statistics drawn in train_stats.png, each in its own panel when the run logged it.
STATS = {"grad_norm": "gradient norm", "tok_per_s": "tokens / s", "aux_loss": "MoE auxiliary loss",
         "z_loss": "router z-loss", "dropped_frac": "dropped token fraction"}  # fmt: skip
VAL_MARKERS = "os^Dv"  # one marker shape per validation source in the comparison plot


@dataclass
class PlotConfig:
    """Sizes and styling of the figures."""

    dpi: int = field(default=110, metadata={"help": "Resolution of the written PNGs, in dots per inch."})
    panel_width: float = field(default=6.0, metadata={"help": "Width of one panel, in inches."})
    panel_height: float = field(default=3.2, metadata={"help": "Height of one panel, in inches."})
    heatmap_height: float = field(default=2.4, metadata={"help": "Height of one heatmap panel, in inches."})
    stats_height: float = field(default=2.6, metadata={"help": "Height of one training-statistics panel, in inches."})
    smoothing: float = field(
        default=0.6, metadata={"help": "EMA factor of the smoothed train-loss line, in [0, 1); 0 = no smoothing."}
    )
    raw_alpha: float = field(default=0.3, metadata={"help": "Opacity of the raw train-loss line under the smoothed one."})
    heatmap_max_rows: int = field(
        default=8, metadata={"help": "Most heatmap panels stacked in one column; more layers wrap into columns."}
    )
    max_relative_load: float = field(
        default=4.0, metadata={"help": "Top of the heatmap colour scale, as load relative to uniform (>1)."}
    )
    colormap: str = field(default="RdBu_r", metadata={"help": "Diverging matplotlib colormap of the heatmap."})

    def __post_init__(self) -> None:
        for name in ("dpi", "panel_width", "panel_height", "heatmap_height", "stats_height"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"plot.{name}={getattr(self, name)} must be positive")
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"plot.smoothing={self.smoothing} must be in [0, 1)")
        if not 0 < self.raw_alpha <= 1:
            raise ConfigError(f"plot.raw_alpha={self.raw_alpha} must be in (0, 1]")
        if self.heatmap_max_rows < 1:
            raise ConfigError(f"plot.heatmap_max_rows={self.heatmap_max_rows} must be at least 1")
        if self.max_relative_load <= 1:
            raise ConfigError(f"plot.max_relative_load={self.max_relative_load} must be above 1")


def ema(values: list[float], factor: float) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled to 0."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = factor * acc + (1 - factor) * v
        out.append(acc / (1 - factor**i) if factor else v)
    return out


def _figure(rows: int, cols: int, cfg: PlotConfig, height: float | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cfg.panel_width * cols, (height or cfg.panel_height) * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, cfg: PlotConfig) -> Path:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=cfg.dpi)
    return path


def _mark_stages(ax, stages: list[tuple[str, int, float]], by_tokens: bool) -> None:
    for i, (stage, step, tokens) in enumerate(stages):
        x = tokens if by_tokens else step
        if i:  # the first stage starts at the left edge
            ax.axvline(x, color="0.5", linestyle=":", linewidth=1)
        ax.annotate(stage, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", fontsize=8, color="0.35")  # fmt: skip


def _curve(ax, s: Series, by_tokens: bool, **kw) -> None:
    ax.plot(s.tokens if by_tokens else s.steps, s.values, **kw)


def draw_loss(run: Run, path: Path, cfg: PlotConfig) -> Path:
    loss, lr, vals = train_series(run.metrics, "loss"), train_series(run.metrics, "lr"), val_series(run.metrics)
    stages = stage_starts(run.metrics)
    fig = _figure(2, 2, cfg)
    axes = fig.subplots(2, 2, sharex="col", height_ratios=[2, 1])
    for col, by_tokens in enumerate((False, True)):
        ax = axes[0][col]
        if loss.values:
            _curve(ax, loss, by_tokens, color="C0", alpha=cfg.raw_alpha, linewidth=1)
            smooth = Series(loss.steps, loss.tokens, ema(loss.values, cfg.smoothing))
            _curve(ax, smooth, by_tokens, color="C0", linewidth=1.8, label="train")
        for i, (source, s) in enumerate(vals.items(), 1):
            _curve(ax, s, by_tokens, color=f"C{i}", marker="o", markersize=3, linestyle="--", label=f"val: {source}")
        _mark_stages(ax, stages, by_tokens)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        ax = axes[1][col]
        _curve(ax, lr, by_tokens, color="C3")
        _mark_stages(ax, stages, by_tokens)
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_xlabel("tokens" if by_tokens else "optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.label}: loss and learning rate")
    return _save(fig, path, cfg)


def draw_stats(run: Run, series: dict[str, Series], path: Path, cfg: PlotConfig) -> Path:
    n = len(series)
    cols = 2 if n in (2, 4) else min(n, 3)  # a square-ish grid: 1, 2, 3, 2x2, 3+2, 3x2
    rows = -(-n // cols)
    fig = _figure(rows, cols, cfg, height=cfg.stats_height)
    grid = fig.subplots(rows, cols, squeeze=False, sharex=True)
    stages = stage_starts(run.metrics)
    for i, (key, s) in enumerate(series.items()):
        ax = grid[i // cols][i % cols]
        ax.plot(s.steps, s.values, color=f"C{i}", linewidth=1.2)
        _mark_stages(ax, stages, by_tokens=False)
        ax.set_title(STATS[key], fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.tick_params(labelbottom=True)
        ax.grid(alpha=0.3)
    for i in range(n, rows * cols):
        grid[i // cols][i % cols].set_visible(False)
    fig.suptitle(f"{run.label}: training statistics")
    return _save(fig, path, cfg)


REWARDS = {"rewards_chosen": "chosen", "rewards_rejected": "rejected", "rewards_margin": "margin"}


def draw_rewards(run: Run, path: Path, cfg: PlotConfig) -> Path:
    fig = _figure(1, 2, cfg)
    left, right = fig.subplots(1, 2, squeeze=True)
    stages = stage_starts(run.metrics)
    for i, (key, label) in enumerate(REWARDS.items()):
        s = train_series(run.metrics, key)
        left.plot(s.steps, s.values, color=f"C{i}", linewidth=1.2, label=label,
                  linestyle="--" if key == "rewards_margin" else "-")  # fmt: skip
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set_title("implicit reward (beta * log ratio to the reference)", fontsize=10)
    left.legend(fontsize=8)
    acc = train_series(run.metrics, "rewards_accuracy")
    right.plot(acc.steps, acc.values, color="C3", linewidth=1.2)
    right.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="chance")
    right.set_ylim(-0.02, 1.02)
    right.set_title("preference accuracy (chosen reward > rejected)", fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, right):
        _mark_stages(ax, stages, by_tokens=False)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.label}: preference optimisation")
    return _save(fig, path, cfg)


def _edges(steps: list[int]) -> list[float]:
    """Cell edges centred on each logged step (non-uniform logging intervals stay honest)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def draw_expert_load(run: Run, loads: list[LayerLoad], path: Path, cfg: PlotConfig) -> Path:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    cols = -(-len(loads) // cfg.heatmap_max_rows)
    rows = -(-len(loads) // cols)
    fig = _figure(rows, cols, cfg, height=cfg.heatmap_height)
    grid = fig.subplots(rows, cols, squeeze=False, sharex=True)
    axes = [grid[i % rows][i // rows] for i in range(len(loads))]  # fill column by column
    for i in range(len(loads), rows * cols):
        grid[i % rows][i // rows].set_visible(False)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=cfg.max_relative_load)
    mesh = None
    for ax, ll in zip(axes, loads):
        data = np.clip(np.asarray(ll.relative, dtype=float), 0.0, cfg.max_relative_load)
        y = np.arange(ll.num_experts + 1) - 0.5
        mesh = ax.pcolormesh(_edges(ll.steps), y, data, cmap=cfg.colormap, norm=norm, shading="flat")
        ax.set_ylabel(f"layer {ll.layer}\nexpert")
        ax.set_ylim(ll.num_experts - 0.5, -0.5)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for c in range(cols):  # label the lowest panel of each column
        axes[min(len(loads) - 1, c * rows + rows - 1)].set_xlabel("optimizer step")
        axes[min(len(loads) - 1, c * rows + rows - 1)].xaxis.set_tick_params(labelbottom=True)
    bar = fig.colorbar(mesh, ax=axes, shrink=0.9)
    bar.set_label(f"load / uniform (clipped at {cfg.max_relative_load:g})")
    fig.suptitle(f"{run.label}: load per expert (1.0 = balanced)")
    return _save(fig, path, cfg)


def draw_balance(run: Run, loads: list[LayerLoad], path: Path, cfg: PlotConfig) -> Path:
    """Two panels, one line per MoE layer: max load / mean load, and the starved experts' fraction."""
    import numpy as np

    fig = _figure(1, 2, cfg)
    left, right = fig.subplots(1, 2, squeeze=True, sharex=True)
    stages = stage_starts(run.metrics)
    for i, ll in enumerate(loads):
        rel = np.asarray(ll.relative, dtype=float)  # [E, steps], 1.0 = the balanced share
        left.plot(ll.steps, rel.max(axis=0), color=f"C{i % 10}", linewidth=1.2, label=f"layer {ll.layer}")
        right.plot(ll.steps, (rel < 0.25).mean(axis=0), color=f"C{i % 10}", linewidth=1.2, label=f"layer {ll.layer}")
    left.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    left.set_title("busiest expert's load / mean load (1.0 = balanced)", fontsize=10)
    right.set_title("fraction of experts under 1/4 of the balanced share", fontsize=10)
    right.set_ylim(-0.02, 1.02)
    for ax in (left, right):
        _mark_stages(ax, stages, by_tokens=False)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    fig.suptitle(f"{run.label}: expert balance")
    return _save(fig, path, cfg)


def plot_run(
    run_dir: str | Path, out_dir: str | Path, cfg: PlotConfig | None = None, notes: list[str] | None = None
) -> list[Path]:
    """Write ``loss.png``, for an MoE run ``expert_load.png`` and ``balance.png``, ``train_stats.png`` when the run
    logged any of ``STATS`` and for a DPO run ``rewards.png``, into ``out_dir``; return the paths.
    Anything worth telling the user (a dense run has no heatmap, a truncated last line, superseded
    records after a resume) is appended to ``notes`` when given."""
    cfg = cfg or PlotConfig()
    return _plot_loaded(load_run(run_dir), Path(out_dir), cfg, notes if notes is not None else [])


def _plot_loaded(run: Run, out_dir: Path, cfg: PlotConfig, notes: list[str]) -> list[Path]:
    notes.extend(run.metrics.warnings)
    if run.metrics.superseded:
        notes.append(f"{run.label}: {run.metrics.superseded} records superseded by a resumed run were left out")
    paths = [draw_loss(run, out_dir / "loss.png", cfg)]
    loads = expert_loads(run.metrics)
    if loads:
        paths.append(draw_expert_load(run, loads, out_dir / "expert_load.png", cfg))
        paths.append(draw_balance(run, loads, out_dir / "balance.png", cfg))
    else:
        notes.append(f"{run.label}: no expert_load records (a dense run?), so no expert-load heatmap")
    stats = {k: s for k in STATS if (s := train_series(run.metrics, k)).values}
    if stats:
        paths.append(draw_stats(run, stats, out_dir / "train_stats.png", cfg))
    if train_series(run.metrics, "rewards_accuracy").values:
        paths.append(draw_rewards(run, out_dir / "rewards.png", cfg))
    return paths


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 and names.count(n) == 1 else f"{n}-{seen[n]}")
    return out


def plot_compare(
    run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None,
    cfg: PlotConfig | None = None, notes: list[str] | None = None,
) -> list[Path]:  # fmt: skip
    """Overlay the runs' loss curves against tokens and against active FLOPs in ``compare_loss.png``."""
    cfg = cfg or PlotConfig()
    if labels is not None and len(labels) != len(run_dirs):
        raise EffilmError(f"{len(labels)} labels given for {len(run_dirs)} runs")
    runs = [load_run(d, label=labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    if notes is not None:
        for run in runs:
            notes.extend(run.metrics.warnings)
    return [draw_compare(runs, Path(out_dir) / "compare_loss.png", cfg)]


def draw_compare(runs: list[Run], path: Path, cfg: PlotConfig) -> Path:
    fig = _figure(1, 2, cfg, height=cfg.panel_height * 1.4)
    ax_tok, ax_flops = fig.subplots(1, 2, sharey=True)
    for i, run in enumerate(runs):
        color = f"C{i}"
        loss, flops = train_series(run.metrics, "loss"), active_flops_series(run)
        smooth = ema(loss.values, cfg.smoothing)
        ax_tok.plot(loss.tokens, smooth, color=color, label=f"{run.label} train")
        ax_flops.plot(flops.tokens, smooth, color=color, label=f"{run.label} train")
        by_flops = val_flops_series(run)
        for j, (source, s) in enumerate(val_series(run.metrics).items()):
            style = dict(color=color, linestyle="--", marker=VAL_MARKERS[j % len(VAL_MARKERS)], markersize=4)
            ax_tok.plot(s.tokens, s.values, label=f"{run.label} val: {source}", **style)
            ax_flops.plot(by_flops[source].tokens, by_flops[source].values, label=f"{run.label} val: {source}", **style)
    ax_tok.set_xlabel("tokens")
    ax_flops.set_xlabel("active training FLOPs (forward + backward)")
    ax_tok.set_ylabel("loss (nats/token, train smoothed)")
    for ax in (ax_tok, ax_flops):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("loss at equal tokens (left) and equal active compute (right)")
    return _save(fig, path, cfg)


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, cfg: PlotConfig | None = None,
              notes: list[str] | None = None) -> list[Path]:  # fmt: skip
    """What ``effilm plot`` does: ``plot_run`` for one run into ``out_dir``; for several, each run
    into ``out_dir/<run name>/`` plus ``plot_compare`` into ``out_dir``."""
    cfg = cfg or PlotConfig()
    notes = notes if notes is not None else []
    out_dir = Path(out_dir)
    if len(run_dirs) == 1:
        return plot_run(run_dirs[0], out_dir, cfg, notes)
    runs = [load_run(d) for d in run_dirs]  # load all first: a bad run fails before anything is written
    paths: list[Path] = []
    for run, name in zip(runs, _unique([r.path.resolve().name for r in runs])):
        paths += _plot_loaded(run, out_dir / name, cfg, notes)
    paths.append(draw_compare(runs, out_dir / "compare_loss.png", cfg))
    return paths


def draw_twin_gaps(rows: list[dict], path: str | Path, confidence: float = 0.95, cfg: PlotConfig | None = None) -> Path:
    """Public-versus-twin gaps, one row per model (``{"label", "public_acc", "twin_acc", "gap", "ci",
    "flagged"}``): left, both accuracies; right, the gap with its confidence interval, flagged
    rows in red, the no-gap line at 0."""
    cfg = cfg or PlotConfig()
    fig = _figure(1, 2, cfg, height=max(2.2, 0.6 * len(rows) + 1.2))
    left, right = fig.subplots(1, 2, squeeze=True, sharey=True)
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows, strict=True):
        left.plot([r["twin_acc"], r["public_acc"]], [y, y], color="0.7", linewidth=2, zorder=1)
        left.scatter([r["public_acc"]], [y], color="C0", zorder=2, label="public items" if y == ys[0] else None)
        left.scatter([r["twin_acc"]], [y], color="C1", marker="s", zorder=2, label="twins" if y == ys[0] else None)
        color = "C3" if r["flagged"] else "C2"
        lo, hi = r["ci"]
        right.errorbar([r["gap"]], [y], xerr=[[r["gap"] - lo], [hi - r["gap"]]], fmt="o", color=color, capsize=4)
        right.annotate("flagged" if r["flagged"] else "not flagged", (hi, y), xytext=(6, 0),
                       textcoords="offset points", va="center", fontsize=8, color=color)
    left.set_yticks(ys, [r["label"] for r in rows])
    left.set_xlim(-0.02, 1.02)
    left.set_xlabel("accuracy")
    left.legend(fontsize=8, loc="lower left")
    right.axvline(0.0, color="0.4", linestyle=":", linewidth=1)
    right.set_xlabel(f"gap: public - twins ({round(100 * confidence)}% bootstrap interval)")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x")
    right.margins(x=0.25)
    fig.suptitle("Private twins: public items against fresh items of the same templates")
    return _save(fig, Path(path), cfg)
