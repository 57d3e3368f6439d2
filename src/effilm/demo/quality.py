"""The demo's learned quality filter (part of the ``clean`` stage): what ``dense-filtered`` reads.

FineWeb-Edu's recipe at the demo's size, through effilm's own three steps:

1. **annotate** a slice of web-like records generated apart from the corpus (after its held-out
   records, so the classifier never sees the documents it filters) with the ``procedural``
   backend, which scores each record on the additive 0-5 rubric from what the generator knows
   (facts stated, distractor lines: :func:`effilm.synth.rubric.procedural_points`);
2. **train** the hashed word n-gram classifier on those scores (``effilm classifier train``);
3. **score** the cleaned web corpus with ``effilm filter --classifier`` (threshold at the bottom of
   the scale, so nothing is dropped there and every record gets its ``quality`` score), then keep
   the top ``filter_keep_fraction`` by score (ties in corpus order), FineWeb-Edu's "keep the best
   share" rather than a fixed threshold, so the kept share is the same whatever the scores' level.

The summary says which documents were kept and why: kept and dropped documents' mean classifier
score, rubric score (the annotator's, from provenance), facts and distractor lines per document,
and a few of the highest and lowest scored documents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from effilm.demo.config import DemoConfig
from effilm.io import atomic_open, iter_jsonl

SCORE_FIELD = "quality"
EXAMPLE_CHARS = 240


def _rubric_score(rec: dict) -> tuple[int | None, int | None, int | None]:
    """(the annotator's 0-5 points, facts, distractor lines) of a procedural web record, or Nones."""
    from effilm.synth.rubric import procedural_points

    prov = rec.get("provenance") or {}
    if prov.get("kind") != "web" or "noise_lines" not in prov:
        return None, None, None
    facts, noise = len(prov.get("facts") or []), int(prov["noise_lines"])
    return procedural_points(facts, noise), facts, noise


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def _group(recs: list[dict]) -> dict:
    rows = [_rubric_score(r) for r in recs]
    words = sum(len(r["text"].split()) for r in recs)
    facts = [f for _, f, _ in rows if f is not None]
    return {"documents": len(recs), "words": words,
            "mean_score": _mean([r[SCORE_FIELD] for r in recs]),
            "mean_rubric_score": _mean([p for p, _, _ in rows]),
            "facts_per_document": _mean([f for _, f, _ in rows]),
            "noise_lines_per_document": _mean([n for _, _, n in rows]),
            "facts_per_100_words": round(100 * sum(facts) / max(words, 1), 3) if facts else None,
            "rubric_3_or_more": _mean([int(p >= 3) for p, _, _ in rows if p is not None])}  # fmt: skip


def _example(rec: dict) -> dict:
    points, facts, noise = _rubric_score(rec)
    text = rec["text"]
    return {"id": rec.get("id"), "score": rec[SCORE_FIELD], "rubric_score": points, "facts": facts,
            "noise_lines": noise, "text": text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"}


def quality_filter(cfg: DemoConfig, annotate_src: Path, web: Path, out: Path) -> dict:
    """Annotate ``annotate_src``, train the n-gram classifier, score ``web`` and keep its top
    ``cfg.filter_keep_fraction`` into ``out/web_filtered.jsonl``. Returns the summary's
    ``clean.quality_filter`` section (see :mod:`effilm.demo.run`)."""
    from effilm.data.classifier_train import ClassifierConfig, train_classifier
    from effilm.data.filters import FilterConfig, filter_files
    from effilm.synth.annotate import AnnotateConfig, annotate

    if out.exists():  # a fresh demo stage, never a resume of an older one
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ann_dir, clf_dir, scored_dir = out / "annotations", out / "classifier", out / "scored"
    ann = annotate([annotate_src], ann_dir, AnnotateConfig(backend="procedural", quiet=True, seed=cfg.seed))
    rep = train_classifier([str(ann_dir / "shard-*.jsonl")], clf_dir, ClassifierConfig(seed=cfg.seed))
    ngram = rep["features"]["ngram"]
    lo = rep["scale"][0]
    f = filter_files([web], scored_dir, out / "scored.report.json",
                     FilterConfig(classifier=str(clf_dir), threshold=lo, score_field=SCORE_FIELD))
    recs = [rec for _, rec in iter_jsonl(Path(f["outputs"]["kept"]))]
    order = sorted(range(len(recs)), key=lambda i: -recs[i][SCORE_FIELD])  # stable: ties in corpus order
    n_keep = max(1, round(cfg.filter_keep_fraction * len(recs)))
    kept_idx = set(order[:n_keep])
    kept = [r for i, r in enumerate(recs) if i in kept_idx]
    dropped = [r for i, r in enumerate(recs) if i not in kept_idx]
    path = out / "web_filtered.jsonl"
    with atomic_open(path) as fh:
        for rec in kept:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    k = cfg.filter_examples
    result = {
        "path": str(path), "keep_fraction": cfg.filter_keep_fraction, "input_documents": len(recs),
        "rejected_by_filter": f["summary"]["rejected"], "kept_documents": len(kept),
        "score_cutoff": recs[order[n_keep - 1]][SCORE_FIELD] if recs else None,
        "annotations": {"source": str(annotate_src), "path": str(ann_dir), "documents": ann["documents"],
                        "scored": ann["scored"], "unscored": ann["unscored"],
                        "score_counts": rep["annotations"]["score_counts"]},
        "classifier": {"path": str(clf_dir), "features": "hashed word n-grams", "threshold": rep["threshold"],
                       "scale": rep["scale"], "split": rep["split"], "f1": ngram["f1"], "mae": ngram["mae"],
                       "rmse": ngram["rmse"], "report": rep["outputs"]["report"], "png": rep["outputs"]["png"]},
        "kept": _group(kept), "dropped": _group(dropped),
        "examples": {"high": [_example(recs[i]) for i in order[:k]],
                     "low": [_example(recs[i]) for i in order[::-1][:k]]},
    }  # fmt: skip
    return result
