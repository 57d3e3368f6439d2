"""Decode speed: effilm's engine against transformers' ``generate`` on the same weights.

    PYTHONPATH=src python benchmarks/bench_decode.py [--quick] [--model DIR ...] [--out PATH]

For each model (by default a tiny Phi-3-style dense model and a tiny Mixtral-style MoE, fp32,
random weights, exported with ``effilm.save_hf`` so both libraries load the same directory):

1. single sequence: time to first token (a 1-token generation: prefill plus one sample) and decode
   tokens/s (the tokens after the first, over the time after the first), greedy, EOS disabled so
   every run makes exactly ``--new-tokens`` tokens. The arms are effilm fp32; effilm int8 (RTN,
   per-channel) and int4 (RTN, groups of 32, symmetric), each with the fast packed CPU kernels
   (bf16 activations, the engine's default) and the exact fp32 kernel
   (``effilm.models.quantized``); transformers fp32; and, when llama_cpp is importable, llama.cpp
   on the model's GGUF export (f32, q8_0 and q4_0, with a tokenizer trained here so llama.cpp
   loads it). Runs are interleaved and the median of ``--repeats`` is reported; every "vs HF"
   ratio is against transformers fp32 and every "vs fp32" ratio against effilm fp32, on the same
   model in the same run;
2. batched throughput at batch 1, 8 and 32 (generated tokens / wall time, prompts of different
   lengths, left-padded), for effilm fp32 / int8 and transformers (llama-cpp-python's API runs one
   sequence at a time, so llama.cpp has no batched rows).

``--model DIR`` benchmarks any model directory instead (an effilm checkpoint, an HF directory, or
whatever ``effilm.formats.load.load`` reads, quantized checkpoints included): transformers runs on
it when it is an HF directory or when ``effilm.save_hf`` can export it, else its rows are skipped.
Repeat ``--model`` for several rows (e.g. fp32 and int8). ``--no-int8`` / ``--no-llama-cpp`` drop
those arms; ``--dense-only`` skips the MoE model, ``--no-exact`` the exact-kernel quantized arms.

The quantized-decode target (issue 17, section 4), at batch 1 on a d=1024, 8-layer dense model::

    PYTHONPATH=src python benchmarks/bench_decode.py --hidden 1024 --layers 8 --dense-only --no-hf \
        --batch-sizes --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)


def _tiny_models(root: Path, hidden: int, layers: int, vocab: int, dense_only: bool = False) -> list[tuple[str, Path]]:
    """The default pair: a tiny Phi-3 (dense) and a tiny Mixtral-style MoE, exported to HF format.
    FFN width is 3 x hidden (experts 1.5 x hidden); heads of 32 dims, 2 query heads per KV head. The
    dense model carries a sliding window as Phi-3's config does, as long as its context (so the GGUF
    export, which llama.cpp's llama graph runs without a window, is exact)."""
    import effilm
    from effilm.config import ModelConfig, MoEConfig
    from effilm.models.transformer import build_model

    heads = max(2, hidden // 32)
    common = dict(vocab_size=vocab, d_model=hidden, n_layers=layers, n_heads=heads, n_kv_heads=heads // 2,
                  max_seq_len=1024, tie_embeddings=False)
    specs = [
        (f"tiny-phi3 (dense, d={hidden})", ModelConfig(name="bench-phi3", ffn_dim=3 * hidden, sliding_window=1024,
                                          hf_architecture="Phi3ForCausalLM", **common)),
        (f"tiny-mixtral (MoE 8x2, d={hidden})", ModelConfig(name="bench-moe", layer_pattern="M", ffn_dim=3 * hidden,
                                                    moe=MoEConfig(num_experts=8, top_k=2,
                                                                  expert_ffn_dim=3 * hidden // 2),
                                                    **common)),
    ]
    out = []
    for label, cfg in specs[:1] if dense_only else specs:
        d = effilm.save_hf(build_model(cfg, seed=0).eval(), root / cfg.name)
        out.append((label, d))
    return out


def _tokenizer(root: Path, vocab: int) -> Path:
    """A byte-level BPE of exactly ``vocab`` tokens (trained on effilm's own source), which the
    GGUF export embeds so llama.cpp can load the model; the benchmark itself feeds token ids."""
    from effilm.config.data import TokenizerTrainConfig
    from effilm.data.tokenizer import train_tokenizer

    src = Path(__file__).resolve().parents[1] / "src" / "effilm"
    text = root / "tokenizer-corpus.txt"
    text.write_text("\n".join(p.read_text(encoding="utf-8") for p in sorted(src.rglob("*.py"))), encoding="utf-8")
    return train_tokenizer([text], root / "tok", TokenizerTrainConfig(vocab_size=vocab, chat_tokens=False, chat_template=""))


def _llama_cpp(model, tok_dir: Path | None, out: Path, n_ctx: int) -> dict:
    """Runners over llama.cpp for the GGUF exports (f32, q8_0) of ``model``; {} when llama_cpp
    is not importable or the model cannot be exported."""
    try:
        import llama_cpp
    except ImportError:
        print("  llama.cpp rows skipped: llama_cpp is not importable (pip install llama-cpp-python)")
        return {}
    from effilm.formats.gguf import export_gguf

    runners = {}
    out.mkdir(parents=True, exist_ok=True)
    for qt in ("f32", "q8_0", "q4_0"):
        try:
            path = export_gguf(model, out / f"{out.name}-{qt}.gguf", qt, tok_dir)
        except Exception as exc:  # noqa: BLE001 - e.g. an architecture llama.cpp has no layout for
            print(f"  llama.cpp rows skipped: {exc}")
            return {}
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=512, verbose=False)
        runners[f"llama.cpp {qt}"] = (lambda m: lambda p, n: _run_llama_cpp(m, p, n))(llm)
    return runners


def _run_llama_cpp(llm, prompts, new_tokens: int) -> float:
    """Greedy decode of one prompt with llama.cpp: prefill, then argmax and one eval per token."""
    import numpy as np

    (prompt,) = prompts
    t = time.perf_counter()
    llm.reset()
    llm.eval(prompt)
    for _ in range(new_tokens - 1):  # the first token comes from the prefill's logits
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    int(np.argmax(llm.scores[llm.n_tokens - 1]))  # the last token's choice, as the other arms make it
    return time.perf_counter() - t


def _hf_model(path: Path, tmp: Path, model):
    """transformers' model for ``path``: the directory itself if HF, else an export, else None."""
    import transformers

    from effilm.formats.checkpoint import is_effilm_dir

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
    from effilm.inference.engine import SamplingParams

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


def _engine(model, kernel: str = "fast"):
    from effilm.inference.engine import Engine

    engine = Engine(model, None, eos_ids=(), quant_kernel=kernel)
    engine.eos_ids = frozenset()  # token-id benchmark: never stop early
    return engine


def bench_model(label: str, path: Path, tmp: Path, args, tok_dir: Path | None = None, extra_arms: bool = False) -> list[dict]:
    """Rows for one model; ``extra_arms`` (the default tiny models) adds effilm int8 and llama.cpp."""
    from effilm.formats.load import load

    model = load(path)
    hf = None if args.no_hf else _hf_model(path, tmp, model)
    vocab = model.cfg.vocab_size
    engine = _engine(model)
    runners = {"effilm": lambda p, n: _run_effilm(engine, p, n)}
    batched = dict(runners)
    if extra_arms and not args.no_int8:
        from effilm.config.quant import QuantConfig
        from effilm.quant.quantize import quantize_model

        for fmt, qcfg in (("int8", QuantConfig(bits=8)), ("int4", QuantConfig(bits=4, group_size=32))):
            qmodel = quantize_model(load(path), qcfg)[0]
            for kernel in ("fast",) if args.no_exact else ("fast", "exact"):
                arm = f"effilm {fmt} {kernel}"
                q_engine = _engine(qmodel, kernel)  # sets the kernel of qmodel's layers, in place
                if kernel == "fast":
                    qmodel = quantize_model(load(path), qcfg)[0]  # the exact arm gets its own copy
                runners[arm] = (lambda e: lambda p, n: _run_effilm(e, p, n))(q_engine)
                if kernel == "fast":
                    batched[arm] = runners[arm]
    if hf is not None:
        runners["transformers"] = batched["transformers"] = lambda p, n: _run_hf(hf, p, n)
    if extra_arms and not args.no_llama_cpp:
        runners.update(_llama_cpp(load(path), tok_dir, tmp / (path.name + "-gguf"),
                                  args.prompt_len + args.new_tokens + 8))
    rows = []
    single = _prompts(1, args.prompt_len, vocab, 0)
    for fn in runners.values():  # warm-up
        fn(single, 4)
    times = {k: {"ttft": [], "total": []} for k in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():  # interleaved, so drift on a shared machine hits every arm
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
        for name, fn in batched.items():
            dts = [fn(prompts, args.new_tokens) for _ in range(max(1, args.repeats // 2))]
            dt = statistics.median(dts)
            rows.append({"model": label, "engine": name, "bench": "batched", "batch": b,
                         "throughput_tok_s": b * args.new_tokens / dt, "seconds": dt,
                         "new_tokens": args.new_tokens, "prompt_len": args.prompt_len})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':30s} {'engine':19s} {'bench':8s} {'batch':>5s} {'TTFT ms':>9s} {'tok/s':>9s} {'vs HF':>7s} "
          f"{'vs fp32':>7s}")
    ref = {(r["model"], r["bench"], r["batch"]): r for r in rows if r["engine"] == "transformers"}
    ours = {(r["model"], r["bench"], r["batch"]): r for r in rows if r["engine"] == "effilm"}

    def rate(r):
        return r.get("decode_tok_s", r.get("throughput_tok_s"))

    for r in rows:
        tps = rate(r)
        key = (r["model"], r["bench"], r["batch"])
        ratio = tps / rate(ref[key]) if key in ref else None
        vs_fp32 = tps / rate(ours[key]) if key in ours else None
        ttft = f"{r['ttft_ms']:9.2f}" if "ttft_ms" in r else " " * 9
        print(f"{r['model']:30s} {r['engine']:19s} {r['bench']:8s} {r['batch']:5d} {ttft} {tps:9.1f} "
              f"{(f'{ratio:6.2f}x' if ratio else '      -')} {(f'{vs_fp32:6.2f}x' if vs_fp32 else '      -')}")


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
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 32],
                    help="batched-throughput sizes (none: skip the batched rows)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--no-int8", action="store_true", help="skip the effilm int8 and int4 rows of the tiny models")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp rows of the tiny models")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-kernel int8 / int4 arms (slow)")
    ap.add_argument("--dense-only", action="store_true", help="benchmark only the tiny dense model")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    ap.add_argument("--out", default=str(RESULTS / "bench_decode.json"), help="results JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.batch_sizes = 16, 2, [1, 8]

    import torch

    from effilm.io import atomic_write_json

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            models, tok_dir = [(Path(m).name, Path(m)) for m in args.model], None
        else:
            models = _tiny_models(tmp, args.hidden, args.layers, args.vocab, args.dense_only)
            tok_dir = None if args.no_llama_cpp else _tokenizer(tmp, args.vocab)
        for label, path in models:
            print(f"benchmarking {label} ({path})", flush=True)
            rows += bench_model(label, path, tmp, args, tok_dir, extra_arms=not args.model)
    print_table(rows)
    import transformers

    atomic_write_json(args.out, {"python": sys.version.split()[0], "machine": platform.machine(),
                                  "torch": torch.__version__, "transformers": transformers.__version__,
                                  "threads": args.threads, "argv": sys.argv[1:], "dtype": "as stored (fp32 for the tiny models; 'effilm int8/int4 fast/exact' are their RTN int8 / int4-g32 copies on the packed bf16 CPU kernels / the exact fp32 path)",
                                  "rows": rows})
    print(f"wrote {Path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
