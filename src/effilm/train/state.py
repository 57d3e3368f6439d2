"""Training checkpoints: model, optimizer and trainer state, written atomically, verified on resume.

Layout of ``RUN_DIR/checkpoints/step-NNNNNNNN/``::

    model.safetensors       the weights (effilm key names), so the directory is also a model
    config.json             effilm checkpoint config (loads with effilm.formats.load.load) + "run"
    optimizer.safetensors   AdamW moments, keyed "<param name>::<state key>"
    trainer_state.json      schema_version, step, tokens, loader state, RNG states, optimizer
                            param_groups, sha256 of both .safetensors files, and its own checksum

Each directory is built under a temporary name and renamed into place, so a checkpoint either
exists whole or not at all; a run killed mid-save leaves only a ``.step-*.tmp`` directory, which
the next resume deletes. The optimizer state is keyed by parameter *name*, not position, so it
loads into any wrapping of the same model (one process, FSDP2 at another world size).
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import warnings
from pathlib import Path

import torch

from effilm import __version__
from effilm.errors import CheckpointError
from effilm.formats.checkpoint import WEIGHTS, write_model_files
from effilm.io import atomic_dir, sha256_file

TRAINER_SCHEMA_VERSION = 1
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
PREFIX = "step-"


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir, step: int) -> Path:
    return checkpoint_root(run_dir) / f"{PREFIX}{step:08d}"


# ----- RNG --------------------------------------------------------------------------------------
def rng_state() -> dict:
    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    random.setstate(_tupled(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


# ----- optimizer state by parameter name (effilm.train.parallel.full_optim_state_dict) ------------
def _split_optimizer(named: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, st in named["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}::{key}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = v
    return tensors, {"param_groups": named["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for k, v in tensors.items():
        name, key = k.rsplit("::", 1)
        state.setdefault(name, {})[key] = v
    for name, st in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _self_sha(state: dict) -> str:
    import hashlib

    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ----- save / load ---------------------------------------------------------------------------------
def save_checkpoint(run_dir, step: int, model_state: dict, model_cfg, optim_named: dict, trainer: dict,
                    run_cfg: dict, keep_last: int) -> Path:
    """Write step ``step``'s checkpoint atomically, then delete all but the newest ``keep_last``."""
    from safetensors.torch import save_file

    path = step_dir(run_dir, step)
    with atomic_dir(path) as tmp:
        write_model_files(tmp, model_state, model_cfg, extra={"run": run_cfg, "step": step})
        tensors, optim_meta = _split_optimizer(optim_named)
        save_file(tensors, str(tmp / OPTIMIZER), metadata={"format": "pt", "effilm": __version__})
        state = {
            "schema_version": TRAINER_SCHEMA_VERSION,
            "effilm_version": __version__,
            **trainer,
            "step": step,
            "optimizer": optim_meta,
            "checksums": {WEIGHTS: sha256_file(tmp / WEIGHTS), OPTIMIZER: sha256_file(tmp / OPTIMIZER)},
        }
        state["state_sha256"] = _self_sha(state)
        (tmp / STATE).write_text(json.dumps(state) + "\n")
    prune(run_dir, keep_last)
    return path


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
                out.append((int(p.name[len(PREFIX):]), p))
    return sorted(out)


def prune(run_dir, keep_last: int) -> None:
    for _, p in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def remove_partial(run_dir) -> list[Path]:
    """Delete the temporary directories of checkpoints whose save never finished."""
    root = checkpoint_root(run_dir)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def verify(path: Path) -> dict:
    """Read and check a checkpoint's trainer state and file checksums; return the state."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/{STATE}: unreadable ({exc})") from None
    version = state.get("schema_version")
    if version is None or version > TRAINER_SCHEMA_VERSION:
        raise CheckpointError(f"{path}: trainer schema_version {version!r}; this effilm reads up to {TRAINER_SCHEMA_VERSION}")
    if state.get("state_sha256") != _self_sha(state):
        raise CheckpointError(f"{path}/{STATE}: checksum mismatch")
    for name, sha in state["checksums"].items():
        f = path / name
        if not f.is_file() or sha256_file(f) != sha:
            raise CheckpointError(f"{path}/{name}: missing or checksum mismatch")
    return state


def latest_valid(run_dir) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped, never deleted."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, verify(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
    return None


def load_checkpoint(path: Path, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The model weights and the named optimizer state of a verified checkpoint."""
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS))
    optim = _join_optimizer(load_file(str(path / OPTIMIZER)), state["optimizer"])
    return weights, optim
