"""GGUF export: read-back of every tensor, RoPE permutation, tokenizer metadata, errors, CLI, llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effilm.config.data import TokenizerTrainConfig
from effilm.config.model import ModelConfig, MoEConfig
from effilm.data.tokenizer import train_tokenizer
from effilm.errors import EffilmError
from effilm.formats.checkpoint import save
from effilm.formats.gguf import export_gguf, gguf_tensors, permute_rotary, verify_gguf
from effilm.models.transformer import apply_rotary, build_model

gguf = pytest.importorskip("gguf")

SMALL = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
SMALL_MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=64)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def small(kind: str, **kw):
    over = dict(SMALL, **kw)
    if kind == "moe":
        over.update(layer_pattern="M", moe=SMALL_MOE)
    elif kind == "arctic":
        # llama.cpp's arctic graph assumes heads x head_dim == hidden size (true of the real Arctic)
        over.update(layer_pattern="H", ffn_dim=64, residual_ffn_dim=64, moe=SMALL_MOE,
                    head_dim=SMALL["d_model"] // SMALL["n_heads"])
    return build_model(ModelConfig.from_name("tiny-dense", **over), seed=0).eval()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    lines = [f"the quick brown fox {i} jumps over the lazy dog; hello world {i * 7}" for i in range(200)]
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return train_tokenizer([d / "text.jsonl"], d / "tok", TokenizerTrainConfig(vocab_size=300))


@pytest.mark.parametrize(
    "kind,qtype",
    [("dense", "f32"), ("dense", "f16"), ("dense", "q8_0"), ("dense", "q4_0"), ("moe", "q8_0"), ("moe", "q4_0"), ("arctic", "f16")],
)
def test_export_reads_back_every_tensor(tmp_path, tok_dir, kind, qtype):
    model = small(kind)
    path = export_gguf(model, tmp_path / "m.gguf", qtype, tok_dir)
    result = verify_gguf(path, model, qtype)
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert result["tensors"] == len(names) == len(gguf_tensors(model))
    assert result["arch"] == ("arctic" if kind == "arctic" else "llama")
    if kind != "dense":
        assert "blk.0.ffn_gate_exps.weight" in names and "blk.1.ffn_down_exps.weight" in names
    if kind == "arctic":
        assert "blk.0.ffn_norm_exps.weight" in names and "blk.0.ffn_gate.weight" in names
    reader = gguf.GGUFReader(str(path))
    t = {x.name: x for x in reader.tensors}
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    expected_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[qtype]
    assert t["blk.0.attn_q.weight"].tensor_type.name == expected_type
    if qtype != "f32":  # the verifier really compares values: a corrupted file fails
        assert path.stat().st_size < export_gguf(model, tmp_path / "f32.gguf", "f32", tok_dir).stat().st_size


def test_verifier_catches_a_wrong_value(tmp_path, tok_dir):
    model = small("dense")
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tok_dir)
    with torch.no_grad():
        model.layers[1].attn.o.weight[3, 5] += 0.5
    with pytest.raises(EffilmError, match="blk.1.attn_output.weight"):
        verify_gguf(path, model, "f32")


def test_metadata_and_tokenizer(tmp_path, tok_dir):
    model = small("moe")
    path = export_gguf(model, tmp_path / "m.gguf", "f16", tok_dir)
    f = gguf.GGUFReader(str(path)).fields
    val = lambda k: f[k].contents()  # noqa: E731
    assert val("general.architecture") == "llama"
    assert val("llama.expert_count") == 4 and val("llama.expert_used_count") == 2
    assert val("llama.block_count") == 2 and val("llama.embedding_length") == 64
    assert val("llama.attention.head_count_kv") == 2 and val("llama.feed_forward_length") == 64
    assert val("tokenizer.ggml.model") == "gpt2"
    tokens, types = val("tokenizer.ggml.tokens"), val("tokenizer.ggml.token_type")
    from effilm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    assert len(tokens) == len(types) == 320  # padded to the model's vocab
    assert tokens[tok.eos_id] == "<|endoftext|>" and types[tok.eos_id] == gguf.TokenType.CONTROL
    assert tokens[-1] == "[PAD319]" and types[-1] == gguf.TokenType.UNUSED
    assert val("tokenizer.ggml.eos_token_id") == tok.eos_id
    merges = val("tokenizer.ggml.merges")
    assert len(merges) > 0 and all(len(m.split(" ")) == 2 for m in merges[:20])


def _rope_interleaved(x, cos, sin):
    """llama.cpp's 'normal' RoPE: rotate adjacent pairs (2i, 2i+1) by angle i."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., : x.shape[-1] // 2], sin[..., : x.shape[-1] // 2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


