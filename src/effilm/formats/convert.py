"""``effilm convert``: a model directory (effilm or HF) to another format, in one function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from effilm.config.reader import choice, option
from effilm.errors import ConfigError, EffilmError
from effilm.formats.gguf import GGUF_TYPES

FORMATS = ("hf", "effilm", "gguf", "mlx")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ConvertConfig:
    """What ``effilm convert SRC DST`` writes."""

    to: str = option("", f"Output format, one of {FORMATS}: hf (a directory transformers loads), effilm (an "
                         "effilm checkpoint), gguf (a llama.cpp file; DST is the .gguf path) or mlx (a directory "
                         "mlx-lm loads, optionally quantized with --bits).")
    arch: str | None = option(None, "HF architecture to write (default: chosen from the layout).")
    type: str = option("f16", f"GGUF tensor type of the weight matrices, one of {GGUF_TYPES}; norms and router stay f32.")
    tokenizer: str | None = option(None, "Tokenizer directory (default: SRC); its files travel with the model, "
                                         "and a GGUF file carries the vocabulary.")
    verify: bool = option(True, "GGUF: read the written file back and check every tensor.")
    bits: int | None = option(None, "mlx: quantize the attention, MLP and expert weights to 4 or 8 bits in MLX's "
                                    "affine layout. A quantized effilm SRC keeps its own codes (RTN or GPTQ); a "
                                    "full-precision SRC is quantized by RTN, asymmetric. Embeddings, head, norms "
                                    "and router stay in full precision.")
    group_size: int | None = option(None, "mlx: quantization group width along the input, one of (32, 64, 128); "
                                          "default 64 with --bits, or the quantized SRC's.")
    dtype: str | None = option(None, f"hf/mlx: storage dtype of the full-precision tensors, one of {DTYPES} "
                                     "(MLX scales and biases too); default: the model's.")

    def __post_init__(self) -> None:
        if not self.to:
            raise ConfigError(f"to: choose the output format, one of {FORMATS} (--to)")
        choice(self, "convert", "to", FORMATS)
        choice(self, "convert", "type", GGUF_TYPES)
        if self.to != "mlx":
            for name in ("bits", "group_size"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"convert.{name}: only --to mlx quantizes here (effilm quantize writes "
                                      "quantized effilm checkpoints; --type sets GGUF's)")  # fmt: skip
        if self.bits is not None:
            choice(self, "convert", "bits", (4, 8))
        if self.group_size is not None:
            choice(self, "convert", "group_size", (32, 64, 128))
        if self.dtype is not None:
            choice(self, "convert", "dtype", DTYPES)
            if self.to in ("gguf", "effilm"):
                raise ConfigError(f"convert.dtype: applies to --to hf and mlx (--to {self.to} keeps its own types)")


def convert(src, dst, cfg: ConvertConfig, overwrite: bool = False) -> str:
    """Write the model of directory ``src`` to ``dst`` as ``cfg`` says; returns a one-line summary.

    ``dst`` is claimed first (:mod:`effilm.outputs`): never ``src`` or anything holding it, and an
    earlier conversion there is replaced only with ``overwrite``."""
    import torch

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
    if cfg.to == "mlx":
        from effilm.formats.checkpoint import read_config
        from effilm.formats.mlx import check_exportable, export_mlx

        meta = read_config(src)
        if meta.get("format") == "effilm" and isinstance(meta.get("model"), dict):
            from effilm.config.model import ModelConfig

            check_exportable(ModelConfig.from_dict(meta["model"]), cfg.arch)  # before loading the weights
        info = export_mlx(load(src), dst, bits=cfg.bits, group_size=cfg.group_size, dtype=cfg.dtype,
                          tokenizer_dir=tok_dir, mark="convert", arch=cfg.arch)  # fmt: skip
        what = f"{info['bits']}-bit, groups of {info['group_size']}, {info['source']}" if info["bits"] else "full precision"
        notes = "".join(f"; note: {n}" for n in info["notes"])
        return f"wrote {dst} (mlx, {info['arch']}, {what}, {info['bytes']:,} bytes){notes}"
    model = load(src)
    if cfg.to == "hf":  # the tokenizer files travel with the weights
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
        save_hf(model, dst, arch=cfg.arch, dtype=dtype, tokenizer_dir=tok_dir, mark="convert")
    else:
        save(model, dst, tokenizer_dir=tok_dir, mark="convert")
    return f"wrote {dst} ({cfg.to})"


def upcycle(src, dst, up, overwrite: bool = False) -> str:
    """``effilm upcycle``: the dense model of directory ``src`` (effilm or HF) as an MoE model
    (``up``: an ``UpcycleConfig``) in a new effilm checkpoint ``dst``, with ``src``'s tokenizer.
    The upcycled model's logits are checked against the dense model's on random tokens; returns a
    one-line summary with that difference."""
    import dataclasses

    import torch

    from effilm.config.model import ModelConfig
    from effilm.formats.checkpoint import load_state_checked, model_state, save
    from effilm.formats.load import load
    from effilm.models.transformer import build_model
    from effilm.models.upcycle import upcycle_state
    from effilm.outputs import claim_dir

    src = Path(src)
    claim_dir(dst, "upcycle", sources=[src], overwrite=overwrite, what="--out")
    dense = load(src)
    cfg = ModelConfig.from_dict(up.architecture(dense.cfg.to_dict(), "upcycle"))  # without init_from/upcycle
    ids = torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(ids).logits.float()
    state = upcycle_state(model_state(dense), dense.cfg, cfg, up)
    del dense
    model = build_model(cfg, init=False)
    load_state_checked(model, state, f"{src} upcycled")
    model.eval()
    with torch.no_grad():
        diff = float((model(ids).logits.float() - ref).abs().max())
    tok = src if (src / "tokenizer.json").is_file() else None
    save(model, dst, extra={"upcycled_from": str(src), "upcycle": dataclasses.asdict(up)}, tokenizer_dir=tok,
         mark="upcycle")  # fmt: skip
    kinds = "".join(s.kind for s in cfg.layers)
    return (f"wrote {dst}: {cfg.num_params():,} parameters, {cfg.num_active_params():,} active per token "
            f"(layers {kinds}, {up.experts} experts of width {cfg.moe.expert_ffn_dim}, top-{up.top_k}); logits vs the "
            f"dense model on random tokens: max |diff| {diff:.2e}{'' if tok else '; no tokenizer.json in SRC to copy'}")
