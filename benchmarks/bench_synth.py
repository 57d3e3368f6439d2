"""Synthetic-data throughput: procedural records/s, openai-backend concurrency, dedup MB/s.

    PYTHONPATH=src python benchmarks/bench_synth.py [--quick] [--out PATH]

1. ``procedural``: textbook and web-like records per second through the Python API.
2. ``openai``: the backend against a local server that answers every request after a fixed
   latency, at concurrency 1, 8 and 32: concurrency hides the latency.
3. ``dedup``: MB/s of effilm's dedup pass (shared MinHash permutations, ``update_batch``) against
   datasketch's plain per-document usage (a fresh ``MinHash`` per document, one ``update`` per
   shingle), both with the same normalisation and the same 14x8 LSH index.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)


def bench_procedural(n: int) -> list[dict]:
    from effilm.synth import procedural

    rows = []
    for name, fn in (("textbook", procedural.generate_corpus), ("web", procedural.generate_web_corpus)):
        t = time.perf_counter()
        nbytes = sum(len(r["text"].encode()) for r in fn(n, 200, seed=0))
        dt = time.perf_counter() - t
        rows.append({"bench": f"procedural {name}", "records": n, "seconds": dt,
                     "records_per_s": n / dt, "MB_per_s": nbytes / dt / 1e6})
    return rows


def bench_openai(n: int, latency: float, levels=(1, 8, 32)) -> list[dict]:
    """The server runs in its own process so that it does not share the client's GIL."""
    import os
    import subprocess

    from effilm.synth.recipe import load_recipe
    from effilm.synth.runner import Run

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "tests" / "support" / "fakeserver.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True, env=env)
    rows = []
    try:
        base_url = proc.stdout.readline().strip()
        for c in levels:
            recipe = load_recipe(None, {"backend": "openai", "records": n, "shard_size": n,
                                        "openai": {"base_url": base_url, "concurrency": c}})
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                s = Run(recipe, tmp, log=lambda m: None).run()
                dt = time.perf_counter() - t
            if not s["complete"] or s["usage"]["requests"] != n:
                raise SystemExit(f"openai run at concurrency {c} was not clean: {s}")
            rows.append({"bench": f"openai concurrency {c}", "records": n, "latency_s": latency,
                         "seconds": dt, "records_per_s": n / dt,
                         "latency_bound_per_s": c / latency, "retries": s["usage"]["retries"]})
    finally:
        proc.terminate()
        proc.wait()
    return rows


def bench_dedup(n: int) -> list[dict]:
    from datasketch import MinHash, MinHashLSH

    from effilm.data.dedup import DedupConfig, dedup_records, normalize, shingles
    from effilm.synth import procedural

    docs = [(r["id"], r) for r in procedural.generate_corpus(n, 200, seed=1)]
    mb = sum(len(r["text"].encode()) for _, r in docs) / 1e6
    cfg = DedupConfig()

    t = time.perf_counter()
    kept_ours = sum(v is None for _, _, v in dedup_records(docs, cfg))
    ours = time.perf_counter() - t

    t = time.perf_counter()
    lsh, seen, kept_plain = MinHashLSH(num_perm=cfg.num_perm, params=(14, 8)), set(), 0
    for rid, rec in docs:
        norm = normalize(rec["text"])
        if norm in seen:
            continue
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        for s in shingles(norm, cfg.ngram):
            m.update(s)
        if not lsh.query(m):
            seen.add(norm)
            lsh.insert(rid, m)
            kept_plain += 1
    plain = time.perf_counter() - t
    return [
        {"bench": "dedup effilm", "records": n, "MB": mb, "seconds": ours, "MB_per_s": mb / ours, "kept": kept_ours},
        {"bench": "dedup datasketch per-doc", "records": n, "MB": mb, "seconds": plain, "MB_per_s": mb / plain,
         "kept": kept_plain},
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (about 10 s)")
    ap.add_argument("--out", default=str(RESULTS / "bench_synth.json"), help="results JSON path")
    args = ap.parse_args(argv)
    n_proc, n_http, n_dedup = (1000, 64, 500) if args.quick else (5000, 192, 3000)
    rows = bench_procedural(n_proc) + bench_openai(n_http, 0.1) + bench_dedup(n_dedup)
    print(f"{'benchmark':28s} {'records':>8s} {'seconds':>8s} {'rec/s':>9s} {'MB/s':>7s}")
    for r in rows:
        mbs = f"{r['MB_per_s']:7.2f}" if "MB_per_s" in r else "      -"
        rps = f"{r['records_per_s']:9.1f}" if "records_per_s" in r else "        -"
        print(f"{r['bench']:28s} {r['records']:8d} {r['seconds']:8.2f} {rps} {mbs}")
    from effilm.io import atomic_write_json

    atomic_write_json(args.out, {"python": sys.version.split()[0], "machine": platform.machine(),
                                  "quick": args.quick, "results": rows})
    print(f"wrote {Path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
