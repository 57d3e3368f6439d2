"""Recipes, the sharded runner (procedural), the local backend protocol and the synth CLI."""

from __future__ import annotations

import json

import pytest

from effilm.cli import build_parser, main
from effilm.errors import ConfigError, EffilmError
from effilm.io import sha256_file
from effilm.synth import procedural
from effilm.synth.recipe import load_recipe
from effilm.synth.runner import Run, SynthOptions, read_records


def test_default_recipe_loads_and_maps_onto_dataclasses():
    r = load_recipe()
    assert r.backend == "procedural" and r.procedural.num_facts == 200
    assert {a.id for a in r.audiences} == {"children", "high_school", "college"}
    assert len({a.instruction for a in r.audiences}) == len(r.audiences)
    assert r.sampling.max_tokens == 600 and r.openai.api_key_env == "OPENAI_API_KEY"


@pytest.mark.parametrize("toml,msg", [
    ('seeed = 3', r"r.toml: unknown config key\(s\): 'seeed' \(did you mean 'seed'\?\)"),
    ('[openai]\nconcurency = 3', r"r.toml: unknown openai config key\(s\): 'concurency' \(did you mean 'concurrency'"),
    ('records = "many"', r"r.toml: records='many' should be of type int, not str"),
    ('[sampling]\ntop_p = 2.0', r"sampling.top_p must be in"),
    ('[[audiences]]\nid = "x"', r"needs an 'id' and an 'instruction'"),
    ('records = ', r"r.toml: not a valid recipe"),
])
def test_recipe_errors_name_the_key(tmp_path, toml, msg):
    p = tmp_path / "r.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError, match=msg):
        load_recipe(p)


def test_topics_file_is_read_relative_to_the_recipe(tmp_path):
    (tmp_path / "topics.txt").write_text("tides\n\nvolcanoes\n")
    (tmp_path / "r.toml").write_text('topics = ["gears"]\ntopics_file = "topics.txt"\n')
    assert load_recipe(tmp_path / "r.toml").topics == ["gears", "tides", "volcanoes"]


def _recipe(**kw):
    proc = {"num_facts": 40, "records": 50, "web_records": 30, **kw}
    return load_recipe(None, {"shard_size": 20, "procedural": proc})


def test_procedural_run_shards_manifest_and_matches_the_api(tmp_path):
    out = tmp_path / "out"
    summary = Run(_recipe(), out, log=lambda m: None).run()
    assert summary["complete"] and summary["records"] == {"textbook": 50, "web": 30}
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe_hash"] == _recipe().content_hash()
    shards = m["streams"]["textbook"]["shards"]
    assert sorted(shards) == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    assert [shards[k]["count"] for k in sorted(shards)] == [20, 20, 10]
    for name, e in shards.items():
        assert sha256_file(out / "textbook" / name) == e["sha256"]
    cfg = _recipe().procedural
    api = list(procedural.generate_corpus(50, 40, seed=0, cfg=cfg))
    assert list(read_records(out / "textbook")) == api
    quiz = [json.loads(x) for x in (out / "quiz.jsonl").read_text().splitlines()]
    assert quiz == procedural.generate_quiz(40, 0) and m["quiz"]["count"] == 40


def test_workers_give_identical_output_and_resume_rebuilds_only_damaged_shards(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    Run(_recipe(), one, log=lambda m: None).run()
    Run(_recipe(), two, SynthOptions(workers=2), log=lambda m: None).run()
    for stream in ("textbook", "web"):
        for f in sorted((one / stream).iterdir()):
            assert f.read_bytes() == (two / stream / f.name).read_bytes()
    (two / "textbook" / "shard-00001.jsonl").write_text("torn")
    (two / "web" / "shard-00000.jsonl").unlink()
    s = Run(_recipe(), two, log=lambda m: None).run()
    assert s["written_shards"] == 2 and s["skipped_shards"] == 3
    assert (two / "textbook" / "shard-00001.jsonl").read_bytes() == (one / "textbook" / "shard-00001.jsonl").read_bytes()
    with pytest.raises(EffilmError, match="different recipe"):
        Run(_recipe(facts_share=0.1), two, log=lambda m: None).run()


class EchoGenerator:
    """A stand-in engine meeting the local backend's protocol (not a mock of any client)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        self.calls.append((len(prompts), max_new_tokens, temperature, top_p, seed))
        return [f"Lesson {seed}: " + p.split("\n")[0] for p in prompts]


def test_local_backend_uses_the_generator_protocol(tmp_path):
    recipe = load_recipe(None, {"backend": "local", "records": 5, "local": {"checkpoint": "ckpt", "batch_size": 2}})
    gen = EchoGenerator()
    s = Run(recipe, tmp_path / "o", generator=gen, log=lambda m: None).run()
    assert s["complete"] and [c[0] for c in gen.calls] == [2, 2, 1]
    recs = list(read_records(tmp_path / "o"))
    assert len(recs) == 5 and recs[0]["provenance"]["backend"] == "local"
    assert recs[0]["provenance"]["model"] == "ckpt" and recs[0]["text"].startswith("Lesson ")


def test_local_backend_without_engine_is_a_clear_error(tmp_path, capsys):
    rc = main(["synth", "--backend", "local", "--out", str(tmp_path / "o"), "--limit", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and ("effilm.inference.engine" in err or "checkpoint" in err)
    recipe = tmp_path / "r.toml"
    recipe.write_text('backend = "local"\ntopics = ["x"]\nvocabulary = ["a", "b", "c"]\n'
                      '[[audiences]]\nid = "a"\ninstruction = "A."\n[[styles]]\nid = "s"\ninstruction = "S."\n'
                      '[[kinds]]\nid = "k"\ninstruction = "K {topic}."\n[local]\ncheckpoint = "ckpt"\n')
    assert main(["synth", str(recipe), "--out", str(tmp_path / "o2")]) == 2
    assert "ckpt" in capsys.readouterr().err  # effilm.inference.engine now exists: the missing checkpoint is named


def test_cli_synth_help_and_dry_run(tmp_path, capsys):
    parser = build_parser()
    for cmd in ("synth", "dedup", "filter"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "-h"])
        assert "usage: effilm " + cmd in capsys.readouterr().out
    assert main(["synth", "--out", str(tmp_path / "o"), "--limit", "7", "--dry-run"]) == 0
    assert "records_to_write       28" in capsys.readouterr().out  # textbook, web, chat, preferences
    assert not (tmp_path / "o" / "textbook").exists()
    assert main(["synth", "--out", str(tmp_path / "o"), "--limit", "7", "--seed", "5"]) == 0
    recs = list(read_records(tmp_path / "o" / "textbook"))
    assert len(recs) == 7 and recs[0]["provenance"]["seed"] == 5
