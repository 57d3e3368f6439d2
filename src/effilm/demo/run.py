"""``effilm demo``: both routes of efficient language models, end to end, on built-in data.

Stages (each prints its progress and its wall and CPU time):

1. **synthesize**: a textbook corpus (facts stated in several phrasings plus exercises with
   solutions that teach the question-and-answer form), a web-like corpus (the same facts in loose
   prose among distractor lines, 0-4 facts among 0-8 distractors per record), held-out text from
   both generators, a separate slice of web records for the quality classifier, and the
   MMLU-format quiz whose question phrasings the corpora never use;
2. **clean**: dedup, quality filters and decontamination against the quiz, per corpus; then a
   few quiz items are planted in a COPY of the cleaned textbook corpus and decontamination must
   find exactly those; then the learned quality filter (:mod:`effilm.demo.quality`): the slice
   scored by the procedural annotator, an n-gram classifier trained on it, and the top
   ``filter_keep_fraction`` of the cleaned web corpus by its score kept as the filtered corpus;
3. **tokenize**: a byte-level BPE trained on the cleaned corpora, one token dataset per corpus
   (and one for the filtered web corpus, with the same tokenizer);
4. **train** at equal token budgets: ``dense-web`` (tiny-dense on web text only),
   ``dense-textbook`` (tiny-dense, web then textbook), ``dense-filtered`` (tiny-dense, web then
   filtered web, in dense-textbook's stage split) and three tiny Arctic hybrids in the same
   two stages, with the same active parameters and many more in total: ``arctic-textbook`` (the
   Switch loss), ``arctic-loss-free`` (loss-free balancing) and ``arctic-upcycled`` (dense-textbook
   upcycled partway, the dense tokens counted in its budget);
5. **evaluate**: quiz accuracy by letter and cloze scoring against chance, bits per byte on the
   held-out text, and the contamination status of each model's training data beside its scores;
6. **twins** (:mod:`effilm.demo.twins`): the public quiz asks ``quiz_public_share`` of the taught
   facts and the private twins (``data/twins``, written by ``effilm.synth.twins``) the rest, in the
   same phrasings; ``dense-contaminated`` (dense-web trained on further with the public quiz items
   leaked into its text, labelled deliberately contaminated) and the clean dense-web and
   dense-textbook are scored on both, and each public-twin gap gets a bootstrap interval;
7. **posttrain**: the textbook model fine-tuned with SFT on chat conversations about its facts,
   then with DPO on preference pairs (right answer vs a plausible wrong one); base, SFT and
   SFT+DPO asked the quiz as free-form chat questions (exact match) and by letter scoring, and the
   SFT+DPO model served by ``effilm serve`` answering two quiz questions through the ``openai`` client;
8. **ship**: the best model quantized to int8 and int4 (RTN, and GPTQ in the full demo) with the
   quality delta, exported to HF and GGUF, and answering quiz questions greedy and sampled;
9. **report**: ``DIR/report.html`` (self-contained) and ``DIR/report.md`` with the plots.

``DIR/summary.json`` (schema version ``SCHEMA_VERSION``)::

    {
      "schema_version": 1, "effilm_version": str, "quick": bool, "seed": int,
      "config": {DemoConfig fields},
      "timings": {stage: {"wall_s": float, "cpu_s": float}},     # stages above + "total"
      "costs": {preset: effilm.config.cost.cost_summary(...)},   # real presets, for comparison
      "synthesize": {"paths": {textbook, web, heldout_textbook, heldout_web, annotate_web, quiz},
                     "posttrain": {chat|preferences: {"path", "records"}},
                     "facts": {"count", "by_relation"}, "textbook_domains": [str],
                     "corpora": {name: {"path", "documents", "chars", "words"}},
                     "quiz": {"path", "items", "subjects", "choices", "chance", "public_share"},
                     "twins": {"dir", "spec" (twins.json), "items"}},
      "clean": {"corpora": {textbook|web: {"input_documents", "dedup": {...}, "filters": {...},
                                           "decontam": {"items", "checked", "contaminated", "contaminated_ids",
                                                        "rejected_candidates", "documents_with_candidates",
                                                        "clean", "report",
                                                        "after_cleaning": {"contaminated", "contaminated_ids"}},
                                           "output_documents"}},
                "paths": {textbook|web|web_filtered: cleaned JSONL},
                "planted_leak_check": {"corpus_copy", "planted": [{"item", "doc", "text"}],
                                       "found_items", "found_documents", "missed", "false_positives",
                                       "exact": bool},
                "quality_filter": {"path", "keep_fraction", "input_documents", "rejected_by_filter",
                                   "kept_documents", "score_cutoff" (the lowest kept score),
                                   "annotations": {"source", "path", "documents", "scored", "unscored",
                                                   "score_counts": {score: count}},
                                   "classifier": {"path", "features", "threshold", "scale", "split", "f1",
                                                  "mae", "rmse", "report", "png"},
                                   "kept" | "dropped": {"documents", "words", "mean_score", "mean_rubric_score",
                                                        "facts_per_document", "noise_lines_per_document",
                                                        "facts_per_100_words", "rubric_3_or_more"},
                                   "examples": {"high" | "low": [{"id", "score", "rubric_score", "facts",
                                                                  "noise_lines", "text"}]}}},
      "tokenize": {"tokenizer", "vocab_size", "datasets": {textbook|web|web_filtered: {"path", "documents", "tokens",
                                                                           "chars_per_token"}}},
      "train": {model: {"run_dir", "config", "final_dir", "preset", "steps", "tokens", "stages",
                        "total_params", "active_params", "flops_per_token", "first_loss", "final_loss",
                        "val_loss": {source: loss}, "loss_curve": [{"step", "tokens", "stage", "loss"}],
                        "wall_s", "cpu_s", "tokens_per_cpu_s", "balance": "aux_loss" | "loss_free" | null,
                        "tokens_total", "cpu_s_total" (the upcycled run: + its dense share),
                        MoE: "final_balance": {"load_max_over_mean", "starved_frac"},
                        arctic-upcycled: "upcycled_from": {"run", "step", "checkpoint", "tokens"}}},
      "evaluate": {model: {"trained_on", "chance",
                           "letter" | "cloze" | "cloze_norm": {"acc", "stderr", "n", "average": "micro"},
                           "predicted_letters": {letter: count}, "bits_per_byte": {heldout_textbook, heldout_web},
                           "contamination": {"contaminated", "items", "contaminated_ids", "clean_acc"},
                           "reports": {scoring: eval report path}}},
      "twins": {"dir", "spec", "scoring", "bootstrap": {"resamples", "confidence", "seed"},
                "leak": {"path", "documents", "tokens", "items", "share", "ngram_found"},
                "contaminated_run": {train summary as above, "config", "init_from"},
                "models": {dense-web|dense-textbook|dense-contaminated: {"label": "clean" | "deliberately contaminated",
                           "model_dir", "gaps": {acc|acc_norm: effilm.eval.twins.bootstrap_gap(...)}, "flagged",
                           "ngram_contaminated", "report"}}},
      "posttrain": {"from": model, "data": {chat|preferences: {"path", "source", "records", "tokens",
                                                               "contaminated", "contaminated_ids"}},
                    "runs": {sft|dpo: {"run_dir", "config", "final_dir", "init_from", "steps", "tokens",
                                       "final_loss", "first_loss", "val_loss", "wall_s", "cpu_s"
                                       (dpo: + "dpo": {beta, loss, reference}, "last": {rewards_*})}},
                    "evaluate": {base|sft|dpo: {"model_dir", "chance", "chat_exact_match": {"acc", "stderr", "n",
                                 "average"}, "letter": {...}, "predicted_letters", "chat_examples", "reports"}},
                    "transcript": {"status", "url", "model", "client", "request", "turns": [{"messages", "reply",
                                   "finish_reason", "expected"}], "server_exit"}},
      "ship": {"status": "done", "model", "source", "fp32": {"weight_bytes", "ppl", "cloze_acc"},
               "quantized": [effilm.quant.report.build_report(...) + {"variant", "path", "cloze_acc",
                                                                       "cloze_acc_fp32", "max_layer_error"}],
               "exports": {"hf", "gguf", "gguf_bytes", "gguf_check"},
               "generations": [{"question", "answer", "greedy", "sampled"}], "sampling": {...}},
      "report": {"status": "written", "html", "markdown", "missing": []},
      "notes": [{"topic", "shows": bool | null, "text"}]         # see effilm.demo.notes
    }

Models: ``dense-web``, ``dense-textbook``, ``dense-filtered``, ``arctic-textbook``, ``arctic-loss-free``,
``arctic-upcycled``. A model's ``trained_on`` names the sources of its stages (``web_filtered`` for the
filtered corpus, whose contamination status is the cleaned web corpus's).
Paths are absolute (``--out`` made absolute).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from effilm.config.presets import COST_SEQ_LEN, REAL_PRESETS
from effilm.config.reader import load
from effilm.demo.config import DemoConfig
from effilm.demo.extras import REPORT_MODULES, SHIP_MODULES, missing_modules
from effilm.io import atomic_write_json

SCHEMA_VERSION = 1
STAGES = ("synthesize", "clean", "tokenize", "train", "evaluate", "twins", "posttrain", "ship", "report")


@contextmanager
def stage(name: str, timings: dict):
    """Print the stage's header and, at its end, its wall and CPU (this process) time."""
    index = STAGES.index(name) + 1 if name in STAGES else "-"
    print(f"\n== {index}. {name} ==", flush=True)
    w0, c0 = time.perf_counter(), time.process_time()
    yield
    t = {"wall_s": round(time.perf_counter() - w0, 2), "cpu_s": round(time.process_time() - c0, 2)}
    timings[name] = t
    print(f"-- {name}: {t['wall_s']:.1f}s wall, {t['cpu_s']:.1f}s CPU", flush=True)


