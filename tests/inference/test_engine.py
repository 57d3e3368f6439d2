"""The generation engine: batching, masking, stopping, sampling, HF parity, the CLI and the synth backend."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import add_tokenizer, assert_steps_match_forward, make_tokenizer, tiny

import effilm
from effilm.cli import build_parser, main
from effilm.data.tokenizer import load_tokenizer
from effilm.errors import ConfigError, EffilmError
from effilm.inference.engine import Engine, SamplingParams
from effilm.inference.sampling import LogitsPipeline

PROMPTS = ["the cat sat", "river stone bright garden number seven equals", "a", "blue house tree"]
# untied embeddings and a wide init, so a random model does not just repeat its last prompt token
LIVELY = dict(tie_embeddings=False, init_std=0.08)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def dense_engine(tok):
    return Engine(tiny("tiny-dense", **LIVELY), tok)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir):
    d = effilm.save(tiny("tiny-dense", **LIVELY), tmp_path_factory.mktemp("ckpt") / "tiny-ckpt")
    return add_tokenizer(d, tok_dir)


# ----- parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", -0.5), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", 0.0), ("seed", "x"), ("stop", ("",)), ("max_new_tokens", 2.5), ("temperature", "hot"),
])  # fmt: skip
def test_sampling_params_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalise():
    p = SamplingParams(stop="END", temperature=1)
    assert p.stop == ("END",) and isinstance(p.temperature, float) and not p.greedy


# ----- batching ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-arctic"])
def test_batched_greedy_equals_one_at_a_time(name, tok):
    engine = Engine(tiny(name, **LIVELY), tok)
    params = SamplingParams(max_new_tokens=16)
    batched = engine.generate(PROMPTS, params)
    alone = [engine.generate([p], params)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.prompt_tokens for c in batched] == [len(tok.encode(p)) for p in PROMPTS]
    assert len({tuple(c.token_ids) for c in batched}) == len(PROMPTS)  # not a degenerate model
    for c in batched:  # 16 tokens, or fewer ending in an end-of-text / end-of-turn token
        assert (c.finish_reason, len(c.token_ids)) == ("length", 16) or (
            c.finish_reason == "stop" and c.token_ids[-1] in engine.eos_ids and len(c.token_ids) <= 16)


@pytest.mark.parametrize("name, over", [
    ("tiny-dense", {}), ("tiny-moe", {}), ("tiny-arctic", {}), ("tiny-openelm", {}),
    ("tiny-dense", {"sliding_window": 6}), ("tiny-dense", {"head_dim": 32, "rope_partial_factor": 0.5}),
])  # fmt: skip
def test_fast_steps_equal_the_model_forward(name, over):
    """effilm.inference.decode's inference steps against Transformer.forward: same logits, same tokens."""

    model = tiny(name, **LIVELY, **over)
    fast, plain = Engine(model, None), Engine(model, None, fast=False)
    assert fast.fast and not plain.fast
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33]]
    params = SamplingParams(max_new_tokens=12)
    assert [c.token_ids for c in fast.generate(prompts, params)] == [c.token_ids for c in plain.generate(prompts, params)]
    assert_steps_match_forward(model, prompts[0])


def test_unknown_modules_fall_back_to_the_model_forward():
    model = tiny("tiny-dense")
    model.layers[0].mlp = torch.nn.Sequential(model.layers[0].mlp)  # e.g. a wrapped or quantized module
    assert not Engine(model, None).fast


def test_left_padding_is_masked(dense_engine):
    """The engine's output is the model's own greedy continuation, computed with no padding at all."""
    model = dense_engine.model
    ids = dense_engine.encode(PROMPTS[0])
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    got = dense_engine.generate(PROMPTS, SamplingParams(max_new_tokens=8))[0]  # padded: PROMPTS[1] is longer
    assert got.token_ids == seq[len(ids):]


