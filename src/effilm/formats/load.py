"""THE model loader: effilm checkpoints (quantized or not) and Hugging Face directories.

Everything that opens a model directory (the CLI, the demo, evaluation, the engine and server,
synth's local backend, quantization) calls :func:`load` or :func:`load_model_and_tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

from effilm.errors import CheckpointError, ConfigError, EffilmError
from effilm.formats.checkpoint import load_effilm, read_config
from effilm.formats.hf import load_hf


def load(path: str | os.PathLike, device=None, dtype=None, verify: bool = True):
    """The model in the directory ``path``, in eval mode: an effilm checkpoint (checksums checked
    unless ``verify=False``) or a Hugging Face Llama, Mistral, Phi-3, Mixtral, PhiMoE, Arctic or
    OpenELM directory. ``device`` is a torch device (or name) to build on; ``dtype`` casts the weights."""
    path = Path(path)
    _check_dir(path, CheckpointError)
    meta = read_config(path)
    if meta.get("format") == "effilm":
        return load_effilm(path, meta, device=device, dtype=dtype, verify=verify)
    return load_hf(path, device=device, dtype=dtype)


def load_model_and_tokenizer(path: str | os.PathLike, device=None, dtype=None, tokenizer_dir=None):
    """``(model, tokenizer)`` for a model directory that holds its tokenizer files (or with
    ``tokenizer_dir`` naming them), the vocabularies checked against each other."""
    from effilm.data.tokenizer import check_vocab, load_tokenizer

    path = Path(path)
    _check_dir(path, EffilmError)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else path
    if not (tok_dir / "tokenizer.json").is_file():
        where = "in the model directory" if tokenizer_dir is None else f"in {tok_dir}"
        raise EffilmError(f"{path}: no tokenizer.json {where}; the model directory must hold its tokenizer files")
    tokenizer = load_tokenizer(tok_dir)
    try:
        model = load(path, device=device, dtype=dtype)
    except ConfigError as exc:  # e.g. an architecture effilm does not implement
        raise EffilmError(f"{path}: cannot load this model: {exc}") from None
    check_vocab(tokenizer, model.cfg.vocab_size)
    return model, tokenizer


def _check_dir(path: Path, error: type[EffilmError]) -> None:
    if not path.exists():
        raise error(f"{path}: no such model directory")
    if not path.is_dir():
        raise error(f"{path}: not a directory (expected a model directory)")