# ----------------------------------------------------------------------------- stages that need optional extras
def ship(summary: dict, out_dir: Path, cfg: DemoConfig, quick: bool) -> dict:
    """Quantize the best model to int8/int4 with the quality delta, export it to HF and GGUF, and
    generate a few answers, greedy and sampled (:mod:`effilm.demo.ship`)."""
    missing = missing_modules(SHIP_MODULES)
    if missing:
        print(f"ship: not available (missing {', '.join(missing)})")
        return {"status": "not available", "missing": missing}
    from effilm.demo.ship import ship_model

    return ship_model(summary, out_dir, cfg, best_model(summary), quick)


def report(summary: dict, out_dir: Path) -> dict:
    """``DIR/report.html`` and ``DIR/report.md`` with the plots (:mod:`effilm.demo.report`)."""
    missing = missing_modules(REPORT_MODULES)
    if missing:
        print(f"report: not available (missing {', '.join(missing)})")
        return {"status": "not available", "missing": missing}
    from effilm.demo.report import write_demo_report

    md, html = write_demo_report(summary, out_dir)
    print(f"report: {html} and {md}")
    return {"status": "written", "missing": [], "html": str(html), "markdown": str(md)}


def best_model(summary: dict) -> str:
    """The model with the highest cloze accuracy (ties: lowest held-out textbook bits per byte) among
    those the ship stage can export: loss-free balancing's selection bias has no place in HF or GGUF."""
    ev, tr = summary["evaluate"], summary["train"]
    ok = [m for m in ev if tr[m].get("balance") != "loss_free"]
    return max(ok, key=lambda m: (ev[m]["cloze"]["acc"], -ev[m]["bits_per_byte"]["heldout_textbook"]))