def test_each_sequence_stops_on_its_own(dense_engine):
    limits = (3, 9, 1, 5)
    free = dense_engine.generate(PROMPTS, SamplingParams(max_new_tokens=9))
    out = dense_engine.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in limits])
    for n, f, c in zip(limits, free, out):
        assert c.token_ids == f.token_ids[:n]
        assert c.finish_reason == ("length" if len(c.token_ids) == n else "stop")
    assert [len(c.token_ids) for c in out[::2]] == [3, 1]


@pytest.mark.parametrize("fast", [True, False])
def test_finished_rows_are_dropped_without_changing_outputs(tok, fast):
    engine = Engine(tiny("tiny-moe", **LIVELY), tok, fast=fast)
    sizes = []
    decode = engine._decode
    engine._decode = lambda tokens, *a: sizes.append(tokens.shape[0]) or decode(tokens, *a)
    params = [SamplingParams(max_new_tokens=n, temperature=t, seed=s, repetition_penalty=r)
              for n, t, s, r in ((2, 0.0, None, 1.0), (9, 0.9, 1, 1.3), (1, 0.0, None, 1.0), (6, 0.7, 2, 1.0))]
    compacted = engine.generate(PROMPTS, params)
    assert min(sizes) < len(PROMPTS)  # the batch did shrink
    engine.compact_below, sizes[:] = 0.0, []
    kept = engine.generate(PROMPTS, params)
    assert set(sizes) == {len(PROMPTS)}
    assert [c.token_ids for c in compacted] == [c.token_ids for c in kept]
    assert [len(c.token_ids) for c in kept][::2] == [2, 1]


def test_eos_stops_a_sequence(tok):
    model = tiny("tiny-dense", **LIVELY)
    free = Engine(model, tok).generate(PROMPTS[:2], SamplingParams(max_new_tokens=12))
    eos = free[0].token_ids[4]
    assert eos not in free[0].token_ids[:4]
    out = Engine(model, tok, eos_ids=[eos]).generate(PROMPTS[:2], SamplingParams(max_new_tokens=12))
    assert out[0].finish_reason == "stop" and out[0].token_ids == free[0].token_ids[:5]
    assert out[0].text == tok.decode(free[0].token_ids[:4], skip_special_tokens=True)
    n = free[1].token_ids.index(eos) + 1 if eos in free[1].token_ids else 12
    assert out[1].token_ids == free[1].token_ids[:n]


def test_stop_strings_and_streaming(dense_engine):
    full = dense_engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=24))[0]
    text = full.text
    cut = next(i for i in range(6, len(text) - 3) if text[i:i + 3].strip() and text.find(text[i:i + 3]) == i)
    stop = text[cut:cut + 3]
    params = SamplingParams(max_new_tokens=24, stop=("zzzz-never", stop))
    out = dense_engine.generate([PROMPTS[3]], params)[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    events = list(dense_engine.stream([PROMPTS[3]], params))
    assert "".join(e.text for e in events) == text[:cut]
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])
    assert all(stop not in e.text for e in events)
    assert [e.token_id for e in events] == out.token_ids


def test_incremental_detokenisation_holds_back_partial_characters_and_stop_prefixes(tok):
    from effilm.inference.engine import _Detok

    text = "the café sat on 日本 mat ünïcode END tail"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 2  # multi-byte characters are split over several tokens
    d, pieces, hit = _Detok(tok, ("END",)), [], False
    for t in ids:
        piece, hit = d.push(t)
        pieces.append(piece)
        assert "\ufffd" not in piece and "E" not in piece  # "E", "EN" could start "END": held back
        if hit:
            break
    assert hit and "".join(pieces) == "the café sat on 日本 mat ünïcode "
    d = _Detok(tok, ())
    assert "".join(d.push(t)[0] for t in ids) + d.flush() == text


def test_stream_cancellation_frees_one_sequence(dense_engine):
    seen = {i: 0 for i in range(3)}

    def cancelled(i):
        seen[i] += 1
        return i == 1 and seen[i] >= 3

    events = list(dense_engine.stream(PROMPTS[:3], SamplingParams(max_new_tokens=10), cancelled=cancelled))
    last = {e.index: e for e in events if e.finish_reason}
    assert last[1].finish_reason == "cancelled" and last[0].finish_reason == last[2].finish_reason == "length"
    assert sum(1 for e in events if e.index == 1 and e.token_id is not None) == 3
    assert sum(1 for e in events if e.index == 0 and e.token_id is not None) == 10


