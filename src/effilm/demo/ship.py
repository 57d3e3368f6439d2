"""The demo's ship stage: quantize the best model, export it, generate answers with it.

``ship_model(summary, out_dir, cfg)`` takes the model with the best quiz cloze accuracy and:

* quantizes it to int8 (per output channel) and int4 (groups of 32; round-to-nearest, and GPTQ
  calibrated on the cleaned textbook corpus in the full demo), saving each as a checkpoint, and
  reports weight bytes, held-out perplexity, greedy-token agreement with the fp32 model, the
  largest per-layer error and the quiz cloze accuracy of each variant;
* exports it to Hugging Face format (with its tokenizer) and to GGUF (q8_0), and reads the GGUF
  file back to check every tensor;
* answers a few quiz questions through the generation engine, greedy and sampled.

It returns the ``ship`` section of ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path

from effilm.demo.config import DemoConfig
from effilm.io import atomic_write_json

SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 0}


def _variants(quick: bool):
    from effilm.config.quant import QuantConfig

    out = [("int8", QuantConfig(bits=8)), ("int4-g32", QuantConfig(bits=4, group_size=32))]
    if not quick:
        out.append(("int4-g32-gptq", QuantConfig(bits=4, group_size=32, method="gptq")))
    return out


def _cloze_acc(model, tokenizer, quiz, cfg: DemoConfig) -> float:
    from effilm.eval.report import run_evaluation
    from effilm.eval.scoring import EvalConfig

    rep = run_evaluation(model, tokenizer, [quiz], EvalConfig(shots=0, scoring="cloze", batch_size=cfg.eval_batch_size,
                                                              seed=cfg.seed))
    return rep["tasks"][0]["overall"]["acc"]["micro"]


def ship_model(summary: dict, out_dir: Path, cfg: DemoConfig, model_name: str, quick: bool, log=print) -> dict:
    import torch

    from effilm.data.tokenizer import load_tokenizer
    from effilm.demo.stages import quiz_spec
    from effilm.eval.tasks import load_task
    from effilm.formats.gguf import export_gguf, verify_gguf
    from effilm.formats.hf import save_hf
    from effilm.formats.load import load
    from effilm.inference.engine import Engine, SamplingParams
    from effilm.quant.pipeline import quantize_dir, text_windows

    torch.set_num_threads(cfg.threads)
    final = Path(summary["train"][model_name]["final_dir"])
    ship_dir = out_dir / "ship"
    ship_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(final)
    fp = load(final)
    quiz = load_task(quiz_spec(Path(summary["synthesize"]["quiz"]["path"])))
    eval_ids = text_windows(summary["synthesize"]["paths"]["heldout_textbook"], tokenizer, cfg.seq_len, "eval", 64)
    calib_ids = text_windows(summary["clean"]["paths"]["textbook"], tokenizer, cfg.seq_len, "calib", 32)
    fp_acc = summary["evaluate"][model_name]["cloze"]["acc"]
    result: dict = {"status": "done", "model": model_name, "source": str(final), "quantized": []}

    log(f"  {'variant':14s} {'weights':>10s} {'ppl':>8s} {'agree':>6s} {'cloze':>6s} {'max layer err':>13s}")
    for label, qcfg in _variants(quick):
        path = ship_dir / label
        rep = quantize_dir(final, path, qcfg, calib_ids=calib_ids if qcfg.method == "gptq" else None,
                           eval_ids=eval_ids, fp_model=fp, compare_rtn=False)["reports"][-1]
        rep.update(variant=label, path=str(path), cloze_acc=_cloze_acc(load(path), tokenizer, quiz, cfg),
                   cloze_acc_fp32=fp_acc, max_layer_error=max(x["max_abs_err"] for x in rep["layers"]))
        result["quantized"].append(rep)
        log(f"  {label:14s} {rep['weight_bytes_quant'] / 2**20:8.2f}Mi {rep['ppl_quant']:8.3f} "
            f"{rep['greedy_agreement']:6.3f} {rep['cloze_acc']:6.3f} {rep['max_layer_error']:13.2e}")
    result["fp32"] = {"weight_bytes": result["quantized"][0]["weight_bytes_fp32"],
                      "ppl": result["quantized"][0]["ppl_fp32"], "cloze_acc": fp_acc}

    hf_dir = save_hf(fp, ship_dir / "hf", tokenizer_dir=final)
    gguf_path = export_gguf(fp, ship_dir / "model-q8_0.gguf", "q8_0", tokenizer_dir=final, name=model_name)
    check = verify_gguf(gguf_path, fp, "q8_0")
    result["exports"] = {"hf": str(hf_dir), "gguf": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size,
                         "gguf_check": check}
    log(f"  exported {hf_dir} and {gguf_path} ({gguf_path.stat().st_size / 2**20:.2f} MiB, read back and checked)")

    engine = Engine(fp, tokenizer, name=model_name)
    items = quiz.items[: (3 if quick else 6)]
    prompts = [f"Question: {it.question.strip()}\nAnswer:" for it in items]
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=12, stop=("\n",)))
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=12, stop=("\n",), seed=cfg.seed, **SAMPLING))
    result["generations"] = [
        {"question": it.question, "answer": it.choices[it.answer], "greedy": g.text.strip(), "sampled": s.text.strip()}
        for it, g, s in zip(items, greedy, sampled, strict=True)
    ]
    result["sampling"] = {**SAMPLING, "seed": cfg.seed, "max_new_tokens": 12}
    for g in result["generations"]:
        log(f"  Q: {g['question']}\n     greedy: {g['greedy']!r}  sampled: {g['sampled']!r}  (answer: {g['answer']})")
    atomic_write_json(ship_dir / "ship.json", result)
    return result
