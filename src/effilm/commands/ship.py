"""Shipping commands: ``effilm quantize`` (and the GGUF branch of ``effilm convert``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="weight-only int8/int4 quantization of a model directory",
        description="Quantize a model's attention, MLP and expert weights (embeddings, LM head, norms and router "
        "stay full precision) and write a compact effilm checkpoint that `effilm.formats.load.load` runs. "
        "--bits 8 is per output channel; --bits 4 needs --group-size. With --eval TEXT the report (written to "
        "OUT/quant_report.json and printed) gives perplexity before/after, greedy-token agreement and per-layer "
        "errors; a GPTQ run also reports RTN on the same settings for comparison.",
    )
    p.add_argument("model", help="effilm checkpoint or HF model directory")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True, help="bits per weight")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None,
                   help="group width along the input dim (required for 4 bits; default for 8: per output channel)")  # fmt: skip
    p.add_argument("--asym", action="store_true", help="asymmetric ranges (scale + zero point)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="rtn: round-to-nearest; gptq: calibrated GPTQ")
    p.add_argument("--calib", default=None, help="calibration text file (.txt, .gz ok); required for gptq")
    p.add_argument("--eval", default=None, help="held-out text file for perplexity and greedy agreement")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--seq-len", type=int, default=256, help="window length for calibration and evaluation")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess measurement")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.set_defaults(func=cmd_quantize)


def _token_windows(path: str | None, tokenizer, seq_len: int, what: str):
    if path is None:
        return None
    from effilm.errors import EffilmError
    from effilm.io import open_text
    from effilm.quant.report import windows

    if tokenizer is None:
        raise EffilmError(f"--{what} needs a tokenizer: pass --tokenizer DIR or put tokenizer.json in the model directory")
    try:
        with open_text(path) as f:
            text = f.read()
    except OSError as exc:
        raise EffilmError(f"--{what} {path}: cannot read ({exc.strerror})") from None
    try:
        return windows(tokenizer.encode(text), seq_len)
    except ValueError as exc:
        raise EffilmError(f"--{what} {path}: {exc}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    import json

    import torch

    from effilm.config.quant import QuantConfig
    from effilm.data.tokenizer import copy_tokenizer_files, load_tokenizer
    from effilm.formats.checkpoint import write_checkpoint_files
    from effilm.formats.load import load
    from effilm.io import atomic_dir
    from effilm.quant.quantize import quantize_model
    from effilm.quant.report import build_report, format_report

    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, asym=args.asym, method=args.method,
                      calib_seq_len=args.seq_len)  # fmt: skip
    src = Path(args.model)
    tok_dir = Path(args.tokenizer) if args.tokenizer else src
    tokenizer = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").is_file() or tok_dir.is_file() else None
    calib = _token_windows(args.calib, tokenizer, args.seq_len, "calib")
    eval_ids = _token_windows(args.eval, tokenizer, args.seq_len, "eval")
    if cfg.method == "gptq" and calib is None:
        from effilm.errors import EffilmError

        raise EffilmError("--method gptq needs --calib FILE (calibration text)")
    torch.manual_seed(0)
    fp = load(src)
    q, spec = quantize_model(load(src), cfg, calib)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        write_checkpoint_files(tmp, q, extra={"quantization": spec})
        copy_tokenizer_files(tok_dir, tmp)
    reports = []
    if cfg.method != "rtn":  # the baseline, on the same report
        rtn_cfg = QuantConfig(**{**cfg.to_dict(), "method": "rtn"})
        rq, rspec = quantize_model(load(src), rtn_cfg)
        reports.append(build_report(fp, rq, rspec, eval_ids))
    no_rss = args.no_rss or not (src / "config.json").is_file()
    reports.append(build_report(fp, q, spec, eval_ids, None if no_rss else src, None if no_rss else out))
    table = format_report(reports)
    from effilm.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "quant_report.json", {"reports": reports})
    atomic_write_text(out / "quant_report.txt", table + "\n")
    print(table)
    print(f"wrote {out} ({json.dumps({k: spec[k] for k in ('bits', 'group_size', 'asym', 'method')})})")
    return 0


def add_gguf_arguments(p: argparse.ArgumentParser) -> None:
    """The GGUF options of ``effilm convert`` (used with ``--to gguf``)."""
    p.add_argument("--type", dest="gguf_type", choices=["f32", "f16", "q8_0", "q4_0"], default="f16",
                   help="GGUF tensor type for weight matrices (--to gguf; norms and router stay f32)")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for --to gguf (default: SRC)")
    p.add_argument("--no-verify", action="store_true", help="--to gguf: skip reading the file back to check every tensor")


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from effilm.errors import EffilmError
    from effilm.formats.gguf import export_gguf, verify_gguf
    from effilm.formats.load import load

    src = Path(args.src)
    tok_dir = Path(args.tokenizer) if args.tokenizer else src
    if not (tok_dir / "tokenizer.json").is_file():
        raise EffilmError(f"no tokenizer.json in {tok_dir}: pass --tokenizer DIR (GGUF files carry their vocabulary)")
    model = load(src)
    out = export_gguf(model, args.dst, args.gguf_type, tok_dir)
    msg = f"wrote {out} (gguf, {args.gguf_type}, {out.stat().st_size:,} bytes)"
    if not args.no_verify:
        v = verify_gguf(out, model, args.gguf_type)
        msg += f"; verified {v['tensors']} tensors (arch {v['arch']}, max error {v['max_rel_err']:.2e} of block max)"
    print(msg)
    return 0