def test_stream_does_not_leak_inference_mode_and_can_be_abandoned(dense_engine):
    stream = dense_engine.stream(PROMPTS[:2], SamplingParams(max_new_tokens=20))
    next(stream)
    assert not torch.is_inference_mode_enabled()
    x = torch.ones(2, requires_grad=True)
    assert (x * 2).sum().requires_grad  # autograd still works for the caller between events
    stream.close()  # a client that goes away mid-stream
    assert not torch.is_inference_mode_enabled()
    assert dense_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))[0].finish_reason == "length"


def test_bad_input_is_a_clear_error(dense_engine):
    with pytest.raises(EffilmError, match="context window is 512"):
        dense_engine.stream([[5] * 512], SamplingParams())  # raised before iteration
    with pytest.raises(EffilmError, match="prompt 1 is empty"):
        dense_engine.generate(["x", ""])
    with pytest.raises(EffilmError, match="outside the vocabulary"):
        dense_engine.generate([[1, 999]])
    with pytest.raises(EffilmError, match="non-empty list"):
        dense_engine.generate("a string, not a list")
    with pytest.raises(EffilmError, match="list of 2"):
        dense_engine.generate(["a", "b"], [SamplingParams()] * 3)
    out = dense_engine.generate([[5] * 509], SamplingParams(max_new_tokens=50))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"  # capped by the context window


# ----- sampling ------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_batched_or_not(dense_engine):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=3)
    a = dense_engine.generate(PROMPTS, p)
    b = dense_engine.generate(PROMPTS, p)
    alone = [dense_engine.generate([x], p)[0] for x in PROMPTS]
    assert [c.token_ids for c in a] == [c.token_ids for c in b] == [c.token_ids for c in alone]
    other = dense_engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=4))
    assert [c.token_ids for c in other] != [c.token_ids for c in a]
    greedy = dense_engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    assert [c.token_ids for c in a] != [c.token_ids for c in greedy]
    # top_k=1 and a tiny top_p both reduce sampling to greedy
    for p in (SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1, seed=1),
              SamplingParams(max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=1)):
        assert [c.token_ids for c in dense_engine.generate(PROMPTS, p)] == [c.token_ids for c in greedy]


def test_logits_pipeline_matches_transformers_processors():
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    V, seen = 50, [[3, 7, 7, 11], [0, 49]]
    logits = torch.randn(2, V) * 3
    ids = torch.tensor([seen[0], seen[1] + [0, 0]])
    for kw in (dict(repetition_penalty=1.7), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6),
               dict(temperature=0.9, top_k=10, top_p=0.8, repetition_penalty=0.8)):
        params = SamplingParams(**kw)
        pipe = LogitsPipeline([params] * 2, V, "cpu", seen)
        ref = logits.clone()
        if params.repetition_penalty != 1.0:
            ref = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, ref)
        if not params.greedy:
            ref = TemperatureLogitsWarper(params.temperature)(ids, ref)
            if params.top_k:
                ref = TopKLogitsWarper(params.top_k)(ids, ref)
            if params.top_p < 1:
                ref = TopPLogitsWarper(params.top_p)(ids, ref)
        got = pipe.process(logits)
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), kw
        finite = ~torch.isinf(ref)
        torch.testing.assert_close(got[finite], ref[finite])


