"""The training loop: ``train(cfg)``, importable, and behind ``effilm train RUN.toml``.

One optimizer step takes ``global_batch`` sequences: ``global_batch / world_size`` per rank, in
micro-batches of ``micro_batch`` (gradient accumulation). Losses are normalised by the *global*
token count, so the gradient is the same however the batch is split:

* cross-entropy: sum over a micro-batch's targets / global target count;
* router z-loss: sum of logsumexp(logits)^2 over the micro-batch's tokens / global token count;
* load-balancing loss: for each micro-batch, E * sum_e f_e * P_e with the routing counts f summed
  over all ranks (one small all-reduce), weighted by the micro-batch's share of the global batch.
  Its *reported* value uses counts and probabilities summed over every micro-batch and rank, so
  it is the global batch's loss whatever the split; the gradient of the split version is the
  mean of the micro-batches' gradients (docs/ARCHITECTURE.md explains why).

Everything that can be wrong with the inputs (files, checksums, keys, vocabularies) is checked
before the first step. Checkpoints hold everything needed to continue bitwise-identically.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from effilm.config.run import RunConfig
from effilm.errors import EffilmError
from effilm.train.metrics import MetricsLog, Window


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


# ----- the loss of one micro-batch --------------------------------------------------------------------
def micro_loss(model, batch, device, amp, global_tokens: int, share: float, world_size: int, reduce_counts=None):
    """Forward one micro-batch; returns (loss to backprop, ce_sum, routing stats list).

    ``share`` is the micro-batch's fraction of the global batch; ``reduce_counts`` sums a tensor
    over ranks in place (None in one process).
    """
    import torch

    from effilm.models.moe import load_balancing_loss

    tokens = batch.tokens.to(device, non_blocking=True)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_ids = batch.doc_ids.to(device)[:, :-1] if batch.doc_ids is not None else None
    with _autocast(device, amp):
        # the LM head and the loss in one chunked pass: the [tokens, vocab] logits are never held
        out = model(inputs, doc_ids=doc_ids, targets=targets)
    ce_sum = out.ce_sum
    loss = ce_sum * (world_size / global_tokens)
    if out.routing:
        m = model_cfg(model).moe
        counts = torch.stack([s.counts_E for s in out.routing])  # [L, E]
        if reduce_counts is not None:
            counts = reduce_counts(counts)  # routing counts of this micro-batch over all ranks
        n_global_micro = out.routing[0].n_tokens * world_size
        # rank r's share of the global micro-batch loss E * sum_e f_e * P_e: P_e's sum over ranks
        # is split across the ranks' gradients, which FSDP/DDP average, hence the world_size factor
        aux = torch.stack([
            load_balancing_loss(c, s.prob_sum_E * world_size, n_global_micro, s.top_k, m.aux_loss_convention)
            for c, s in zip(counts, out.routing, strict=True)
        ]).mean()
        z = torch.stack([s.z_sum for s in out.routing]).mean()
        loss = loss + m.aux_loss_coef * share * aux + m.z_loss_coef * z * (world_size / global_tokens)
    return loss, ce_sum.detach(), out.routing


def model_cfg(model):
    inner = getattr(model, "_orig_mod", model)
    return inner.cfg


def _autocast(device, amp):
    """bf16 autocast when ``amp`` is set, else nothing."""
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _get_dist():
    from effilm.train.parallel import init_distributed

    return init_distributed()


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
def validate(model, val_batches: dict, device, amp, dist) -> dict[str, float]:
    import torch

    out = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name, batches in val_batches.items():
            acc = torch.zeros(2, dtype=torch.float64, device=device)
            for b in batches:
                tokens = b.tokens.to(device)
                doc_ids = b.doc_ids.to(device)[:, :-1] if b.doc_ids is not None else None
                with _autocast(device, amp):
                    ce = model(tokens[:, :-1], doc_ids=doc_ids, targets=tokens[:, 1:]).ce_sum
                acc += torch.stack([ce.double(), acc.new_tensor(float(tokens[:, 1:].numel()))])
            acc = dist.all_reduce_sum(acc)
            out[name] = float(acc[0] / acc[1].clamp_min(1))
    model.train(was_training)
    return out


# ----- the loop ----------------------------------------------------------------------------------------
def train(cfg: RunConfig, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train as ``cfg`` says. With ``resume``, continue from the newest valid checkpoint in out_dir."""
    import torch

    import effilm.train.state as ts
    from effilm.formats.checkpoint import load_state_checked
    from effilm.io import atomic_write_json
    from effilm.models.transformer import build_model
    from effilm.train.metrics import step_routing_stats
    from effilm.train.optim import build_optimizer, make_schedule

    cfg = cfg.with_absolute_paths()
    t = cfg.train
    dist = _get_dist()
    try:
        if t.threads:
            torch.set_num_threads(t.threads)
        device, amp = _device_and_autocast(cfg, dist)
        run_dir = Path(cfg.out_dir)
        loader = preflight(cfg, dist.rank, dist.world_size)
        if not resume and ts.list_checkpoints(run_dir):
            raise EffilmError(
                f"{run_dir} already holds checkpoints; pass --resume to continue that run, or choose another out_dir"
            )
        total_steps = min(loader.total_steps, t.max_steps or loader.total_steps)
        schedule = make_schedule(cfg.optim, loader.stage_bounds, total_steps)

        model = build_model(cfg.model, device=device, seed=t.seed)
        model.train()
        wrapped = _parallelize(model, cfg, dist)
        optimizer = build_optimizer(wrapped, cfg.optim)
        run_dict = cfg.to_dict()
        log = MetricsLog(run_dir, enabled=dist.is_main)

        step, tokens, skips, resumed_from, elapsed0 = 0, 0, 0, None, 0.0
        found = ts.latest_valid(run_dir) if resume else None
        if resume and dist.is_main:
            ts.remove_partial(run_dir)
        if found is not None:
            path, state = found
            _check_same_run(state, run_dict, path)
            weights, optim_named = ts.load_checkpoint(path, state)
            _load_weights(wrapped, model, weights, dist, load_state_checked, str(path))
            _load_optimizer(optimizer, wrapped, model, optim_named, dist)
            loader.load_state_dict(state["loader"])
            ts.set_rng_state(state["rng"])
            step, tokens, skips = state["step"], state["tokens"], state.get("skips", 0)
            elapsed0 = state.get("elapsed_s", 0.0)
            resumed_from = step
            log.truncate_after(step)
            log.write({"kind": "event", "step": step, "tokens": tokens, "event": "resume", "from": str(path)})
        elif dist.is_main:
            if resume:
                print(f"--resume: no valid checkpoint in {run_dir / 'checkpoints'}; starting from step 0", file=sys.stderr)
            log.reset()
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", run_dict)

        val_batches = loader.validation_batches()
        flops_per_token = 3 * cfg.model.flops_per_token(cfg.data.seq_len)  # forward + backward
        tokens_per_step = t.global_batch * cfg.data.seq_len
        show = t.progress if progress is None else progress
        bar = _progress(total_steps, step, show and dist.is_main)
        window = Window()
        t_start = time.perf_counter()
        window.reset(t_start)
        last_loss, val_loss, ckpt, stopped = None, {}, None, None
        stage_name = loader.stage.name if step < loader.total_steps else None
        if step == 0 and stage_name:
            log.write({"kind": "event", "step": 0, "tokens": 0, "event": "stage_start", "stage": stage_name})
        reduce = dist.all_reduce_sum if dist.world_size > 1 else None

        def checkpoint(at: int) -> Path | None:
            state = _gather_state(wrapped, model, optimizer, dist)
            if not dist.is_main:
                dist.barrier()
                return None
            trainer = {
                "tokens": tokens, "loader": loader.state_dict(), "rng": ts.rng_state(), "skips": skips,
                "world_size": dist.world_size, "elapsed_s": elapsed0 + time.perf_counter() - t_start,
            }
            p = ts.save_checkpoint(run_dir, at, state[0], cfg.model, state[1], trainer, run_dict, t.keep_last)
            log.write({"kind": "event", "step": at, "tokens": tokens, "event": "checkpoint", "path": str(p)})
            dist.barrier()
            return p

        with _StopFlag() as flag:
            while step < total_steps:
                lr = schedule.apply(optimizer, step)
                stage = loader.stage.name
                if stage != stage_name:
                    stage_name = stage
                    log.write({"kind": "event", "step": step, "tokens": tokens, "event": "stage_start", "stage": stage})
                per_micro, ce_total = [], torch.zeros((), dtype=torch.float64, device=device)
                for _ in range(loader.num_micro):
                    batch = next(loader)
                    loss, ce_sum, routing = micro_loss(
                        wrapped, batch, device, amp, tokens_per_step, 1.0 / loader.num_micro, dist.world_size, reduce
                    )
                    loss.backward()
                    ce_total += ce_sum.double()
                    if routing:
                        per_micro.append(routing)
                ce_total = dist.all_reduce_sum(ce_total)
                step_loss = float(ce_total) / tokens_per_step
                grad_norm = _clip(wrapped, cfg.optim.grad_clip, dist)
                finite = torch.isfinite(torch.tensor([step_loss, grad_norm])).all()
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    if t.nan_policy == "stop":
                        where = ts.list_checkpoints(run_dir)
                        last = where[-1][1] if where else "none yet"
                        raise TrainingError(
                            f"non-finite loss or gradient at step {step + 1} (loss={step_loss}, grad_norm={grad_norm}, "
                            f"stage {stage}); stopped before the update. The last good checkpoint ({last}) is untouched. "
                            "Lower optim.lr, raise optim.warmup_steps, or set train.nan_policy='skip'"
                        )
                    skips += 1
                    log.write({"kind": "event", "step": step + 1, "tokens": tokens, "event": "nan_skip",
                               "loss": None, "consecutive": skips})
                    if skips >= t.max_skips:
                        raise TrainingError(f"{skips} consecutive non-finite steps (train.max_skips={t.max_skips}); stopping")
                else:
                    skips = 0
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += tokens_per_step
                last_loss = step_loss if finite else last_loss
                rstats = step_routing_stats(per_micro, cfg.model.moe, reduce) if per_micro else None
                window.add(step_loss if finite else float("nan"), grad_norm, tokens_per_step, rstats)
                bar.update(1)
                if step % t.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    rec = {"kind": "train", "step": step, "tokens": tokens, "stage": stage, "lr": lr}
                    rec.update(window.record(now))
                    rec["moe_layers"] = _moe_layers(cfg.model) if rec["expert_load"] is not None else None
                    rec["active_flops"] = float(tokens) * flops_per_token
                    rec["elapsed_s"] = elapsed0 + now - t_start
                    log.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}" if rec["loss"] is not None else "nan", lr=f"{lr:.2e}")
                    window.reset(now)
                if val_batches and ((t.eval_every and step % t.eval_every == 0) or step == total_steps):
                    val_loss = validate(wrapped, val_batches, device, amp, dist)
                    log.write({"kind": "val", "step": step, "tokens": tokens, "val_loss": val_loss})
                stop_now = flag.signum is not None
                if (t.save_every and step % t.save_every == 0) or step == total_steps or stop_now:
                    ckpt = checkpoint(step) or ckpt
                if stop_now:
                    stopped = signal.Signals(flag.signum).name
                    log.write({"kind": "event", "step": step, "tokens": tokens, "event": "stop", "signal": stopped})
                    break
        bar.close()
        final_dir = None
        if stopped is None:
            state = _gather_state(wrapped, model, optimizer, dist, optimizer_too=False)
            if dist.is_main:
                final_dir = run_dir / "final"
                _save_final(final_dir, state[0], cfg, run_dict, step)
        log.close()
        return TrainResult(run_dir=run_dir, steps=step, tokens=tokens, final_loss=last_loss, val_loss=val_loss,
                           final_dir=final_dir, checkpoint=ckpt, resumed_from=resumed_from, stopped_early=stopped)
    finally:
        dist.destroy()


