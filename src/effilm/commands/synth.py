"""Data commands: ``synth`` (synthetic corpora), ``dedup`` (exact + MinHash) and ``filter`` (quality)."""

from __future__ import annotations

import argparse
import json


def cmd_synth(args) -> int:
    from effilm.synth.recipe import load_recipe
    from effilm.synth.runner import Run

    recipe = load_recipe(args.recipe, backend=args.backend, seed=args.seed)
    run = Run(recipe, args.out, limit=args.limit, workers=args.workers, api_key_env=args.api_key_env)
    result = run.run(dry_run=args.dry_run)
    if args.dry_run:
        print("dry run (nothing sent, nothing written):")
        for k, v in result.items():
            print(f"  {k:22s} {v}")
        return 0
    print(json.dumps(result, indent=2))
    return 0 if result.get("complete") else 3


def cmd_dedup(args) -> int:
    from effilm.data.dedup import DedupConfig, dedup_files

    cfg = DedupConfig(num_bands=args.bands, rows_per_band=args.rows, ngram=args.ngram, threshold=args.threshold,
                      text_field=args.field)
    report = dedup_files(args.inputs, args.out, args.report, cfg)
    print(json.dumps(report["summary"], indent=2))
    return 0


def cmd_filter(args) -> int:
    from effilm.data.filters import FilterConfig, filter_files

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = value
    cfg = FilterConfig.from_strings(overrides)
    report = filter_files(args.inputs, args.out, args.report, cfg)
    print(json.dumps(report["summary"], indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "synth", help="generate synthetic textbook data from a recipe",
        description="Generate synthetic data. The procedural backend (default) writes a textbook "
        "corpus, a web-like corpus and a held-out MMLU-format quiz with no model; openai uses any "
        "OpenAI-compatible server; local uses effilm's engine. Output is sharded, each shard written "
        "atomically and listed in DIR/manifest.json; re-running the same command resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", default=None, help="recipe TOML (default: the bundled default.toml)")
    p.add_argument("--out", required=True, help="output directory (re-use it to resume)")
    p.add_argument("--backend", choices=["procedural", "openai", "local"], default=None,
                   help="override the recipe's backend")
    p.add_argument("--limit", type=int, default=None, help="at most N records per stream")
    p.add_argument("--workers", type=int, default=1, help="processes for procedural shards")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding the API key (never pass the key itself)")
    p.add_argument("--dry-run", action="store_true", help="print the requests and tokens the run would cost")
    p.set_defaults(func=cmd_synth)

    d = sub.add_parser(
        "dedup", help="exact and near-duplicate removal (MinHash LSH)",
        description="Remove exact duplicates (hash of normalised text: lowercase, digits to 0, punctuation "
        "to space, accents stripped, whitespace folded), then near duplicates with MinHash LSH over word "
        "n-grams. Kept records go to OUT/kept.jsonl, removed ones to OUT/removed.jsonl with the id they "
        "duplicate; the report lists every cluster and what was kept.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("inputs", nargs="+", help="JSONL files (.gz ok) or synth output directories")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--report", required=True, help="report JSON path")
    d.add_argument("--bands", type=int, default=14, help="LSH bands")
    d.add_argument("--rows", type=int, default=8, help="rows per band")
    d.add_argument("--ngram", type=int, default=5, help="word n-gram size for shingles")
    d.add_argument("--threshold", type=float, default=0.0,
                   help="also require estimated Jaccard >= this for a near-duplicate (0: LSH alone decides)")
    d.add_argument("--field", default="text", help="record field holding the text")
    d.set_defaults(func=cmd_dedup)

    f = sub.add_parser(
        "filter", help="quality filters with per-filter counts and a rejects file",
        description="Apply heuristic quality filters (length, repeated n-grams, non-alphabetic fraction, "
        "boilerplate openings, empty or truncated completions). Accepted records go to OUT/kept.jsonl, "
        "rejects to OUT/rejects.jsonl with the reason; the report gives counts and examples per filter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    f.add_argument("inputs", nargs="+", help="JSONL files (.gz ok) or synth output directories")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--report", required=True, help="report JSON path")
    f.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a FilterConfig field, e.g. --set min_words=20 (repeatable)")
    f.set_defaults(func=cmd_filter)
