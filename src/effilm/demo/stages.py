"""The demo's data stages: synthesize, clean (with the planted-leak check) and tokenize.

Each stage is a plain function ``stage(cfg, paths...) -> dict`` returning the JSON-serialisable
section of ``summary.json`` it owns; the files it writes sit under the demo's output directory.
They call effilm's own modules (``synth.procedural``, ``dedup``, ``filters``, ``decontam_scan``,
``tokenizer``, ``data_shards``), never re-implementations of them.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

from effilm.demo.config import FILTERED_SOURCE, DemoConfig
from effilm.errors import EffilmError
from effilm.io import atomic_open, atomic_write_json, iter_jsonl

CORPORA = ("textbook", "web")


def write_jsonl(path: Path, records) -> int:
    """Write records atomically, one JSON object per line; returns the count."""
    n = 0
    with atomic_open(path) as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def corpus_stats(path: Path) -> dict:
    docs = chars = words = 0
    for _, rec in iter_jsonl(path):
        docs += 1
        chars += len(rec["text"])
        words += len(rec["text"].split())
    return {"path": str(path), "documents": docs, "chars": chars, "words": words}


def quiz_spec(path: Path) -> str:
    return f"jsonl:{path},name=quiz"


# ----------------------------------------------------------------------------- 1. synthesize
def synthesize(cfg: DemoConfig, out: Path) -> dict:
    """Textbook corpus (facts + Q&A exercises), web-like corpus, held-out text and the quiz."""
    from effilm.synth import procedural as P
    from effilm.synth.twins import TwinConfig, make_twins

    pcfg = P.ProceduralConfig(num_facts=cfg.num_facts, records=cfg.textbook_records, web_records=cfg.web_records,
                              domains=["facts"], web_varied=cfg.web_varied)
    n_text, n_web, n_held = cfg.textbook_records, cfg.web_records, cfg.heldout_records
    paths = {"textbook": out / "textbook.jsonl", "web": out / "web.jsonl",
             "heldout_textbook": out / "heldout_textbook.jsonl", "heldout_web": out / "heldout_web.jsonl",
             "annotate_web": out / "annotate_web.jsonl", "quiz": out / "quiz.jsonl"}
    write_jsonl(paths["textbook"], P.generate_corpus(n_text, cfg.num_facts, cfg.seed, cfg=pcfg))
    write_jsonl(paths["web"], P.generate_web_corpus(n_web, cfg.num_facts, cfg.seed, cfg=pcfg))
    # held-out text: the records right after the training ones (same generators, unseen indices)
    write_jsonl(paths["heldout_textbook"], P.generate_corpus(n_held, cfg.num_facts, cfg.seed, start=n_text, cfg=pcfg))
    write_jsonl(paths["heldout_web"], P.generate_web_corpus(n_held, cfg.num_facts, cfg.seed, start=n_web, cfg=pcfg))
    # the quality classifier's training slice: web records after the held-out ones, never in the corpus it filters
    write_jsonl(paths["annotate_web"], P.generate_web_corpus(cfg.annotate_records, cfg.num_facts, cfg.seed,
                                                             start=n_web + n_held, cfg=pcfg))
    quiz = P.generate_quiz(cfg.num_facts, cfg.seed, cfg.quiz_questions_per_fact, cfg.quiz_public_share)
    write_jsonl(paths["quiz"], quiz)
    # the private twins: the taught facts the public quiz leaves out, in its phrasings (effilm twin make)
    twin_cfg = TwinConfig(kind="quiz", seed=cfg.seed, twin_seed=cfg.twin_seed, num_facts=cfg.num_facts,
                          public_share=cfg.quiz_public_share, questions_per_fact=cfg.quiz_questions_per_fact)
    twin_spec = make_twins(twin_cfg, out / "twins")
    # post-training data: chat turns and preference pairs about the same facts, in exercise and chat phrasings
    posttrain = {"chat": out / "chat.jsonl", "preferences": out / "preferences.jsonl"}
    n_chat = write_jsonl(posttrain["chat"], P.generate_chat(cfg.chat_records, cfg.num_facts, cfg.seed, cfg=pcfg))
    n_pref = write_jsonl(posttrain["preferences"],
                         P.generate_preferences(cfg.preference_records, cfg.num_facts, cfg.seed, cfg=pcfg))
    facts = P.select_facts(cfg.num_facts, cfg.seed)
    stats = {k: corpus_stats(v) for k, v in paths.items() if k != "quiz"}
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "posttrain": {"chat": {"path": str(posttrain["chat"]), "records": n_chat},
                      "preferences": {"path": str(posttrain["preferences"]), "records": n_pref}},
        "facts": {"count": len(facts), "by_relation": dict(Counter(f.relation for f in facts))},
        "textbook_domains": pcfg.domains,
        "corpora": stats,
        "quiz": {"path": str(paths["quiz"]), "items": len(quiz), "subjects": dict(Counter(q["subject"] for q in quiz)),
                 "choices": len(quiz[0]["choices"]), "chance": 1.0 / len(quiz[0]["choices"]),
                 "public_share": cfg.quiz_public_share},
        "twins": {"dir": str(out / "twins"), "spec": twin_spec, "items": twin_spec["files"]["twins"]["items"]},
    }


# ----------------------------------------------------------------------------- 2. clean
def clean(cfg: DemoConfig, synth: dict, out: Path) -> dict:
    """Dedup, quality filters and decontamination against the quiz, per corpus; the planted-leak
    check; then the learned quality filter: the top of the cleaned web corpus by classifier score
    (:mod:`effilm.demo.quality`)."""
    from effilm.data.dedup import dedup_files
    from effilm.data.filters import filter_files
    from effilm.demo.quality import quality_filter
    from effilm.eval.decontam_scan import find_contamination
    from effilm.eval.tasks import load_task

    quiz = load_task(quiz_spec(Path(synth["quiz"]["path"])))
    result: dict = {"corpora": {}, "paths": {}}
    for name in CORPORA:
        src = Path(synth["paths"][name])
        d = dedup_files([src], out / "dedup" / name, out / "dedup" / f"{name}.report.json")
        f = filter_files([out / "dedup" / name / "kept.jsonl"], out / "filter" / name,
                         out / "filter" / f"{name}.report.json")
        filtered = Path(f["outputs"]["kept"])
        rep = find_contamination([quiz], [filtered], decontam_config(cfg), clean_out=out / "decontam" / name)
        atomic_write_json(out / "decontam" / f"{name}.report.json", rep)
        final = out / "decontam" / name / filtered.name
        b = rep["benchmarks"][0]
        after = find_contamination([quiz], [final], decontam_config(cfg))["benchmarks"][0]  # what training will actually read
        result["corpora"][name] = {
            "input_documents": d["summary"]["input_records"],
            "dedup": {k: d["summary"][k] for k in ("kept", "removed_exact", "removed_near", "clusters")},
            "filters": {k: v for k, v in f["summary"].items() if k != "input_records"},
            "decontam": {"items": b["items"], "checked": b["checked"], "contaminated": b["contaminated"],
                         "contaminated_ids": b["contaminated_ids"], "rejected_candidates": b["rejected_candidates"],
                         "documents_with_candidates": rep["totals"]["documents_with_candidates"],
                         "clean": rep["clean"], "report": str(out / "decontam" / f"{name}.report.json"),
                         "after_cleaning": {"contaminated": after["contaminated"],
                                            "contaminated_ids": after["contaminated_ids"]}},
            "output_documents": corpus_stats(final)["documents"],
        }
        result["paths"][name] = str(final)
    result["planted_leak_check"] = planted_leak_check(cfg, quiz, Path(result["paths"]["textbook"]), out / "planted")
    qf = result["quality_filter"] = quality_filter(cfg, Path(synth["paths"]["annotate_web"]),
                                                   Path(result["paths"]["web"]), out / "quality")
    result["paths"][FILTERED_SOURCE] = qf["path"]
    return result


def plant_leaks(cfg: DemoConfig, quiz, corpus: Path, out: Path) -> tuple[Path, list[dict]]:
    """A COPY of ``corpus`` with ``cfg.planted_leaks`` quiz items (question + answer) embedded
    mid-document in distinct documents, re-cased to show the match is not byte-exact."""
    rng = random.Random(f"plant:{cfg.seed}")
    docs = [rec for _, rec in iter_jsonl(corpus)]
    if len(docs) < cfg.planted_leaks:
        raise EffilmError(f"{corpus}: {len(docs)} documents, too few to plant {cfg.planted_leaks} leaks in")
    items = rng.sample(quiz.items, cfg.planted_leaks)
    targets = rng.sample(range(len(docs)), cfg.planted_leaks)
    planted = []
    for item, di in zip(items, targets, strict=True):
        text = docs[di]["text"]
        leak = f"{item.question} {item.choices[item.answer]}"
        leak = leak.upper() if len(planted) % 2 else leak
        cut = text.find("\n\n", len(text) // 2)
        cut = cut if cut >= 0 else len(text)
        docs[di] = {**docs[di], "text": f"{text[:cut]}\n\n{leak}\n\n{text[cut:].lstrip()}"}
        planted.append({"item": item.uid, "doc": docs[di].get("id", str(di + 1)), "text": leak})
    copy = out / "textbook_with_leaks.jsonl"
    write_jsonl(copy, docs)
    return copy, planted


def decontam_config(cfg: DemoConfig):
    """The demo scans at effilm's defaults: nothing tuned to its templated quiz."""
    from effilm.eval.decontam import DecontamConfig

    return DecontamConfig()


