"""Planted contamination is found, boilerplate is not flagged, and cleaning keeps everything else."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np

from effilm.cli import main
from effilm.eval.decontam import (
    DecontamConfig,
    NgramIndex,
    clean_text,
    hash_batch,
    items_from_tasks,
    normalize,
    scan_texts,
)
from effilm.eval.decontam_scan import find_contamination
from effilm.eval.tasks import Item, Task

VOCAB = ("photosynthesis chlorophyll enzyme substrate mitochondria membrane osmosis diffusion protein "
         "nucleus ribosome genome allele mutation species habitat predator climate glacier tectonic "
         "volcano sediment erosion magma crust mantle orbit planet galaxy nebula comet asteroid").split()
BOILER = "Which of the following statements best describes the relationship between the variables described in"
FILLER = ("The committee met on Tuesday to discuss the budget, the schedule and the staffing plan for "
          "the coming year; members agreed to revisit the matter next month. ")


def make_bench(n=30, seed=0):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        body = " ".join(rng.choice(VOCAB) for _ in range(30))
        q = (BOILER + " " if i % 3 == 0 else "") + body.capitalize() + "?"
        choices = [" ".join(rng.choice(VOCAB) for _ in range(3)) for _ in range(4)]
        items.append(Item(q, choices, i % 4, "biology", f"bench:{i + 1}", f"biology/{i}"))
    return Task("bench", "jsonl", "jsonl:bench.jsonl", items=items)


def repunctuate(text):
    words = text.upper().replace("?", "").split()
    return " -- ".join([", ".join(words[:7]), "; ".join(words[7:15]), "!! ".join(words[15:])]) + "?!"


def write_corpus(path, task):
    it = task.items
    docs = [
        {"id": "verbatim", "text": it[1].question + " " + it[1].choices[it[1].answer]},
        {"id": "recased", "text": repunctuate(it[4].question)},
        {"id": "embedded", "text": FILLER * 5 + it[7].question + " " + FILLER * 5},
        {"text": FILLER * 3},  # clean, no id: reported by line
        {"id": "boiler", "text": FILLER + BOILER + " the rainfall and crop yields in the survey. " + FILLER},
        {"id": "clean2", "text": "Photosynthesis and osmosis are covered in chapter two. " * 4},
    ]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def test_planted_contamination_found_and_boilerplate_not(tmp_path):
    task = make_bench()
    docs = write_corpus(tmp_path / "c.jsonl", task)
    rep = find_contamination([task], [tmp_path / "c.jsonl"])
    b = rep["benchmarks"][0]
    assert b["contaminated_ids"] == ["biology/1", "biology/4", "biology/7"]
    assert b["contaminated"] == 3 and b["items"] == b["checked"] == 30
    flagged = {d["doc"]: d for d in rep["documents"] if d["confirmed"]}
    assert set(flagged) == {"verbatim", "recased", "embedded"}
    for name, item in (("verbatim", 1), ("recased", 4), ("embedded", 7)):
        m = [m for m in flagged[name]["matches"] if m["confirmed"]]
        assert [x["item"] for x in m] == [f"biology/{item}"] and m[0]["score"] > 0.9
    assert flagged["verbatim"]["matches"][0]["score_question_answer"] == 1.0
    # the matched span points at the planted question inside the embedded document
    s, e = flagged["embedded"]["matches"][0]["spans"][0]
    text = docs[2]["text"]
    assert s >= len(FILLER * 5) and normalize(text[s:e]) in normalize(task.items[7].question)
    boiler = [d for d in rep["documents"] if d["doc"] == "boiler"]
    assert boiler and not boiler[0]["confirmed"] and b["rejected_candidates"] >= 1
    assert all(m["score"] < 0.5 for m in boiler[0]["matches"])
    assert rep["totals"]["documents"] == 6 and rep["totals"]["contaminated_documents"] == 3


def test_hashed_ngrams_equal_a_plain_python_reference():
    rng = random.Random(3)
    texts = [" ".join(rng.choice(VOCAB + ["Don't", "x,y", "É"]) for _ in range(rng.randint(0, 40))) for _ in range(50)]
    n = 4
    h = hash_batch(texts, n)
    for d, t in enumerate(texts):
        words = normalize(t).split()
        mine = [int(g) for g, ok, wd in zip(h.grams, h.gram_ok, h.word_doc[: len(h.grams)], strict=True) if ok and wd == d]
        ref = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        assert len(mine) == len(ref)
        # equal n-grams hash equal, different ones differently
        assert len({(r, m) for r, m in zip(ref, mine, strict=True)}) == len(set(ref)) == len(set(mine))
        got_words = [normalize(t[s - h.doc_offset[d] : e - h.doc_offset[d]])
                     for s, e, wd in zip(h.word_start, h.word_end, h.word_doc, strict=True) if wd == d]
        assert got_words == words


def test_cleaning_cut_keeps_everything_else_and_logs_removals(tmp_path):
    task = make_bench()
    docs = write_corpus(tmp_path / "c.jsonl", task)
    cfg = DecontamConfig(min_piece_chars=50)
    find_contamination([task], [tmp_path / "c.jsonl"], cfg, clean_out=tmp_path / "out")
    out = [json.loads(x) for x in (tmp_path / "out" / "c.jsonl").read_text().splitlines()]
    removed = [json.loads(x) for x in (tmp_path / "out" / "c.jsonl.removed.jsonl").read_text().splitlines()]
    by_id = {d.get("id", "line4"): d for d in out}
    # untouched documents are byte-identical, boilerplate included
    for d in docs[3:]:
        assert by_id[d.get("id", "line4")] == d
    # the embedded one lost the hit and 200 chars either side, nothing else
    emb = [r for r in removed if r["doc"] == "embedded"]
    assert len(emb) == 1 and emb[0]["items"] == ["biology/7"]
    text = docs[2]["text"]
    assert text[emb[0]["start"] : emb[0]["end"]] == emb[0]["text"]
    assert by_id["embedded"]["text"] == text[: emb[0]["start"]] + cfg.piece_separator + text[emb[0]["end"] :]
    assert task.items[7].question not in by_id["embedded"]["text"]
    # short documents wholly inside the margin vanish, and the side file holds their text
    assert "verbatim" not in by_id and any(r["doc"] == "verbatim" and r["text"] == docs[0]["text"] for r in removed)


def test_clean_drop_mode_and_piece_limit():
    cfg = DecontamConfig(margin_chars=5, min_piece_chars=1, max_pieces=3)
    text = "".join(f"{'x' * 20}HIT{i}" for i in range(5)) + "y" * 20
    spans = [[text.index(f"HIT{i}"), text.index(f"HIT{i}") + 4] for i in range(5)]
    match = [{"item": "a/0", "confirmed": True, "spans": spans}]
    new, rem = clean_text(text, match, cfg)
    assert new is None and "pieces" in rem[0]["reason"] and rem[0]["text"] == text
    new, rem = clean_text(text, [{**match[0], "spans": spans[:2]}], cfg)
    assert new is not None and "HIT0" not in new and "HIT2" in new
    assert clean_text(text, [{**match[0], "confirmed": False}], cfg) == (text, [])
    new, rem = clean_text(text, match, DecontamConfig(mode="drop"))
    assert new is None and rem[0]["reason"] == "document dropped"


def test_plain_text_gz_shards_in_parallel(tmp_path):
    task = make_bench()
    lines = [FILLER, task.items[10].question.lower(), FILLER, "short line"]
    with gzip.open(tmp_path / "a.txt.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    (tmp_path / "b.txt").write_text(FILLER + repunctuate(task.items[13].question) + "\n")
    files = [tmp_path / "a.txt.gz", tmp_path / "b.txt"]
    one = find_contamination([task], files)
    two = find_contamination([task], files, DecontamConfig(workers=2))
    assert one["documents"] == two["documents"]
    assert [(d["doc"], d["confirmed"]) for d in one["documents"] if d["confirmed"]] == [("2", True), ("1", True)]
    assert one["benchmarks"][0]["contaminated_ids"] == ["biology/10", "biology/13"]


def test_items_shorter_than_n_are_matched_whole():
    short = Item("Name the enzyme that unwinds the DNA helix?", ["ligase", "helicase", "primase", "gyrase"], 1, "s", "x:1", "s/0")
    task = Task("t", "jsonl", "jsonl:t", items=[short, *make_bench(3).items])
    idx = NgramIndex(items_from_tasks([task]), DecontamConfig())
    assert idx.short_lengths == [8] and idx.checked.all()  # 8 question words + the answer: 9 < 13
    from effilm.eval.decontam import scan_texts

    texts = [FILLER + "NAME the enzyme, that unwinds the DNA helix: helicase! " + FILLER,
             FILLER + "the dna enzyme that unwinds: name the helix " + FILLER]  # same words, no 8 in a row
    found = scan_texts(texts, idx)
    assert [m["item"] for m in found[0] if m["confirmed"]] == ["s/0"] and found[1] == []
    assert NgramIndex(items_from_tasks([task]), DecontamConfig(min_words=0)).short_lengths == []


def test_short_items_reported_unchecked():
    items = [Item("Too short to index?", ["a", "b", "c", "d"], 0, "s", "x:1", "s/0")] + make_bench(3).items
    idx = NgramIndex(items_from_tasks([Task("t", "jsonl", "jsonl:t", items=items)]), DecontamConfig())
    assert idx.checked.tolist() == [False, True, True, True]


def test_index_of_15000_items_finds_every_planted_item():
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(5000)])
    items = [Item(" ".join(vocab[rng.integers(0, 5000, 40)]), ["a", "b", "c", "d"], 0, "s", "x", f"s/{i}")
             for i in range(15000)]
    idx = NgramIndex(items_from_tasks([Task("t", "jsonl", "jsonl:t", items=items)]), DecontamConfig())
    assert idx.checked.all()
    from effilm.eval.decontam import scan_texts

    picks = [17, 7777, 14999]
    texts = [FILLER + items[i].question + FILLER for i in picks] + [FILLER * 4]
    found = scan_texts(texts, idx)
    assert [[m["item"] for m in f if m["confirmed"]] for f in found] == [["s/17"], ["s/7777"], ["s/14999"], []]


def test_cli_decontam(tmp_path, capsys):
    task = make_bench()
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question": i.question, "subject": i.subject, "choices": i.choices,
                                         "answer": i.answer}) + "\n" for i in task.items))
    write_corpus(tmp_path / "c.jsonl", task)
    rc = main(["decontam", "--benchmark", f"jsonl:{bench},name=bio", "--corpus", str(tmp_path / "c.jsonl"),
               "--report", str(tmp_path / "r.json"), "--clean-out", str(tmp_path / "clean"), "--mode", "drop"])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["benchmarks"][0]["contaminated_ids"] == ["biology/1", "biology/4", "biology/7"]
    assert rep["clean"] == {"kept": 3, "cut": 0, "dropped": 3, "mode": "drop"}
    assert "bio" in capsys.readouterr().out
    assert main(["decontam", "--benchmark", f"jsonl:{bench}", "--corpus", str(tmp_path / "nope.jsonl"),
                 "--report", str(tmp_path / "r2.json")]) == 2


def test_a_long_document_is_scanned_in_pieces_with_the_same_findings(tmp_path, monkeypatch):
    import effilm.eval.decontam as D

    task = make_bench()
    index = NgramIndex(items_from_tasks([task]), DecontamConfig())
    q1, q4 = task.items[1].question, task.items[4].question
    body = FILLER * 40 + q1 + " " + FILLER * 40
    cut = len(body) - len(FILLER * 40) - len(q1) // 2  # where a piece boundary will fall: inside q1
    text = body + repunctuate(q4) + " " + FILLER * 40 + q1 + " " + FILLER * 10  # q1 twice, far apart
    (whole,) = scan_texts([text], index)
    monkeypatch.setattr(D, "LONG_SCAN_CHARS", cut)  # pieces of about that size: one cut falls inside q1
    monkeypatch.setattr(D, "SCAN_OVERLAP_CHARS", 4000)
    (pieces,) = scan_texts([text], index)
    confirmed = lambda found: sorted(m["item"] for m in found if m["confirmed"])  # noqa: E731
    assert confirmed(pieces) == confirmed(whole) == ["biology/1", "biology/4"]
    spans = {m["item"]: m["spans"] for m in pieces}
    assert len(spans["biology/1"]) == 2  # both copies of q1, at their places in the whole text
    for s, e in spans["biology/1"]:
        assert normalize(text[s:e]) in normalize(q1)
    assert {m["item"]: m["spans"] for m in whole}["biology/4"] == spans["biology/4"]


# ----- templated benchmarks: template-mates and reused templates are not leaks ------------------
CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("New Zealand", "Wellington"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
            ("Chile", "Santiago")]


def test_templated_items_are_told_apart_at_the_defaults(tmp_path):
    items = []
    for i, (country, capital) in enumerate(CAPITALS):
        others = [c for _, c in CAPITALS if c != capital][:3]
        items.append(Item(f"Which of these cities is the capital of {country}?", [capital, *others], 0, "geo",
                          f"geo:{i + 1}", f"geo/{i}"))
    task = Task("capitals", "jsonl", "jsonl:capitals.jsonl", items=items)
    leak_verbatim, leak_recased = items[3], items[6]  # New Zealand, Japan
    docs = [
        {"id": "verbatim", "text": f"{leak_verbatim.question} {leak_verbatim.choices[0]}"},
        {"id": "recased", "text": FILLER * 3 + leak_recased.question.upper() + " ANSWER: TOKYO. " + FILLER * 3},
        # the template reused for entities that are not in the benchmark
        {"id": "reuse1", "text": FILLER + "Which of these cities is the capital of Portugal? Lisbon. " + FILLER},
        {"id": "reuse2", "text": "Quiz time. Which of these cities is the capital of Norway? Oslo, of course. "
                                 "Which of these cities is the capital of Ghana? Accra."},
        # the answers stated in plain prose
        {"id": "prose", "text": " ".join(f"The capital of {c} is {a}." for c, a in CAPITALS) + " " + FILLER},
        {"id": "clean", "text": FILLER * 4},
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    rep = find_contamination([task], [corpus], DecontamConfig())  # the defaults, nothing special
    b = rep["benchmarks"][0]
    assert sorted(b["contaminated_ids"]) == sorted([leak_verbatim.uid, leak_recased.uid]) and b["contaminated"] == 2
    flagged = sorted({d["doc"] for d in rep["documents"] if d["confirmed"]})
    assert flagged == ["recased", "verbatim"], rep["documents"]
    # the template-mates and the reused templates were candidates, rejected by their distinguishing words
    # (9 mates in each leaking document, all 10 items in each reusing one), though their matched fraction
    # of the item's text passes the threshold: that alone confirmed all of them before
    assert b["rejected_candidates"] == 9 + 9 + 10 + 10
    rejected = [m for d in rep["documents"] for m in d["matches"] if not m["confirmed"]]
    assert len(rejected) == 38 and all(m["score"] >= 0.5 for m in rejected)
    france = next(m for d in rep["documents"] if d["doc"] == "recased" for m in d["matches"] if m["item"] == "geo/0")
    assert france["missing_distinguishing_words"] == ["france"]  # a mate of the leaked Japan item
    nz = next(m for d in rep["documents"] if d["doc"] == "verbatim" for m in d["matches"] if m["item"] == "geo/3")
    assert nz["confirmed"] and "missing_distinguishing_words" not in nz
    # the old rule (no distinguishing-words check) flags every item of the template
    old = find_contamination([task], [corpus], DecontamConfig(slot_words=-1))["benchmarks"][0]
    assert old["contaminated"] == 10