# ----- parity with transformers --------------------------------------------------------------
@pytest.mark.parametrize("name, arch", [("tiny-dense", "LlamaForCausalLM"), ("tiny-moe", "MixtralForCausalLM")])
def test_greedy_equals_transformers_generate(name, arch, tmp_path, tok_dir, tok):
    transformers = pytest.importorskip("transformers")
    model = tiny(name, **LIVELY, n_layers=2)
    effilm.save_hf(model, tmp_path / "hf")
    add_tokenizer(tmp_path / "hf", tok_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    engine = Engine.load(tmp_path / "hf")  # the HF directory, through effilm's HF loader
    assert engine.name == "hf"
    params = SamplingParams(max_new_tokens=20)
    for prompt, got in zip(PROMPTS, engine.generate(PROMPTS, params)):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                              eos_token_id=sorted(engine.eos_ids), pad_token_id=tok.pad_id)
        assert got.token_ids == ref[0, ids.shape[1]:].tolist(), prompt


# ----- chat, API, CLI ------------------------------------------------------------------------
def test_chat_prompt_matches_transformers_template(dense_engine, tok_dir, tmp_path):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat"}]
    ref = AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert dense_engine.chat_prompt(messages) == dense_engine.encode(ref)
    with pytest.raises(EffilmError, match=r"messages\[0\]"):
        dense_engine.chat_prompt([{"role": "user"}])
    bare = Engine(dense_engine.model, load_tokenizer(make_tokenizer(tmp_path, chat_template=False)))
    with pytest.raises(EffilmError, match="no chat template"):
        bare.chat_prompt(messages)


def test_python_api(model_dir):
    one = effilm.generate(model_dir, "the cat", max_new_tokens=6)
    many = effilm.generate(model_dir, ["the cat", "a"], max_new_tokens=6)
    assert one.token_ids == many[0].token_ids and len(one.token_ids) == 6
    with pytest.raises(ConfigError, match="temperature"):
        effilm.generate(model_dir, "x", temperature=-1)