def _found(rep: dict, planted: list[dict]) -> dict:
    found_items = set(rep["benchmarks"][0]["contaminated_ids"])
    found_docs = {str(d["doc"]) for d in rep["documents"] if d["confirmed"]}
    want_items = {p["item"] for p in planted}
    want_docs = {str(p["doc"]) for p in planted}
    return {"confirm_threshold": rep["config"]["confirm_threshold"], "window_words": rep["config"]["window_words"],
            "slot_words": rep["config"]["slot_words"], "found_items": sorted(found_items), "found_documents": sorted(found_docs),
            "missed": sorted(want_items - found_items), "false_positives": sorted(found_items - want_items),
            "exact": found_items == want_items and found_docs == want_docs}


def planted_leak_check(cfg: DemoConfig, quiz, corpus: Path, out: Path) -> dict:
    """Plant leaks in a copy of the cleaned corpus; decontamination at the defaults must find
    exactly those.

    Also records what the matched fraction alone finds on the same copy (``slot_words=-1``, the
    rule before distinguishing words): with a templated quiz it confirms the leaked items'
    template-mates as well."""
    import dataclasses

    from effilm.eval.decontam_scan import find_contamination

    copy, planted = plant_leaks(cfg, quiz, corpus, out)
    result = {"corpus_copy": str(copy), "planted": planted,
              **_found(find_contamination([quiz], [copy], decontam_config(cfg)), planted)}
    fraction_only = dataclasses.replace(decontam_config(cfg), slot_words=-1)
    result["without_distinguishing_words"] = _found(find_contamination([quiz], [copy], fraction_only), planted)
    return result


