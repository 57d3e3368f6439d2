"""Evaluation commands: ``effilm eval`` (benchmarks, perplexity) and ``effilm decontam``."""

from __future__ import annotations

import argparse
import json

from effilm.config.reader import add_arguments, from_args
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
  chat:FILE       free-form questions asked through the model's chat template, answered greedily
                  (up to --max-new-tokens, ending at the end-of-turn token) and scored by exact match
                  after normalising case, punctuation, articles and spaces; records with question
                  (or messages ending in a user turn) and answer (a string, or an index into
                  choices: the MMLU-format quiz works as it is) or answers (a list)
  gsm8k:FILE      math word problems: question, answer (the solution ending in '#### <number>');
                  few-shot from dev=FILE (the first --shots), greedy generation up to --max-gen-toks,
                  scored as lm-evaluation-harness's gsm8k: strict-match and flexible-extract
  code:FILE       HumanEval-format problems: prompt, test, entry_point (task_id, canonical_solution
                  optional); --samples completions per problem (greedy, or --temperature/--top-p),
                  stopped at HumanEval's stop sequences, each run with its tests in a sandbox (a
                  fresh process and temporary directory, time/memory/file/process limits, no
                  network; --sandbox.*), scored by the unbiased pass@k for --pass-at; needs
                  --allow-code-execution
options after a comma: split=val, dev=PATH (few-shot source, same format), name=LABEL
  e.g. --task jsonl:quiz.jsonl,dev=quiz_dev.jsonl,name=quiz