def test_cli_generate_streams_the_completion(model_dir, capsys):
    expected = Engine.load(model_dir).generate(["the cat"], SamplingParams(max_new_tokens=7))[0].text
    assert main(["generate", str(model_dir), "--prompt", "the cat", "--max-new-tokens", "7"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    rc = main(["generate", str(model_dir), "--prompt", "the cat", "--chat", "--max-new-tokens", "3",
               "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--repetition-penalty", "1.1",
               "--seed", "1", "--stop", "x", "y"])
    assert rc == 0


@pytest.mark.parametrize("args, msg", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "2"], "top_p must be in"),
    (["--prompt-file-missing"], None),
])  # fmt: skip
def test_cli_generate_bad_params(model_dir, args, msg, capsys):
    if msg is None:
        with pytest.raises(SystemExit):
            main(["generate", str(model_dir), "--prompt", "x", *args])
        return
    assert main(["generate", str(model_dir), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_generate_bad_model_and_prompt(model_dir, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    effilm.save(tiny("tiny-dense"), tmp_path / "no-tok")
    assert main(["generate", str(tmp_path / "no-tok"), "--prompt", "x"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "the cat sat " * 300]) == 2
    assert "context window is 512" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "-h"])
    assert "--repetition-penalty" in capsys.readouterr().out


# ----- the synth local backend ---------------------------------------------------------------
def test_synth_local_backend_end_to_end(tmp_path, tok_dir):
    from effilm.synth.recipe import load_recipe
    from effilm.synth.runner import Run, read_records

    ckpt = add_tokenizer(effilm.save(tiny("tiny-dense", max_seq_len=2048, **LIVELY), tmp_path / "ckpt"), tok_dir)
    sampling = {"max_tokens": 5, "temperature": 0.8, "top_p": 0.9}
    over = {"backend": "local", "records": 3, "sampling": sampling, "local": {"checkpoint": str(ckpt), "batch_size": 2}}
    recipe = load_recipe(None, over)
    s = Run(recipe, tmp_path / "out", log=lambda m: None).run()
    recs = list(read_records(tmp_path / "out"))
    assert s["complete"] and len(recs) == 3
    assert all(r["provenance"]["backend"] == "local" and r["provenance"]["model"] == str(ckpt) for r in recs)
    assert all(isinstance(r["text"], str) and r["text"] for r in recs)
    again = Run(load_recipe(None, over), tmp_path / "out2", log=lambda m: None).run()
    assert again["complete"] and [r["text"] for r in read_records(tmp_path / "out2")] == [r["text"] for r in recs]


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-arctic"])
def test_cpu_layout_keeps_values_ties_and_tokens(name, tmp_path):
    """The engine's in-place CPU layout changes strides only: same values, same parameters (a tied
    head stays tied), same tokens as an engine on an untouched copy, and a checkpoint still saves."""
    import copy

    from effilm.formats.checkpoint import save
    from effilm.formats.load import load
    from effilm.inference.decode import use_cpu_layout

    model = tiny(name, init_std=0.08)
    untouched = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    engine = Engine(model, None)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        if p.dim() == 2 and "embed" not in n and "norm" not in n:
            assert p.t().is_contiguous() and not p.is_contiguous(), n
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed.weight
    assert use_cpu_layout(model) == 0  # already laid out
    plain = Engine(untouched, None, cpu_layout=False)
    assert all(p.is_contiguous() for p in untouched.parameters())
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
    params_ = SamplingParams(max_new_tokens=10)
    assert [c.token_ids for c in engine.generate(prompts, params_)] == [c.token_ids for c in plain.generate(prompts, params_)]
    save(model, tmp_path / "ckpt")
    for n, p in load(tmp_path / "ckpt").named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-arctic"])
def test_fast_steps_run_int8_models(name):
    """An int8 (per-channel) quantized model takes the fast steps too (the chosen experts' codes are
    read directly) and gives the tokens and logits of its own Transformer.forward."""
    from effilm.config.quant import QuantConfig
    from effilm.quant.quantize import quantize_model

    model, _ = quantize_model(tiny(name, **LIVELY), QuantConfig(bits=8))
    # the exact kernel: a parity check of the steps' arithmetic (tests/quant/test_kernels.py checks "fast")
    fast, plain = Engine(model, None, quant_kernel="exact"), Engine(model, None, fast=False, quant_kernel="exact")
    assert fast.fast
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
    params = SamplingParams(max_new_tokens=10)
    assert [c.token_ids for c in fast.generate(prompts, params)] == [c.token_ids for c in plain.generate(prompts, params)]
    assert_steps_match_forward(model, prompts[0], (3, 4), tol=1e-4, check_prefill=False)


# ----- shared prompt prefixes ----------------------------------------------------------------
PREFIX = "the cat sat on a mat while river stone bright garden number seven equals sum of two and five "
SUFFIXES = ["apple", "water light story lesson small large", "red", "blue green house tree fast slow", "a"]


def _spy_shared(engine):
    """Record, per decode step, whether the step attended to a shared prefix."""
    seen = []
    decode = engine._decode

    def spy(tokens, cache, positions, mask, plan=None, shared=None):
        seen.append(shared is not None)
        return decode(tokens, cache, positions, mask, plan, shared)

    engine._decode = spy
    return seen


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-arctic", "tiny-openelm"])
def test_shared_prefix_gives_the_tokens_of_a_whole_prefill(name, tok):
    """A prefix common to the batch runs once, and decode steps attend to it once for all rows;
    with padding (suffixes of different lengths), stop strings, per-row limits (rows finishing at
    different times, the batch compacted) the tokens and texts are those of an engine that shares
    nothing."""
    model = tiny(name, **LIVELY)
    prompts = [PREFIX + s for s in SUFFIXES]
    ids = [tok.encode(p) for p in prompts]
    n = min(len(i) for i in ids)
    shared = next(k for k in range(n) if len({tuple(i[:k + 1]) for i in ids}) > 1)
    assert shared >= 16 and len({len(i) for i in ids}) > 2  # a long common prefix, padded rows
    plain = Engine(model, tok, share_prefix=False)
    free = plain.generate(prompts, SamplingParams(max_new_tokens=16))
    text = free[1].text
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip())
    params = [SamplingParams(max_new_tokens=m, stop=("zzzz-never", stop)) for m in (16, 16, 3, 9, 12)]
    sharing = Engine(model, tok)
    used = _spy_shared(sharing)
    plain.prefilled_tokens = 0
    want, got = plain.generate(prompts, params), sharing.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [(c.text, c.finish_reason) for c in got] == [(c.text, c.finish_reason) for c in want]
    assert got[1].finish_reason == "stop" and len(got[1].token_ids) < 16  # the stop string cut row 1
    assert len({len(c.token_ids) for c in got}) > 2  # rows finished at different steps
    P = max(len(i) for i in ids)
    # only real tokens run (no padding): a row's slots after the shared prefix, or its whole prompt
    assert plain.prefilled_tokens == sum(len(i) for i in ids)
    assert sharing.prefilled_tokens == shared + sum(min(len(i), P - shared) for i in ids)
    assert used and all(used)  # every decode step attended to the prefix once


