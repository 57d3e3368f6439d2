"""KV-cache scoring of effilm models, effilm tokenizers, strided perplexity and the effilm loader."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from eval_fixtures import make_mmlu_dir, train_tokenizer  # noqa: E402

from effilm.config.model import ModelConfig  # noqa: E402
from effilm.eval.scorers import CachedScorer  # noqa: E402
from effilm.eval.scoring import (  # noqa: E402
    BatchScorer,
    EvalConfig,
    Group,
    TokenizerAdapter,
    make_scorer,
    perplexity,
    score_task,
)
from effilm.eval.tasks import load_task  # noqa: E402
from effilm.models.transformer import build_model  # noqa: E402

SMALL = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=1024, tie_embeddings=False)
PRESETS = {
    "tiny-dense": {},
    "tiny-moe": {"moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 64}},
    "tiny-arctic": {"ffn_dim": 64, "residual_ffn_dim": 64, "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 64}},
}


def effilm_model(preset: str, vocab: int, **kw):
    over = {**SMALL, **PRESETS[preset], "vocab_size": vocab, **kw}
    if "moe" in over:
        base = ModelConfig.from_name(preset).to_dict()["moe"]
        over["moe"] = {**base, **over["moe"]}
    model = build_model(ModelConfig.from_name(preset, **over), seed=0).eval()
    with torch.no_grad():  # larger logits so that the choices are told apart
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mmlu")
    make_mmlu_dir(root, n_test=4)
    tok = train_tokenizer()
    yield {"root": root, "tok": tok, "vocab": tok.get_vocab_size()}
    torch.set_num_threads(threads)


def flat(records):
    return [v for r in records for v in r["loglikelihoods"]]


@pytest.mark.parametrize("preset,scoring", [(p, "cloze") for p in PRESETS] + [("tiny-dense", "letter")])
def test_cached_equals_uncached(setup, preset, scoring):
    model = effilm_model(preset, setup["vocab"])
    task = load_task(f"mmlu:{setup['root']}")
    cfg = EvalConfig(shots=2, scoring=scoring, batch_size=4)
    cached = make_scorer(model, cfg)
    assert isinstance(cached, CachedScorer)
    a = score_task(model, setup["tok"], task, cfg, scorer=cached)
    b = score_task(model, setup["tok"], task, EvalConfig(shots=2, scoring=scoring, batch_size=4, use_kv_cache=False))
    assert cached.cached_groups == len(task.items)  # every question really went through the cache
    # questions after the first of each subject reuse the description + few-shot prefix
    assert cached.shared_tokens > (len(task.items) - 2) * 30
    assert flat(a) == pytest.approx(flat(b), abs=1e-5, rel=0)
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert max(max(r["loglikelihoods"]) - min(r["loglikelihoods"]) for r in a) > 0.1


def test_cached_batch_size_and_prefix_sharing_invariance(setup):
    model = effilm_model("tiny-dense", setup["vocab"])
    task = load_task(f"mmlu:{setup['root']}")
    for scoring in ("letter", "cloze"):
        runs = [score_task(model, setup["tok"], task, EvalConfig(shots=1, scoring=scoring, batch_size=bs,
                                                                  min_shared_prefix=share))
                for bs, share in ((1, 16), (8, 16), (8, 0))]
        assert flat(runs[0]) == pytest.approx(flat(runs[1]), abs=1e-5, rel=0)
        assert flat(runs[0]) == pytest.approx(flat(runs[2]), abs=1e-5, rel=0)


def test_cache_equals_direct_forward_and_falls_back_when_truncating(setup):
    model = effilm_model("tiny-dense", setup["vocab"])
    tok = TokenizerAdapter(setup["tok"])
    ctx = tok.encode("energy mass force light wave atom")
    conts = [tok.encode(" god temple prayer"), tok.encode(" heat"), tok.encode(" field charge")]
    scorer = CachedScorer(model, max_length=64)
    got = scorer.score([Group(ctx, conts)])[0]
    assert scorer.cached_groups == 1
    with torch.no_grad():
        for c, v in zip(conts, got, strict=True):
            lp = torch.log_softmax(model(torch.tensor([ctx + c])).logits[0], -1)
            assert v == pytest.approx(sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(c)), abs=1e-5)
    # past the context length the uncached path truncates from the left; the cached scorer defers to it
    short = CachedScorer(model, max_length=10)
    want = BatchScorer(model, max_length=10).score([Group(ctx, conts)])[0]
    assert short.score([Group(ctx, conts)])[0] == pytest.approx(want, abs=1e-6)
    assert short.cached_groups == 0


def test_sliding_window_model_through_the_cache(setup):
    model = effilm_model("tiny-dense", setup["vocab"], sliding_window=4)
    tok = TokenizerAdapter(setup["tok"])
    g = Group(tok.encode("energy mass force light wave atom"), [tok.encode(" god temple prayer"), tok.encode(" heat")])
    a = CachedScorer(model, max_length=64).score([g])
    b = BatchScorer(model, max_length=64).score([g])
    assert a[0] == pytest.approx(b[0], abs=1e-5)


def test_effilm_tokenizer_adapter(setup, tmp_path):
    from effilm.data.tokenizer import load_tokenizer

    setup["tok"].save(str(tmp_path / "tokenizer.json"))
    eff = load_tokenizer(tmp_path)
    a, b = TokenizerAdapter(eff), TokenizerAdapter(setup["tok"])
    text = "Question: which energy?\nAnswer: light wave"
    assert a.encode(text) == b.encode(text) and a.encode(text)
    assert a.special_id("bos", "eos") == eff.eos_id == setup["tok"].token_to_id("</s>")
    assert TokenizerAdapter(a).effilm is eff


def test_strided_perplexity_matches_direct_computation(setup):
    model = effilm_model("tiny-dense", setup["vocab"])
    text = "energy mass force light wave atom field charge heat motion god temple " * 4
    tok = TokenizerAdapter(setup["tok"])
    ids = [tok.special_id("eos")] + tok.encode(text)
    max_len, stride = 16, 5
    p = perplexity(model, setup["tok"], [text], EvalConfig(max_length=max_len, ppl_stride=stride, batch_size=3))
    nll, start, end = 0.0, 1, 1 + max_len
    with torch.no_grad():
        while start < len(ids):
            lo = max(0, end - 1 - max_len)
            lp = torch.log_softmax(model(torch.tensor([ids[lo : end - 1]])).logits[0], -1)
            nll -= sum(float(lp[t - 1 - lo, ids[t]]) for t in range(start, end))
            start, end = end, min(end + stride, len(ids))
    assert p["tokens"] == len(ids) - 1 and p["stride"] == stride and p["windows"] > len(ids) // max_len
    assert p["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
    # no padding effects: windows of different lengths batched together give the same numbers
    one_by_one = perplexity(model, setup["tok"], [text], EvalConfig(max_length=max_len, ppl_stride=stride, batch_size=1))
    assert one_by_one["nll"] == pytest.approx(p["nll"], abs=1e-4)
    disjoint = perplexity(model, setup["tok"], [text], EvalConfig(max_length=max_len))
    assert disjoint["windows"] < p["windows"] and disjoint["tokens"] == p["tokens"]


def test_cli_ppl_on_an_effilm_checkpoint(setup, tmp_path, capsys):
    from effilm.cli import main
    from effilm.formats.checkpoint import save

    model = effilm_model("tiny-dense", setup["vocab"])
    save(model, tmp_path / "ckpt")
    setup["tok"].save(str(tmp_path / "ckpt" / "tokenizer.json"))
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"text": t}) for t in ["energy mass force light", "god temple faith"]))
    out = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "ckpt"), "--task", f"ppl:{held}", "--output", str(out)]) == 0
    p = json.loads(out.read_text())["tasks"][0]["perplexity"]
    api = perplexity(model, setup["tok"], ["energy mass force light", "god temple faith"], EvalConfig())
    assert p["bits_per_byte"] == pytest.approx(api["bits_per_byte"], rel=1e-6)
    assert f"bits/byte {p['bits_per_byte']:.4f}" in capsys.readouterr().out


def test_cli_unsupported_architecture_is_one_clear_line(setup, tmp_path, capsys):
    from effilm.cli import main

    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    setup["tok"].save(str(d / "tokenizer.json"))
    held = tmp_path / "held.txt"
    held.write_text("energy mass force\n")
    assert main(["eval", str(d), "--task", f"ppl:{held}", "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "not supported" in err and "Traceback" not in err
