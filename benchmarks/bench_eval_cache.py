"""Cloze and letter scoring of an effilm model: the KV-cache path against batched rows.

The cached path runs each question's context once (copying the few-shot prefix it shares with
the previous question from that question's cache) and scores its choices from copies of the KV
cache; the uncached path (``use_kv_cache=False``) runs context + choice for every choice
(lm-eval's request layout), or one shared row per question when every choice is one token. Same model, tokenizer and items; items/s and the largest per-choice
log-likelihood difference. Also times bits per byte on held-out text: disjoint 64-token windows, and sliding ones with stride 16.

Run: PYTHONPATH=src python benchmarks/bench_eval_cache.py [--quick] [--out benchmarks/results/bench_eval_cache.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # the fixtures live with the tests


def run(n_test: int, shots: int, preset: str, threads: int) -> dict:
    import torch
    from eval_fixtures import SUBJECTS, make_mmlu_dir, train_tokenizer

    from effilm.config.model import ModelConfig
    from effilm.eval.scoring import EvalConfig, perplexity, score_task
    from effilm.eval.tasks import load_task
    from effilm.models.transformer import build_model

    torch.set_num_threads(threads)
    tok = train_tokenizer(vocab_size=1000)
    model = build_model(ModelConfig.from_name(preset, vocab_size=tok.get_vocab_size()), seed=0).eval()
    root = Path(tempfile.mkdtemp())
    make_mmlu_dir(root, n_test=n_test // len(SUBJECTS), n_dev=max(shots, 1))
    task = load_task(f"mmlu:{root}")
    out = {"preset": preset, "items": len(task.items), "shots": shots, "threads": threads, "scoring": {}}
    for scoring in ("cloze", "letter"):
        rates, recs = {}, {}
        for name, cache in (("no_cache", False), ("kv_cache", True), ("no_cache_again", False), ("kv_cache_again", True)):
            cfg = EvalConfig(shots=shots, scoring=scoring, batch_size=8, use_kv_cache=cache)
            t0 = time.perf_counter()
            recs[name] = score_task(model, tok, task, cfg)
            rates[name] = round(len(task.items) / (time.perf_counter() - t0), 2)
        diff = max(abs(a - b) for x, y in zip(recs["kv_cache"], recs["no_cache"], strict=True)
                   for a, b in zip(x["loglikelihoods"], y["loglikelihoods"], strict=True))
        best_cache = max(rates["kv_cache"], rates["kv_cache_again"])
        out["scoring"][scoring] = {"items_per_s": rates, "max_abs_ll_diff": diff,
                                   "speedup": round(best_cache / max(rates["no_cache"], rates["no_cache_again"]), 2)}
    text = [" ".join(it.question for it in task.items)] * 4
    n_bytes = sum(len(t.encode()) for t in text)
    for stride in (0, 16):
        t0 = time.perf_counter()
        p = perplexity(model, tok, text, EvalConfig(max_length=64, ppl_stride=stride))
        dt = time.perf_counter() - t0
        out[f"ppl_stride{stride}"] = {"bits_per_byte": round(p["bits_per_byte"], 4), "windows": p["windows"],
                                      "kb_per_s": round(n_bytes / 1e3 / dt, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer items")
    ap.add_argument("--preset", default="tiny-dense")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "bench_eval_cache.json"))
    args = ap.parse_args()
    res = run(16 if args.quick else 48, 5, args.preset, args.threads)
    print(f"{res['preset']}, {res['items']} items, {res['shots']}-shot, {res['threads']} thread(s)")
    print(f"{'scoring':<8} {'path':<16} {'items/s':>9}")
    for scoring, r in res["scoring"].items():
        for k, v in r["items_per_s"].items():
            print(f"{scoring:<8} {k:<16} {v:>9}")
        print(f"{scoring:<8} speedup {r['speedup']}x, max |ll diff| {r['max_abs_ll_diff']:.2e}")
    for s in (0, 16):
        p = res[f"ppl_stride{s}"]
        print(f"bits/byte stride {s or 'disjoint'}: {p['bits_per_byte']} ({p['windows']} windows, {p['kb_per_s']} KB/s)")
    from effilm.io import atomic_write_json

    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
