"""Plot commands: ``effilm plot RUN_DIR [RUN_DIR ...]``."""

from __future__ import annotations

import argparse
import warnings

from effilm.config.reader import add_arguments, from_args


def register(sub) -> None:
    from effilm.reports.plots import PlotConfig  # light: matplotlib is imported only when drawing

    p = sub.add_parser(
        "plot",
        help="plot a training run: loss, LR, expert load; compare runs",
        description="Write PNG plots of training runs from RUN_DIR/metrics.jsonl (and config.json). For one "
        "run: loss.png (train and validation loss per source, learning rate, against step and tokens, "
        "stage starts marked) and, for an MoE run, expert_load.png (one heatmap per MoE layer: step x "
        "expert, colour = load relative to uniform) and balance.png (per layer: the busiest expert's load over the mean, "
        "and the fraction of experts under a quarter of the balanced share). For several runs: each run's plots in OUT/<run name>/ "
        "plus compare_loss.png, their loss curves overlaid against tokens and against active training "
        "FLOPs.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories")
    p.add_argument("--out", default=None,
                   help="output directory (default: RUN_DIR/plots for one run, ./plots for several)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace earlier plots in the output directory")
    add_arguments(p, PlotConfig, group_title="figures")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from effilm.outputs import claim_dir, mark
    from effilm.reports.plots import PlotConfig, plot_runs

    out = args.out or (str(Path(args.run_dirs[0]) / "plots") if len(args.run_dirs) == 1 else "plots")
    cfg = from_args(PlotConfig, args)
    read = [Path(d) / name for d in args.run_dirs for name in ("metrics.jsonl", "config.json")]
    claim_dir(out, "plot", sources=read, overwrite=args.overwrite, what="--out")
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same text comes back in notes, printed once below
        paths = plot_runs(args.run_dirs, out, cfg, notes)
    mark(out, "plot")
    for note in notes:
        print(f"note: {note}")
    for path in paths:
        print(path)
    return 0
