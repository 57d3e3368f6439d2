"""``effilm serve`` under concurrent load: does batching pay, and what does a request wait?

Usage: PYTHONPATH=src python benchmarks/bench_serve.py [--requests 16] [--max-tokens 32]
       [--preset tiny-dense] [--out benchmarks/results/bench_serve.json]

Saves a tiny preset model (random weights) with a small BPE tokenizer, then for each
``--max-concurrency`` setting starts ``effilm serve`` in a subprocess on 127.0.0.1 and sends
``--requests`` streaming completions at once (greedy, fixed length). Reports wall time, generated
tokens/s over the whole burst, and the median / worst time to first token and request latency.
Concurrency 1 is the unbatched baseline: one sequence in the engine at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # the server-process and model-directory helpers


def burst(srv, n: int, max_tokens: int, served: str) -> dict:
    import httpx
    from serve_harness import sse_events

    def one(i):
        body = {"model": served, "prompt": f"the cat {i} sat on the mat", "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first = None
        with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=600) as r:
            lines = []
            for line in r.iter_lines():
                if first is None and line.startswith("data: "):
                    first = time.perf_counter() - t0
                lines.append(line)
        events = sse_events(lines)
        return first, time.perf_counter() - t0, events[-2]["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    lat = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_max_s": max(ttft), "latency_p50_s": statistics.median(lat), "latency_max_s": max(lat)}


def main(argv=None) -> int:
    from engine_fixtures import add_tokenizer, make_tokenizer, tiny
    from serve_harness import ServerProcess

    from effilm.formats.checkpoint import save
    from effilm.io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16, help="requests sent at once")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--preset", default="tiny-dense", help="model preset (random weights)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="--max-concurrency values")
    ap.add_argument("--out", default=str(RESULTS / "bench_serve.json"), help="results JSON path")
    args = ap.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = add_tokenizer(save(tiny(args.preset), tmp / "model"), make_tokenizer(tmp))
        for c in args.concurrency:
            srv = ServerProcess(model_dir, "--max-concurrency", str(c), "--max-queue", str(args.requests))
            try:
                burst(srv, 2, 4, "model")  # warm-up
                row = {"max_concurrency": c, **burst(srv, args.requests, args.max_tokens, "model"),
                       "batches": srv.health()["batches_run"]}
            finally:
                srv.stop()
            rows.append(row)

    print(f"effilm serve, {args.requests} concurrent streaming requests x {args.max_tokens} tokens, "
          f"{args.preset} (random weights), CPU threads per server: 1 (OMP_NUM_THREADS)")
    head = f"{'max_conc':>8} {'wall s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT max':>9} {'lat p50':>8} {'lat max':>8} {'batches':>7}"
    print(head)
    for r in rows:
        print(f"{r['max_concurrency']:>8} {r['wall_s']:>7.2f} {r['tokens_per_s']:>7.1f} {r['ttft_p50_s']:>9.3f} "
              f"{r['ttft_max_s']:>9.3f} {r['latency_p50_s']:>8.3f} {r['latency_max_s']:>8.3f} {r['batches']:>7}")
    result = {"benchmark": "bench_serve", "requests": args.requests, "max_tokens": args.max_tokens,
              "preset": args.preset, "rows": rows, "machine": platform.platform(), "cpus": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0]}
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    print(json.dumps({"speedup_tok_s": rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
