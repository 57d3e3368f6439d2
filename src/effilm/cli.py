"""The command line: a table of subcommand modules, each a set of plain, typed functions.

Every module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on each parser to a function taking the parsed namespace. Their
flags are generated from the config dataclasses by :mod:`effilm.config.reader`, so the CLI, the
Python API and the TOML files share one set of arguments and one set of defaults. Flags accept
dashes or underscores (``--train.log_every=4`` is ``--train.log-every=4``). Modules import torch
lazily, inside the functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from effilm import __version__
from effilm.errors import EffilmError, closest

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
    "effilm.commands.quality",
]


class Parser(argparse.ArgumentParser):
    """No abbreviated flags (``--min-word`` must not silently mean ``--min-words``), and an
    unknown flag gets a did-you-mean suggestion."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for word in message.split(":", 1)[1].split():
                near = closest(word.split("=")[0], known) if word.startswith("--") else []
                if near:
                    hints.append(f"{word.split('=')[0]}: did you mean {', '.join(near)}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="effilm",
        description="effilm: build, train, evaluate and ship efficient language models.",
    )
    parser.add_argument("--version", action="version", version=f"effilm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _mark_parsers(parser)
    return parser


def _mark_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser records itself, so errors about its flags come from it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                p.set_defaults(_parser=p)
                _mark_parsers(p)


def main(argv: list[str] | None = None) -> int:
    import warnings

    from effilm.config.reader import normalize_flag

    # effilm's own warnings (a stale lock taken over, a smaller vocabulary than asked) as one line each
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args([normalize_flag(a) for a in argv])
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
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
