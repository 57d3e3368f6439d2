"""The end-to-end demo (interim: the foundation slice).

Until the data, training and evaluation stages land, the demo runs the real end-to-end path that
exists: the cost table of the real presets, then tiny dense / MoE / Arctic-hybrid models built,
run forward, decoded greedily with the KV cache (checked against full recomputation), and
round-tripped through the Hugging Face format. Results go to ``OUT/summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from effilm.io import atomic_write_json

REAL = ["arctic", "phi-3-mini-4k", "phi-3-medium-4k", "phi-3.5-moe", "mixtral-8x7b", "openelm-270m", "openelm-3b"]
TINY = ["tiny-dense", "tiny-moe", "tiny-arctic", "tiny-openelm"]


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, steps: int, use_cache: bool = True) -> torch.Tensor:
    ids = prompt
    if not use_cache:
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits = model(prompt, cache=cache).logits
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        logits = model(nxt, cache=cache).logits
    return ids


def run_demo(out: str, quick: bool = False) -> int:
    import effilm
    from effilm.config import ModelConfig
    from effilm.config.cost import cost_summary
    from effilm.model import build_model

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("== 1. Cost of the real architectures (analytic, exact) ==")
    print(f"{'preset':16s} {'total':>9s} {'active':>9s} {'GFLOP/tok':>10s} {'bf16 weights':>13s} {'KV/tok bf16':>12s}")
    costs = {}
    for name in REAL:
        s = cost_summary(ModelConfig.from_name(name), 2048)
        costs[name] = s
        print(f"{name:16s} {s['total_params'] / 1e9:8.2f}B {s['active_params'] / 1e9:8.2f}B "
              f"{s['flops_per_token'] / 1e9:10.1f} {s['weight_bytes']['bf16'] / 2**30:9.1f} GiB "
              f"{s['kv_cache_bytes_per_token']['bf16'] / 1024:8.0f} KiB")  # fmt: skip
    print("\n== 2. Tiny models: forward, cached greedy decoding, HF round trip ==")
    steps = 8 if quick else 32
    results = {}
    for name in tqdm(TINY, desc="tiny models", unit="model"):
        cfg = ModelConfig.from_name(name)
        model = build_model(cfg, seed=0).eval()
        prompt = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        cached = greedy(model, prompt, steps)
        dt = time.perf_counter() - t
        full = greedy(model, prompt, steps, use_cache=False)
        row = {"total_params": cfg.num_params(), "active_params": cfg.num_active_params(),
               "cache_matches_full": bool(torch.equal(cached, full)), "decode_tok_per_s": 2 * steps / dt,
               "greedy_tokens": cached[0, 16:].tolist()}  # fmt: skip
        if name != "tiny-openelm":  # OpenELM is not a transformers architecture
            effilm.save_hf(model, out_dir / f"{name}-hf")
            back = effilm.load(out_dir / f"{name}-hf")
            with torch.no_grad():
                row["hf_round_trip_max_diff"] = float((back(prompt).logits - model(prompt).logits).abs().max())
        results[name] = row
    for name, r in results.items():
        rt = f"{r['hf_round_trip_max_diff']:.1e}" if "hf_round_trip_max_diff" in r else "n/a"
        print(f"{name:13s} total {r['total_params'] / 1e6:6.2f}M active {r['active_params'] / 1e6:5.2f}M  "
              f"cache==full: {r['cache_matches_full']}  decode {r['decode_tok_per_s']:7.1f} tok/s  HF round trip diff {rt}")  # fmt: skip
    summary = {"costs": costs, "tiny": results, "seconds": time.perf_counter() - t0, "quick": quick}
    atomic_write_json(out_dir / "summary.json", summary)
    print(f"\nwrote {out_dir / 'summary.json'} in {summary['seconds']:.1f}s")
    return 0 if all(r["cache_matches_full"] for r in results.values()) else 1
