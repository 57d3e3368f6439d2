"""The learned quality classifier: training and its report, the saved directory, the filter beside
the heuristics (in-process and in workers), and bad input as one line naming file and line or field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from effilm.cli import main
from effilm.data.classifier import MANIFEST, NgramFeatures, keep, load_classifier, metrics
from effilm.data.classifier_train import ClassifierConfig, read_annotations, train_classifier
from effilm.data.filters import FilterConfig, filter_files
from effilm.errors import ConfigError, EffilmError

GOOD = ["the river carries water from the hills to the sea and shapes the valley", "an atom of carbon has six "
        "protons and six electrons in its neutral state", "photosynthesis turns light water and carbon dioxide "
        "into sugar and oxygen", "the capital of france is paris on the river seine"]  # fmt: skip
BAD = ["click here to subscribe now", "lol my cat did the thing again", "reply share report loading comments",
       "cheap flights book now sponsored deals"]  # fmt: skip


def _annotations(path, n=120, scale=(0, 5)):
    rng = np.random.default_rng(0)
    with open(path, "w") as fh:
        for i in range(n):
            good = int(rng.integers(0, 4))
            lines = [GOOD[int(rng.integers(0, 4))] for _ in range(good)] + [BAD[int(rng.integers(0, 4))] for _ in range(4 - good)]
            rng.shuffle(lines)
            fh.write(json.dumps({"id": f"d{i}", "text": ". ".join(lines), "score": min(5, good + (good > 1)),
                                 "annotation": {"scale": list(scale)}}) + "\n")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    ann = _annotations(root / "ann.jsonl")
    report = train_classifier([ann], root / "clf", ClassifierConfig(hash_bits=14, min_documents=10))
    return root, report


def test_training_reports_f1_confusion_and_errors_in_json_and_png(trained):
    root, report = trained
    m = report["features"]["ngram"]
    assert m["f1"] > 0.9 and m["mae"] < 0.6 and m["rmse"] < 0.8
    (tn, fp), (fn, tp) = m["confusion"]["matrix"]
    assert tn + fp + fn + tp == report["split"]["test"] == 24
    assert json.loads((root / "clf" / "report.json").read_text())["features"]["ngram"]["f1"] == m["f1"]
    assert (root / "clf" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((root / "clf" / MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["features"] == {"kind": "ngram", "hash_bits": 14, "ngram": 2}
    clf = load_classifier(root / "clf")
    scores = clf.score([". ".join(GOOD), ". ".join(BAD)])
    assert scores[0] > 3 > scores[1] and clf.scale == (0.0, 5.0)


def test_hashing_is_deterministic_case_blind_and_bounded_on_long_texts():
    f = NgramFeatures(hash_bits=12)
    a, b = f.matrix(["The Cat sat."]), f.matrix(["the cat sat"])
    assert (a != b).nnz == 0 and a.nnz == 3 + 2 + 1  # 3 words, 2 pairs, the length column
    w = np.random.default_rng(0).normal(size=f.dim)
    long = "word " * 300_000  # hashed in pieces
    s, words = f.predict([long, "", "x y"], w, 0.5)
    assert list(words) == [300_000, 0, 2] and s[1] == 0.5
    dense = np.asarray(f.matrix(["x y", "the cat sat"]) @ w).ravel() + 0.5
    assert np.allclose(f.predict(["x y", "the cat sat"], w, 0.5)[0], dense)


def test_metrics_keep_rule_rounds_like_fineweb_edu():
    assert list(keep(np.array([2.49, 2.5, 3.2]), 3)) == [False, True, True]
    m = metrics(np.array([0.0, 1, 3, 4]), np.array([0.2, 2.6, 2.7, 3.9]), 3, (0, 5))
    assert m["confusion"]["matrix"] == [[1, 1], [0, 2]] and m["f1"] == 0.8
    assert m["score_confusion"]["matrix"][1][3] == 1 and m["mae"] == pytest.approx(0.55, abs=1e-4)


def test_filter_runs_the_classifier_beside_the_heuristics_in_workers(trained, tmp_path):
    root, _ = trained
    corpus = tmp_path / "in.jsonl"
    docs = [{"id": "good", "text": ". ".join(GOOD)}, {"id": "bad", "text": ". ".join(BAD)},
            {"id": "empty", "text": "  "}, {"id": "symbols", "text": "%%% ^^^ &&& ***"}]  # fmt: skip
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs * 3))
    cfg = {"classifier": str(root / "clf"), "min_words": 0, "score_field": "quality", "max_examples": 2}
    one = filter_files([corpus], tmp_path / "o1", tmp_path / "r1.json", FilterConfig(**cfg))
    two = filter_files([corpus], tmp_path / "o2", tmp_path / "r2.json", FilterConfig(**cfg, workers=2, batch_records=2))
    for rep, out in ((one, "o1"), (two, "o2")):
        s = rep["summary"]
        assert (s["kept"], s["rejected_classifier"], s["rejected_empty"]) == (3, 3, 3), s
        assert s["rejected_non_alpha"] == 3
        kept = [json.loads(x) for x in (tmp_path / out / "kept.jsonl").read_text().splitlines()]
        assert [k["id"] for k in kept] == ["good"] * 3 and all(k["quality"] > 3 for k in kept)
        rejects = [json.loads(x)["_rejected"] for x in (tmp_path / out / "rejects.jsonl").read_text().splitlines()]
        why = [r for r in rejects if r["filter"] == "classifier"]
        assert len(why) == 3 and all(r["value"] < 2.5 and r["threshold"] == 3 for r in why)
        c = rep["classifier"]
        assert c["scored"] == 6 and c["highest"][0]["id"] == "good" and c["lowest"][0]["id"] == "bad"
    assert (tmp_path / "o1" / "kept.jsonl").read_text() == (tmp_path / "o2" / "kept.jsonl").read_text()


def test_empty_document_is_a_counted_rejection_even_with_heuristics_off(trained, tmp_path):
    root, _ = trained
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ". ".join(GOOD)}) + "\n")
    rep = filter_files([corpus], tmp_path / "o", tmp_path / "r.json",
                       FilterConfig(classifier=str(root / "clf"), disabled=["empty", "length"]))
    assert rep["summary"]["rejected_empty"] == 1 and rep["summary"]["kept"] == 1


def test_bad_annotation_files_name_file_and_line(tmp_path):
    cases = {"missing": ({"text": "a"}, "missing field 'score'"),
             "range": ({"text": "a", "score": 7}, "score 7 is outside the scale 0-5"),
             "type": ({"text": "a", "score": "high"}, "field 'score' is 'high', not a number"),
             "negative": ({"text": "a", "score": -1, "annotation": {"scale": [0, 3]}}, "score -1 is outside the scale 0-3")}  # fmt: skip
    for name, (rec, msg) in cases.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text(json.dumps({"text": "fine", "score": 1}) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(EffilmError, match=f"{name}.jsonl:2: {msg}"):
            read_annotations([p])
    p = tmp_path / "nulls.jsonl"
    p.write_text(json.dumps({"text": "a", "score": None}) + "\n" + json.dumps({"text": "b", "score": 2}) + "\n")
    assert read_annotations([p]).unscored == 1


def test_other_version_dir_and_threshold_outside_the_scale_are_one_line(trained, tmp_path, capsys):
    import shutil

    root, _ = trained
    old = tmp_path / "old"
    shutil.copytree(root / "clf", old)
    m = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(EffilmError, match=r"classifier.json: classifier format version 99, but this effilm reads version 1"):
        load_classifier(old)
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(json.dumps({"text": ". ".join(GOOD)}) + "\n")
    base = ["filter", str(corpus), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json")]
    assert main([*base, "--classifier", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "format version 99" in err
    assert main([*base, "--classifier", str(root / "clf"), "--threshold", "6"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "effilm filter: error: threshold=6.0 is outside the classifier's score scale 0-5"
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="threshold=9 is outside the score scale 0-5"):
        ClassifierConfig(threshold=9, scale=[0, 5])
    with pytest.raises(ConfigError, match="threshold needs a classifier"):
        FilterConfig(threshold=3)


def test_cli_train_prints_f1_and_refuses_too_few_documents(tmp_path, capsys):
    ann = _annotations(tmp_path / "ann.jsonl", n=40)
    assert main(["classifier", "train", str(ann), "--out", str(tmp_path / "c"), "--hash-bits", "12"]) == 0
    assert "ngram   F1" in capsys.readouterr().out
    assert main(["classifier", "train", str(ann), "--out", str(tmp_path / "c2"), "--min-documents", "100"]) == 2
    assert "40 scored document(s); training needs at least 100" in capsys.readouterr().err
    assert main(["classifier", "train", str(ann), "--out", str(tmp_path / "c3"), "--threshold", "8"]) == 2
    assert "threshold=8 is outside the score scale 0-5" in capsys.readouterr().err


def test_hidden_state_features_are_trained_and_reported_beside_ngrams(tmp_path):
    from engine_fixtures import add_tokenizer, make_tokenizer, tiny

    import effilm
    from effilm.inference.embed import HiddenStateFeatures

    model_dir = tmp_path / "model"
    effilm.save(tiny("tiny-dense"), model_dir)
    add_tokenizer(model_dir, make_tokenizer(tmp_path))
    feats = HiddenStateFeatures(model_dir, batch_size=8, max_tokens=32, device="cpu")
    x = feats.matrix(["the cat sat", "the cat sat on a mat while river stone", ""])
    assert x.shape[0] == 3 and np.isfinite(x).all()
    assert np.allclose(feats.matrix(["the cat sat"])[0], x[0], atol=1e-5), "padding must not change the pooling"
    ann = _annotations(tmp_path / "ann.jsonl", n=40)
    cfg = ClassifierConfig(hash_bits=12, hidden_model=str(model_dir))
    with pytest.raises(EffilmError, match="hidden_model needs its featurizer"):
        train_classifier([ann], tmp_path / "c0", cfg)
    report = train_classifier([ann], tmp_path / "c", cfg, hidden=feats)
    assert set(report["features"]) == {"ngram", "hidden"}
    assert all(0 <= m["f1"] <= 1 and m["mae"] is not None for m in report["features"].values())
    clf = load_classifier(tmp_path / "c" / "hidden", featurizer=feats)
    assert clf.features["kind"] == "hidden" and clf.score(["the cat sat"]).shape == (1,)
    with pytest.raises(EffilmError, match="pass their featurizer"):
        load_classifier(tmp_path / "c" / "hidden").score(["x"])
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    with pytest.raises(EffilmError, match="effilm filter runs n-gram classifiers"):
        filter_files([corpus], tmp_path / "o", tmp_path / "r.json", FilterConfig(classifier=str(tmp_path / "c" / "hidden")))
