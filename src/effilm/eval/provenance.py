"""What a model was trained on, and the contamination check ``effilm eval`` runs by default.

An effilm model directory (a run's ``final/`` or a checkpoint) records the run that made it in
``config.json`` (``run``): its data sources, and ``model.init_from`` when it started from another
model. ``training_sources`` follows that chain back to random weights (or to a model effilm did
not train), collecting every token dataset on the way; each dataset's ``manifest.json`` names its
raw input files with their sha256, so the check scans exactly the text that was trained on
(:func:`effilm.eval.decontam_scan.precheck`) without keeping a second copy of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from effilm.errors import EffilmError

HOW_TO_CHECK = ("check it with `effilm decontam --benchmark SPEC --corpus FILES --report R.json` and pass "
                "`--corpus-report R.json`")


def training_sources(model_dir, max_depth: int = 32) -> dict:
    """``{"models": [dirs, newest first], "sources": [dataset paths], "unknown": [reasons]}``.

    ``unknown`` says which part of the model's history effilm cannot see: a directory without a
    run record (an HF model, or weights saved by ``effilm.save``), or an ``init_from`` that is gone."""
    models, sources, unknown = [], [], []
    seen = set()
    cur = Path(model_dir)
    while cur is not None and len(models) < max_depth:
        key = str(cur.resolve())
        if key in seen:
            break
        seen.add(key)
        meta = cur / "config.json"
        if not meta.is_file():
            unknown.append(f"{cur}: no config.json (the model it started from is gone)")
            break
        try:
            conf = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            unknown.append(f"{meta}: unreadable ({exc})")
            break
        run = conf.get("run") if isinstance(conf, dict) else None
        if not isinstance(run, dict):
            unknown.append(f"{cur}: not trained by effilm (no run record in config.json)")
            break
        models.append(str(cur))
        for s in (run.get("data") or {}).get("sources") or []:
            if isinstance(s, dict) and s.get("path") and s["path"] not in sources:
                sources.append(s["path"])
        init = (run.get("model") or {}).get("init_from")
        cur = Path(init) if init else None
    return {"models": models, "sources": sources, "unknown": unknown}


def check_training_data(model_dir, tasks, cfg=None) -> tuple[dict | None, dict]:
    """The default contamination check of ``effilm eval``: ``(corpus_report, status)``.

    ``corpus_report`` has the shape of an ``effilm decontam`` report's ``benchmarks`` (None when
    nothing could be checked); ``status`` is ``{"status": "checked" | "partial" | "unknown" |
    "not checked", "line": one sentence for the table, ...}``."""
    from effilm.eval.decontam_scan import precheck

    scored = [t for t in tasks if t.kind != "ppl"]
    if not scored:
        return None, {"status": "not checked", "line": "contamination: no benchmark items to check (perplexity only)"}
    prov = training_sources(model_dir)
    if not prov["sources"]:
        why = prov["unknown"][0] if prov["unknown"] else f"{model_dir}: no training data recorded"
        return None, {"status": "unknown", **prov,
                      "line": f"contamination: unknown ({why}); {HOW_TO_CHECK}"}
    try:
        summary = precheck(prov["sources"], scored, cfg)
    except EffilmError as exc:
        return None, {"status": "not checked", **prov,
                      "line": f"contamination: not checked: {exc}"}
    partial = bool(prov["unknown"])
    tail = f"; the rest of its history is unknown ({prov['unknown'][0]})" if partial else ""
    counts = ", ".join(f"{b['name']} {b['contaminated']}/{b['items']}" for b in summary["benchmarks"])
    line = (f"contamination: checked against the {len(summary['files'])} source file(s) of "
            f"{len(prov['sources'])} training dataset(s) of {len(prov['models'])} run(s) "
            f"({summary['documents']} documents): {counts} items found{tail}")
    status = {"status": "partial" if partial else "checked", **prov, "files": summary["files"],
              "documents": summary["documents"], "hits": summary["hits"][:50], "line": line}
    return {"benchmarks": summary["benchmarks"]}, status