# ----------------------------------------------------------------------------- 3. tokenize
def tokenize(cfg: DemoConfig, cleaned: dict, out: Path) -> dict:
    """Train the BPE tokenizer on the cleaned training corpora and write one token dataset per corpus."""
    from effilm.config.data import TokenizeConfig, TokenizerTrainConfig
    from effilm.data.shards import tokenize_files
    from effilm.data.tokenizer import load_tokenizer, train_tokenizer

    inputs = [Path(cleaned["paths"][n]) for n in CORPORA]
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    train_tokenizer(inputs, tok_dir, TokenizerTrainConfig(vocab_size=cfg.vocab_size))
    tok = load_tokenizer(tok_dir)
    # the filtered web corpus is a subset of the web one: tokenized with the same tokenizer, not trained on twice
    corpora = {name: Path(cleaned["paths"][name]) for name in (*CORPORA, FILTERED_SOURCE) if name in cleaned["paths"]}
    datasets = {}
    for name, path in corpora.items():
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        m = tokenize_files([path], tok_dir, target, TokenizeConfig())
        chars = corpus_stats(path)["chars"]
        datasets[name] = {"path": str(target), "documents": m["documents"], "tokens": m["tokens"],
                          "chars_per_token": round(chars / max(m["tokens"], 1), 3)}
    return {"tokenizer": str(tok_dir), "vocab_size": tok.vocab_size, "datasets": datasets}