def test_shared_prefix_on_the_model_forward_and_with_sliding_windows(tok):
    prompts = [PREFIX + s for s in SUFFIXES[:4]]
    params = SamplingParams(max_new_tokens=10)
    for over, cascade in (({}, False), ({"sliding_window": 6}, False), ({"sliding_window": 400}, True)):
        model = tiny("tiny-dense", **LIVELY, **over)
        for fast in (False, True):
            want = Engine(model, tok, fast=fast, share_prefix=False).generate(prompts, params)
            engine = Engine(model, tok, fast=fast)
            used = _spy_shared(engine)
            assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in want], (over, fast)
            # the forward path and windows that could cut into the prefix share the prefill only
            assert all(used) == (fast and (cascade or not over)), (over, fast)


def test_prefix_cache_reuses_the_last_prompt_across_calls(tok):
    """``prefix_cache``: one-prompt calls and later batches reuse the kept prompt's keys and values
    (only what follows the common part runs), with the tokens of an engine that keeps nothing."""
    model = tiny("tiny-dense", **LIVELY)
    prompts = [PREFIX + s for s in SUFFIXES]
    params = SamplingParams(max_new_tokens=8)
    plain = Engine(model, tok, share_prefix=False)
    want = [plain.generate([p], params)[0].token_ids for p in prompts]
    cached = Engine(model, tok, prefix_cache=True)
    runs = []
    for p in prompts:
        before = cached.prefilled_tokens
        runs.append(cached.generate([p], params)[0].token_ids)
        runs_prefill = cached.prefilled_tokens - before
        assert runs_prefill < len(tok.encode(p)) or len(runs) == 1, p  # only the first call runs it all
    assert runs == want
    shared = len(tok.encode(PREFIX)) - 1
    cached.prefilled_tokens = 0
    got = cached.generate_batches(prompts, params, batch_size=2)
    assert [c.token_ids for c in got] == want
    lens = [len(tok.encode(p)) for p in prompts]
    assert cached.prefilled_tokens == sum(min(lens[i], max(lens[j] for j in b) - shared)
                                          for b in ([1, 3], [0, 2]) for i in b) + (lens[4] - shared)
    cached.clear_prefix_cache()
    cached.prefilled_tokens = 0
    assert cached.generate([prompts[0]], params)[0].token_ids == want[0]
    assert cached.prefilled_tokens == len(tok.encode(prompts[0]))
    assert not Engine(model, tok)._prefix  # off by default: nothing is kept


def test_longrope_shares_prefixes_only_within_its_original_context(tok):
    model = tiny("tiny-dense", **LIVELY, rope_type="longrope", rope_original_max_seq_len=16,
                 rope_short_factor=[1.1] * 16, rope_long_factor=[4.0] * 16)
    params = SamplingParams(max_new_tokens=6)
    for prompts in ([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 13]],  # within 16 positions: shared
                    [list(range(5, 25)), list(range(5, 22)) + [30]]):  # past them: the frequencies change
        engine, plain = Engine(model, None), Engine(model, None, share_prefix=False)
        engine.shared_min = 4
        assert [c.token_ids for c in engine.generate(prompts, params)] == \
            [c.token_ids for c in plain.generate(prompts, params)]
        assert (engine.prefilled_tokens < plain.prefilled_tokens) == (len(prompts[0]) <= 16)