bad rows are skipped and listed in the report; --strict makes them errors (file:line)."""


def register(sub) -> None:
    from effilm.eval.code_task import CodeConfig
    from effilm.eval.decontam import DecontamConfig
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.tasks import TaskConfig

    p = sub.add_parser("eval", help="evaluate a model on MMLU-format tasks or held-out text",
                       description="Evaluate MODEL (an effilm checkpoint or an HF model directory, with "
                       "tokenizer.json) the way lm-evaluation-harness's MMLU does: --scoring letter scores the "
                       "log-likelihood of ' A'..' D'; cloze scores the answer texts and reports acc and acc_norm "
                       "(per character).",
                       epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="effilm checkpoint or HF model directory")
    p.add_argument("--task", action="append", required=True, metavar="SPEC", help="task SPEC (see below)")
    p.add_argument("--corpus-report", metavar="R.json", help="an 'effilm decontam' report: show each "
                   "task's contamination beside its score (instead of the default check)")
    p.add_argument("--no-contamination-check", action="store_true",
                   help="skip the default check of an effilm-trained model's training data (its run record "
                   "and init_from chain name the token datasets, whose manifests name the source files)")
    p.add_argument("--device", default="auto", help="torch device for the model: auto (cuda when present), cpu, cuda:0...")
    p.add_argument("--output", "-o", required=True, metavar="R.json", help="where to write the report")
    add_arguments(p, EvalConfig, group_title="scoring")
    add_arguments(p, TaskConfig, group_title="task files")
    add_arguments(p, CodeConfig, group_title="code tasks")
    p.set_defaults(func=cmd_eval)

    d = sub.add_parser("decontam", help="find benchmark items in training corpora, optionally clean them out",
                       description="Index benchmark items as hashed word n-grams (question, and question + "
                       "correct answer; lowercased, punctuation removed), stream corpus documents through "
                       "the index and confirm each candidate by the fraction of the item's text found "
                       "around the hit (difflib). --mode cut removes each hit with --margin-chars either side "
                       "(GPT-3); drop removes whole documents.",
                       epilog=SPEC_HELP.split("\noptions")[0].replace("(repeat --task", "(repeat --benchmark")
                       + "\ncorpus files: JSONL (text field, id field), parquet or plain text (one document per"
                       " line), optionally .gz, or directories of them; each file is one shard.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--benchmark", action="append", required=True, metavar="SPEC", help="benchmark task SPEC")
    d.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="corpus files or directories")
    d.add_argument("--report", required=True, metavar="R.json", help="where to write the report")
    d.add_argument("--clean-out", metavar="DIR", help="write cleaned shards and <shard>.removed.jsonl here")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier --clean-out of this command")
    add_arguments(d, DecontamConfig, group_title="index and confirmation")
    add_arguments(d, TaskConfig, group_title="benchmark files")
    d.set_defaults(func=cmd_decontam)
    register_twin(sub)


def register_twin(sub) -> None:
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.twins import TwinEvalConfig
    from effilm.synth.twins import TwinConfig

    t = sub.add_parser("twin", help="private twin benchmarks: public-versus-twin score gaps",
                       description="Private twin benchmarks: fresh items of the same templates as a public benchmark "
                       "effilm generates (the procedural quiz, arithmetic word problems), which no corpus can "
                       "contain. A model that saw the public items, or was fitted to them, scores higher on them "
                       "than on their twins.")
    tsub = t.add_subparsers(dest="twin_command", metavar="SUBCOMMAND")
    m = tsub.add_parser(
        "make", help="write a public benchmark, its twins and few-shot examples",
        description="Write OUT/public.jsonl, OUT/twins.jsonl, OUT/dev.jsonl and OUT/twins.json (the generator's "
        "settings and seeds, each file's sha256). --kind quiz: the procedural quiz's facts split relation by "
        "relation; the public quiz asks --public-share of them (synthesize the corpus with "
        "--procedural.quiz-public-share set alike, and the same --num-facts and --seed), the twins ask the "
        "held-back facts, which the corpus teaches too, in the same phrasings with fresh distractors. --kind "
        "math: GSM8K-format word problems; each twin is its public problem's template with new names and "
        "numbers.")
    m.add_argument("--out", required=True, help="directory to write")
    m.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command at --out")
    add_arguments(m, TwinConfig)
    m.set_defaults(func=cmd_twin_make)
    e = tsub.add_parser(
        "eval", help="score a model on the public items and the twins; report the gap",
        description="Score MODEL on DIR's public set and its twins (quiz: MMLU-format, --scoring letter or "
        "cloze; math: gsm8k, strict-match and flexible-extract), then report both accuracies, their gap "
        "(public - twins) and a percentile-bootstrap confidence interval of it. A gap whose interval excludes "
        "0 is flagged: a possible leak of the public items, or a fit to them.")
    e.add_argument("model", metavar="MODEL", help="effilm checkpoint or HF model directory")
    e.add_argument("twins", metavar="DIR", help="an 'effilm twin make' directory")
    e.add_argument("--output", "-o", required=True, metavar="R.json", help="where to write the report")
    e.add_argument("--no-contamination-check", action="store_true",
                   help="skip the default n-gram check of an effilm-trained model's training data")
    e.add_argument("--device", default="auto", help="torch device for the model: auto (cuda when present), cpu, cuda:0...")
    add_arguments(e, TwinEvalConfig, group_title="gap")
    add_arguments(e, EvalConfig, group_title="scoring")
    e.set_defaults(func=cmd_twin_eval)
    t.set_defaults(func=lambda a: (t.print_help(), 2)[1])


def cmd_twin_make(args) -> int:
    from effilm.outputs import claim_dir
    from effilm.synth.twins import COMMAND, TwinConfig, make_twins

    cfg = from_args(TwinConfig, args)
    claim_dir(args.out, COMMAND, overwrite=args.overwrite)
    spec = make_twins(cfg, args.out)
    f = spec["files"]
    print(f"wrote {args.out}: {f['public']['items']} public items, {f['twins']['items']} twins, "
          f"{f['dev']['items']} few-shot examples ({cfg.kind}, seed {cfg.seed}, twin seed {cfg.twin_seed})")
    if not f["dev"]["items"]:
        print("  the corpora teach every fact of the tables, so none is left for few-shot examples: evaluate with "
              "--shots 0")
    return 0


def cmd_twin_eval(args) -> int:
    from effilm.device import resolve_device
    from effilm.eval.report import format_table
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.twins import TwinEvalConfig, evaluate_twins, format_gaps, read_spec, twin_tasks
    from effilm.formats.load import load_model_and_tokenizer
    from effilm.io import atomic_write_json
    from effilm.outputs import claim_file

    claim_file(args.output, inputs=[args.model, args.twins], what="--output")
    cfg = from_args(EvalConfig, args)
    tcfg = from_args(TwinEvalConfig, args)
    spec = read_spec(args.twins)  # before loading the model: a bad directory fails fast
    tasks = twin_tasks(args.twins, spec)
    corpus_report, check = _contamination(args, tasks)
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device))
    report = evaluate_twins(model, tokenizer, args.twins, cfg, tcfg, model_path=args.model,
                            corpus_report=corpus_report, contamination_check=check, spec=spec, tasks=tasks)
    atomic_write_json(args.output, report)
    print(format_table(report))
    print(format_gaps(report))
    print(f"report: {args.output}")
    return 0


def _read_json(path: str) -> dict:
    from effilm.io import read_text

    try:
        report = json.loads(read_text(path))  # read_text names the file for non-UTF-8 bytes, a directory...
    except json.JSONDecodeError as exc:
        raise EffilmError(f"{path}:{exc.lineno}: not a JSON report ({exc.msg})") from None
    if not isinstance(report, dict):
        raise EffilmError(f"{path}: not a JSON report (expected an object)")
    return report


def _contamination(args, tasks) -> tuple[dict | None, dict]:
    """The corpus report beside the scores and how it was obtained: ``--corpus-report`` (eval only),
    none with ``--no-contamination-check``, else the default check of the model's training data."""
    if getattr(args, "corpus_report", None):
        return _read_json(args.corpus_report), {"status": "from --corpus-report",
                                                "line": f"contamination: from {args.corpus_report}"}
    if args.no_contamination_check:
        return None, {"status": "skipped", "line": "contamination: not checked (--no-contamination-check)"}
    from effilm.eval.provenance import check_training_data

    return check_training_data(args.model, tasks)


