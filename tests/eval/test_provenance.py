"""``effilm eval`` checks an effilm-trained model's training data for the benchmark by default (the
run record, the init_from chain, the datasets' manifests), says "unknown" for any other model, and
gives a clear line (not a crash) when a source file has gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_fixtures import make_data, write_run

from effilm.eval.provenance import training_sources


def _quiz(root):
    """Item 0 is a training document of 'syn' (question + answer verbatim); item 1 is in no corpus."""
    syn = [json.loads(x)["text"] for x in (root / "syn.jsonl").read_text().splitlines()]
    doc = next(t for t in syn if len(t.split()) >= 16).split()
    items = [{"question": " ".join(doc[:-1]), "choices": [doc[-1], "zebra", "quokka", "yak"], "answer": 0},
             {"question": "Which ancient harbour city exported the most purple dye in antiquity?",
              "choices": ["Tyre", "Ostia", "Gades", "Sidon"], "answer": 0}]
    (root / "quiz.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return root / "quiz.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from effilm.cli import main

    root = tmp_path_factory.mktemp("prov")
    make_data(root)
    assert main(["train", str(write_run(root, root / "run")), "--no-progress"]) == 0
    return root, _quiz(root)


def _eval(model, quiz, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "effilm", "eval", str(model), "--task", f"jsonl:{quiz},name=quiz",
                        "--scoring", "cloze", "--shots", "0", "--output", str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout, json.loads(out.read_text())


def test_an_effilm_model_is_checked_by_default(trained, tmp_path):
    root, quiz = trained
    stdout, rep = _eval(root / "run" / "final", quiz, tmp_path / "r.json")
    check = rep["contamination_check"]
    assert check["status"] == "checked" and check["sources"] == [str(root / "web"), str(root / "syn")]
    assert sorted(check["files"]) == sorted([str(root / "web.jsonl"), str(root / "syn.jsonl")])
    c = rep["tasks"][0]["contamination"]
    assert c["contaminated"] == 1 and c["items"] == 2 and c["contaminated_ids"] == [rep["tasks"][0]["items"][0]["id"]]
    assert "contamination: 1/2 items found in the corpus" in stdout and "quiz 1/2 items found" in stdout
    # --no-contamination-check skips it, and says so
    stdout, rep = _eval(root / "run" / "final", quiz, tmp_path / "r2.json", "--no-contamination-check")
    assert rep["contamination_check"]["status"] == "skipped" and "contamination" not in rep["tasks"][0]
    assert "not checked (--no-contamination-check)" in stdout


def test_a_model_effilm_did_not_train_is_unknown(trained, tmp_path):
    import shutil

    from effilm.formats.load import load

    root, quiz = trained
    other = tmp_path / "saved"
    import effilm

    effilm.save(load(root / "run" / "final"), other)  # the same weights, no run record
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (root / "run" / "final" / f).exists():
            shutil.copy(root / "run" / "final" / f, other / f)
    stdout, rep = _eval(other, quiz, tmp_path / "r.json")
    check = rep["contamination_check"]
    assert check["status"] == "unknown" and "not trained by effilm" in check["line"]
    assert "effilm decontam --benchmark" in stdout and "contamination: unknown" in stdout


def test_a_source_file_that_has_gone_is_a_line_not_a_crash(trained, tmp_path):
    root, quiz = trained
    moved = root / "syn.jsonl.moved"
    (root / "syn.jsonl").rename(moved)
    try:
        stdout, rep = _eval(root / "run" / "final", quiz, tmp_path / "r.json")
    finally:
        moved.rename(root / "syn.jsonl")
    check = rep["contamination_check"]
    assert check["status"] == "not checked" and "syn.jsonl" in check["line"] and "is gone" in check["line"]
    assert "Traceback" not in stdout and check["line"] in stdout


def test_the_init_from_chain_is_followed(tmp_path):
    def model(name, sources=None, init_from=None, run=True):
        d = tmp_path / name
        d.mkdir()
        conf = {"format": "effilm", "model": {}}
        if run:
            conf["run"] = {"data": {"sources": [{"name": s, "path": s} for s in sources or []]},
                           "model": {"init_from": str(tmp_path / init_from) if init_from else None}}
        (d / "config.json").write_text(json.dumps(conf))
        return d

    model("base", ["/data/web", "/data/textbook"])
    model("sft", ["/data/chat"], init_from="base")
    dpo = model("dpo", ["/data/prefs", "/data/chat"], init_from="sft")
    got = training_sources(dpo)
    assert got["sources"] == ["/data/prefs", "/data/chat", "/data/web", "/data/textbook"] and not got["unknown"]
    assert got["models"] == [str(tmp_path / n) for n in ("dpo", "sft", "base")]
    model("hf", run=False)
    tuned = model("tuned", ["/data/chat"], init_from="hf")
    got = training_sources(tuned)
    assert got["sources"] == ["/data/chat"] and "not trained by effilm" in got["unknown"][0]
    gone = model("gone", ["/data/x"], init_from="nowhere")
    assert "no config.json" in training_sources(gone)["unknown"][0]
