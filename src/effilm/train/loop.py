"""The training loop: ``train(cfg)``, importable, and behind ``effilm train RUN.toml``.

``train()`` is a short loop over :func:`train_step`. One step takes ``global_batch`` sequences:
``global_batch / world_size`` per rank, in micro-batches of ``micro_batch`` (gradient
accumulation), each through the run's objective (:mod:`effilm.train.objectives`: the loss is
normalised over the *global* batch, so the gradient is the same however the batch is split);
then the NaN policy, clipping and the optimizer step. :class:`Trainer` holds what is built once;
the :class:`~effilm.train.checkpointer.Checkpointer` saves, resumes and prunes; the parallel
helpers (:mod:`effilm.train.parallel`) make every call the same at any world size.

Everything that can be wrong with the inputs (files, checksums, keys, vocabularies) is checked
before the first step. Checkpoints hold everything needed to continue bitwise-identically.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effilm.config.run import RunConfig
from effilm.errors import EffilmError
from effilm.train.checkpointer import Checkpointer, Position
from effilm.train.init import load_initial_weights, resolve_init
from effilm.train.metrics import MetricsLog, Window
from effilm.train.objectives import MicroLoss, Objective, StepContext, make_objective
from effilm.train.parallel import Dist, clip_grad_norm_, init_distributed, parallelize


class TrainingError(EffilmError):
    """Training stopped on purpose (non-finite loss, too many skipped steps)."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float | None
    val_loss: dict[str, float] = field(default_factory=dict)
    final_dir: Path | None = None
    checkpoint: Path | None = None
    resumed_from: int | None = None
    stopped_early: str | None = None


