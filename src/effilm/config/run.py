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

On the command line, ``--optim.lr=3e-4`` or ``--model.moe.num-experts=16`` override any key
(flags generated from these dataclasses by :mod:`effilm.config.reader`, the one config reader).
Values are parsed as TOML literals (``3e-4``, ``true``, ``"text"``, ``[1, 2]``); ``none`` means
None; anything else is taken as a string. Unknown keys and wrong types are errors naming the key.
The resolved config (``RunConfig.to_dict()``) is written as ``config.json`` into the run directory
and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from effilm.config.data import DataConfig
from effilm.config.hf import expand_init_from
from effilm.config.model import ModelConfig
from effilm.config.reader import build, choice, read_file
from effilm.config.reader import option as _f
from effilm.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
SCHEDULE_SCOPES = ("run", "stage")
DECAY_SHAPES = ("linear", "cosine", "sqrt")
NAN_POLICIES = ("stop", "skip")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PARALLELISMS = ("auto", "fsdp", "fsdp+ep")
OBJECTIVES = ("lm", "sft", "dpo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
DPO_REFERENCES = ("precomputed", "model")


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
        choice(self, "optim", "schedule", SCHEDULES)
        choice(self, "optim", "scope", SCHEDULE_SCOPES)
        choice(self, "optim", "decay_shape", DECAY_SHAPES)
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

    objective: str = _f("lm", f"One of {OBJECTIVES}: lm = next-token loss on every token; sft = only on the loss-masked "
                         "tokens of chat data (assistant turns), normalised by their count in the global batch; dpo = "
                         "direct preference optimisation on preference pairs (see the [dpo] table).")
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
        choice(self, "train", "device", DEVICES)
        choice(self, "train", "precision", PRECISIONS)
        choice(self, "train", "nan_policy", NAN_POLICIES)
        choice(self, "train", "parallelism", PARALLELISMS)
        choice(self, "train", "objective", OBJECTIVES)


@dataclass
class DPOConfig:
    """Direct preference optimisation (``objective = "dpo"``): the ``[dpo]`` table."""

    beta: float = _f(0.1, "Strength of the pull toward the reference model (DPO's beta; IPO's tau).")
    loss: str = _f("sigmoid", f"One of {DPO_LOSSES}: DPO's -log sigmoid(beta * margin), IPO's squared loss on the "
                   "per-token margin, or the hinge max(0, 1 - beta * margin).")
    reference: str = _f("precomputed", f"One of {DPO_REFERENCES}: the reference model's log-probabilities computed once "
                        "before training and stored in the run directory (one model in memory), or a frozen copy "
                        "of the starting model kept in memory.")

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0 \
                or self.beta != self.beta or self.beta == float("inf"):  # fmt: skip
            raise ConfigError(f"dpo.beta={self.beta!r} must be a positive number")
        choice(self, "dpo", "loss", DPO_LOSSES)
        choice(self, "dpo", "reference", DPO_REFERENCES)


@dataclass
class RunConfig:
    """Everything one training run needs."""

    out_dir: str = _f("runs/run", "Run directory: config.json, metrics.jsonl, checkpoints/ and final/.")
    tokenizer: str | None = _f(None, "Tokenizer directory; when given, checked against the model and the shards.")
    model: ModelConfig = _f(help="The model ([model] table; `preset = NAME` starts from a preset).", factory=ModelConfig)
    data: DataConfig | None = _f(None, "Sources and stages ([data] table).")
    optim: OptimConfig = _f(help="Optimizer and schedule ([optim] table).", factory=OptimConfig)
    train: TrainConfig = _f(help="The loop ([train] table).", factory=TrainConfig)
    dpo: DPOConfig = _f(help="Preference optimisation, for objective = 'dpo' ([dpo] table).", factory=DPOConfig)

    @classmethod
    def __config_expand__(cls, d: dict, where: str = "") -> dict:
        """``[model] init_from = DIR``: the architecture comes from DIR (see ``expand_init_from``)."""
        if isinstance(d.get("model"), dict) and d["model"].get("init_from"):
            d = {**d, "model": expand_init_from(d["model"])}
        return d

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
        model = dataclasses.replace(self.model, init_from=self.model.init_from and absolute(self.model.init_from))
        return dataclasses.replace(
            self, out_dir=absolute(self.out_dir), tokenizer=self.tokenizer and absolute(self.tokenizer), data=data,
            model=model,
        )

    @classmethod
    def from_dict(cls, d: dict, where: str = "run config") -> RunConfig:
        try:
            return build(cls, d)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def read_run_file(path: str | Path) -> dict:
    """The raw dict of a run file: TOML, or a JSON config.json written by an earlier run (which
    keeps the run under ``"run"``)."""
    d = read_file(path, "run config file")
    return d.get("run", d) if Path(path).suffix == ".json" else d


def load_run_config(path: str | Path, overrides=()) -> RunConfig:
    """The run file at ``path`` with dotted ``overrides`` (``{"optim.lr": 3e-4}`` or ``["optim.lr=3e-4"]``)."""
    from effilm.config.reader import apply_overrides

    d = read_run_file(path)
    try:
        return build(RunConfig, apply_overrides(RunConfig, d, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
