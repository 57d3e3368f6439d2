"""Data pipeline throughput: tokenizer training, tokenizing into shards (1 vs N workers), loader;
the learned quality filter; and the peak memory of each data command on one very large record.

Usage: PYTHONPATH=src python benchmarks/bench_data.py [--docs 20000] [--record-mb 50] [--quality-mb 20] [--out benchmarks/results/bench_data.json]
Prints tables and writes JSON. The corpus is synthetic (random words), generated in a temp dir.

Memory: a JSONL file holding one ``--record-mb`` record (and a small one) goes through ``effilm
dedup``, ``data tokenize``, ``decontam``, ``tokenizer train`` and ``filter``, each in a fresh
process whose peak resident memory (``VmHWM``) is read when it ends. The target is under 1 GB for
a 50 MB record (``--record-mb 0`` skips this part).

Quality filter (``--quality-mb``, 0 skips): a procedural web-like corpus of about that size
(``web_varied``) is annotated by the procedural backend and an n-gram classifier trained on its
first 4000 documents; then the classifier scores the corpus's text in the filter's batches in
this one process (one core: the median of ``--repeats`` runs; target at least 20 MB/s per core),
and ``effilm filter --classifier`` runs end to end (heuristics + classifier, JSON in and out) with
1 and ``--workers`` processes, in MB of input file per second.
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
    ap.add_argument("--record-mb", type=float, default=50.0, help="size of the one large record (0: skip)")
    ap.add_argument("--quality-mb", type=float, default=20.0, help="size of the quality-filter corpus (0: skip)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of the classifier timing (median reported)")
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
        memory = peak_memory(tmp, tok, args.record_mb, vocab, rng) if args.record_mb > 0 else []
        quality = quality_filter(tmp, args) if args.quality_mb > 0 else []

    print(f"corpus: {args.docs} docs, {mb:.1f} MB; vocab {args.vocab_size}; {os.cpu_count()} CPUs")
    print(f"{'measure':40s} {'seconds':>9s} {'rate':>14s}")
    for r in rows:
        print(f"{r['what']:40s} {r['seconds']:9.2f} {r['rate']:14,.0f} {r['unit']}")
    if quality:
        print("\nlearned quality filter (n-gram classifier)")
        print(f"{'measure':52s} {'MB':>7s} {'seconds':>8s} {'MB/s':>8s}")
        for r in quality:
            print(f"{r['what']:52s} {r['mb']:7.1f} {r['seconds']:8.2f} {r['mb_per_s']:8.1f}")
    if memory:
        print(f"\npeak memory on one {args.record_mb:g} MB record (target: under 1 GB each)")
        print(f"{'command':20s} {'peak RSS':>10s} {'seconds':>8s}")
        for r in memory:
            print(f"{r['command']:20s} {r['peak_rss_mb']:8.0f} MB {r['seconds']:8.1f}")
    atomic_write_json(args.out, {"args": vars(args), "corpus_mb": mb, "cpus": os.cpu_count(),
                                 "python": platform.python_version(), "results": rows, "memory": memory,
                                 "quality_filter": quality})
    return 0


_PROBE = """
import sys
from effilm.cli import main
rc = main(sys.argv[1:])
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print("PEAK_KB", hwm[0], file=sys.stderr)
sys.exit(rc)
"""


def quality_filter(tmp: Path, args) -> list[dict]:
    """Classifier scoring speed on one core, and ``effilm filter --classifier`` end to end."""
    import statistics

    from effilm.data.classifier import load_classifier
    from effilm.data.classifier_train import ClassifierConfig, train_classifier
    from effilm.data.filters import FilterConfig, _batches, filter_files
    from effilm.io import iter_jsonl
    from effilm.synth import procedural
    from effilm.synth.annotate import AnnotateConfig, annotate

    cfg = procedural.ProceduralConfig(web_varied=True)
    corpus = tmp / "web.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        i = 0
        while fh.tell() < args.quality_mb * 1e6:
            for rec in procedural.generate_web_corpus(2000, 200, 0, start=i, cfg=cfg):
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            i += 2000
    head = tmp / "web-head.jsonl"
    with open(corpus, encoding="utf-8") as src, open(head, "w", encoding="utf-8") as dst:
        for _ in range(4000):
            dst.write(src.readline())
    annotate([head], tmp / "ann", AnnotateConfig(quiet=True), log=lambda m: None)
    report = train_classifier([tmp / "ann"], tmp / "clf", ClassifierConfig())
    clf = load_classifier(tmp / "clf")
    texts = [rec["text"] for _, rec in iter_jsonl(corpus)]
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    file_mb = corpus.stat().st_size / 1e6
    batches = [b for b in _batches(texts, FilterConfig().batch_records)]
    clf.score(batches[0])  # warm-up: the hashing tables
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for b in batches:
            clf.score(b)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    rows = [{"what": f"classifier score, 1 process (median of {args.repeats})", "mb": text_mb, "seconds": dt,
             "mb_per_s": text_mb / dt, "runs_s": times, "f1": report["features"]["ngram"]["f1"]}]
    for w in sorted({1, args.workers}):
        t0 = time.perf_counter()
        filter_files([corpus], tmp / f"filtered{w}", tmp / f"filtered{w}.json",
                     FilterConfig(classifier=str(tmp / "clf"), min_words=1, workers=w))
        dt = time.perf_counter() - t0
        rows.append({"what": f"effilm filter --classifier, workers={w} (file MB)", "mb": file_mb, "seconds": dt,
                     "mb_per_s": file_mb / dt})
    return rows


def peak_memory(tmp: Path, tok: Path, record_mb: float, vocab, rng) -> list[dict]:
    """Peak RSS of each data command on a file holding one ``record_mb`` record."""
    import subprocess
    import sys

    big = tmp / "big.jsonl"
    words = rng.choice(vocab, size=int(record_mb * 1e6 / 5.5))
    with open(big, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "big", "text": " ".join(words)}) + "\n")
        fh.write(json.dumps({"id": "small", "text": "a small document"}) + "\n")
    quiz = tmp / "quiz.jsonl"
    quiz.write_text(json.dumps({"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Oslo",
                                "Bern"], "answer": 0}) + "\n")  # fmt: skip
    commands = {
        "dedup": ["dedup", str(big), "--out", str(tmp / "m-dedup"), "--report", str(tmp / "m-dedup.json")],
        "data tokenize": ["data", "tokenize", "--input", str(big), "--tokenizer", str(tok), "--out", str(tmp / "m-tok"),
                          "--quiet"],  # fmt: skip
        "decontam": ["decontam", "--benchmark", f"jsonl:{quiz}", "--corpus", str(big), "--report",
                     str(tmp / "m-decontam.json")],  # fmt: skip
        "tokenizer train": ["tokenizer", "train", "--input", str(big), "--vocab-size", "1024", "--out",
                            str(tmp / "m-tokenizer")],  # fmt: skip
        "filter": ["filter", str(big), "--out", str(tmp / "m-filter"), "--report", str(tmp / "m-filter.json")],
    }
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = []
    for name, argv in commands.items():
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
        kb = int(proc.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
        out.append({"command": name, "peak_rss_mb": kb / 1024, "seconds": dt, "record_mb": big.stat().st_size / 1e6})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
