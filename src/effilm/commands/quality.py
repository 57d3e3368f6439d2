"""The learned quality filter's commands: ``effilm annotate`` and ``effilm classifier train``
(``effilm filter --classifier DIR`` applies the result; see ``commands/synth.py``)."""

from __future__ import annotations

from effilm.config.reader import add_arguments, from_args


def cmd_annotate(args) -> int:
    from effilm.synth.annotate import AnnotateConfig, annotate
    from effilm.synth.runner import print_run_result

    cfg = from_args(AnnotateConfig, args)
    return print_run_result(annotate(args.corpus, args.out, cfg), cfg.dry_run)


def cmd_classifier_train(args) -> int:
    from effilm.data.classifier_train import ClassifierConfig, train_classifier

    cfg = from_args(ClassifierConfig, args)
    hidden = None
    if cfg.hidden_model:
        from effilm.inference.embed import HiddenStateFeatures

        hidden = HiddenStateFeatures(cfg.hidden_model, cfg.hidden_batch_size, cfg.hidden_max_tokens, cfg.device)
    report = train_classifier(args.annotations, args.out, cfg, hidden=hidden, overwrite=args.overwrite, log=print)
    for name, m in report["features"].items():
        print(f"{name:7s} F1 {m['f1']:.3f} (precision {m['precision']:.3f}, recall {m['recall']:.3f}) at threshold "
              f"{report['threshold']:g}; MAE {m['mae']:.3f}, RMSE {m['rmse']:.3f}; confusion {m['confusion']['matrix']}")
    print(f"wrote {report['outputs']['classifier']} (report.json, report.png)")
    return 0


def register(sub) -> None:
    from effilm.data.classifier_train import ClassifierConfig
    from effilm.synth.annotate import AnnotateConfig

    a = sub.add_parser(
        "annotate", help="score documents with a teacher for the learned quality filter",
        description="Score documents with a teacher and a rubric (prompt + scale, TOML; the bundled one is a 0-5 "
        "additive educational rubric). Backends: openai (any OpenAI-compatible server, with synth's request "
        "cache, budget, retries and dry run), local (effilm's engine) and procedural (effilm's own synthetic "
        "web and textbook records, scored from what the generator knows, offline). A reply with no valid score "
        "is asked again, then recorded with score null. Output: sharded JSONL with a manifest; re-running "
        "resumes.",
    )
    a.add_argument("corpus", nargs="+", help="JSONL / text / parquet files (.gz ok), directories or globs")
    a.add_argument("--out", required=True, help="output directory (re-use it to resume)")
    add_arguments(a, AnnotateConfig)
    a.set_defaults(func=cmd_annotate)

    c = sub.add_parser("classifier", help="train the learned quality classifier",
                       description="Quality-classifier commands.")
    csub = c.add_subparsers(dest="classifier_command", metavar="SUBCOMMAND")
    t = csub.add_parser(
        "train", help="fit a hashed n-gram classifier on annotated scores",
        description="Fit a ridge regression on hashed word n-grams (scikit-learn) to annotated scores, with a "
        "seeded hold-out split. Writes the classifier directory (classifier.json + weights.safetensors) and "
        "report.json / report.png: F1 at the keep/drop threshold, confusion matrices, MAE and RMSE. "
        "--hidden-model DIR also trains on mean-pooled hidden states of an effilm model (OUT/hidden/) and "
        "reports both.",
    )
    t.add_argument("annotations", nargs="+", help="annotation JSONL files or `effilm annotate` directories")
    t.add_argument("--out", required=True, help="classifier directory to write")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command at --out")
    add_arguments(t, ClassifierConfig)
    t.set_defaults(func=cmd_classifier_train)
    c.set_defaults(func=lambda a: (c.print_help(), 2)[1])
