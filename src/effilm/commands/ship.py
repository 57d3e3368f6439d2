"""``effilm quantize``: weight-only int8/int4 quantization of a model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from effilm.config.reader import add_arguments, from_args


def register(sub) -> None:
    from effilm.config.quant import QuantConfig

    p = sub.add_parser(
        "quantize",
        help="weight-only int8/int4 quantization of a model directory",
        description="Quantize a model's attention, MLP and expert weights (embeddings, LM head, norms and router "
        "stay full precision) and write a compact effilm checkpoint that `effilm.load` runs. --bits 8 is per "
        "output channel unless --group-size is given; --bits 4 needs --group-size. With --eval TEXT the report "
        "(written to OUT/quant_report.json and printed) gives perplexity before/after, greedy-token agreement "
        "and per-layer errors; a GPTQ run also reports RTN on the same settings for comparison.",
    )
    p.add_argument("model", help="effilm checkpoint or HF model directory")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--calib", default=None, help="calibration text (JSONL, text or parquet; .gz ok); required for gptq")
    p.add_argument("--eval", default=None, help="held-out text for perplexity and greedy agreement")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess measurement")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command at the destination")
    add_arguments(p, QuantConfig, group_title="quantization")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from effilm.config.quant import QuantConfig
    from effilm.data.tokenizer import load_tokenizer
    from effilm.outputs import claim_dir
    from effilm.quant.pipeline import quantize_dir, spec_line, text_windows

    cfg = from_args(QuantConfig, args)
    src = Path(args.model)
    # before the calibration text is read; quantize_dir claims it again for API callers
    claim_dir(args.out, "quantize", sources=[src, args.tokenizer, args.calib, args.eval], overwrite=args.overwrite)
    tok_dir = Path(args.tokenizer) if args.tokenizer else src
    tokenizer = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
    calib = text_windows(args.calib, tokenizer, cfg.calib_seq_len, "--calib") if args.calib else None
    eval_ids = text_windows(args.eval, tokenizer, cfg.calib_seq_len, "--eval") if args.eval else None
    result = quantize_dir(src, args.out, cfg, tokenizer_dir=tok_dir, calib_ids=calib, eval_ids=eval_ids,
                          measure_rss=not args.no_rss, overwrite=args.overwrite, sources=[args.calib, args.eval])
    print(result["table"])
    print(f"wrote {args.out} ({spec_line(result['spec'])})")
    return 0
