"""The command line: a table of subcommand modules, each a set of plain, typed functions.

Every module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on each parser to a function taking the parsed namespace. The
functions call the same Python API that users import, so the CLI, the API and the TOML run
files share one set of arguments. Modules import torch lazily, inside the functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from effilm import __version__
from effilm.errors import EffilmError

# One line per command module; later issues add theirs here.
COMMAND_MODULES: list[str] = [
    "effilm.commands.model",
    "effilm.commands.data",
    "effilm.commands.synth",
    "effilm.commands.evaluate",
    "effilm.commands.train",
    "effilm.commands.plot",
    "effilm.commands.generate",
    "effilm.commands.serve",
    "effilm.commands.ship",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effilm",
        description="effilm: build, train, evaluate and ship efficient language models.",
    )
    parser.add_argument("--version", action="version", version=f"effilm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except EffilmError as exc:
        print(f"effilm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