def _clip(model, max_norm, dist) -> float:
    """Clip to ``max_norm`` (None: only measure) and return the global gradient norm."""
    import torch

    if dist.world_size > 1:
        from effilm.train.parallel import clip_grad_norm_

        return float(clip_grad_norm_(model, max_norm, dist))
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf")))


def _moe_layers(model_cfg) -> list[int]:
    return [i for i, s in enumerate(model_cfg.layers) if s.kind in ("M", "H")]


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="train", dynamic_ncols=True)


def _check_same_run(state: dict, run_dict: dict, path) -> None:
    import json

    saved = json.loads((Path(path) / "config.json").read_text()).get("run", {})
    for key in ("model", "data"):
        if json.dumps(saved.get(key), sort_keys=True) != json.dumps(run_dict[key], sort_keys=True):
            raise EffilmError(
                f"{path}: the checkpoint was written with a different [{key}] config; resuming would not "
                "continue the same run (use a new out_dir, or restore the original config)"
            )


# ----- parallel hooks (one process: plain; torchrun: effilm.train.parallel) -----------------------------------
def _parallelize(model, cfg: RunConfig, dist):
    """One process: the model itself. Under torchrun: experts spread over the ranks (MoE models,
    when ``parallelism`` allows and E divides evenly), then FSDP2 over every block."""
    if dist.world_size > 1:
        from effilm.train.parallel import apply_expert_parallel, apply_fsdp

        mode = cfg.train.parallelism
        moe = cfg.model.moe
        if mode == "fsdp+ep" and not cfg.model.has_moe:
            raise EffilmError("train.parallelism='fsdp+ep' needs a model with MoE layers")
        if mode == "fsdp+ep" and moe.num_experts % dist.world_size:
            raise EffilmError(
                f"train.parallelism='fsdp+ep': {moe.num_experts} experts do not split evenly over {dist.world_size} ranks"
            )
        use_ep = mode == "fsdp+ep" or (mode == "auto" and cfg.model.has_moe and moe.num_experts % dist.world_size == 0)
        if use_ep:
            apply_expert_parallel(model, dist)
        apply_fsdp(model, dist)
    return torch_compile(model) if cfg.train.compile else model