# ----------------------------------------------------------------------------- the run
def run_pipeline(cfg: DemoConfig, out_dir: Path, quick: bool = False) -> dict:
    """Run every stage into ``out_dir`` and return the summary (also written to summary.json).

    Every path the stages write and the summary records is absolute (``out_dir`` is made so first),
    so the summary and the report mean the same files from any working directory."""
    import torch

    import effilm
    from effilm.config import ModelConfig
    from effilm.config.cost import cost_summary
    from effilm.demo.notes import build_notes
    from effilm.demo.posttrain import posttrain
    from effilm.demo.stages import clean, synthesize, tokenize
    from effilm.demo.train import evaluate_models, train_models
    from effilm.demo.twins import twins_stage

    out_dir = Path(os.path.abspath(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    timings: dict = {}
    summary: dict = {"schema_version": SCHEMA_VERSION, "effilm_version": effilm.__version__, "quick": quick,
                     "seed": cfg.seed, "config": cfg.to_dict(), "timings": timings,
                     "costs": {n: cost_summary(ModelConfig.from_name(n), COST_SEQ_LEN) for n in REAL_PRESETS}}
    w0, c0 = time.perf_counter(), time.process_time()
    with stage("synthesize", timings):
        s = summary["synthesize"] = synthesize(cfg, out_dir / "data")
        for k, v in s["corpora"].items():
            print(f"  {k:17s} {v['documents']:6d} docs {v['words']:9,d} words")
        print(f"  quiz: {s['quiz']['items']} items on {s['facts']['count']} facts, chance {s['quiz']['chance']:.2f}")
    with stage("clean", timings):
        c = summary["clean"] = clean(cfg, s, out_dir / "clean")
        for k, v in c["corpora"].items():
            print(f"  {k:9s} {v['input_documents']} -> {v['output_documents']} docs (dedup removed "
                  f"{v['dedup']['removed_exact'] + v['dedup']['removed_near']}, filters {v['filters']['rejected']}, "
                  f"quiz items found {v['decontam']['contaminated']}, after cleaning "
                  f"{v['decontam']['after_cleaning']['contaminated']})")
        pl = c["planted_leak_check"]
        print(f"  planted {len(pl['planted'])} quiz items in a copy: found {len(pl['found_items'])}, "
              f"exactly those: {pl['exact']}")
        qf = c["quality_filter"]
        print(f"  quality filter: classifier F1 {qf['classifier']['f1']:.3f} on {qf['classifier']['split']['test']} "
              f"held-out annotations; kept {qf['kept_documents']} of {qf['input_documents']} web docs (score >= "
              f"{qf['score_cutoff']:.2f}; facts/doc {qf['kept']['facts_per_document']} kept vs "
              f"{qf['dropped']['facts_per_document']} dropped)")
    with stage("tokenize", timings):
        t = summary["tokenize"] = tokenize(cfg, c, out_dir / "tokens")
        print(f"  vocab {t['vocab_size']}: " + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in t["datasets"].items()))
    with stage("train", timings):
        summary["train"] = train_models(cfg, t, out_dir / "runs")
    with stage("evaluate", timings):
        summary["evaluate"] = evaluate_models(cfg, s, c, summary["train"], out_dir / "eval")
    with stage("twins", timings):
        summary["twins"] = twins_stage(cfg, summary, out_dir / "twins")
    with stage("posttrain", timings):
        summary["posttrain"] = posttrain(cfg, summary, out_dir / "posttrain")
    summary["notes"] = build_notes(summary, cfg.significance_z, cfg.cloze_target)
    with stage("ship", timings):
        summary["ship"] = ship(summary, out_dir, cfg, quick)
    timings["total"] = {"wall_s": round(time.perf_counter() - w0, 2), "cpu_s": round(time.process_time() - c0, 2)}
    atomic_write_json(out_dir / "summary.json", summary)  # the report reads a complete summary
    with stage("report", timings):
        summary["report"] = report(summary, out_dir)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def print_outcome(summary: dict, out_dir: Path) -> None:
    print("\n== what this shows ==")
    for n in summary["notes"]:
        mark = {True: "[yes]", False: "[no] ", None: "[---]"}[n["shows"]]
        print(f"{mark} {n['text']}")
    print(f"\n{'stage':11s} {'wall s':>8s} {'CPU s':>8s}")
    for k, v in summary["timings"].items():
        print(f"{k:11s} {v['wall_s']:8.1f} {v['cpu_s']:8.1f}")
    print(f"\nwrote {out_dir / 'summary.json'}")


def run_demo(out: str, quick: bool = False, config: str | None = None, overrides=(), overwrite: bool = False) -> int:
    """The ``effilm demo`` entry point. Returns 0 when every stage ran and the planted-leak check held.

    ``config`` is a demo TOML file (``configs/demo.toml``); otherwise the built-in full or quick
    setting. ``overrides`` (dotted ``{"seed": 3}``) apply on top. ``out`` must be new, empty, or
    (with ``overwrite``) an earlier demo output, which is cleared first."""
    import shutil

    from effilm.outputs import claim_dir, mark

    if config:
        cfg = DemoConfig.from_toml(config, overrides)
    else:
        cfg = DemoConfig.quick(overrides) if quick else load(DemoConfig, overrides=overrides)
    out_dir = claim_dir(out, "demo", sources=[config], overwrite=overwrite, what="--out")
    if out_dir.is_dir():  # an earlier demo output (claim_dir allowed it): start from nothing
        for child in out_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    mark(out_dir, "demo")
    summary = run_pipeline(cfg, out_dir, quick=quick)
    print_outcome(summary, out_dir)
    return 0 if summary["clean"]["planted_leak_check"]["exact"] else 1
