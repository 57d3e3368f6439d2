"""``effilm train RUN.toml [--resume] [--section.key=value ...]``."""

from __future__ import annotations

import argparse
import signal

from effilm.config.reader import add_arguments, given, parse_value


def register(sub) -> None:
    from effilm.config.run import RunConfig

    p = sub.add_parser(
        "train",
        help="train a model from a TOML run file (one CPU, one GPU, or many under torchrun)",
        description=(
            "Train a model as RUN says (see configs/ and effilm.config.run for the keys). Any key can be "
            "overridden with a dotted flag, e.g. --optim.lr=3e-4 --train.global-batch=32 "
            "--model.moe.num-experts=16 (underscores work too). Under `torchrun --nproc_per_node=N -m effilm "
            "train RUN` the model is sharded with FSDP2 and, for MoE models, its experts spread over the ranks."
        ),
        epilog="Metrics go to OUT_DIR/metrics.jsonl (plot them with `effilm plot OUT_DIR`), checkpoints to "
        "OUT_DIR/checkpoints/, the trained model to OUT_DIR/final/. One run at a time per OUT_DIR (a lock, "
        "OUT_DIR/.lock). Exit status: 0 when training finished; 143 (SIGTERM) or 130 (SIGINT) when a signal "
        "stopped it after writing a checkpoint (continue with --resume); 2 for bad input.",
    )
    p.add_argument("run", metavar="RUN", help="run file (.toml), or a run's config.json")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    overrides = p.add_argument_group("run-file overrides (every key of the run file; lists of tables only in the file)")
    overrides.add_argument("--model.preset", dest="model.preset", type=parse_value, default=argparse.SUPPRESS,
                           metavar="PRESET", help="Start [model] from this preset (see `effilm presets`).")
    add_arguments(overrides, RunConfig)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import json

    from effilm.config.run import RunConfig, load_run_config

    overrides = given(args, RunConfig)
    if "model.preset" in vars(args):
        overrides["model.preset"] = vars(args)["model.preset"]
    cfg = load_run_config(args.run, overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from effilm.train.loop import train

    result = train(cfg, resume=args.resume, progress=False if args.no_progress else None)
    if result.final_dir is not None or result.stopped_early:
        parts = [f"{result.steps} steps, {result.tokens:,} tokens"]
        if result.final_loss is not None:
            parts.append(f"last loss {result.final_loss:.4f}")
        for name, v in result.val_loss.items():
            parts.append(f"val[{name}] {v:.4f}")
        print("trained: " + ", ".join(parts))
        if result.stopped_early:
            print(f"stopped by {result.stopped_early}; checkpoint {result.checkpoint}; continue with --resume")
            return 128 + signal.Signals[result.stopped_early].value  # 143 for SIGTERM: not finished
        print(f"model: {result.final_dir}")
    return 0
