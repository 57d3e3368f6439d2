"""Scoring agrees with lm-eval's MMLU method; batch-size invariance; reports; perplexity."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import harness_reference as ref  # noqa: E402
from eval_fixtures import hf_tokenizer, make_mmlu_dir, tiny_llama, train_tokenizer  # noqa: E402

from effilm.eval.report import aggregate, format_table, mean_stderr, run_evaluation  # noqa: E402
from effilm.eval.scorers import BatchScorer, Group  # noqa: E402
from effilm.eval.scoring import EvalConfig, TokenizerAdapter, encode_pair, score_task  # noqa: E402
from effilm.eval.tasks import load_task  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and stall on a shared machine)
    root = tmp_path_factory.mktemp("mmlu")
    tests, devs = make_mmlu_dir(root, n_test=8)
    tok = train_tokenizer()
    model = tiny_llama(tok.get_vocab_size())
    yield {"root": root, "tests": tests, "devs": devs, "tok": tok, "hf_tok": hf_tokenizer(tok), "model": model}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_agrees_with_harness_method(setup, shots, scoring):
    task = load_task(f"mmlu:{setup['root']}")
    cfg = EvalConfig(shots=shots, scoring=scoring, batch_size=4)
    ours = score_task(setup["model"], setup["tok"], task, cfg)
    theirs = ref.evaluate(setup["model"], setup["hf_tok"], setup["tests"], setup["devs"], shots, cloze=scoring == "cloze")
    assert len(ours) == len(theirs) == 16
    for o, t in zip(ours, theirs, strict=True):
        assert o["loglikelihoods"] == pytest.approx(t["lls"], abs=1e-4)
        assert float(o["correct"]) == t["acc"]
        if scoring == "cloze":
            assert float(o["correct_norm"]) == t["acc_norm"]
    # the choices are really told apart, so agreement in accuracy means something
    assert any(max(o["loglikelihoods"]) - min(o["loglikelihoods"]) > 0.1 for o in ours)


def test_hf_and_tokenizers_adapters_agree(setup):
    a, b = TokenizerAdapter(setup["tok"]), TokenizerAdapter(setup["hf_tok"])
    text = "The following are multiple choice questions about energy.\nAnswer: B"
    assert a.encode(text) == b.encode(text) and a.encode(text)
    assert a.special_id("bos", "eos") == b.special_id("bos", "eos") == setup["tok"].token_to_id("</s>")


def test_encode_pair_moves_trailing_space(setup):
    tok = TokenizerAdapter(setup["tok"])
    ctx, cont = encode_pair(tok, "Answer: ", "B")
    ctx2, cont2 = encode_pair(tok, "Answer:", " B")
    assert (ctx, cont) == (ctx2, cont2)
    assert tok.encode("Answer:") == ctx


def test_batch_size_invariance(setup):
    task = load_task(f"mmlu:{setup['root']}")
    for scoring in ("letter", "cloze"):
        runs = [score_task(setup["model"], setup["tok"], task, EvalConfig(shots=1, scoring=scoring, batch_size=bs))
                for bs in (1, 8)]
        for a, b in zip(*runs, strict=True):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5, rel=0)
            assert a["prediction"] == b["prediction"]


def test_multi_token_labels_are_summed(setup):
    """A continuation of several tokens: the sum over its tokens, from the right positions."""
    model, tok = setup["model"], TokenizerAdapter(setup["tok"])
    ctx = tok.encode("energy mass force")
    cont = tok.encode(" light wave atom")
    assert len(cont) > 1
    got = BatchScorer(model, batch_size=2, max_length=64).score([Group(ctx, [cont, cont[:1]])])[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], -1)
    want = sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
    assert got[0] == pytest.approx(want, abs=1e-5)
    assert got[1] == pytest.approx(float(lp[len(ctx) - 1, cont[0]]), abs=1e-5)


def test_truncates_from_the_left_like_harness(setup):
    model, tok = setup["model"], TokenizerAdapter(setup["tok"])
    ctx = tok.encode("energy mass force light wave atom field charge heat motion " * 3)
    cont = tok.encode(" god temple")
    got = BatchScorer(model, max_length=8).score([Group(ctx, [cont])])[0][0]
    inp = (ctx + cont)[-9:][:-1]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([inp])).logits[0], -1)
    want = sum(float(lp[len(inp) - len(cont) + k, t]) for k, t in enumerate(cont))
    assert got == pytest.approx(want, abs=1e-5)


def test_report_manifest_and_table(setup, tmp_path):
    task = load_task(f"mmlu:{setup['root']}")
    cfg = EvalConfig(shots=1, scoring="cloze")
    rep = run_evaluation(setup["model"], setup["tok"], [task], cfg)
    m = rep["manifest"]
    assert len(m["weights_sha256"]) == 64 and len(m["config_sha256"]) == 64
    assert m["seed"] == cfg.seed and m["prompt_format"]["scoring"] == "cloze"
    t = rep["tasks"][0]
    assert t["data_sha256"] == task.data_hash()
    items = t["items"]
    assert all(len(r["loglikelihoods"]) == 4 and len(r["prompt_hash"]) == 16 for r in items)
    assert t["overall"]["acc"]["micro"] == pytest.approx(sum(r["correct"] for r in items) / len(items))
    assert set(t["subjects"]) == {"high_school_physics", "world_religions"}
    table = format_table(rep)
    assert "OVERALL (micro)" in table and "OVERALL (macro)" in table and "acc_norm" in table
    # a changed weight changes the manifest's hash
    with torch.no_grad():
        setup["model"].lm_head.weight[0, 0] += 1.0
    try:
        assert run_evaluation(setup["model"], setup["tok"], [task], cfg)["manifest"]["weights_sha256"] != m["weights_sha256"]
    finally:
        with torch.no_grad():
            setup["model"].lm_head.weight[0, 0] -= 1.0


def test_micro_and_macro_differ_when_subjects_are_unbalanced():
    recs = [{"subject": "a", "correct": True}] * 3 + [{"subject": "b", "correct": False}]
    o = aggregate(recs, ("acc",))["overall"]["acc"]
    assert o["micro"] == pytest.approx(0.75) and o["macro"] == pytest.approx(0.5)
    assert mean_stderr([1.0, 0.0]) == pytest.approx(0.5)


def test_perplexity_matches_direct_computation(setup, tmp_path):
    text = "energy mass force light wave atom field charge heat motion god temple " * 8
    f = tmp_path / "held.txt"
    f.write_text(text)
    task = load_task(f"ppl:{f}")
    model, tok = setup["model"], TokenizerAdapter(setup["tok"])
    ids = [tok.special_id("eos")] + tok.encode(text)
    for max_len in (16, 1024):  # several windows, then one
        p = run_evaluation(model, setup["tok"], [task], EvalConfig(max_length=max_len))["tasks"][0]["perplexity"]
        nll = 0.0
        with torch.no_grad():
            for s in range(1, len(ids), max_len):
                e = min(s + max_len, len(ids))
                lp = torch.log_softmax(model(torch.tensor([ids[s - 1 : e - 1]])).logits[0], -1)
                nll -= sum(float(lp[k, ids[s + k]]) for k in range(e - s))
        assert p["tokens"] == len(ids) - 1 and p["bytes"] == len(text.encode())
        assert p["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
        assert p["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_cli_eval_with_corpus_report(setup, tmp_path, capsys):
    from effilm.cli import main
    from effilm.eval.decontam_scan import find_contamination

    model_dir = tmp_path / "model"
    setup["model"].save_pretrained(model_dir)
    setup["tok"].save(str(model_dir / "tokenizer.json"))
    spec = f"mmlu:{setup['root']},name=mini"
    leaked = setup["tests"][2]
    leak = {"text": leaked["question"] + " " + leaked["choices"][leaked["answer"]]}
    (tmp_path / "corpus.jsonl").write_text(json.dumps(leak) + "\n")
    from effilm.eval.decontam import DecontamConfig
    from effilm.io import atomic_write_json

    rep = find_contamination([spec], [tmp_path / "corpus.jsonl"], DecontamConfig(n=5))
    atomic_write_json(tmp_path / "contam.json", rep)
    out = tmp_path / "r.json"
    rc = main(["eval", str(model_dir), "--task", spec, "--shots", "1", "--output", str(out),
               "--corpus-report", str(tmp_path / "contam.json")])
    assert rc == 0
    report = json.loads(out.read_text())
    t = report["tasks"][0]
    assert t["contamination"]["contaminated_ids"] == ["high_school_physics/2"]
    # the CLI path (tokenizer.json + saved model) gives the API's scores
    api = score_task(setup["model"], setup["tok"], load_task(spec), EvalConfig(shots=1))
    flat = [v for r in t["items"] for v in r["loglikelihoods"]]
    assert flat == pytest.approx([v for r in api for v in r["loglikelihoods"]], abs=1e-5)
    printed = capsys.readouterr().out
    assert "OVERALL (micro)" in printed and "contamination: 1/16 items" in printed
    assert main(["eval", str(tmp_path), "--task", spec, "--output", str(out)]) == 2  # no tokenizer.json
    assert "no tokenizer.json" in capsys.readouterr().err


def test_single_item_subject_has_no_stderr_and_table_still_prints():
    recs = [{"subject": "a", "correct": True, "id": "a/0"}, {"subject": "b", "correct": False, "id": "b/0"},
            {"subject": "b", "correct": True, "id": "b/1"}]
    agg = aggregate(recs, ("acc",))
    assert agg["subjects"]["a"]["acc_stderr"] is None and agg["overall"]["acc"]["macro_stderr"] is None
    table = format_table({"tasks": [{"name": "t", **agg}]})
    assert "n/a" in table and json.dumps(agg, allow_nan=False)


class PlainModel(torch.nn.Module):
    """Only ``model(input_ids).logits``: the contract effilm models satisfy, no logits_to_keep."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids)


