"""Exact and MinHash-LSH deduplication on planted duplicates."""

from __future__ import annotations

import json
import random

import pytest

from effilm.cli import main
from effilm.data.dedup import DedupConfig, dedup_files, normalize
from effilm.errors import EffilmError

VOCAB = [a + b + c for a in "bcdfg" for b in "aeiou" for c in "klmnprst"]  # 200 words, no digits: digits normalise to 0


def _doc(rng, n=150):
    return " ".join(rng.choice(VOCAB) for _ in range(n)) + "."


def _edit(rng, text, k):
    words = text.split()
    for _ in range(k):
        words[rng.randrange(len(words))] = rng.choice(["alpha", "beta", "gamma"])
    return " ".join(words)


@pytest.fixture
def planted(tmp_path):
    rng = random.Random(0)
    recs = [{"id": f"d{i}", "text": _doc(rng)} for i in range(60)]
    recs.append({"id": "exact-of-d3", "text": "  " + recs[3]["text"].upper().replace(" ", "\n ") + "!!"})
    recs.append({"id": "near-of-d7", "text": _edit(rng, recs[7]["text"], 2)})
    recs.append({"id": "near-of-d7-b", "text": _edit(rng, recs[7]["text"], 3)})
    words = recs[9]["text"].split()
    recs.append({"id": "far-from-d9", "text": " ".join(words[:45]) + " " + _doc(rng, 105)})  # J ~ 0.2
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


def test_normalisation():
    assert normalize("Café  No. 42,\tÉTÉ!") == "cafe no 00 ete"


def test_finds_exactly_the_planted_duplicates(planted, tmp_path):
    path, recs = planted
    report = dedup_files([path], tmp_path / "out", tmp_path / "r.json")
    s = report["summary"]
    assert (s["input_records"], s["kept"], s["removed_exact"], s["removed_near"]) == (64, 61, 1, 2)
    clusters = {c["kept"]: sorted(r["id"] for r in c["removed"]) for c in report["clusters"]}
    assert clusters == {"d3": ["exact-of-d3"], "d7": ["near-of-d7", "near-of-d7-b"]}
    kept = [json.loads(line)["id"] for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert "far-from-d9" in kept and len(kept) + len(removed) == len(recs)
    assert {r["_dedup"]["duplicate_of"] for r in removed} == {"d3", "d7"}
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == s


def test_threshold_and_banding_are_configurable(planted, tmp_path):
    path, _ = planted
    strict = dedup_files([path], tmp_path / "o", tmp_path / "r.json", DedupConfig(threshold=0.99))
    assert strict["summary"]["removed_near"] == 0 and strict["summary"]["removed_exact"] == 1
    with pytest.raises(Exception, match="num_bands"):
        DedupConfig(num_bands=0)


def test_cli_and_clear_errors(planted, tmp_path, capsys):
    path, _ = planted
    assert main(["dedup", str(path), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads(capsys.readouterr().out)["removed_near"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(EffilmError, match=r"bad.jsonl:2: no field 'text'"):
        dedup_files([bad], tmp_path / "o2", tmp_path / "r2.json")
    assert main(["dedup", str(bad), "--out", str(tmp_path / "o2"), "--report", str(tmp_path / "r2.json")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_long_records_are_normalized_and_hashed_in_pieces_with_the_same_result(monkeypatch):
    import random

    import numpy as np

    from effilm.data import dedup as D

    rng = random.Random(3)
    words = ["Café", "naïve", "x1", "Hello,", "world!", "a", "b", "c", "d-e"]
    text = " ".join(rng.choice(words) for _ in range(30_000))
    whole = D._normalize(text)
    h = D.MinHasher(D.DedupConfig())
    ref = h._MinHash(num_perm=h.cfg.num_perm, seed=h.cfg.seed, permutations=h.perms, scheme=h.scheme)
    ref.update_batch(D.shingles(whole, h.cfg.ngram))
    monkeypatch.setattr(D, "PIECE_CHARS", 1000)  # ~40 pieces
    assert D.normalize(text) == whole
    assert np.array_equal(h(whole).hashvalues, ref.hashvalues)
