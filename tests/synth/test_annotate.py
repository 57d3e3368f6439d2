"""effilm annotate: the procedural backend (offline), the openai backend against a real local HTTP
server (cache, resume, budget, dry run, retried and unscored replies), the local backend, rubrics."""

from __future__ import annotations

import json

import pytest
from fakeserver import FakeOpenAIServer

from effilm.cli import main
from effilm.config.reader import build
from effilm.errors import ConfigError, EffilmError
from effilm.synth import procedural
from effilm.synth.annotate import AnnotateConfig, annotate
from effilm.synth.recipe import load_recipe
from effilm.synth.rubric import Rubric, load_rubric, procedural_points
from effilm.synth.runner import Run, read_records


def _corpus(path, texts):
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def _records(out):
    return list(read_records(out))


@pytest.fixture
def server():
    srv = FakeOpenAIServer().start()

    def answer(prompt):  # a teacher that grades by counting GOOD, and cannot grade GARBLE
        doc = prompt.split("<<<", 1)[1]
        return "I cannot tell." if "GARBLE" in doc else f"Clear enough.\nScore: {min(5, doc.count('GOOD'))}"

    srv.answer_for = answer
    yield srv
    srv.stop()


def _openai(server, **kw):
    return build(AnnotateConfig, {"backend": "openai", "quiet": True, "shard_size": 2, **kw,
                                  "openai": {"base_url": server.base_url, "backoff_base_s": 0.01,
                                             "backoff_max_s": 0.02, "concurrency": 2}})  # fmt: skip


def test_procedural_backend_scores_web_records_from_what_the_generator_knows(tmp_path):
    recipe = load_recipe(None, {"procedural": {"records": 3, "web_records": 60, "quiz": False, "web_varied": True}})
    Run(recipe, tmp_path / "synth", log=lambda m: None).run()
    s = annotate([tmp_path / "synth" / "web", tmp_path / "synth" / "textbook"], tmp_path / "ann",
                 AnnotateConfig(quiet=True, shard_size=25))
    assert s["complete"] and s["documents"] == 63 and s["scored"] == 63 and s["written_shards"] == 3
    recs = _records(tmp_path / "ann")
    web = [r for r in recs if r["annotation"]["basis"]["kind"] == "web"]
    assert {r["score"] for r in web} == set(range(6)), "varied web records span the whole scale"
    for r in web:
        b = r["annotation"]["basis"]
        assert r["score"] == procedural_points(b["facts"], b["noise_lines"])
        assert r["text"].count("\n") + 1 == b["facts"] + b["noise_lines"]
    assert all(r["score"] == 5 for r in recs if r["annotation"]["basis"]["kind"] != "web")
    assert annotate([tmp_path / "synth" / "web"], tmp_path / "ann2", AnnotateConfig(quiet=True, limit=5))["documents"] == 5
    again = annotate([tmp_path / "synth" / "web", tmp_path / "synth" / "textbook"], tmp_path / "ann",
                     AnnotateConfig(quiet=True, shard_size=25))  # fmt: skip
    assert again["skipped_shards"] == 3 and again["written_shards"] == 0


def test_web_variation_is_opt_in_and_seeded():
    plain = list(procedural.generate_web_corpus(20, 50, 0))
    assert {len(r["provenance"]["facts"]) for r in plain} == {2} and {r["provenance"]["noise_lines"] for r in plain} == {4}
    cfg = procedural.ProceduralConfig(web_varied=True)
    a, b = (list(procedural.generate_web_corpus(20, 50, 0, cfg=cfg)) for _ in range(2))
    assert a == b and len({len(r["provenance"]["facts"]) for r in a}) > 2
    assert load_recipe(None).content_hash() != load_recipe(None, {"procedural.web_varied": True}).content_hash()


def test_procedural_backend_refuses_records_it_cannot_know(tmp_path):
    p = _corpus(tmp_path / "c.jsonl", ["plain text"])
    with pytest.raises(EffilmError, match=r"c.jsonl:1: the procedural backend scores effilm's procedural"):
        annotate([p], tmp_path / "o", AnnotateConfig(quiet=True))