def test_logits_to_keep_path_equals_full_logits(setup):
    task = load_task(f"mmlu:{setup['root']}")
    for scoring in ("letter", "cloze"):
        cfg = EvalConfig(shots=1, scoring=scoring)
        full_scorer = BatchScorer(PlainModel(setup["model"]), cfg.batch_size, 1024)
        assert full_scorer.keep_arg is None and BatchScorer(setup["model"]).keep_arg == "logits_to_keep"
        a = score_task(setup["model"], setup["tok"], task, cfg)
        b = score_task(setup["model"], setup["tok"], task, cfg, scorer=full_scorer)
        flat_a = [v for r in a for v in r["loglikelihoods"]]
        assert flat_a == pytest.approx([v for r in b for v in r["loglikelihoods"]], abs=1e-5)


def test_shots_and_max_length_beyond_what_exists_are_refused_before_scoring(setup, tmp_path, capsys):
    from effilm.cli import main

    model_dir = tmp_path / "model"
    setup["model"].save_pretrained(model_dir)
    setup["tok"].save(str(model_dir / "tokenizer.json"))
    spec = f"mmlu:{setup['root']},name=mini"  # 5 dev examples per subject
    out = tmp_path / "r.json"
    assert main(["eval", str(model_dir), "--task", spec, "--shots", "6", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "only 5 dev examples for subject" in err and "--shots 6" in err and "use --shots 5" in err
    positions = setup["model"].config.max_position_embeddings
    assert main(["eval", str(model_dir), "--task", spec, "--max-length", str(positions + 1), "--output", str(out)]) == 2
    assert f"max_length={positions + 1} exceeds the model's {positions} positions" in capsys.readouterr().err
    assert not out.exists()  # nothing written, nothing scored
    assert main(["eval", str(model_dir), "--task", spec, "--shots", "5", "--max-length", str(positions),
                 "--output", str(out)]) == 0  # fmt: skip


def test_empty_questions_are_skipped_and_reported(tmp_path):
    rows = [{"question": "   ", "choices": ["a", "b", "c", "d"], "answer": 0},
            {"question": "Real?", "choices": ["a", "b", "c", "d"], "answer": 1}]  # fmt: skip
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f"jsonl:{tmp_path / 'q.jsonl'}")
    assert [it.question for it in task.items] == ["Real?"]
    assert task.skipped == [{"source": f"{tmp_path / 'q.jsonl'}:1", "reason": "empty question"}]
    (tmp_path / "s_test.csv").write_text(",1,2,3,4,A\nReal?,1,2,3,4,B\n")
    task = load_task(f"csv:{tmp_path / 's_test.csv'}")
    assert len(task.items) == 1 and task.skipped[0]["reason"] == "empty question"