def cmd_eval(args) -> int:
    from effilm.device import resolve_device
    from effilm.eval.code_task import CodeConfig, require_permission
    from effilm.eval.report import format_table, run_evaluation
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.tasks import TaskConfig, load_task
    from effilm.formats.load import load_model_and_tokenizer
    from effilm.io import atomic_write_json
    from effilm.outputs import claim_file

    claim_file(args.output, inputs=[args.model, args.corpus_report], what="--output")  # before any work
    cfg = from_args(EvalConfig, args)
    tcfg = from_args(TaskConfig, args)
    code_cfg = from_args(CodeConfig, args)
    tasks = [load_task(spec, tcfg) for spec in args.task]
    if any(t.kind == "code" for t in tasks):
        require_permission(code_cfg)  # before any work
    corpus_report, check = _contamination(args, tasks)
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device))
    report = run_evaluation(model, tokenizer, tasks, cfg, corpus_report=corpus_report, model_path=args.model,
                            contamination_check=check, code_cfg=code_cfg)
    atomic_write_json(args.output, report)
    print(format_table(report))
    print(f"report: {args.output}")
    return 0


def cmd_decontam(args) -> int:
    from effilm.data.inputs import expand_inputs
    from effilm.eval.decontam import DecontamConfig
    from effilm.eval.decontam_scan import find_contamination
    from effilm.eval.tasks import TaskConfig
    from effilm.io import atomic_write_json
    from effilm.outputs import claim_file

    cfg = from_args(DecontamConfig, args)
    claim_file(args.report, inputs=expand_inputs(args.corpus), what="--report")
    report = find_contamination(args.benchmark, args.corpus, cfg, clean_out=args.clean_out,
                                task_cfg=from_args(TaskConfig, args), overwrite=args.overwrite)
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