def test_openai_scores_retries_unscored_and_resumes_from_the_cache(server, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", ["GOOD GOOD GOOD", "nothing", "GARBLE", "GOOD"])
    s = annotate([corpus], tmp_path / "o", _openai(server, score_retries=2))
    assert s["complete"] and (s["scored"], s["unscored"]) == (3, 1)
    assert len(server.log) == 3 + 3, "the unparseable reply is asked three times, each with a new seed"
    recs = _records(tmp_path / "o")
    assert [r["score"] for r in recs] == [3, 0, None, 1]
    bad = recs[2]["annotation"]
    assert bad["unscored"] == "no score in the reply" and bad["attempts"] == 3 and bad["reply"] == "I cannot tell."
    # the document stands between the rubric's markers (requests run concurrently: any order)
    assert sum("<<<\nGOOD GOOD GOOD\n>>>" in e["prompt"] for e in server.log) == 1
    (tmp_path / "o" / "shard-00001.jsonl").unlink()
    again = annotate([corpus], tmp_path / "o", _openai(server, score_retries=2))
    assert again["skipped_shards"] == 1 and again["usage"]["cache_hits"] == 4 and len(server.log) == 6
    assert _records(tmp_path / "o") == recs


def test_openai_budget_stops_and_a_rerun_resumes_and_dry_run_counts(server, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", [f"GOOD {i}" for i in range(6)])
    plan = annotate([corpus], tmp_path / "o", _openai(server, dry_run=True))
    assert plan["requests"] == 6 and plan["documents_to_score"] == 6 and not (tmp_path / "o").exists()
    s = annotate([corpus], tmp_path / "o", _openai(server, budget={"max_requests": 3}))
    assert not s["complete"] and "request cap" in s["stopped"] and s["documents"] == 2
    plan = annotate([corpus], tmp_path / "o", _openai(server, dry_run=True))
    assert (plan["shards_to_write"], plan["requests"], plan["cached"]) == (2, 3, 1)
    s = annotate([corpus], tmp_path / "o", _openai(server))
    assert s["complete"] and s["documents"] == 6 and len(server.log) == 6, "nothing paid twice"


def test_local_backend_and_a_custom_rubric(tmp_path):
    class Teacher:
        def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
            return [f"Rating: {len(p) % 11}" for p in prompts]

    rubric = tmp_path / "r.toml"
    rubric.write_text('name = "len"\nscale_min = 0\nscale_max = 10\nthreshold = 5\n'
                      'score_pattern = "Rating: (\\\\d+)"\nprompt = "Rate {text}"\n')
    corpus = _corpus(tmp_path / "c.jsonl", ["a", "bb", "ccc"])
    s = annotate([corpus], tmp_path / "o", AnnotateConfig(backend="local", rubric=str(rubric), quiet=True),
                 generator=Teacher())
    recs = _records(tmp_path / "o")
    assert s["scored"] == 3 and [r["score"] for r in recs] == [6, 7, 8]
    assert recs[0]["annotation"]["scale"] == [0, 10] and recs[0]["annotation"]["rubric"] == "len"


def test_rubric_parsing_and_errors(tmp_path):
    r = load_rubric()
    assert r.scale == (0, 5) and r.threshold == 3 and "{text}" in r.prompt
    assert r.parse("Reasons...\nScore: 4") == (4, None)
    assert r.parse("score: 2 ... final Score: 3") == (3, None)
    assert r.parse("Score: 7")[1] == "score 7 is outside the scale 0-5"
    assert r.parse("Score: 2.5")[1] == "score 2.5 is not a whole number"
    with pytest.raises(ConfigError, match="threshold=9 is outside the scale 0-5"):
        Rubric(threshold=9)
    bad = tmp_path / "bad.toml"
    bad.write_text('prompt = "no placeholder"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: field 'prompt' must contain \{text\}"):
        load_rubric(bad)


def test_cli_annotate_then_train_then_filter(tmp_path, capsys):
    recipe = load_recipe(None, {"procedural": {"records": 0, "web_records": 300, "quiz": False, "web_varied": True}})
    Run(recipe, tmp_path / "synth", log=lambda m: None).run()
    web = str(tmp_path / "synth" / "web")
    assert main(["annotate", web, "--backend", "procedural", "--out", str(tmp_path / "ann"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == 300
    assert main(["classifier", "train", str(tmp_path / "ann"), "--out", str(tmp_path / "clf")]) == 0
    f1 = float(capsys.readouterr().out.split("F1 ")[1].split()[0])
    assert f1 > 0.8
    assert main(["filter", web, "--out", str(tmp_path / "f"), "--report", str(tmp_path / "r.json"),
                 "--classifier", str(tmp_path / "clf"), "--min-words", "1", "--workers", "2"]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert 0 < rep["summary"]["rejected_classifier"] < 300 and rep["classifier"]["highest"][0]["score"] >= 4