def test_generate_batches_keeps_prompt_order_and_per_row_params(dense_engine):
    prompts = [PREFIX + s for s in SUFFIXES] + ["a"]
    params = [SamplingParams(max_new_tokens=6 + i, temperature=0.8 if i % 2 else 0.0, seed=i) for i in range(6)]
    alone = [dense_engine.generate([p], [q])[0] for p, q in zip(prompts, params)]
    got = dense_engine.generate_batches(prompts, params, batch_size=4)  # longest first: rows regrouped
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert [c.prompt_tokens for c in got] == [len(dense_engine.encode(p)) for p in prompts]
    with pytest.raises(EffilmError, match="batch_size"):
        dense_engine.generate_batches(prompts, params[0], batch_size=0)
    with pytest.raises(EffilmError, match="list of 6"):
        dense_engine.generate_batches(prompts, params[:2])


def test_projections_on_onednn_equal_the_plain_products():
    """The larger fp32 products of several rows run on oneDNN (the rest on MKL): the values of
    F.linear / addmm up to float rounding, with or without a bias and the fused residual add."""
    from effilm.inference import decode

    if decode.onednn_linear() is None:
        pytest.skip("this PyTorch build has no oneDNN linear")
    torch.manual_seed(0)
    for bias in (False, True):
        lin = torch.nn.Linear(256, 512, bias=bias)
        proj = decode._Proj(lin)
        assert proj.dnn is not None and proj.dnn_rows == max(decode.ONEDNN_MIN_ROWS, decode.ONEDNN_MIN_MACS // (256 * 512))
        for rows in (1, proj.dnn_rows - 1, proj.dnn_rows, proj.dnn_rows + 7):
            x, res = torch.randn(rows, 256), torch.randn(rows, 512)
            with torch.inference_mode():
                torch.testing.assert_close(proj(x), lin(x), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(proj.add_to(res, x), res + lin(x), atol=1e-5, rtol=1e-5)
    assert decode._Proj(torch.nn.Linear(8, 8).to(torch.bfloat16)).dnn is None  # fp32 only


@pytest.mark.parametrize("name, over", [("tiny-dense", {}), ("tiny-moe", {}), ("tiny-dense", {"sliding_window": 5})])
def test_prefill_continues_from_the_cache_length(name, over):
    """decode.prefill after k cached positions (the engine's shared prefix) gives the logits and
    cache of one whole prefill, left-padded rows included."""
    from effilm.inference.decode import prefill

    model = tiny(name, **LIVELY, **over)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 14), generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, :2] = mask[2, :5] = False  # rows 1 and 2 left-padded
    pos = (mask[:, :14].long().cumsum(1) - 1).clamp(min=0)
    whole, parts = model.new_cache(3, 20), model.new_cache(3, 20)
    with torch.inference_mode():
        ref = prefill(model, ids, whole, pos, mask)
        prefill(model, ids[:, :8], parts, pos[:, :8], mask)
        got = prefill(model, ids[:, 8:], parts, pos[:, 8:], mask)
        forward = model(ids, positions=pos, attention_mask=mask[:, :14]).logits[:, -1]
    assert parts.length == whole.length == 14
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, forward, atol=1e-5, rtol=1e-5)
    real = mask[:, None, :14]  # padding slots hold keys no real query reads
    for a, b in zip(parts.k + parts.v, whole.k + whole.v):
        torch.testing.assert_close(a[:, :, :14][real.expand(-1, a.shape[1], -1)],
                                   b[:, :, :14][real.expand(-1, b.shape[1], -1)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, over", [("tiny-dense", {}), ("tiny-moe", {}), ("tiny-arctic", {}),
                                        ("tiny-dense", {"sliding_window": 5})])
