"""``effilm train RUN.toml [--resume] [--section.key=value ...]``."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a TOML run file (one CPU, one GPU, or many under torchrun)",
        description=(
            "Train a model as RUN says (see configs/ and effilm.config.run for the keys). Any key can be "
            "overridden with a dotted flag, e.g. --optim.lr=3e-4 --train.global_batch=32 "
            "--model.moe.num_experts=16. Under `torchrun --nproc_per_node=N -m effilm train RUN` the model "
            "is sharded with FSDP2 and, for MoE models, its experts spread over the ranks."
        ),
        epilog="Metrics go to OUT_DIR/metrics.jsonl (plot them with `effilm plot OUT_DIR`), checkpoints to "
        "OUT_DIR/checkpoints/, the trained model to OUT_DIR/final/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run file (.toml), or a run's config.json")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=cmd_train, accepts_overrides=True, overrides=[])


def cmd_train(args) -> int:
    import json

    from effilm.config.run import load_run_config

    cfg = load_run_config(args.run, _pairs(args.overrides))
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
        else:
            print(f"model: {result.final_dir}")
    return 0


def _pairs(extra: list[str]) -> list[str]:
    """``--a.b=v`` and ``--a.b v`` both become ``a.b=v``; anything else is an error."""
    from effilm.errors import ConfigError

    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        key = item.split("=", 1)[0]
        if not item.startswith("--") or "." not in key:
            raise ConfigError(f"unrecognized argument {item!r}; overrides look like --section.key=value")
        if "=" in item:
            out.append(item[2:])
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{item[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {item} has no value; write {item}=VALUE")
    return out