def test_rotary_permutation_gives_the_same_attention_scores():
    model = small("dense")
    hd, H = model.cfg.head_dim, model.cfg.n_heads
    w_q = model.layers[0].attn.qkv.weight[: H * hd].detach()
    x = torch.randn(5, model.cfg.d_model)
    pos = torch.arange(5)[None]
    cos, sin = model.rotary(pos, torch.float32)
    q = (x @ w_q.T).view(5, H, hd).transpose(0, 1)[None]  # [1, H, T, hd]
    ours = apply_rotary(q, cos, sin)
    wp = torch.from_numpy(permute_rotary(w_q.numpy(), H))
    qp = (x @ wp.T).view(5, H, hd).transpose(0, 1)[None]
    theirs = _rope_interleaved(qp, cos[:, None], sin[:, None])
    # the same per-head vectors up to the fixed pair-interleaving permutation, so q.k is unchanged
    perm = torch.arange(hd).view(2, hd // 2).T.reshape(-1)
    torch.testing.assert_close(theirs, ours[..., perm])
    scores = lambda a: a @ a.transpose(-1, -2)  # noqa: E731
    torch.testing.assert_close(scores(theirs), scores(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "over,match",
    [(dict(norm="layernorm"), "RMSNorm"), (dict(qk_norm=True), "qk_norm"), (dict(attn_bias=True), "attn_bias"),
     (dict(sliding_window=16), "sliding_window"), (dict(layer_pattern="DM", moe=SMALL_MOE), "mixed"),
     (dict(layer_pattern="H", ffn_dim=64, residual_ffn_dim=64, moe=SMALL_MOE, head_dim=32), "head_dim != d_model")],
)  # fmt: skip
def test_unsupported_models_fail_clearly(tmp_path, over, match):
    model = small("dense", **over)
    with pytest.raises(EffilmError, match=match):
        export_gguf(model, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_window_as_long_as_the_context_exports(tmp_path):
    """A sliding window that never masks anything (>= the context) is no obstacle to the export."""
    ctx = small("dense").cfg.max_seq_len
    assert export_gguf(small("dense", sliding_window=ctx), tmp_path / "w.gguf", "f32").is_file()
    with pytest.raises(EffilmError, match="shorter than the context"):
        export_gguf(small("dense", sliding_window=ctx - 1), tmp_path / "x.gguf", "f32")


def test_cli_convert_to_gguf(tmp_path, tok_dir, capsys):
    import shutil

    from effilm.cli import main

    model = small("dense")
    save(model, tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "x.gguf"), "--to", "gguf", "--type", "q8_0"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "ckpt" / "tokenizer.json")
    rc = main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "x.gguf"), "--to", "gguf", "--type", "q8_0"])
    assert rc == 0 and "verified" in capsys.readouterr().out
    assert gguf.GGUFReader(str(tmp_path / "x.gguf")).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def _effilm_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("kind", ["dense", "moe", "arctic"])
def test_llama_cpp_greedy_matches_effilm(tmp_path, tok_dir, kind):
    """The real consumer: llama.cpp (llama-cpp-python) loads the f32 export and decodes greedily."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = small(kind, init_std=0.1)  # a sharper random model, so arg-max ties do not decide the test
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tok_dir)
    # f32 KV cache (llama.cpp keeps it in f16 by default), so the f32 export is compared at f32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    prompt = [5, 17, 42, 99, 3, 250]
    llm.eval(prompt)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(prompt)]), ref, rtol=1e-3, atol=1e-3)
    ours = _effilm_greedy(model, prompt, 12)
    theirs = []
    for _ in range(12):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(nxt)
        llm.eval([nxt])
    assert theirs == ours


def test_a_phi3_name_is_written_so_llama_cpp_loads_it(tmp_path, tok_dir):
    """llama.cpp treats a general.name containing "phi3"/"phi-3" as Phi-3's own vocabulary and then
    fails on a byte-level BPE one; the export writes such names with "phi_3"."""
    path = export_gguf(small("dense"), tmp_path / "p.gguf", "f32", tok_dir, name="Phi3-mini-textbook")
    field = gguf.GGUFReader(str(path)).fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == "Phi_3-mini-textbook"
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_threads=1, verbose=False)
    llm.eval([5, 17, 42])
    assert llm.n_tokens == 3