def test_packed_prefill_skips_the_padding(name, over):
    """decode.prefill_packed runs a left-padded batch's real tokens only (packed, each row attending
    to its own slots), from slot 0 or after cached slots: the logits and real cache slots of the
    padded prefill."""
    from effilm.inference.decode import prefill, prefill_packed

    model = tiny(name, **LIVELY, **over)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 14), generator=g)
    first = [0, 2, 11]  # row 2 has three real tokens, all after slot 8
    mask = torch.zeros(3, 20, dtype=torch.bool)
    for b, f in enumerate(first):
        mask[b, f:14] = True
    pos = (mask[:, :14].long().cumsum(1) - 1).clamp(min=0)
    real = mask[:, None, :14]
    with torch.inference_mode():
        whole = model.new_cache(3, 20)
        ref = prefill(model, ids, whole, pos, mask)
        for split in (0, 8):  # 8: slots [0, 8) cached first (the engine's shared prefix), rows 0, 1 continue
            packed = model.new_cache(3, 20)
            if split:
                prefill(model, ids[:, :split], packed, pos[:, :split], mask)
            got = prefill_packed(model, ids[:, split:], packed, first)
            assert packed.length == 14
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(packed.k + packed.v, whole.k + whole.v):
                sel = real.expand(-1, a.shape[1], -1)
                torch.testing.assert_close(a[:, :, :14][sel], b[:, :, :14][sel], atol=1e-5, rtol=1e-5)


def test_decode_attention_as_bmm_equals_sdpa():
    """A fp32 CPU decode step attends with bmm (``_attend_rows``): the logits of the
    scaled_dot_product_attention path, with padding and with a sliding window."""
    from effilm.inference.decode import DecodePlan, decode_step, prefill

    for over in ({}, {"sliding_window": 6}):
        model = tiny("tiny-dense", **LIVELY, **over)
        ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(2, 14, dtype=torch.bool)
        mask[1, :3] = False
        pos = (mask[:, :9].long().cumsum(1) - 1).clamp(min=0)
        out = {}
        for bmm in (True, False):
            plan = DecodePlan(model)
            assert plan.bmm_attention
            plan.bmm_attention = bmm
            cache = model.new_cache(2, 14)
            with torch.inference_mode():
                prefill(model, ids, cache, pos, mask, plan)
                out[bmm] = [decode_step(model, torch.tensor([5 + s, 7 + s]), cache, pos[:, -1:] + 1 + s, mask, plan)
                            for s in range(4)]
        for a, b in zip(out[True], out[False]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_weights_and_the_kept_plan(tok):
    """On the CPU the engine's plan holds oneDNN's blocked copies of the fp32 linear weights (the
    products of the plain weights, bit for bit) and is kept across calls until a weight changes."""
    from effilm.inference import decode

    if decode.onednn_linear() is None:
        pytest.skip("this PyTorch build has no oneDNN linear")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512)
    plain, packed = decode._Proj(lin), decode._Proj(lin, pack=True)
    assert packed.dnn_w is not lin.weight and packed.dnn_rows <= plain.dnn_rows
    for rows in (packed.dnn_rows, 8, 33):
        x, res = torch.randn(rows, 256), torch.randn(rows, 512)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(packed.add_to(res, x), res + lin(x), atol=1e-5, rtol=1e-5)
            if rows >= plain.dnn_rows:
                assert torch.equal(packed(x), plain(x))
    model = tiny("tiny-dense", **LIVELY)
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=6)
    first = engine.generate(PROMPTS, params)
    plan = engine._plan_cache
    assert plan is not None and plan.packed
    assert [c.token_ids for c in Engine(model, tok, fast=False).generate(PROMPTS, params)] == \
        [c.token_ids for c in first]
    engine.generate(PROMPTS[:2], params)
    assert engine._plan_cache is plan  # the same weights: the plan is kept
    with torch.no_grad():
        model.layers[0].mlp.down.weight.mul_(3.0)  # an in-place change bumps the version
    changed = engine.generate(PROMPTS, params)
    assert engine._plan_cache is not plan
    assert [c.token_ids for c in changed] == [c.token_ids for c in Engine(model, tok, fast=False).generate(PROMPTS, params)]
    engine.pack_bytes = 0
    engine.clear_prefix_cache()
    engine.generate(PROMPTS[:1], params)
    assert not engine._plan_cache.packed
