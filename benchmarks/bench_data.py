"""Data pipeline throughput: tokenizer training, tokenizing into shards (1 vs N workers), loader.

Usage: PYTHONPATH=src python benchmarks/bench_data.py [--docs 20000] [--out benchmarks/results/bench_data.json]
Prints a table and writes JSON. The corpus is synthetic (random words), generated in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)


def main(argv=None) -> int:
    import numpy as np

    from effilm.config.data import DataConfig, TokenizeConfig, TokenizerTrainConfig
    from effilm.config.reader import build
    from effilm.data.loader import StagedLoader
    from effilm.data.shards import tokenize_files
    from effilm.data.tokenizer import train_tokenizer
    from effilm.io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=20000, help="documents in the synthetic corpus")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2, help="worker count compared against 1")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS / "bench_data.json"), help="results JSON path")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 9)))) for _ in range(3000)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "corpus.jsonl"
        with open(src, "w", encoding="utf-8") as fh:
            for _ in range(args.docs):
                n = int(rng.integers(50, 400))
                fh.write(json.dumps({"text": " ".join(rng.choice(vocab, size=n))}) + "\n")
        mb = src.stat().st_size / 1e6

        t0 = time.perf_counter()
        tok = train_tokenizer([src], tmp / "tok", TokenizerTrainConfig(vocab_size=args.vocab_size))
        dt = time.perf_counter() - t0
        rows.append({"what": "tokenizer train", "seconds": dt, "rate": mb / dt, "unit": "MB/s"})

        for w in sorted({1, args.workers}):
            t0 = time.perf_counter()
            m = tokenize_files([src], tok, tmp / f"ds{w}", TokenizeConfig(workers=w))
            dt = time.perf_counter() - t0
            rows.append({"what": f"data tokenize, workers={w}", "seconds": dt, "rate": m["tokens"] / dt,
                         "unit": "tokens/s"})

        cfg = build(DataConfig, {
            "sources": [{"name": "a", "path": str(tmp / "ds1")}, {"name": "b", "path": str(tmp / f"ds{args.workers}")}],
            "stages": [{"name": "s", "tokens": 10**12, "mixture": {"a": 0.6, "b": 0.4}}],
            "seq_len": args.seq_len, "doc_ids": True,
        })
        t0 = time.perf_counter()
        loader = StagedLoader(cfg, args.micro_batch, args.micro_batch)
        open_s = time.perf_counter() - t0
        rows.append({"what": "loader open (sha256 verify)", "seconds": open_s, "rate": 2 * m["tokens"] / open_s,
                     "unit": "tokens/s"})
        next(loader)  # warm-up: imports torch, builds the first epoch permutation
        t0 = time.perf_counter()
        for _ in range(args.loader_batches):
            next(loader)
        dt = time.perf_counter() - t0
        rows.append({"what": f"loader [{args.micro_batch}, {args.seq_len + 1}] batches", "seconds": dt,
                     "rate": args.loader_batches * args.micro_batch * args.seq_len / dt, "unit": "tokens/s"})

    print(f"corpus: {args.docs} docs, {mb:.1f} MB; vocab {args.vocab_size}; {os.cpu_count()} CPUs")
    print(f"{'measure':40s} {'seconds':>9s} {'rate':>14s}")
    for r in rows:
        print(f"{r['what']:40s} {r['seconds']:9.2f} {r['rate']:14,.0f} {r['unit']}")
    atomic_write_json(args.out, {"args": vars(args), "corpus_mb": mb, "cpus": os.cpu_count(),
                                 "python": platform.python_version(), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
