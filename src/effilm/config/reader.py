"""The one config mechanism: files, dicts, dotted overrides and command-line flags, into any config
dataclass.

Every config in effilm is a plain ``@dataclass`` whose fields carry their help text
(``option(default, "help")``) and whose ``__post_init__`` validates. This module is the only
reader of them:

* :func:`build` turns plain data (a dict from TOML or JSON) into a dataclass: nested tables become
  nested dataclasses (also inside lists and dicts), every value is checked against its field's
  type, and an unknown key is an error with a did-you-mean suggestion. A class may define
  ``__config_expand__(data) -> data`` to expand shorthand first (``[model] preset = NAME``).
* :func:`read_file` reads TOML or JSON, naming the file in any error; :func:`load` is
  ``read_file`` + :func:`apply_overrides` + :func:`build`.
* :func:`apply_overrides` applies dotted ``KEY=VALUE`` overrides (``optim.lr=3e-4``), each key
  checked against the dataclass fields. Values are TOML literals; ``none`` means None; anything
  else is a string.
* :func:`add_arguments` generates a subcommand's flags from the same fields and help text
  (``--optim.lr``, ``--vocab-size``), so every default is written once, in the dataclass; and
  :func:`given` collects the flags the user gave, as overrides for :func:`build` or :func:`load`.

Flags spell a field's name with dashes (``--log-every``); the command line also accepts
underscores (``--train.log_every=4``), see :func:`normalize_flag`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from effilm.errors import ConfigError, closest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NONE_WORDS = ("none", "null")


def option(default: Any = None, help: str = "", factory=None):  # noqa: A002 - 'help' reads best here
    """A dataclass field with its help text (shown by ``-h`` and in generated docs)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def choice(obj, where: str, name: str, choices) -> None:
    """Raise naming ``where.name`` when its value is not one of ``choices`` (with a suggestion)."""
    v = getattr(obj, name)
    if v not in choices:
        near = closest(str(v), [str(c) for c in choices])
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{where}.{name}={v!r} must be one of {tuple(choices)}{hint}")


# ----- building dataclasses from plain data --------------------------------------------------------
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _unknown(cls, data: Mapping, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            near = closest(str(k), names)
            hints.append(f"{k!r}" + (f" (did you mean {', '.join(map(repr, near))}?)" if near else ""))
        raise ConfigError(f"unknown {where + ' ' if where else ''}config key(s): {', '.join(hints)}")


def _convert(tp, value, where: str):
    """``value`` as type ``tp``: dataclasses built from tables, containers converted element by
    element, ints accepted for floats; anything else that does not fit is an error naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}={value!r} should be of type {type_name(tp)}, not {type(value).__name__}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of keys, got {type(value).__name__}")
        return build(tp, value, where)
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (Any,))[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} should be a list, not {type(value).__name__}")
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        k_t, v_t = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return {_convert(k_t, k, f"{where} key"): _convert(v_t, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, float),
        str: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is not None and not ok(value):
        raise ConfigError(f"{where}={value!r} should be of type {type_name(tp)}, not {type(value).__name__}")
    return value


def build(cls, data: Mapping | None = None, where: str = ""):
    """``cls`` from plain data; see the module docstring. ``where`` prefixes every key in errors
    (``"optim"`` gives ``optim.lr``); a file name may stand before it (``"run.toml: optim"``)."""
    data = {} if data is None else data
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a table of keys, got {type(data).__name__}")
    expand = getattr(cls, "__config_expand__", None)
    data = dict(expand(dict(data), where) if expand else data)
    _unknown(cls, data, where)
    hints = _hints(cls)
    kwargs = {k: _convert(hints[k], v, _key(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field left out
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(obj) -> dict:
    """The plain-data form of a config (what :func:`build` reads back to an equal config)."""
    return dataclasses.asdict(obj)


# ----- files and dotted overrides ----------------------------------------------------------------
def read_file(path: str | Path, what: str = "config file") -> dict:
    """The dict of a TOML or JSON (``.json``) file; any problem is one error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found" if not path.exists() else f"{path}: {what} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: not a valid {what}: {exc}") from None


def parse_value(raw: str):
    """A command-line value: a TOML literal when it parses as one, ``none`` for None, else a string."""
    if raw.strip().lower() in NONE_WORDS:
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _field_types(cls) -> dict[str, Any]:
    return {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls)}


