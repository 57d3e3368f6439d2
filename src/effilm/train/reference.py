"""The DPO reference: the starting model's log-probabilities of every preference pair.

With ``[dpo] reference = "precomputed"`` (the default) they are computed once, before the first
step, by the model the run starts from (``init_from``'s weights, or the seeded initialisation),
and stored in ``RUN/reference_logps.safetensors`` with a fingerprint of the data and the starting
point; training then holds one model. A resumed run reads them back; if the file is gone, the
starting model is rebuilt to compute them again. With ``reference = "model"`` a frozen copy of the
starting model stays in memory and scores each batch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from effilm.errors import EffilmError

FILE = "reference_logps.safetensors"


def fingerprint(cfg, datasets: dict) -> dict:
    return {"init_from": cfg.model.init_from, "seed": cfg.train.seed, "model": cfg.model.to_dict(),
            "data": {n: ds.content_sha256 for n, ds in datasets.items()}}  # fmt: skip


def frozen_copy(model):
    """A frozen, eval-mode copy of ``model`` (the in-memory reference)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def prepare(tr, resumed: bool, progress: bool) -> None:
    """Give a DPO objective its reference (a no-op for other objectives)."""
    from effilm.train.objectives import DirectPreference, ReferenceLogps

    obj, cfg = tr.objective, tr.cfg
    if not isinstance(obj, DirectPreference) or obj.reference_model is not None:
        return
    path = Path(cfg.out_dir) / FILE
    want = fingerprint(cfg, tr.loader.datasets)
    if resumed and path.is_file():
        obj.reference = _read(path, want)
        return
    if resumed:  # the file is gone: score the pairs with the starting model again
        from effilm.models.transformer import build_model
        from effilm.train.init import load_initial_weights

        start = build_model(cfg.model, device=tr.device, seed=cfg.train.seed)
        if cfg.model.init_from:
            load_initial_weights(start, cfg)
        model = start
    else:
        model = tr.wrapped  # step 0: the weights are the starting point
    obj.reference = ReferenceLogps.compute(model, tr.loader.datasets, tr.cfg.train.micro_batch, tr.device, tr.amp,
                                           tr.dist, progress=progress and tr.dist.is_main)  # fmt: skip
    if tr.dist.is_main:
        _write(path, obj.reference, want)
    tr.dist.barrier()


def _write(path: Path, ref, fp: dict) -> None:
    from safetensors.torch import save

    from effilm.io import atomic_write_bytes

    tensors = {f"source.{name}": t.contiguous() for name, t in ref.table.items()}
    atomic_write_bytes(path, save(tensors, metadata={"fingerprint": json.dumps(fp, sort_keys=True)}))


def _read(path: Path, want: dict):
    from safetensors import safe_open

    from effilm.train.objectives import ReferenceLogps

    try:
        with safe_open(str(path), framework="pt") as f:
            fp = json.loads((f.metadata() or {}).get("fingerprint", "null"))
            table = {k.removeprefix("source."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # a damaged file: say which, and how to recover
        raise EffilmError(f"{path}: cannot read the reference log-probabilities ({exc}); delete the file to "
                          "recompute them from the starting model") from None  # fmt: skip
    if fp != json.loads(json.dumps(want, sort_keys=True)):
        raise EffilmError(f"{path} was computed for another starting model or other data than this run's; delete "
                          "it to recompute, or resume with the run's own config")  # fmt: skip
    return ReferenceLogps(table)
