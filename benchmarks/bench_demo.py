"""The demo's cost and quality across seeds: per-stage wall and CPU time, and the three models' scores.

Runs ``effilm demo`` (full, or ``--quick``) for each seed, or reads the ``summary.json`` of runs
already made (``--summaries DIR ...``), then prints a table and writes JSON::

    PYTHONPATH=src python benchmarks/bench_demo.py --seeds 0 1 2 --runs-dir /tmp/demo_bench
    PYTHONPATH=src python benchmarks/bench_demo.py --summaries /tmp/demo_s0 /tmp/demo_s1 /tmp/demo_s2

Wall time depends on what else the machine runs; CPU time (``time.process_time`` of the demo
process, all its threads) is the budget figure: the full demo must stay within about 8 CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)


def _summaries(args) -> list[dict]:
    if args.summaries:
        return [json.loads((Path(d) / "summary.json").read_text()) for d in args.summaries]
    from effilm.demo.config import DemoConfig
    from effilm.demo.run import run_pipeline

    out = []
    for seed in args.seeds:
        cfg = DemoConfig.quick({"seed": seed}) if args.quick else DemoConfig(seed=seed)
        out.append(run_pipeline(cfg, Path(args.runs_dir) / f"seed{seed}", quick=args.quick))
    return out


def _spread(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "min": min(values), "max": max(values), "stdev": statistics.stdev(values) if len(values) > 1 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run")
    ap.add_argument("--quick", action="store_true", help="the CI setting instead of the full demo")
    ap.add_argument("--runs-dir", default="demo_bench", help="where the demo runs go")
    ap.add_argument("--summaries", nargs="+", help="read these demo output directories instead of running")
    ap.add_argument("--out", default=str(RESULTS / "bench_demo.json"), help="results JSON path")
    args = ap.parse_args()

    runs = _summaries(args)
    stages = list(runs[0]["timings"])
    models = list(runs[0]["evaluate"])
    print(f"{'stage':11s}" + "".join(f" {'seed ' + str(r['seed']):>17s}" for r in runs))
    for st in stages:
        print(f"{st:11s}" + "".join(f" {r['timings'][st]['wall_s']:7.1f}w {r['timings'][st]['cpu_s']:7.1f}c" for r in runs))
    quality = {}
    print(f"\n{'model':16s} {'metric':22s}" + "".join(f" {'seed ' + str(r['seed']):>8s}" for r in runs) + f" {'mean':>8s}")
    for m in models:
        quality[m] = {}
        for metric, get in (("cloze acc", lambda e: e["cloze"]["acc"]), ("letter acc", lambda e: e["letter"]["acc"]),
                            ("bpb heldout textbook", lambda e: e["bits_per_byte"]["heldout_textbook"]),
                            ("bpb heldout web", lambda e: e["bits_per_byte"]["heldout_web"])):
            vals = [get(r["evaluate"][m]) for r in runs]
            quality[m][metric] = _spread(vals)
            print(f"{m:16s} {metric:22s}" + "".join(f" {v:8.3f}" for v in vals) + f" {statistics.fmean(vals):8.3f}")
    result = {
        "claim": "full demo within ~8 CPU minutes; textbook model cloze >= 50% averaged over seeds",
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "quick": runs[0]["quick"], "seeds": [r["seed"] for r in runs], "config": runs[0]["config"],
        "timings": {str(r["seed"]): r["timings"] for r in runs},
        "total_cpu_s": _spread([r["timings"]["total"]["cpu_s"] for r in runs]),
        "quality": quality,
        "planted_leak_exact": [r["clean"]["planted_leak_check"]["exact"] for r in runs],
    }
    from effilm.io import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