# ----- setup --------------------------------------------------------------------------------------
def _device_and_autocast(cfg: RunConfig, dist):
    import torch

    from effilm.device import resolve_device

    device = resolve_device(cfg.train.device, dist.local_rank if dist is not None else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    amp = torch.bfloat16 if precision == "bf16" else None
    return device, amp


def preflight(cfg: RunConfig, rank: int = 0, world_size: int = 1):
    """Open (and checksum) the data, check tokenizer and vocab; returns the loader. Writes nothing."""
    from effilm.data.loader import StagedLoader

    t = cfg.train
    if t.global_batch % world_size or (t.global_batch // world_size) % t.micro_batch:
        raise EffilmError(
            f"train.global_batch={t.global_batch} must split into world_size={world_size} ranks of whole "
            f"micro-batches of train.micro_batch={t.micro_batch}"
        )
    loader = StagedLoader(cfg.data, t.global_batch, t.micro_batch, rank=rank, world_size=world_size,
                          model_vocab_size=cfg.model.vocab_size)
    if cfg.tokenizer:
        from effilm.data.tokenizer import check_vocab, load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
        check_vocab(tok, cfg.model.vocab_size)
        for name, ds in loader.datasets.items():
            if ds.tokenizer_sha256 != tok.sha256:
                raise EffilmError(
                    f"data source {name!r} was tokenized with another tokenizer than {cfg.tokenizer} "
                    "(tokenizer.json sha256 differs); re-tokenize or point `tokenizer` at the right one"
                )
    if t.objective == "sft" and not loader.has_loss_mask:
        raise EffilmError("objective 'sft' needs loss masks: none of the data sources has them (tokenize chat data "
                          "with `effilm data tokenize --chat`)")  # fmt: skip
    if (t.objective == "dpo") != loader.pairs:
        raise EffilmError("objective 'dpo' needs preference pairs (tokenize them with `effilm data tokenize "
                          "--preferences`)" if t.objective == "dpo" else
                          f"the data sources hold preference pairs, which only objective 'dpo' trains on "
                          f"(train.objective is {t.objective!r})")  # fmt: skip
    if t.precheck_benchmarks:
        _precheck(cfg)
    return loader


def _precheck(cfg: RunConfig) -> None:
    from effilm.eval.decontam_scan import precheck

    sources = [s.path for s in cfg.data.sources]
    summary = precheck(sources, cfg.train.precheck_benchmarks, fail_on_contamination=cfg.train.precheck_fail)
    hits = summary.get("contaminated_items", 0)
    if hits:
        print(f"warning: contamination pre-check found {hits} benchmark item(s) in the training data", file=sys.stderr)


class _StopFlag:
    """SIGTERM / SIGINT: finish the current step, checkpoint, and stop."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ----- validation -----------------------------------------------------------------------------------
def validate(model, val_batches: dict, device, amp, dist, objective) -> dict[str, float]:
    """The objective's mean loss on each source's held-out rows (its counted units), over all ranks."""
    out = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name, batches in val_batches.items():
            acc = torch.zeros(2, dtype=torch.float64, device=device)
            for b in batches:
                acc += objective.val_sums(model, b, device, amp).to(device)
            acc = dist.all_reduce_sum(acc)
            out[name] = float(acc[0] / acc[1].clamp_min(1))
    model.train(was_training)
    return out


# ----- what is built once -------------------------------------------------------------------------
@dataclass
class Trainer:
    cfg: RunConfig
    dist: Dist
    device: torch.device
    amp: torch.dtype | None
    loader: object
    model: torch.nn.Module  # the plain model (its config, its checkpoint layout)
    wrapped: torch.nn.Module  # what runs: sharded and/or compiled
    optimizer: torch.optim.Optimizer
    schedule: object
    objective: Objective
    log: MetricsLog
    checkpoints: Checkpointer
    total_steps: int

    @classmethod
    def build(cls, cfg: RunConfig, dist: Dist) -> Trainer:
        from effilm.models.transformer import build_model
        from effilm.train.optim import build_optimizer, make_schedule

        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device, amp = _device_and_autocast(cfg, dist)
        loader = preflight(cfg, dist.rank, dist.world_size)
        run_dir = Path(cfg.out_dir)
        total_steps = min(loader.total_steps, cfg.train.max_steps or loader.total_steps)
        model = build_model(cfg.model, device=device, seed=cfg.train.seed)
        if cfg.model.init_from:  # step 0 starts from these weights (a resume then restores its own)
            load_initial_weights(model, cfg)
        model.train()
        objective = make_objective(cfg.train.objective, cfg.dpo)
        if cfg.train.objective == "dpo" and cfg.dpo.reference == "model":
            from effilm.train.reference import frozen_copy

            objective.reference_model = frozen_copy(model)  # the starting weights, whatever a resume restores
        wrapped = parallelize(model, cfg.train.parallelism, dist)
        wrapped = torch.compile(wrapped) if cfg.train.compile else wrapped
        return cls(cfg, dist, device, amp, loader, model, wrapped, build_optimizer(wrapped, cfg.optim),
                   make_schedule(cfg.optim, loader.stage_bounds, total_steps), objective,
                   MetricsLog(run_dir, enabled=dist.is_main),
                   Checkpointer(run_dir, cfg.to_dict(), cfg.model, cfg.train.keep_last, dist), total_steps)  # fmt: skip

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch * self.cfg.data.seq_len


@dataclass
class StepOutcome:
    loss: float  # the objective's mean loss over the global batch (nan when not finite)
    grad_norm: float
    lr: float
    stage: str
    routing: dict | None  # MoE statistics of the step (effilm.train.metrics.step_routing_stats)
    extras: dict = field(default_factory=dict)  # the objective's other metrics (DPO: rewards, accuracy)


# ----- one optimizer step ------------------------------------------------------------------------------
def train_step(tr: Trainer, pos: Position) -> StepOutcome:
    """Micro-batches through the objective (gradient accumulation), the step's loss over the
    global batch, the NaN policy, clipping and the optimizer step, then (loss-free balancing) the
    routers' selection biases from the global batch's expert loads. Advances ``pos``."""
    from effilm.train.metrics import step_routing_stats

    dist = tr.dist
    lr = tr.schedule.apply(tr.optimizer, pos.step)
    stage = tr.loader.stage.name
    batches = [next(tr.loader) for _ in range(tr.loader.num_micro)]
    count = tr.objective.global_count(batches, dist)
    reduce = dist.all_reduce_sum  # a copy in one process: the same code at any world size
    loss_total, per_micro, extras = torch.zeros((), dtype=torch.float64, device=tr.device), [], {}
    for b in batches:
        ctx = StepContext(tr.device, tr.amp, dist.world_size, count, 1.0 / len(batches), reduce)
        out: MicroLoss = tr.objective.micro_loss(tr.wrapped, b, ctx)
        out.loss.backward()
        loss_total += out.loss_sum.double()
        for k, v in out.extras.items():
            extras[k] = extras.get(k, 0.0) + v.detach().to(tr.device)
        if out.routing:
            per_micro.append(out.routing)
    step_loss = float(dist.all_reduce_sum(loss_total)) / count
    if extras:  # the objective's other per-unit metrics, averaged over the global batch
        sums = dist.all_reduce_sum(torch.stack([extras[k] for k in sorted(extras)]))
        extras = {k: float(v) / count for k, v in zip(sorted(extras), sums, strict=True)}
    grad_norm = float(clip_grad_norm_(tr.wrapped, tr.cfg.optim.grad_clip, dist))
    finite = bool(torch.isfinite(torch.tensor([step_loss, grad_norm])).all())
    if finite:
        pos.skips = 0
        tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    if not finite:
        _non_finite(tr, pos, step_loss, grad_norm, stage)
    pos.step += 1
    pos.tokens += tr.tokens_per_step
    routing = step_routing_stats(per_micro, tr.cfg.model.moe, reduce) if per_micro else None
    moe = tr.cfg.model.moe
    if finite and routing is not None and moe.balance == "loss_free":
        from effilm.models.moe import update_selection_biases

        update_selection_biases(tr.model, routing["counts"], moe.bias_update_rate)
    return StepOutcome(step_loss if finite else float("nan"), grad_norm, lr, stage, routing, extras)


def _non_finite(tr: Trainer, pos: Position, loss: float, grad_norm: float, stage: str) -> None:
    """The NaN policy: stop before the update (the last checkpoint is untouched), or skip it."""
    t = tr.cfg.train
    if t.nan_policy == "stop":
        where = tr.checkpoints.existing()
        last = where[-1][1] if where else "none yet"
        raise TrainingError(
            f"non-finite loss or gradient at step {pos.step + 1} (loss={loss}, grad_norm={grad_norm}, stage {stage}); "
            f"stopped before the update. The last good checkpoint ({last}) is untouched. Lower optim.lr, raise "
            "optim.warmup_steps, or set train.nan_policy='skip'"
        )
    pos.skips += 1
    tr.log.write({"kind": "event", "step": pos.step + 1, "tokens": pos.tokens, "event": "nan_skip", "loss": None,
                  "consecutive": pos.skips})  # fmt: skip
    if pos.skips >= t.max_skips:
        raise TrainingError(f"{pos.skips} consecutive non-finite steps (train.max_skips={t.max_skips}); stopping")


# ----- the loop ----------------------------------------------------------------------------------------
def train(cfg: RunConfig, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train as ``cfg`` says. With ``resume``, continue from the newest valid checkpoint in out_dir."""
    cfg = resolve_init(cfg.with_absolute_paths())
    dist = init_distributed()
    try:
        tr = Trainer.build(cfg, dist)
        with _own_run_dir(cfg, dist):
            return run_loop(tr, resume, progress)
    finally:
        dist.destroy()


@contextlib.contextmanager
def _own_run_dir(cfg: RunConfig, dist: Dist):
    """Rank 0 claims out_dir (new, empty, or an earlier run's) and locks it for the whole run, for
    every rank; a second run on the same directory fails at once, naming the holder."""
    from effilm.outputs import claim_dir
    from effilm.train.lock import RunLock

    lock, error = None, None
    if dist.is_main:
        try:
            sources = [s.path for s in cfg.data.sources] + [cfg.tokenizer]
            claim_dir(cfg.out_dir, "train", sources=sources, resumable=True, what="out_dir")
            lock = RunLock(cfg.out_dir).acquire()
        except EffilmError as exc:
            error = exc
    if dist.all_reduce_float(0.0 if error else 1.0) < dist.world_size:
        raise error or EffilmError("rank 0 could not take the run directory (its error says why)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def run_loop(tr: Trainer, resume: bool, progress: bool | None) -> TrainResult:
    """The run itself, in a claimed and locked run directory."""
    cfg, dist = tr.cfg, tr.dist
    if not resume and tr.checkpoints.existing():
        raise EffilmError(f"{cfg.out_dir} already holds checkpoints; pass --resume to continue that run, "
                          "or choose another out_dir")  # fmt: skip
    pos = (tr.checkpoints.restore(tr.model, tr.optimizer, tr.loader) if resume else None) or Position()
    _start_log(tr, pos)
    t = cfg.train
    from effilm.train import reference

    reference.prepare(tr, resumed=pos.resumed_from is not None, progress=t.progress if progress is None else progress)
    val_batches = tr.loader.validation_batches()
    bar = _progress(tr.total_steps, pos.step, (t.progress if progress is None else progress) and dist.is_main)
    window, t0, stage = Window(), time.perf_counter(), tr.loader.stage.name if pos.step < tr.total_steps else None
    window.reset(t0)
    last_loss, val_loss, ckpt, stopped = None, {}, None, None
    with _StopFlag() as flag:
        while pos.step < tr.total_steps:
            if tr.loader.stage.name != stage:
                stage = tr.loader.stage.name
                tr.log.write({"kind": "event", "step": pos.step, "tokens": pos.tokens, "event": "stage_start",
                              "stage": stage})  # fmt: skip
            out = train_step(tr, pos)
            last_loss = out.loss if out.loss == out.loss else last_loss  # nan != nan
            window.add(out.loss, out.grad_norm, tr.tokens_per_step, out.routing, out.extras)
            bar.update(1)
            if pos.step % t.log_every == 0 or pos.step == tr.total_steps:
                _log_window(tr, pos, out, window, bar, t0)
            if val_batches and ((t.eval_every and pos.step % t.eval_every == 0) or pos.step == tr.total_steps):
                val_loss = validate(tr.wrapped, val_batches, tr.device, tr.amp, dist, tr.objective)
                tr.log.write({"kind": "val", "step": pos.step, "tokens": pos.tokens, "val_loss": val_loss})
            stop = flag.signum is not None
            if (t.save_every and pos.step % t.save_every == 0) or pos.step == tr.total_steps or stop:
                elapsed = pos.elapsed_s + time.perf_counter() - t0
                ckpt = tr.checkpoints.save(pos, elapsed, tr.model, tr.optimizer, tr.loader) or ckpt
            if stop:
                stopped = signal.Signals(flag.signum).name
                tr.log.write({"kind": "event", "step": pos.step, "tokens": pos.tokens, "event": "stop",
                              "signal": stopped})  # fmt: skip
                break
    bar.close()
    final_dir = None if stopped else tr.checkpoints.save_final(tr.model, pos.step, cfg.tokenizer)
    tr.log.close()
    return TrainResult(run_dir=Path(cfg.out_dir), steps=pos.step, tokens=pos.tokens, final_loss=last_loss,
                       val_loss=val_loss, final_dir=final_dir, checkpoint=ckpt, resumed_from=pos.resumed_from,
                       stopped_early=stopped)  # fmt: skip


def _start_log(tr: Trainer, pos: Position) -> None:
    """Truncate the metrics log to the resumed step (or start it afresh) and write config.json."""
    from effilm.io import atomic_write_json

    if pos.resumed_from is not None:
        tr.log.truncate_after(pos.step)
        tr.log.write({"kind": "event", "step": pos.step, "tokens": pos.tokens, "event": "resume", "from": pos.source})
    else:
        tr.log.reset()
    if tr.dist.is_main:
        from effilm.outputs import mark

        Path(tr.cfg.out_dir).mkdir(parents=True, exist_ok=True)
        mark(tr.cfg.out_dir, "train")
        atomic_write_json(Path(tr.cfg.out_dir) / "config.json", tr.cfg.to_dict())
    if pos.step == 0 and tr.total_steps:
        tr.log.write({"kind": "event", "step": 0, "tokens": 0, "event": "stage_start", "stage": tr.loader.stage.name})


def _log_window(tr: Trainer, pos: Position, out: StepOutcome, window: Window, bar, t0: float) -> None:
    now = time.perf_counter()
    rec = {"kind": "train", "step": pos.step, "tokens": pos.tokens, "stage": out.stage, "lr": out.lr}
    rec.update(window.record(now))
    rec["moe_layers"] = _moe_layers(tr.cfg.model) if rec["expert_load"] is not None else None
    rec["active_flops"] = float(pos.tokens) * 3 * tr.cfg.model.flops_per_token(tr.cfg.data.seq_len)  # fwd + bwd
    rec["elapsed_s"] = pos.elapsed_s + now - t0
    tr.log.write(rec)
    bar.set_postfix(loss=f"{rec['loss']:.4f}" if rec["loss"] is not None else "nan", lr=f"{out.lr:.2e}")
    window.reset(now)


def _moe_layers(model_cfg) -> list[int]:
    return [i for i, s in enumerate(model_cfg.layers) if s.kind in ("M", "H")]


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="train", dynamic_ncols=True)


