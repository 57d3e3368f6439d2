"""Decode speed: effilm's engine against transformers' ``generate`` on the same weights.

    PYTHONPATH=src python benchmarks/bench_decode.py [--quick] [--model DIR ...] [--json PATH]

For each model (by default a tiny Phi-3-style dense model and a tiny Mixtral-style MoE, fp32,
random weights, exported with ``effilm.save_hf`` so both libraries load the same directory):

1. single sequence: time to first token (a 1-token generation: prefill plus one sample) and decode
   tokens/s (the tokens after the first, over the time after the first), greedy, EOS disabled so
   every run makes exactly ``--new-tokens`` tokens. effilm and transformers runs are interleaved and
   the median of ``--repeats`` is reported;
2. batched throughput at batch 1, 8 and 32 (generated tokens / wall time, prompts of different
   lengths, left-padded), for both.

``--model DIR`` benchmarks any model directory instead (an effilm checkpoint, an HF directory, or
whatever ``effilm.checkpoint.load`` reads, quantized checkpoints included): transformers runs on
it when it is an HF directory or when ``effilm.save_hf`` can export it, else its rows are skipped.
Repeat ``--model`` for several rows (e.g. fp32 and int8).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _tiny_models(root: Path, hidden: int, layers: int, vocab: int) -> list[tuple[str, Path]]:
    """The default pair: a tiny Phi-3 (dense) and a tiny Mixtral-style MoE, exported to HF format.
    FFN width is 3 x hidden (experts 1.5 x hidden); heads of 32 dims, 2 query heads per KV head."""
    import effilm
    from effilm.config import ModelConfig, MoEConfig
    from effilm.model import build_model

    heads = max(2, hidden // 32)
    common = dict(vocab_size=vocab, d_model=hidden, n_layers=layers, n_heads=heads, n_kv_heads=heads // 2,
                  max_seq_len=1024, tie_embeddings=False)
    specs = [
        (f"tiny-phi3 (dense, d={hidden})", ModelConfig(name="bench-phi3", ffn_dim=3 * hidden, sliding_window=1000,
                                          hf_architecture="Phi3ForCausalLM", **common)),
        (f"tiny-mixtral (MoE 8x2, d={hidden})", ModelConfig(name="bench-moe", layer_pattern="M", ffn_dim=3 * hidden,
                                                    moe=MoEConfig(num_experts=8, top_k=2,
                                                                  expert_ffn_dim=3 * hidden // 2),
                                                    **common)),
    ]
    out = []
    for label, cfg in specs:
        d = effilm.save_hf(build_model(cfg, seed=0).eval(), root / cfg.name)
        out.append((label, d))
    return out


def _hf_model(path: Path, tmp: Path, model):
    """transformers' model for ``path``: the directory itself if HF, else an export, else None."""
    import transformers

    from effilm.checkpoint import is_effilm_dir

    src = path
    if is_effilm_dir(path):
        try:
            import effilm

            src = effilm.save_hf(model, tmp / (path.name + "-hf"))
        except Exception as exc:  # noqa: BLE001 - a checkpoint HF cannot express (e.g. quantized)
            print(f"  transformers rows skipped for {path}: {exc}")
            return None
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="float32").eval()
    hf.generation_config.eos_token_id = None  # every run makes exactly the requested tokens
    return hf


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    lens = [length] if batch == 1 else [max(1, length - (i * length) // (2 * batch)) for i in range(batch)]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def _run_effilm(engine, prompts, new_tokens: int) -> float:
    from effilm.engine import SamplingParams

    t = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
    dt = time.perf_counter() - t
    assert all(len(c.token_ids) == new_tokens for c in out)
    return dt


def _run_hf(hf, prompts, new_tokens: int) -> float:
    import torch

    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] == P + new_tokens
    return dt


def bench_model(label: str, path: Path, tmp: Path, args) -> list[dict]:
    from effilm.checkpoint import load
    from effilm.engine import Engine

    model = load(path)
    engine = Engine(model, None, eos_ids=())
    engine.eos_ids = frozenset()  # token-id benchmark: never stop early
    hf = None if args.no_hf else _hf_model(path, tmp, model)
    vocab = model.cfg.vocab_size
    runners = {"effilm": lambda p, n: _run_effilm(engine, p, n)}
    if hf is not None:
        runners["transformers"] = lambda p, n: _run_hf(hf, p, n)
    rows = []
    single = _prompts(1, args.prompt_len, vocab, 0)
    for fn in runners.values():  # warm-up
        fn(single, 4)
    times = {k: {"ttft": [], "total": []} for k in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():  # interleaved, so drift on a shared machine hits both
            times[name]["ttft"].append(fn(single, 1))
            times[name]["total"].append(fn(single, args.new_tokens))
    for name in runners:
        ttft = statistics.median(times[name]["ttft"])
        total = statistics.median(times[name]["total"])
        rows.append({"model": label, "engine": name, "bench": "single", "batch": 1,
                     "ttft_ms": 1e3 * ttft, "decode_tok_s": (args.new_tokens - 1) / max(total - ttft, 1e-9),
                     "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats})
    for b in args.batch_sizes:
        prompts = _prompts(b, args.prompt_len, vocab, b)
        for name, fn in runners.items():
            dts = [fn(prompts, args.new_tokens) for _ in range(max(1, args.repeats // 2))]
            dt = statistics.median(dts)
            rows.append({"model": label, "engine": name, "bench": "batched", "batch": b,
                         "throughput_tok_s": b * args.new_tokens / dt, "seconds": dt,
                         "new_tokens": args.new_tokens, "prompt_len": args.prompt_len})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':30s} {'engine':13s} {'bench':8s} {'batch':>5s} {'TTFT ms':>9s} {'tok/s':>9s} {'vs HF':>7s}")
    ref = {(r["model"], r["bench"], r["batch"]): r for r in rows if r["engine"] == "transformers"}
    for r in rows:
        tps = r.get("decode_tok_s", r.get("throughput_tok_s"))
        base = ref.get((r["model"], r["bench"], r["batch"]))
        ratio = tps / base.get("decode_tok_s", base.get("throughput_tok_s")) if base else None
        ttft = f"{r['ttft_ms']:9.2f}" if "ttft_ms" in r else " " * 9
        print(f"{r['model']:30s} {r['engine']:13s} {r['bench']:8s} {r['batch']:5d} {ttft} {tps:9.1f} "
              f"{(f'{ratio:6.2f}x' if ratio else '      -')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, metavar="DIR",
                    help="benchmark this model directory (repeatable) instead of the two tiny models")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the two tiny models")
    ap.add_argument("--layers", type=int, default=4, help="layers of the two tiny models")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary of the two tiny models")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (the longest in a batch)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats per measurement (median reported)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batched-throughput sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    ap.add_argument("--json", default="benchmarks/results/bench_decode.json", help="where to write results")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.batch_sizes = 16, 2, [1, 8]

    import torch

    from effilm.io import atomic_write_json

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = [(Path(m).name, Path(m)) for m in args.model] if args.model else _tiny_models(tmp, args.hidden, args.layers, args.vocab)
        for label, path in models:
            print(f"benchmarking {label} ({path})", flush=True)
            rows += bench_model(label, path, tmp, args)
    print_table(rows)
    import transformers

    atomic_write_json(args.json, {"python": sys.version.split()[0], "machine": platform.machine(),
                                  "torch": torch.__version__, "transformers": transformers.__version__,
                                  "threads": args.threads, "argv": sys.argv[1:], "dtype": "as stored (fp32 for the tiny models)",
                                  "rows": rows})
    print(f"wrote {Path(args.json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
