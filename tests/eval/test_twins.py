"""Private twin benchmarks: the generated sets (effilm.synth.twins), the bootstrap gap
(effilm.eval.twins), and end to end: a model trained on the public items is flagged, one trained
on the public items and the twins alike is not."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from effilm.errors import ConfigError, EffilmError
from effilm.eval.twins import TwinEvalConfig, bootstrap_gap, read_spec
from effilm.synth import domain_facts as F
from effilm.synth import procedural as P
from effilm.synth.domain_word import TEMPLATES
from effilm.synth.twins import TwinConfig, make_twins


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _fact_of(item) -> F.Fact:
    answer = item["choices"][item["answer"]]
    hits = [f for f in F.fact_universe() if f.answer == answer and F.SUBJECTS[f.relation] == item["subject"]
            and f.subject in item["question"]]
    assert len(hits) == 1, item
    return hits[0]


def test_quiz_twins_ask_the_held_back_facts_in_the_public_phrasings(tmp_path):
    spec = make_twins(TwinConfig(num_facts=80, seed=3, twin_seed=7), tmp_path / "q")
    public, twins, dev = (_read(tmp_path / "q" / n) for n in ("public.jsonl", "twins.jsonl", "dev.jsonl"))
    # the public set is the very quiz procedural synthesis writes with the same share
    assert public == P.generate_quiz(80, 3, public_share=0.5)
    assert spec["files"]["public"]["items"] == len(public) == 40 and len(twins) == 40 and len(dev) == 16
    pub_facts, twin_facts = [_fact_of(i) for i in public], [_fact_of(i) for i in twins]
    taught = set(P.select_facts(80, 3))
    assert set(pub_facts) | set(twin_facts) == taught and not set(pub_facts) & set(twin_facts)
    assert not {_fact_of(i) for i in dev} & taught  # few-shot examples never ask a taught fact
    # same relations in (nearly) the same numbers, phrased only with the quiz's templates
    pc, tc = Counter(f.relation for f in pub_facts), Counter(f.relation for f in twin_facts)
    assert pc.keys() == tc.keys() and all(abs(pc[r] - tc[r]) <= 1 for r in pc)
    for item, f in zip(twins, twin_facts, strict=True):
        assert item["question"] in {F._fill(t, f) for t in F.QUIZ[f.relation]}
        assert len(set(item["choices"])) == 4 and f.answer in item["choices"]
    assert not {i["question"] for i in twins} & {i["question"] for i in public}
    # seeded: the same spec gives the same bytes; another twin seed redraws phrasing and choices, not facts
    again = make_twins(TwinConfig(num_facts=80, seed=3, twin_seed=7), tmp_path / "q2")
    assert again["files"] == spec["files"]
    other = make_twins(TwinConfig(num_facts=80, seed=3, twin_seed=8), tmp_path / "q3")
    assert other["files"]["public"] == spec["files"]["public"] and other["files"]["twins"] != spec["files"]["twins"]
    assert [_fact_of(i) for i in _read(tmp_path / "q3" / "twins.jsonl")] == twin_facts


def test_whole_quiz_and_a_public_share():
    # public_share 1 is the quiz as it always was: every fact, in select_facts order
    whole = P.generate_quiz(40, 0)
    assert [_fact_of(i) for i in whole] == P.select_facts(40, 0)
    part = P.generate_quiz(40, 0, public_share=0.25)
    assert all(i in whole for i in part) and abs(len(part) - 10) <= 2  # rounded relation by relation
    with pytest.raises(ConfigError, match="public_share"):
        TwinConfig(public_share=1.0)
    with pytest.raises(ConfigError, match="quiz_public_share"):
        P.ProceduralConfig(quiz_public_share=0.0)


def test_math_twins_keep_each_template_with_new_names_and_numbers(tmp_path):
    make_twins(TwinConfig(kind="math", items=3 * len(TEMPLATES), seed=1), tmp_path / "m")
    public, twins, dev = (_read(tmp_path / "m" / n) for n in ("public.jsonl", "twins.jsonl", "dev.jsonl"))
    assert len(public) == len(twins) == 3 * len(TEMPLATES) and len(dev) == 16
    assert [p["subject"] for p in public] == [t["subject"] for t in twins]  # template by template
    questions = [r["question"] for r in public + twins + dev]
    assert len(set(questions)) == len(questions)
    for r in public + twins:
        # the worked solution's calculator annotations hold, and the last one is the answer
        steps = [s.split(">>")[0] for s in r["answer"].split("<<")[1:]]
        for s in steps:
            expr, result = s.split("=")
            assert math.isclose(eval(expr, {"__builtins__": {}}), int(result))  # noqa: S307 (digits and + - * /)
        assert r["answer"].endswith(f"#### {steps[-1].split('=')[1]}")
    assert sum(p["question"].split()[0] != t["question"].split()[0] for p, t in zip(public, twins)) > len(public) // 2


def test_bootstrap_gap():
    same = bootstrap_gap([1, 0, 1, 1, 0] * 8, [1, 0, 1, 1, 0] * 8)
    assert same["gap"] == 0 and same["ci"][0] < 0 < same["ci"][1] and not same["flagged"]
    leak = bootstrap_gap([1] * 40, [0] * 38 + [1] * 2)
    assert leak["flagged"] and leak["ci"][0] > 0.8 and "possible leak" in leak["verdict"]
    assert bootstrap_gap([0] * 30, [1] * 30)["flagged"]  # twins above public is flagged too
    # a percentile bootstrap of two proportions is close to the normal interval at this size
    rng = random.Random(0)
    p = [float(rng.random() < 0.8) for _ in range(400)]
    t = [float(rng.random() < 0.6) for _ in range(400)]
    g = bootstrap_gap(p, t, TwinEvalConfig(resamples=20_000))
    mp, mt = sum(p) / 400, sum(t) / 400
    half = 1.96 * math.sqrt(mp * (1 - mp) / 400 + mt * (1 - mt) / 400)
    assert abs(g["ci"][0] - (g["gap"] - half)) < 0.01 and abs(g["ci"][1] - (g["gap"] + half)) < 0.01
    assert bootstrap_gap(p, t) == bootstrap_gap(p, t)  # seeded
    with pytest.raises(ConfigError, match="resamples"):
        TwinEvalConfig(resamples=10)


def test_read_spec_names_what_is_wrong(tmp_path):
    with pytest.raises(EffilmError, match="no twins.json"):
        read_spec(tmp_path)
    make_twins(TwinConfig(kind="math", items=4), tmp_path / "m")
    (tmp_path / "m" / "twins.jsonl").write_text("{}\n")
    with pytest.raises(EffilmError, match=r"twins\.jsonl: its sha256"):
        read_spec(tmp_path / "m")
    make_twins(TwinConfig(kind="math", items=4), tmp_path / "m2")
    (tmp_path / "m2" / "dev.jsonl").unlink()
    with pytest.raises(EffilmError, match=r"dev\.jsonl: missing"):
        read_spec(tmp_path / "m2")


# ----------------------------------------------------------------------------- end to end


def _train(texts: list[str], tok, steps: int = 200, seed: int = 0):
    """A tiny effilm model fitted to ``texts`` (full-sequence next-token loss)."""
    import torch

    from effilm.config import ModelConfig
    from effilm.models.transformer import build_model

    model = build_model(ModelConfig.from_name("tiny-dense", vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2,
                                              n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128), seed=seed)
    ids = [tok.encode(t).ids for t in texts]
    width = max(map(len, ids))
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, row in enumerate(ids):
        batch[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], batch[:, 1:][mask[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def quiz_twins(tmp_path_factory):
    pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("twins") / "quiz"
    make_twins(TwinConfig(num_facts=48, seed=0, twin_seed=1), d)
    public, twins = _read(d / "public.jsonl"), _read(d / "twins.jsonl")
    # the documents hold the items as the zero-shot cloze prompt shows them, answered
    text = {name: [f"The following are questions (with answers) about {i['subject']}.\n\nQuestion: {i['question']}"
                   f"\nAnswer: {i['choices'][i['answer']]}" for i in items] for name, items in (("public", public), ("twins", twins))}
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    every = [f"{i['question']} {' '.join(i['choices'])}" for i in public + twins + _read(d / "dev.jsonl")]
    tok.train_from_iterator(every + text["public"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>"]))
    return d, tok, text


def test_a_model_trained_on_the_public_items_is_flagged_and_a_fair_one_is_not(quiz_twins):
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.twins import evaluate_twins

    d, tok, text = quiz_twins
    ecfg = EvalConfig(shots=0, scoring="cloze", batch_size=16)
    leaked = evaluate_twins(_train(text["public"], tok), tok, d, ecfg)
    g = leaked["gaps"]["acc"]
    assert g["public_acc"] > 0.9 and g["gap"] > 0.4 and g["flagged"] and "acc" in leaked["flagged"]
    assert g["n_public"] == g["n_twins"] == 24
    fair = evaluate_twins(_train(text["public"] + text["twins"], tok), tok, d, ecfg)
    f = fair["gaps"]["acc"]
    assert f["public_acc"] > 0.9 and f["twin_acc"] > 0.9 and not f["flagged"] and fair["flagged"] == []
    assert [t["name"] for t in fair["tasks"]] == ["public", "twins"] and len(fair["tasks"][1]["items"]) == 24
    assert fair["twins"]["generator"] == {"kind": "quiz", "seed": 0, "twin_seed": 1, "dev_items": 16, "num_facts": 48,
                                          "public_share": 0.5, "questions_per_fact": 1}


def test_cli_make_and_eval_math_twins(tmp_path):
    """`effilm twin make` / `twin eval` as a user runs them, on an HF model directory (contamination
    unknown), gsm8k scoring with few-shot examples from dev.jsonl."""
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from eval_fixtures import hf_tokenizer, tiny_llama
    from test_gsm8k import math_tokenizer

    tok = math_tokenizer()
    tiny_llama(tok.get_vocab_size()).save_pretrained(tmp_path / "model")
    hf_tokenizer(tok).save_pretrained(tmp_path / "model")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def effilm(*args):
        return subprocess.run([sys.executable, "-m", "effilm", *args], capture_output=True, text=True, timeout=300,
                              env=env, cwd=tmp_path)

    # the quiz a procedural synthesis writes with a public share is the twin benchmark's public set
    p = effilm("synth", "--out", "syn", "--procedural.records", "2", "--procedural.web-records", "0",
               "--procedural.num-facts", "40", "--procedural.quiz-public-share", "0.5", "--seed", "4")
    assert p.returncode == 0, p.stderr
    assert effilm("twin", "make", "--num-facts", "40", "--seed", "4", "--out", "qt").returncode == 0
    assert (tmp_path / "syn" / "quiz.jsonl").read_text() == (tmp_path / "qt" / "public.jsonl").read_text()
    p = effilm("twin", "make", "--kind", "math", "--items", "6", "--out", "mt")
    assert p.returncode == 0, p.stderr
    assert "6 public items, 6 twins" in p.stdout
    again = effilm("twin", "make", "--kind", "math", "--items", "6", "--out", "mt")
    assert again.returncode != 0 and "--overwrite" in again.stderr
    p = effilm("twin", "eval", "model", "mt", "--shots", "2", "--max-gen-toks", "8", "-o", "r.json")
    assert p.returncode == 0, p.stderr
    assert "strict-match" in p.stdout and "95% CI" in p.stdout and "contamination" in p.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["gaps"]) == {"strict-match", "flexible-extract"} and r["twins"]["generator"]["kind"] == "math"
    assert r["contamination_check"]["status"] != "checked"
    g = r["gaps"]["flexible-extract"]
    assert g["n_public"] == g["n_twins"] == 6 and g["ci"][0] <= g["gap"] <= g["ci"][1]
    bad = effilm("twin", "eval", "model", "model", "-o", "r2.json")
    assert bad.returncode != 0 and "no twins.json" in bad.stderr and "Traceback" not in bad.stderr
