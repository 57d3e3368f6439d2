"""``effilm convert``: a model directory (effilm or HF) to another format, in one function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from effilm.config.reader import choice, option
from effilm.errors import ConfigError, EffilmError
from effilm.formats.gguf import GGUF_TYPES

FORMATS = ("hf", "effilm", "gguf")


@dataclass
class ConvertConfig:
    """What ``effilm convert SRC DST`` writes."""

    to: str = option("", f"Output format, one of {FORMATS}: hf (a directory transformers loads), effilm (an "
                         "effilm checkpoint) or gguf (a llama.cpp file; DST is the .gguf path).")
    arch: str | None = option(None, "HF architecture to write (default: chosen from the layout).")
    type: str = option("f16", f"GGUF tensor type of the weight matrices, one of {GGUF_TYPES}; norms and router stay f32.")
    tokenizer: str | None = option(None, "Tokenizer directory (default: SRC); its files travel with the model, "
                                         "and a GGUF file carries the vocabulary.")
    verify: bool = option(True, "GGUF: read the written file back and check every tensor.")

    def __post_init__(self) -> None:
        if not self.to:
            raise ConfigError(f"to: choose the output format, one of {FORMATS} (--to)")
        choice(self, "convert", "to", FORMATS)
        choice(self, "convert", "type", GGUF_TYPES)


def convert(src, dst, cfg: ConvertConfig, overwrite: bool = False) -> str:
    """Write the model of directory ``src`` to ``dst`` as ``cfg`` says; returns a one-line summary.

    ``dst`` is claimed first (:mod:`effilm.outputs`): never ``src`` or anything holding it, and an
    earlier conversion there is replaced only with ``overwrite``."""
    from effilm.formats.checkpoint import save
    from effilm.formats.gguf import export_gguf, verify_gguf
    from effilm.formats.hf import save_hf
    from effilm.formats.load import load
    from effilm.outputs import claim_dir, claim_file

    src = Path(src)
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else src
    if cfg.to == "gguf":
        claim_file(dst, inputs=[src, tok_dir], what="DST", replace=overwrite)
    else:
        claim_dir(dst, "convert", sources=[src, tok_dir], overwrite=overwrite, what="DST")
    if cfg.to == "gguf":
        if not (tok_dir / "tokenizer.json").is_file():
            raise EffilmError(f"no tokenizer.json in {tok_dir}: pass --tokenizer DIR (GGUF files carry their vocabulary)")
        model = load(src)
        out = export_gguf(model, dst, cfg.type, tok_dir)
        msg = f"wrote {out} (gguf, {cfg.type}, {out.stat().st_size:,} bytes)"
        if cfg.verify:
            v = verify_gguf(out, model, cfg.type)
            msg += f"; verified {v['tensors']} tensors (arch {v['arch']}, max error {v['max_rel_err']:.2e} of block max)"
        return msg
    model = load(src)
    if cfg.to == "hf":  # the tokenizer files travel with the weights
        save_hf(model, dst, arch=cfg.arch, tokenizer_dir=tok_dir, mark="convert")
    else:
        save(model, dst, tokenizer_dir=tok_dir, mark="convert")
    return f"wrote {dst} ({cfg.to})"
