"""Data commands: ``synth`` (synthetic corpora), ``dedup`` (exact + MinHash) and ``filter`` (quality)."""

from __future__ import annotations

import json

from effilm.config.reader import add_arguments, from_args, given


def cmd_synth(args) -> int:
    from effilm.synth.recipe import Recipe, load_recipe
    from effilm.synth.runner import Run, SynthOptions, print_run_result

    options = from_args(SynthOptions, args)
    recipe = load_recipe(args.recipe, given(args, Recipe))
    return print_run_result(Run(recipe, args.out, options).run(dry_run=options.dry_run), options.dry_run)


def cmd_dedup(args) -> int:
    from effilm.data.dedup import DedupConfig, dedup_files

    cfg = from_args(DedupConfig, args)
    report = dedup_files(args.inputs, args.out, args.report, cfg, overwrite=args.overwrite)
    print(json.dumps(report["summary"], indent=2))
    return 0


def cmd_filter(args) -> int:
    from effilm.data.filters import FilterConfig, filter_files

    cfg = from_args(FilterConfig, args)
    report = filter_files(args.inputs, args.out, args.report, cfg, overwrite=args.overwrite)
    print(json.dumps(report["summary"], indent=2))
    return 0


def register(sub) -> None:
    from effilm.data.dedup import DedupConfig
    from effilm.data.filters import FilterConfig
    from effilm.synth.recipe import Recipe
    from effilm.synth.runner import SynthOptions

    p = sub.add_parser(
        "synth", help="generate synthetic textbook data from a recipe",
        description="Generate synthetic data. The procedural backend (default) writes a textbook "
        "corpus, a web-like corpus and a held-out MMLU-format quiz with no model; openai uses any "
        "OpenAI-compatible server; local uses effilm's engine. Output is sharded, each shard written "
        "atomically and listed in DIR/manifest.json; re-running the same command resumes. Any recipe key "
        "can be overridden with a flag (--backend openai, --openai.model NAME, --sampling.temperature 0.7).",
    )
    p.add_argument("recipe", nargs="?", default=None, help="recipe TOML (default: the bundled default.toml)")
    p.add_argument("--out", required=True, help="output directory (re-use it to resume)")
    add_arguments(p, SynthOptions)
    add_arguments(p, Recipe, group_title="recipe overrides")
    p.set_defaults(func=cmd_synth)

    d = sub.add_parser(
        "dedup", help="exact and near-duplicate removal (MinHash LSH)",
        description="Remove exact duplicates (hash of normalised text: lowercase, digits to 0, punctuation "
        "to space, accents stripped, whitespace folded), then near duplicates with MinHash LSH over word "
        "n-grams. Kept records go to OUT/kept.jsonl, removed ones to OUT/removed.jsonl with the id they "
        "duplicate; the report lists every cluster and what was kept.",
    )
    d.add_argument("inputs", nargs="+", help="JSONL / text / parquet files (.gz ok), directories or globs")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--report", required=True, help="report JSON path")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command at --out")
    add_arguments(d, DedupConfig)
    d.set_defaults(func=cmd_dedup)

    f = sub.add_parser(
        "filter", help="quality filters with per-filter counts and a rejects file",
        description="Apply heuristic quality filters (length, repeated n-grams, non-alphabetic fraction, "
        "boilerplate openings, empty or truncated completions). Accepted records go to OUT/kept.jsonl, "
        "rejects to OUT/rejects.jsonl with the reason; the report gives counts and examples per filter.",
    )
    f.add_argument("inputs", nargs="+", help="JSONL / text / parquet files (.gz ok), directories or globs")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--report", required=True, help="report JSON path")
    f.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command at --out")
    add_arguments(f, FilterConfig)
    f.set_defaults(func=cmd_filter)
