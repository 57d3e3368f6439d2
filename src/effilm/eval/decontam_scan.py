"""Streaming corpus shards through the n-gram index, in parallel; the report and the clean-out.

Corpus files are read by the one input reader (:mod:`effilm.data.inputs`): JSONL (one document
per line in ``text_field``, id in ``id_field``), parquet, or plain text (one document per line,
its id the line number), gzipped or not. Each file is one shard; ``workers`` shards run at once in
separate processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from effilm.data.inputs import expand_inputs, iter_file
from effilm.errors import EffilmError
from effilm.eval.decontam import DecontamConfig, NgramIndex, clean_text, items_from_tasks, scan_texts
from effilm.outputs import claim_dir, mark

_INDEX: NgramIndex | None = None


def iter_documents(path: str, cfg: DecontamConfig) -> Iterator[tuple[int, str, dict | None, str]]:
    """(line number, document id, JSON record or None, text) for each document of a shard."""
    for d in iter_file(path, cfg.text_field, text_split="line"):
        doc_id = d.record.get(cfg.id_field) if d.record is not None else None
        yield d.line, str(doc_id) if doc_id is not None else str(d.line), d.record, d.text


def _batches(docs, batch_chars: int):
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d[3])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _init_worker(index: NgramIndex) -> None:
    global _INDEX
    _INDEX = index


def scan_shard(path: str, clean_dir: str | None = None, index: NgramIndex | None = None) -> dict:
    """Scan one corpus file; with ``clean_dir``, write its cleaned copy and its removals there."""
    from effilm.io import atomic_open

    index = index or _INDEX
    cfg = index.cfg
    t0, c0 = time.perf_counter(), time.process_time()
    hits, n_docs, n_chars, kept, dropped, cut = [], 0, 0, 0, 0, 0
    name = Path(path).name.removesuffix(".gz")
    try:
        with contextlib.ExitStack() as stack:
            out = rem = None
            if clean_dir:
                out = stack.enter_context(atomic_open(Path(clean_dir) / name))
                rem = stack.enter_context(atomic_open(Path(clean_dir) / f"{name}.removed.jsonl"))
            for batch in _batches(iter_documents(path, cfg), cfg.batch_chars):
                matches = scan_texts([d[3] for d in batch], index)
                for (lineno, doc_id, rec, text), found in zip(batch, matches, strict=True):
                    n_docs += 1
                    n_chars += len(text)
                    if found:
                        hits.append({"shard": path, "doc": doc_id, "line": lineno,
                                     "confirmed": any(m["confirmed"] for m in found), "matches": found})
                    if out is None:
                        continue
                    new, removals = clean_text(text, found, cfg) if found else (text, [])
                    for r in removals:
                        rem.write(json.dumps({"shard": path, "doc": doc_id, "line": lineno, **r},
                                             ensure_ascii=False) + "\n")
                    if new is None:
                        dropped += 1
                        if rec is None:
                            out.write("\n")  # keep line numbers of plain-text shards aligned
                        continue
                    cut += new != text
                    kept += 1
                    if rec is None:
                        out.write(new + "\n")
                    else:
                        out.write(json.dumps({**rec, cfg.text_field: new}, ensure_ascii=False) + "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise EffilmError(f"{path}: cannot read ({exc})") from None
    return {"shard": path, "documents": n_docs, "chars": n_chars, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0, "hits": hits, "clean": {"kept": kept, "cut": cut, "dropped": dropped} if clean_dir else None}


def find_contamination(benchmarks, corpus, cfg: DecontamConfig | None = None, *,
                       clean_out: str | os.PathLike | None = None, task_cfg=None, overwrite: bool = False) -> dict:
    """Check corpus files against benchmark items; returns the report (JSON-serialisable).

    ``benchmarks`` are task SPEC strings or loaded :class:`effilm.eval.tasks.Task` objects;
    ``cfg.workers`` corpus files are scanned at once. ``clean_out`` (the cleaned copies) is
    claimed first: never one of the corpus files' folders, and an earlier clean-out is replaced
    only with ``overwrite`` (:mod:`effilm.outputs`).
    """
    from effilm.eval.tasks import Task, load_task

    cfg = cfg or DecontamConfig()
    workers = cfg.workers
    corpus = [str(c) for c in expand_inputs(corpus)]
    if clean_out:
        claim_dir(clean_out, "decontam", sources=corpus, overwrite=overwrite, what="--clean-out")
    tasks = [b if isinstance(b, Task) else load_task(b, task_cfg) for b in benchmarks]
    names = [Path(c).name.removesuffix(".gz") for c in corpus]
    if clean_out and len(set(names)) != len(names):
        raise EffilmError("--clean-out: two corpus files share a name; their cleaned copies would collide")
    t0 = time.perf_counter()
    index = NgramIndex(items_from_tasks(tasks), cfg)
    t_index = time.perf_counter() - t0
    clean_dir = str(clean_out) if clean_out else None
    if clean_dir:
        Path(clean_dir).mkdir(parents=True, exist_ok=True)
        mark(clean_dir, "decontam")
    if workers > 1 and len(corpus) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(workers, len(corpus)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(index,)) as ex:
            shards = list(ex.map(scan_shard, corpus, [clean_dir] * len(corpus)))
    else:
        shards = [scan_shard(c, clean_dir, index) for c in corpus]
    return build_report(tasks, index, shards, cfg, t_index, time.perf_counter() - t0, workers)


def build_report(tasks, index: NgramIndex, shards: list[dict], cfg: DecontamConfig,
                 t_index: float, t_total: float, workers: int) -> dict:
    documents = [h for s in shards for h in s["hits"]]
    confirmed: list[set] = [set() for _ in tasks]
    rejected = [0] * len(tasks)
    for d in documents:
        for m in d["matches"]:
            if m["confirmed"]:
                confirmed[m["benchmark"]].add(m["item"])
            else:
                rejected[m["benchmark"]] += 1
    benches = []
    for b, task in enumerate(tasks):
        mine = [i for i, it in enumerate(index.items) if it.benchmark == b]
        unchecked = [index.items[i].uid for i in mine if not index.checked[i]]
        order = {it.uid: k for k, it in enumerate(task.entries)}
        benches.append({"name": task.name, "spec": task.spec, "items": len(mine), "checked": len(mine) - len(unchecked),
                        "unchecked_ids": unchecked, "contaminated": len(confirmed[b]),
                        "contaminated_ids": sorted(confirmed[b], key=lambda u: order.get(u, 0)),
                        "rejected_candidates": rejected[b], "skipped_rows": task.skipped})
    chars = sum(s["chars"] for s in shards)
    scan_s = sum(s["seconds"] for s in shards)
    cpu_s = sum(s["cpu_seconds"] for s in shards)
    totals = {"shards": len(shards), "documents": sum(s["documents"] for s in shards), "chars": chars,
              "documents_with_candidates": len(documents),
              "contaminated_documents": sum(d["confirmed"] for d in documents),
              "contaminated_items": sum(len(c) for c in confirmed), "rejected_candidates": sum(rejected),
              "index_seconds": round(t_index, 4), "wall_seconds": round(t_total, 4), "workers": workers,
              "scan_mb_per_s_per_worker": round(chars / 1e6 / scan_s, 2) if scan_s > 0 else None,
              "scan_mb_per_cpu_s": round(chars / 1e6 / cpu_s, 2) if cpu_s > 0 else None}
    clean = None
    if shards and shards[0]["clean"] is not None:
        clean = {k: sum(s["clean"][k] for s in shards) for k in ("kept", "cut", "dropped")}
        clean["mode"] = cfg.mode
    for d in documents:
        for m in d["matches"]:
            m["benchmark"] = tasks[m["benchmark"]].name
            m.pop("index", None)
    return {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "benchmarks": benches,
            "documents": documents, "shards": [{k: s[k] for k in ("shard", "documents", "chars", "seconds", "cpu_seconds")}
                                               for s in shards],
            "totals": totals, "clean": clean,
            "method": "hashed word n-grams over question+answer; candidates confirmed by difflib matched fraction"}


# ----------------------------------------------------------------------------- training pre-check


def source_files(sources) -> list[dict]:
    """The raw text files behind training ``sources``, each ``{"path", "source", "text_field",
    "text_split", "sha256"}``.

    A source is a token dataset directory (its ``manifest.json`` names every input file with
    its sha256, and the text field and paragraph split used to read it) or raw text: a
    JSONL/parquet/text file, a directory of them or a glob. A file named by a manifest that is gone
    or changed since tokenizing is an error: the check must scan the text that was trained on.
    """
    from effilm.data.shards import FORMAT
    from effilm.io import sha256_file

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[dict] = []
    for src in map(str, sources):
        manifest = Path(src) / "manifest.json"
        if not manifest.is_file():
            for f in expand_inputs([src]):
                files.append({"path": str(f), "source": src, "text_field": "text", "text_split": "paragraph",
                              "sha256": None})
            continue
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EffilmError(f"{manifest}: cannot read ({exc})") from None
        if m.get("format") != FORMAT or not isinstance(m.get("inputs"), list):
            raise EffilmError(f"{manifest}: not a token dataset manifest (format {m.get('format')!r}, no inputs list)")
        conf = m.get("config", {})
        for rec in m["inputs"]:
            path = Path(rec["path"])
            if not path.is_absolute() and not path.is_file() and (Path(src) / path).is_file():
                path = Path(src) / path
            if not path.is_file():
                raise EffilmError(f"{src}: source file {rec['path']} named in manifest.json is gone; the "
                                  "contamination pre-check scans the raw text, so restore it (or re-tokenize "
                                  "from the files you have)")
            if rec.get("sha256") and sha256_file(path) != rec["sha256"]:
                raise EffilmError(f"{src}: source file {path} changed since it was tokenized (sha256 differs "
                                  "from manifest.json); the pre-check would scan other text than was trained on")
            files.append({"path": str(path), "source": src, "text_field": conf.get("text_field", "text"),
                          "text_split": conf.get("text_split", "paragraph"), "sha256": rec.get("sha256")})
    if not files:
        raise EffilmError("precheck: no source files to scan")
    return files


def precheck(sources, benchmarks, cfg: DecontamConfig | None = None, *, fail_on_contamination: bool = False,
             max_listed: int = 5, task_cfg=None) -> dict:
    """Scan training ``sources`` for items of ``benchmarks`` before training.

    ``sources``: token dataset directories (their manifests' raw inputs are scanned) or raw
    JSONL/parquet/text files. ``benchmarks``: task SPEC strings or loaded tasks. Returns a summary:
    per benchmark the contaminated count and ids, every confirmed hit (file:line, item, score) and
    totals. With ``fail_on_contamination`` a confirmed hit raises an EffilmError that lists the
    first ``max_listed`` hits.
    """
    from effilm.eval.tasks import Task, load_task

    cfg = cfg or DecontamConfig()
    t0 = time.perf_counter()
    tasks = [b if isinstance(b, Task) else load_task(b, task_cfg) for b in benchmarks]
    files = source_files(sources)
    index = NgramIndex(items_from_tasks(tasks), cfg)
    hits, n_docs, n_chars = [], 0, 0
    for f in files:
        docs = iter_file(f["path"], f["text_field"], f["text_split"])
        for batch in _batches(((d.where, None, None, d.text) for d in docs), cfg.batch_chars):
            for (loc, _, _, text), found in zip(batch, scan_texts([d[3] for d in batch], index), strict=True):
                n_docs += 1
                n_chars += len(text)
                hits += [{"location": loc, "source": f["source"], "benchmark": tasks[m["benchmark"]].name,
                          "item": m["item"], "score": m["score"]} for m in found if m["confirmed"]]
    per = []
    for b, task in enumerate(tasks):
        order = {it.uid: k for k, it in enumerate(task.entries)}
        ids = sorted({h["item"] for h in hits if h["benchmark"] == task.name}, key=lambda u: order.get(u, 0))
        unchecked = sum(1 for i, it in enumerate(index.items) if it.benchmark == b and not index.checked[i])
        per.append({"name": task.name, "spec": task.spec, "items": len(task.entries), "unchecked": unchecked,
                    "contaminated": len(ids), "contaminated_ids": ids})
    summary = {"benchmarks": per, "hits": hits, "files": [f["path"] for f in files],
               "documents": n_docs, "chars": n_chars, "contaminated_items": sum(b["contaminated"] for b in per),
               "clean": not hits, "seconds": round(time.perf_counter() - t0, 4),
               "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    if hits and fail_on_contamination:
        listed = "; ".join(f"{h['location']}: {h['benchmark']} item {h['item']} (score {h['score']})"
                           for h in hits[:max_listed])
        more = f" and {len(hits) - max_listed} more" if len(hits) > max_listed else ""
        counts = ", ".join(f"{b['name']}: {b['contaminated']}/{b['items']}" for b in per if b["contaminated"])
        raise EffilmError(f"training data contains benchmark items ({counts}): {listed}{more}")
    return summary
