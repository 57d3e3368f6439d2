"""Tokenizer and data commands: ``effilm tokenizer train`` and ``effilm data tokenize``."""

from __future__ import annotations

from effilm.config.reader import add_arguments, from_args


def cmd_tokenizer_train(args) -> int:
    from effilm.config.data import TokenizerTrainConfig
    from effilm.data.tokenizer import load_tokenizer, train_tokenizer

    cfg = from_args(TokenizerTrainConfig, args)
    out = train_tokenizer(args.input, args.out, cfg, overwrite=args.overwrite)
    tok = load_tokenizer(out)
    print(f"wrote {out}: {tok.vocab_size} tokens, eos={tok.eos_id} pad={tok.pad_id}, sha256 {tok.sha256[:16]}")
    return 0


def cmd_data_tokenize(args) -> int:
    import time

    from tqdm import tqdm

    from effilm.config.data import TokenizeConfig
    from effilm.data.shards import tokenize_files

    cfg = from_args(TokenizeConfig, args)
    t0 = time.perf_counter()
    bars: list = []  # created on the first batch, so input errors print no empty bar

    def progress(docs: int, tokens: int) -> None:
        if not bars:
            bars.append(tqdm(unit="doc", desc="tokenize", disable=args.quiet))
        bars[0].update(docs)

    try:
        m = tokenize_files(args.input, args.tokenizer, args.out, cfg, progress=progress, overwrite=args.overwrite)
    finally:
        for bar in bars:
            bar.close()
    dt = time.perf_counter() - t0
    skipped = sum(i["skipped_empty"] for i in m["inputs"])
    print(
        f"wrote {args.out}: {m['documents']} documents, {m['tokens']} tokens ({m['dtype']}) in "
        f"{len(m['shards'])} shard(s) from {len(m['inputs'])} file(s); {skipped} empty document(s) skipped; "
        f"{m['tokens'] / max(dt, 1e-9):,.0f} tokens/s"
    )
    return 0


def register(sub) -> None:
    from effilm.config.data import TokenizeConfig, TokenizerTrainConfig

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                         description="Tokenizer commands.")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    t = tsub.add_parser(
        "train", help="train a byte-level BPE on JSONL(.gz) / text / parquet files",
        description="Train a byte-level BPE with the tokenizers library and save an HF tokenizer directory "
        "(tokenizer.json, tokenizer_config.json with a chat template, special_tokens_map.json) that "
        "transformers' AutoTokenizer loads. Inputs are streamed.",
    )
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files, directories or glob patterns (.jsonl[.gz], .txt[.gz], .md, .parquet)")
    t.add_argument("--out", required=True, metavar="DIR", help="output tokenizer directory (written atomically)")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command at --out")
    add_arguments(t, TokenizerTrainConfig)
    t.set_defaults(func=cmd_tokenizer_train)
    tok.set_defaults(func=lambda a: (tok.print_help(), 2)[1])

    data = sub.add_parser("data", help="tokenize text into token shards", description="Data commands.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    d = dsub.add_parser(
        "tokenize", help="turn JSONL(.gz) / text / parquet files into checksummed token shards",
        description="Tokenize documents into uint16/uint32 shards (.bin + .idx.npy document offsets) with EOS "
        "after every document, and a manifest.json holding shard checksums, input file hashes, the "
        "tokenizer hash and counts. The dataset directory appears atomically. Plain-text files hold one "
        "document per blank-line-separated block (--text-split paragraph) or per file (--text-split file).",
    )
    d.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files, directories or glob patterns (.jsonl[.gz], .txt[.gz], .md, .parquet)")
    d.add_argument("--tokenizer", required=True, metavar="DIR", help="HF tokenizer directory (tokenizer.json)")
    d.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command at --out")
    add_arguments(d, TokenizeConfig)
    d.set_defaults(func=cmd_data_tokenize)
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])
