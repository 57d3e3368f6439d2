"""Run configs: the TOML file ``effilm train`` reads, and the dotted-key overrides.

A run file maps one-to-one onto :class:`RunConfig`::

    out_dir = "runs/demo"
    tokenizer = "tok"                 # optional: checked against the model and the shards

    [model]
    preset = "tiny-dense"             # start from a preset; any ModelConfig key overrides it
    n_layers = 6

    [data]                            # effilm.config.data.DataConfig
    seq_len = 256
    [[data.sources]]
    name = "web"
    path = "tokens/web"
    [[data.stages]]
    name = "stage1"
    tokens = 2_000_000
    mixture = { web = 1.0 }

    [optim]                           # OptimConfig
    lr = 1e-3

    [train]                           # TrainConfig
    global_batch = 16

On the command line, ``--optim.lr=3e-4`` or ``--model.moe.num_experts=16`` override any key.
Values are parsed as TOML literals (``3e-4``, ``true``, ``"text"``, ``[1, 2]``); ``none`` means
None; anything else is taken as a string. Unknown keys and wrong types are errors naming the key.
The resolved config (``RunConfig.to_dict()``) is written as ``config.json`` into the run directory
and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from effilm.config.data import DataConfig, known_keys
from effilm.config.model import ModelConfig, MoEConfig
from effilm.errors import ConfigError, closest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _f(default: Any = None, help: str = "", factory=None):  # noqa: A002
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


SCHEDULES = ("cosine", "wsd", "constant")
SCHEDULE_SCOPES = ("run", "stage")
DECAY_SHAPES = ("linear", "cosine", "sqrt")
NAN_POLICIES = ("stop", "skip")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PARALLELISMS = ("auto", "fsdp", "fsdp+ep")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = _f(3e-4, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of the peak.")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    weight_decay: float = _f(0.1, "Decoupled weight decay for matrices; norms, biases and embeddings get none.")
    decay_embeddings: bool = _f(False, "Also decay the embedding (and an untied LM head counts as a matrix).")
    grad_clip: float | None = _f(1.0, "Clip the global gradient norm to this; None = no clipping.")
    schedule: str = _f("cosine", f"One of {SCHEDULES}: warmup then cosine decay, warmup-stable-decay, or warmup then constant.")
    warmup_steps: int = _f(100, "Linear warmup steps (at the start of the run, or of each stage with scope='stage').")
    decay_fraction: float = _f(0.2, "wsd: fraction of the steps (of the run or stage) spent decaying at the end.")
    decay_shape: str = _f("linear", f"wsd: shape of the final decay, one of {DECAY_SHAPES}.")
    scope: str = _f("run", f"One of {SCHEDULE_SCOPES}: one schedule across all stages, or restart it at each stage.")
    foreach: bool | None = _f(None, "Use torch's multi-tensor AdamW; None = torch's default for the device.")

    def __post_init__(self) -> None:
        _choice(self, "optim", "schedule", SCHEDULES)
        _choice(self, "optim", "scope", SCHEDULE_SCOPES)
        _choice(self, "optim", "decay_shape", DECAY_SHAPES)
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr!r} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio!r} must lie in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}={getattr(self, name)!r} must lie in [0, 1)")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError("optim.weight_decay must be >= 0 and optim.eps > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip!r} must be positive or none")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps!r} must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction!r} must lie in [0, 1]")


@dataclass
class TrainConfig:
    """The loop: batch sizes, precision, logging, validation, checkpoints, failure handling."""

    global_batch: int = _f(8, "Sequences per optimizer step, over all ranks.")
    micro_batch: int = _f(8, "Sequences per forward pass on one rank; gradient accumulation covers the rest.")
    seed: int = _f(0, "Seed of the model initialisation (the data order has its own, data.seed).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (default: the stages' token budgets).")
    device: str = _f("auto", f"One of {DEVICES}; auto = cuda when available (the torchrun local rank's GPU).")
    precision: str = _f("auto", f"One of {PRECISIONS}; auto = bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool = _f(False, "Wrap the model in torch.compile.")
    parallelism: str = _f(
        "auto", f"One of {PARALLELISMS} under torchrun; auto = fsdp+ep for MoE models, fsdp for dense ones."
    )
    log_every: int = _f(10, "Write a metrics record every this many steps (and at the last step).")
    eval_every: int = _f(100, "Validation loss every this many steps (and at the end); 0 = only at the end.")
    save_every: int = _f(100, "Checkpoint every this many steps (and at the end); 0 = only at the end.")
    keep_last: int = _f(3, "Checkpoints kept; older ones are deleted once a newer one is complete.")
    nan_policy: str = _f("stop", f"On a non-finite loss or gradient: one of {NAN_POLICIES} (skip drops that step's update).")
    max_skips: int = _f(10, "With nan_policy='skip', stop after this many consecutive skipped steps.")
    progress: bool = _f(True, "Show a progress bar with the ETA (rank 0 only).")
    threads: int | None = _f(None, "torch CPU threads (None = torch's default).")
    precheck_benchmarks: list[str] = _f(
        help="Benchmark task specs (as for `effilm decontam --benchmark`) to check the data sources' texts "
        "against before training.",
        factory=list,
    )
    precheck_fail: bool = _f(True, "Stop before training when the pre-check finds contamination (else warn).")

    def __post_init__(self) -> None:
        for name in ("global_batch", "micro_batch", "log_every", "keep_last", "max_skips"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"train.{name}={v!r} must be a positive integer")
        for name in ("eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"train.{name}={v!r} must be an integer >= 0")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"train.max_steps={self.max_steps!r} must be positive or none")
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"train.global_batch={self.global_batch} must be a multiple of train.micro_batch={self.micro_batch}"
            )
        _choice(self, "train", "device", DEVICES)
        _choice(self, "train", "precision", PRECISIONS)
        _choice(self, "train", "nan_policy", NAN_POLICIES)
        _choice(self, "train", "parallelism", PARALLELISMS)


@dataclass
class RunConfig:
    """Everything one training run needs."""

    out_dir: str = _f("runs/run", "Run directory: config.json, metrics.jsonl, checkpoints/ and final/.")
    tokenizer: str | None = _f(None, "Tokenizer directory; when given, checked against the model and the shards.")
    model: ModelConfig = _f(help="The model ([model] table; `preset = NAME` starts from a preset).", factory=ModelConfig)
    data: DataConfig | None = _f(None, "Sources and stages ([data] table).")
    optim: OptimConfig = _f(help="Optimizer and schedule ([optim] table).", factory=OptimConfig)
    train: TrainConfig = _f(help="The loop ([train] table).", factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data is None:
            raise ConfigError("the run config needs a [data] table with sources and stages")
        if not self.out_dir:
            raise ConfigError("out_dir must be a non-empty path")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds the model's max_seq_len={self.model.max_seq_len}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def with_absolute_paths(self) -> RunConfig:
        """A copy whose paths (out_dir, tokenizer, each source's path) are absolute, so that the
        run's ``config.json`` means the same files from whatever directory it is read.
        Relative paths in a run file are relative to the working directory it is run from."""
        def absolute(p: str) -> str:
            return os.path.abspath(os.path.expanduser(p))

        data = dataclasses.replace(
            self.data, sources=[dataclasses.replace(s, path=absolute(s.path)) for s in self.data.sources]
        )
        return dataclasses.replace(
            self, out_dir=absolute(self.out_dir), tokenizer=self.tokenizer and absolute(self.tokenizer), data=data
        )

    @classmethod
    def from_dict(cls, d: dict, where: str = "run config") -> RunConfig:
        d = dict(known_keys(cls, d, "run"))
        try:
            if "model" in d:
                d["model"] = model_from_table(d["model"])
            if "data" in d:
                d["data"] = typed(DataConfig, known_keys(DataConfig, d["data"], "data"), "data")
            if "optim" in d:
                d["optim"] = typed(OptimConfig, known_keys(OptimConfig, d["optim"], "optim"), "optim")
            if "train" in d:
                d["train"] = typed(TrainConfig, known_keys(TrainConfig, d["train"], "train"), "train")
            check_types(cls, {k: v for k, v in d.items() if k in ("out_dir", "tokenizer")}, "")
            return cls(**d)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def model_from_table(t: dict) -> ModelConfig:
    """``[model]``: optional ``preset`` plus ModelConfig keys overriding it."""
    if not isinstance(t, dict):
        raise ConfigError("[model] must be a table")
    t = dict(t)
    preset = t.pop("preset", None)
    if preset is not None:
        base = ModelConfig.from_name(preset).to_dict()
        moe_over = t.pop("moe", None)
        if isinstance(moe_over, dict) and isinstance(base.get("moe"), dict):
            base["moe"] = {**base["moe"], **moe_over}
        elif moe_over is not None:
            base["moe"] = moe_over
        base.update(t)
        t = base
    known_keys(ModelConfig, t, "model")
    if isinstance(t.get("moe"), dict):
        check_types(MoEConfig, known_keys(MoEConfig, t["moe"], "model.moe"), "model.moe")
    return typed(ModelConfig, t, "model")


# ----- type checking ------------------------------------------------------------------------
def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        k_t, v_t = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, k_t) and _type_ok(v, v_t) for k, v in value.items())
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, dict))
    return True


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_types(cls, d: dict, where: str) -> None:
    """Raise ConfigError naming the first key of ``d`` whose value does not fit ``cls``'s field type."""
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        if k in hints and not _type_ok(v, hints[k]):
            key = f"{where}.{k}" if where else k
            raise ConfigError(f"{key}={v!r} should be of type {_type_name(hints[k])}, not {type(v).__name__}")


def typed(cls, d: dict, where: str):
    check_types(cls, d, where)
    return cls(**d)


def _choice(obj, where: str, name: str, choices) -> None:
    v = getattr(obj, name)
    if v not in choices:
        near = closest(str(v), list(choices))
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{where}.{name}={v!r} must be one of {choices}{hint}")


# ----- files and overrides ------------------------------------------------------------------
def parse_value(raw: str):
    """A command-line value: a TOML literal when it parses as one, ``none`` for None, else a string."""
    if raw.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def _known_path(keys: list[str]) -> None:
    """Check a dotted override path names real fields (``model.moe.num_experts``, ``optim.lr``)."""
    cls = RunConfig
    for depth, k in enumerate(keys):
        if cls is ModelConfig and k == "preset":
            if depth != len(keys) - 1:
                break
            return
        names = [f.name for f in fields(cls)]
        if k not in names:
            near = closest(k, names)
            prefix = ".".join(keys[:depth])
            where = f"--{prefix + '.' if prefix else ''}{k}"
            hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
            raise ConfigError(f"unknown config key {where}{hint}")
        if depth == len(keys) - 1:
            return
        nxt = _SECTIONS.get(k) if cls is RunConfig else None
        if cls is ModelConfig and k == "moe":
            nxt = MoEConfig
        if nxt is None:
            raise ConfigError(f"--{'.'.join(keys)}: {'.'.join(keys[: depth + 1])} is not a table of keys")
        cls = nxt


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` (or ``--KEY=VALUE``) dotted overrides to the raw run dict."""
    d = json.loads(json.dumps(d))  # deep copy of plain data
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        key, raw = text.split("=", 1)
        keys = key.split(".")
        _known_path(keys)
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a table")
        node[keys[-1]] = parse_value(raw)
    return d


def read_run_file(path: str | Path) -> dict:
    """The raw dict of a run file: TOML, or a JSON config.json written by an earlier run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: run config file not found")
    try:
        if path.suffix == ".json":
            d = json.loads(path.read_text())
            return d.get("run", d)  # a checkpoint's config.json keeps the run under "run"
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid run file: {exc}") from None


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    d = apply_overrides(read_run_file(path), list(overrides or []))
    return RunConfig.from_dict(d, where=str(path))
