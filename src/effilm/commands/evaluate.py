"""Evaluation commands: ``effilm eval`` (benchmarks, perplexity) and ``effilm decontam``."""

from __future__ import annotations

import argparse
import json

from effilm.errors import EffilmError

SPEC_HELP = """task SPEC forms (repeat --task for several):
  mmlu:DIR        DIR/{dev,val,test}/*.csv as MMLU ships them; evaluates test, few-shot from dev
  csv:FILE        one hendrycks CSV (no header: question, A, B, C, D, answer letter); subject from
                  the file name (high_school_physics_test.csv); few-shot from a sibling *_dev.csv
  jsonl:FILE      records with question, subject, choices (list), answer (int index)
  parquet:FILE    the same columns (HF MMLU parquet)
  ppl:FILE        held-out text: JSONL with 'text' per line, or a plain text file; reports bits per
                  byte and perplexity over disjoint windows of the model's context (or sliding
                  windows with --ppl-stride)
options after a comma: split=val, dev=PATH (few-shot source, same format), name=LABEL
  e.g. --task jsonl:quiz.jsonl,dev=quiz_dev.jsonl,name=quiz
bad rows are skipped and listed in the report; --strict makes them errors (file:line)."""


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on MMLU-format tasks or held-out text",
                       description="Evaluate MODEL (an effilm checkpoint or an HF model directory, with "
                       "tokenizer.json) the way lm-evaluation-harness's MMLU does.",
                       epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="effilm checkpoint or HF model directory")
    p.add_argument("--task", action="append", required=True, metavar="SPEC", help="task SPEC (see below)")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples from the dev split (default 5)")
    p.add_argument("--scoring", choices=("letter", "cloze"), default="letter",
                   help="letter: log-likelihood of ' A'..' D' (harness MMLU, default); cloze: of the "
                   "answer texts, reporting acc and acc_norm (per character)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=0, help="context length (default: the model's)")
    p.add_argument("--ppl-stride", type=int, default=0, help="ppl tasks: score this many new tokens per window, "
                   "each seeing up to the full context before it (default 0: disjoint windows)")
    p.add_argument("--no-kv-cache", action="store_true", help="effilm models: score every choice as its own "
                   "row instead of from the context's KV cache (same numbers, slower)")
    p.add_argument("--seed", type=int, default=1234, help="seed, recorded in the manifest")
    p.add_argument("--split", default="test", choices=("dev", "val", "test"), help="split to evaluate")
    p.add_argument("--strict", action="store_true", help="bad rows are errors instead of skips")
    p.add_argument("--corpus-report", metavar="R.json", help="an 'effilm decontam' report: show each "
                   "task's contamination beside its score")
    p.add_argument("--device", default="auto", help="torch device for the model: auto (cuda when present), cpu, cuda:0...")
    p.add_argument("--output", "-o", required=True, metavar="R.json", help="where to write the report")
    p.set_defaults(func=cmd_eval)

    d = sub.add_parser("decontam", help="find benchmark items in training corpora, optionally clean them out",
                       description="Index benchmark items as hashed word n-grams (question, and question + "
                       "correct answer; lowercased, punctuation removed), stream corpus documents through "
                       "the index and confirm each candidate by the fraction of the item's text found "
                       "around the hit (difflib).",
                       epilog=SPEC_HELP.split("\noptions")[0].replace("(repeat --task", "(repeat --benchmark")
                       + "\ncorpus files: JSONL (text field, id field) or plain text (one document per line),"
                       " optionally .gz; each file is one shard.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--benchmark", action="append", required=True, metavar="SPEC", help="benchmark task SPEC")
    d.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="corpus shards")
    d.add_argument("--report", required=True, metavar="R.json", help="where to write the report")
    d.add_argument("--n", type=int, default=13, help="n-gram length in words (default 13, as GPT-3)")
    d.add_argument("--threshold", type=float, default=0.5,
                   help="matched fraction of an item's text that confirms a candidate (default 0.5)")
    d.add_argument("--clean-out", metavar="DIR", help="write cleaned shards and <shard>.removed.jsonl here")
    d.add_argument("--mode", choices=("cut", "drop"), default="cut",
                   help="cut: GPT-3 (remove each hit with 200 chars either side; drop a document cut into "
                   "more than 10 pieces); drop: remove whole documents")
    d.add_argument("--workers", type=int, default=1, help="shards scanned in parallel (default 1)")
    d.add_argument("--text-field", default="text", help="JSONL text field (default text)")
    d.add_argument("--id-field", default="id", help="JSONL id field (default id; else the line number)")
    d.add_argument("--split", default="test", choices=("dev", "val", "test"), help="benchmark split to index")
    d.add_argument("--strict", action="store_true", help="bad benchmark rows are errors instead of skips")
    d.set_defaults(func=cmd_decontam)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise EffilmError(f"{path}: cannot read JSON report ({exc})") from None


def cmd_eval(args) -> int:
    from effilm.device import resolve_device
    from effilm.eval.report import format_table, run_evaluation
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.tasks import TaskConfig, load_task
    from effilm.formats.load import load_model_and_tokenizer
    from effilm.io import atomic_write_json

    cfg = EvalConfig(shots=args.shots, scoring=args.scoring, batch_size=args.batch_size,
                     max_length=args.max_length, seed=args.seed, ppl_stride=args.ppl_stride,
                     use_kv_cache=not args.no_kv_cache)
    tcfg = TaskConfig(strict=args.strict, split=args.split)
    tasks = [load_task(spec, tcfg) for spec in args.task]
    corpus_report = _read_json(args.corpus_report) if args.corpus_report else None
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device))
    report = run_evaluation(model, tokenizer, tasks, cfg, corpus_report=corpus_report, model_path=args.model)
    atomic_write_json(args.output, report)
    print(format_table(report))
    print(f"report: {args.output}")
    return 0


def cmd_decontam(args) -> int:
    from effilm.eval.decontam import DecontamConfig
    from effilm.eval.decontam_scan import find_contamination
    from effilm.eval.tasks import TaskConfig
    from effilm.io import atomic_write_json

    if args.workers < 1:
        raise EffilmError("--workers: must be >= 1")
    cfg = DecontamConfig(n=args.n, confirm_threshold=args.threshold, mode=args.mode,
                         text_field=args.text_field, id_field=args.id_field)
    report = find_contamination(args.benchmark, args.corpus, cfg, workers=args.workers,
                                clean_out=args.clean_out, task_cfg=TaskConfig(strict=args.strict, split=args.split))
    atomic_write_json(args.report, report)
    print(f"{'benchmark':<40} {'items':>7} {'checked':>8} {'contaminated':>13} {'rejected':>9}")
    for b in report["benchmarks"]:
        print(f"{b['name']:<40} {b['items']:>7} {b['checked']:>8} {b['contaminated']:>13} {b['rejected_candidates']:>9}")
    t = report["totals"]
    print(f"{t['documents']} documents, {t['chars'] / 1e6:.2f} M chars in {t['shards']} shards: "
          f"{t['contaminated_documents']} contaminated, {t['contaminated_items']} items; "
          f"{t['scan_mb_per_s_per_worker']} MB/s per worker")
    if report["clean"]:
        c = report["clean"]
        print(f"clean-out ({c['mode']}): kept {c['kept']} (of which cut {c['cut']}), dropped {c['dropped']}; "
              f"removals in {args.clean_out}/<shard>.removed.jsonl")
    print(f"report: {args.report}")
    return 0
