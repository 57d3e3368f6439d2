"""Quantization report for tiny-dense and tiny-moe, and llama.cpp decode speed on the GGUF export.

1. A byte-level BPE tokenizer (vocab = the model's 4096) is trained on the repository's own
   Python sources; each preset is trained briefly (AdamW) on them, so quality numbers mean
   something; held-out text is the tests/ directory (never trained on).
2. For RTN int8, RTN int4 (g32, sym and asym) and GPTQ int4 (g32): stored weight bytes, peak RSS of
   a fresh process loading the checkpoint and running a forward, perplexity before/after, greedy
   agreement with fp32, and the largest weight error per layer (effilm.quant.report).
3. If llama_cpp is importable: single-sequence greedy decode tokens/s of the GGUF export (f32,
   q8_0, q4_0) next to effilm's own KV-cached greedy loop (fp32 and int8), same prompt, one thread.

Run: PYTHONPATH=src python benchmarks/bench_quant.py [--quick] [--out benchmarks/results/bench_quant.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)

ROOT = Path(__file__).resolve().parents[1]


def corpus(kind: str) -> str:
    folder = ROOT / ("src/effilm" if kind == "train" else "tests")
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.py")))


def train_briefly(model, ids, steps: int, seq_len: int, batch: int, lr: float):
    import torch

    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = windows[torch.randint(0, windows.shape[0], (batch,), generator=gen)]
        out = model(rows)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
        if out.moe_loss is not None:
            loss = loss + out.moe_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def effilm_decode_tps(model, prompt, n: int) -> float:
    import torch

    with torch.no_grad():
        cache = model.new_cache(1, len(prompt) + n + 1)
        logits = model(torch.tensor([prompt]), cache=cache).logits
        t = time.perf_counter()
        for _ in range(n):
            nxt = logits[0, -1].argmax().view(1, 1)
            logits = model(nxt, cache=cache).logits
        return n / (time.perf_counter() - t)


def llama_cpp_decode_tps(path, prompt, n: int) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_threads=1, verbose=False)
    llm.eval(prompt)
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer training steps and evaluation tokens")
    ap.add_argument("--presets", nargs="+", default=["tiny-dense", "tiny-moe"])
    ap.add_argument("--out", default=str(RESULTS / "bench_quant.json"))
    args = ap.parse_args()

    import torch

    from effilm.config.data import TokenizerTrainConfig
    from effilm.config.model import ModelConfig
    from effilm.config.quant import QuantConfig
    from effilm.data.tokenizer import load_tokenizer, train_tokenizer
    from effilm.formats.checkpoint import save
    from effilm.formats.load import load
    from effilm.io import atomic_write_json
    from effilm.models.transformer import build_model
    from effilm.quant.quantize import quantize_model, save_quantized
    from effilm.quant.report import build_report, format_report, windows

    torch.set_num_threads(1)
    steps, eval_tokens, seq = (30, 2048, 128) if args.quick else (300, 16384, 128)
    work = Path(tempfile.mkdtemp(prefix="bench_quant_"))
    (work / "train.jsonl").write_text(json.dumps({"text": corpus("train")}) + "\n")
    train_tokenizer([work / "train.jsonl"], work / "tok", TokenizerTrainConfig(vocab_size=4096, chat_tokens=False, chat_template=""))
    tok = load_tokenizer(work / "tok")
    train_ids = torch.tensor(tok.encode(corpus("train")))
    eval_ids = windows(tok.encode(corpus("eval"))[:eval_tokens], seq)
    calib = train_ids[: 32 * seq].view(32, seq)
    configs = [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32), QuantConfig(bits=4, group_size=32, asym=True),
               QuantConfig(bits=4, group_size=32, method="gptq")]  # fmt: skip
    results = {"machine": "shared 2-core CPU, 1 torch thread", "train_steps": steps, "eval_tokens": int(eval_ids.numel()), "presets": {}}
    for preset in args.presets:
        model = build_model(ModelConfig.from_name(preset), seed=0)
        t0 = time.perf_counter()
        model, loss = train_briefly(model, train_ids, steps, seq, 8, 3e-3)
        print(f"\n== {preset}: trained {steps} steps in {time.perf_counter() - t0:.0f}s, final loss {loss:.3f}")
        fp_dir = work / preset / "fp32"
        save(model, fp_dir)
        reports, qdirs = [], {}
        for cfg in configs:
            q, spec = quantize_model(load(fp_dir), cfg, calib)
            qdir = work / preset / f"{cfg.method}-b{cfg.bits}-g{cfg.group_size}-{'a' if cfg.asym else 's'}"
            save_quantized(q, spec, qdir)
            qdirs[qdir.name] = qdir
            reports.append(build_report(model, q, spec, eval_ids, fp_dir, qdir))
        print(format_report(reports))
        entry = {"reports": reports, "train_loss": loss}
        prompt = tok.encode("def load(path):\n    ")
        speed = {"effilm fp32": effilm_decode_tps(model, prompt, 64),
                 "effilm int8 (rtn)": effilm_decode_tps(load(qdirs["rtn-b8-gNone-s"]), prompt, 64)}  # fmt: skip
        try:
            import llama_cpp  # noqa: F401

            from effilm.formats.gguf import export_gguf

            for qt in ("f32", "q8_0", "q4_0"):
                path = export_gguf(model, work / preset / f"m-{qt}.gguf", qt, work / "tok")
                speed[f"llama.cpp {qt}"] = llama_cpp_decode_tps(path, prompt, 64)
        except ImportError:
            speed["llama.cpp"] = None
        print(f"{'decode (batch 1, 64 tokens, 1 thread)':40s} tok/s")
        for k, v in speed.items():
            print(f"  {k:38s} {'not installed' if v is None else f'{v:.1f}'}")
        entry["decode_tok_s"] = speed
        results["presets"][preset] = entry
        atomic_write_json(args.out, results)  # after each preset, so a partial run keeps its figures
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
