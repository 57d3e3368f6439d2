"""effilm checkpoint directories: ``config.json`` + ``model.safetensors``, written atomically.

Layout of a checkpoint directory::

    config.json         {"format": "effilm", "schema_version": 1, "model": {...ModelConfig...},
                         "checksums": {"model.safetensors": sha256}, ...}
    model.safetensors   the weights, effilm key names (a tied LM head is stored once)

:func:`effilm.formats.load.load` reads these and Hugging Face directories alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from effilm import __version__
from effilm.config.model import ModelConfig
from effilm.errors import CheckpointError, ConfigError
from effilm.io import atomic_dir, sha256_file

SCHEMA_VERSION = 1
WEIGHTS = "model.safetensors"


def model_state(model) -> dict[str, torch.Tensor]:
    """The weights to store: every parameter once (a tied LM head is dropped), contiguous, on CPU."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_checkpoint_files(directory: Path, model, extra: dict | None = None) -> None:
    """Write config.json and model.safetensors into an (already temporary) directory."""
    write_model_files(directory, model_state(model), model.cfg, extra)


def write_model_files(directory: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, extra: dict | None = None) -> None:
    """Write ``state`` (effilm key names) and its config.json into an (already temporary) directory."""
    from safetensors.torch import save_file

    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt", "effilm": __version__})
    meta = {
        "format": "effilm",
        "schema_version": SCHEMA_VERSION,
        "effilm_version": __version__,
        "model": cfg.to_dict(),
        "checksums": {WEIGHTS: sha256_file(directory / WEIGHTS)},
    }
    if extra:
        meta.update(extra)
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def save(model, path: str | os.PathLike, extra: dict | None = None,
         tokenizer_dir: str | os.PathLike | None = None, mark: str | None = None) -> Path:
    """Save ``model`` as an effilm checkpoint directory, atomically (temp dir, then rename), with
    the tokenizer files of ``tokenizer_dir`` when given."""
    path = Path(path)
    with atomic_dir(path, mark=mark) as tmp:
        write_checkpoint_files(tmp, model, extra)
        if tokenizer_dir is not None:
            from effilm.data.tokenizer import copy_tokenizer_files

            copy_tokenizer_files(tokenizer_dir, tmp)
    return path


def read_config(path: str | os.PathLike) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (not an effilm checkpoint or HF model directory)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def is_effilm_dir(path: str | os.PathLike) -> bool:
    try:
        return read_config(path).get("format") == "effilm"
    except CheckpointError:
        return False


def load_safetensors_dir(path: str | os.PathLike, only: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a directory: one ``*.safetensors`` file or a sharded index; with ``only``,
    that file alone (an effilm training checkpoint also holds ``optimizer.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if only is not None:
        files = [only]
    elif index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing" + ("" if only else " (named in the index)"))
        try:
            tensors.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors file ({exc})") from None
    return tensors


def raise_tensor_problems(source: str, missing, unexpected, misshaped=()) -> None:
    """One CheckpointError naming every missing, unexpected and mis-shaped tensor (first 20 of each)."""

    def listed(kind: str, names, sep: str = ", ") -> str:
        names = list(names)
        return f"{kind} tensors: {sep.join(names[:20])}" + (" ..." if len(names) > 20 else "")

    problems = [
        listed(kind, names, sep)
        for kind, names, sep in (("missing", missing, ", "), ("unexpected", unexpected, ", "), ("mis-shaped", misshaped, "; "))
        if names
    ]
    if problems:
        raise CheckpointError(f"{source}: " + " | ".join(problems))


def load_state_checked(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; missing, unexpected or mis-shaped tensors are named in the error."""
    expected = dict(model.state_dict())
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    raise_tensor_problems(source, missing, unexpected, shapes)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(state[k].to(t.dtype))


def load_effilm(path: Path, meta: dict, device=None, dtype=None, verify: bool = True):
    """Load the effilm checkpoint at ``path`` (``meta`` is its config.json), quantized or not, in
    eval mode. :func:`effilm.formats.load.load` is the loader to call; it dispatches here."""
    from effilm.models.quantized import build_quantized
    from effilm.models.transformer import build_model

    version = meta.get("schema_version")
    if version is None or version > SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint schema_version {version!r}; this effilm reads up to {SCHEMA_VERSION}")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}/config.json: bad model config: {exc}") from None
    if verify and WEIGHTS in meta.get("checksums", {}):
        if not (path / WEIGHTS).is_file():
            raise CheckpointError(f"{path}/{WEIGHTS}: missing (the checkpoint's config.json lists it)")
        if sha256_file(path / WEIGHTS) != meta["checksums"][WEIGHTS]:
            raise CheckpointError(f"{path}/{WEIGHTS}: checksum mismatch (file corrupt or replaced)")
    if meta.get("quantization"):  # weight-only quantized checkpoint (effilm.models.quantized)
        model = build_quantized(cfg, meta["quantization"], device=device)
    else:
        model = build_model(cfg, device=device, init=False)
    load_state_checked(model, load_safetensors_dir(path, only=WEIGHTS), str(path))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