def _table_type(tp):
    """The dataclass a field holds as a table (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def check_key(cls, key: str) -> None:
    """Raise naming ``key`` unless it is a dotted path of fields of ``cls`` (or of a class's
    ``__config_extra_keys__``, such as ``[model] preset``)."""
    keys = key.split(".")
    node = cls
    for depth, k in enumerate(keys):
        names = [f.name for f in dataclasses.fields(node)] + list(getattr(node, "__config_extra_keys__", ()))
        if k not in names:
            near = closest(k, names)
            prefix = ".".join(keys[:depth])
            hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
            raise ConfigError(f"unknown config key {_key(prefix, k)}{hint}")
        if depth == len(keys) - 1:
            return
        nxt = _table_type(_field_types(node).get(k))
        if nxt is None:
            raise ConfigError(f"{key}: {'.'.join(keys[: depth + 1])} is not a table of keys")
        node = nxt


def apply_overrides(cls, data: Mapping, overrides: Mapping[str, Any] | Iterable[str]) -> dict:
    """``data`` with dotted overrides applied: a mapping ``{"optim.lr": 3e-4}`` or strings
    ``"optim.lr=3e-4"`` (a leading ``--`` is allowed). Each key must name fields of ``cls``."""
    d = json.loads(json.dumps(dict(data)))  # a deep copy of plain data
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            text = item[2:] if item.startswith("--") else item
            if "=" not in text:
                raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. optim.lr=3e-4)")
            key, raw = text.split("=", 1)
            pairs[key.replace("-", "_")] = parse_value(raw)
        overrides = pairs
    for key, value in overrides.items():
        check_key(cls, key)
        node = d
        parts = key.split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {k} is not a table")
        node[parts[-1]] = value
    return d


def load(cls, path: str | Path | None = None, overrides: Mapping | Iterable[str] = (), section: str | None = None,
         what: str = "config file"):
    """``cls`` from the file at ``path`` (its ``[section]`` table when given and present), with
    ``overrides`` applied; without a path, from the dataclass defaults and the overrides. Errors
    name the file and the key (``run.toml: demo.seed=...``)."""
    data: dict = {}
    where = ""
    if path is not None:
        data = read_file(path, what)
        if section and isinstance(data.get(section), dict):
            data = data[section]
        where = str(path)
    try:
        return build(cls, apply_overrides(cls, data, overrides), section or "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


# ----- command-line flags --------------------------------------------------------------------------
def normalize_flag(arg: str) -> str:
    """``--train.log_every=4`` -> ``--train.log-every=4``: flags may use underscores or dashes."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def _scalar(tp) -> bool:
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    return all(a in (int, float, str, bool) for a in inner)


def _list_of_scalars(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) == 1 and _list_of_scalars(args[0])
    return typing.get_origin(tp) in (list, tuple) and _list_item(tp) in (int, float, str)


def _list_item(tp):
    if typing.get_origin(tp) in (list, tuple):
        return typing.get_args(tp)[0]
    return _list_item(next(a for a in typing.get_args(tp) if a is not type(None)))


def _default_text(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _flag_value(tp):
    """argparse ``type`` for a field: strings stay as typed; anything else is a TOML literal."""
    plain_str = tp is str
    return (lambda raw: raw) if plain_str else parse_value


def add_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: Iterable[str] = (),
                  positional: Iterable[str] = (), group_title: str | None = None) -> None:
    """Add one flag per field of ``cls`` (nested tables as ``--table.field``), with the field's
    help and default. Flags default to *absent*: :func:`given` returns only what the user typed,
    and the dataclass supplies every default. Fields that only a file can hold (lists of tables,
    dicts) get no flag; ``skip`` leaves out others; ``positional`` makes fields positional."""
    target = parser.add_argument_group(group_title) if group_title else parser
    _add_fields(target, cls, prefix, set(skip), set(positional))


def _add_fields(target, cls, prefix: str, skip: set, positional: set) -> None:
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if f.name in skip or name in skip:
            continue
        tp = _hints(cls)[f.name]
        table = _table_type(tp)
        if table is not None:
            _add_fields(target, table, f"{name}.", skip, set())
            continue
        default = field_default(f)
        help_text = field_help(f).replace("%", "%%")
        if f.name in positional:
            target.add_argument(name, type=_flag_value(tp), help=help_text)
            continue
        flag = "--" + name.replace("_", "-")
        shown = "" if default is dataclasses.MISSING else f" (default: {_default_text(default)})".replace("%", "%%")
        if tp is bool:
            target.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text + shown)
        elif _scalar(tp):
            target.add_argument(flag, dest=name, type=_flag_value(tp), default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text + shown)
        elif _list_of_scalars(tp):
            target.add_argument(flag, dest=name, nargs="*", type=_flag_value(_list_item(tp)),
                                default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text + shown)


def given(args: argparse.Namespace, cls, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` (dotted keys for nested tables) that the command line set."""
    out = {}
    ns = vars(args)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        table = _table_type(_hints(cls)[f.name])
        if table is not None:
            out.update(given(args, table, prefix=f"{name}."))
        elif name in ns:
            out[name] = ns[name]
    return out


def from_args(cls, args: argparse.Namespace):
    """``cls`` built from its defaults and the flags the user gave (for commands with no file)."""
    return build(cls, apply_overrides(cls, {}, given(args, cls)))