def torch_compile(model):
    import torch

    return torch.compile(model)


def _gather_state(wrapped, model, optimizer, dist, optimizer_too: bool = True):
    """(model state, named optimizer state) in the single-device layout, on rank 0 (None elsewhere)."""
    import effilm.train.state as ts
    from effilm.formats.checkpoint import model_state

    if dist.world_size == 1:
        return model_state(model), (ts.named_optimizer_state(optimizer, model) if optimizer_too else None)
    from effilm.train.parallel import full_optim_state_dict, full_state_dict

    weights = full_state_dict(model, dist)
    optim = full_optim_state_dict(model, optimizer, dist) if optimizer_too else None
    return (weights, optim) if dist.is_main else None


def _load_weights(wrapped, model, weights, dist, load_state_checked, source: str) -> None:
    if dist.world_size == 1:
        load_state_checked(model, weights, source)
        return
    from effilm.train.parallel import load_full_state_dict

    load_full_state_dict(model, weights, dist)


def _load_optimizer(optimizer, wrapped, model, named, dist) -> None:
    import effilm.train.state as ts

    if dist.world_size == 1:
        ts.load_named_optimizer_state(optimizer, model, named)
        return
    from effilm.train.parallel import load_full_optim_state_dict

    load_full_optim_state_dict(wrapped, optimizer, named, dist)


def _save_final(final_dir, state, cfg: RunConfig, run_dict, step) -> None:
    """The trained model as a plain effilm checkpoint, with the tokenizer beside it when known."""
    from effilm.data.tokenizer import copy_tokenizer_files
    from effilm.formats.checkpoint import write_model_files
    from effilm.io import atomic_dir

    with atomic_dir(final_dir) as tmp:
        write_model_files(tmp, state, cfg.model, extra={"run": run_dict, "step": step})
        if cfg.tokenizer:
            copy_tokenizer_files(cfg.tokenizer, tmp)
