"""Packing, data config validation and the staged, rank-aware, resumable loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from train_fixtures import docs as _docs
from train_fixtures import write_jsonl as _jsonl

from effilm.config.data import DataConfig, SourceConfig, StageConfig, TokenizeConfig, TokenizerTrainConfig
from effilm.config.reader import build
from effilm.data.loader import StagedLoader, block_causal_mask, pack_documents
from effilm.data.shards import TokenDataset, tokenize_files
from effilm.data.tokenizer import train_tokenizer
from effilm.errors import ConfigError, EffilmError

SEQ = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    tok = train_tokenizer([_jsonl(root / "t.jsonl", _docs(100, 0, "t"))], root / "tok",
                          TokenizerTrainConfig(vocab_size=300))
    for i, (name, n) in enumerate({"web": 80, "web-filtered": 50, "synthetic": 40}.items()):
        tokenize_files([_jsonl(root / f"{name}.jsonl", _docs(n, i + 1, name[:3]))], tok, root / name,
                       TokenizeConfig(shard_tokens=400))
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    d = {
        "sources": [{"name": n, "path": str(root / n)} for n in ("web", "web-filtered", "synthetic")],
        "stages": [
            {"name": "stage1", "tokens": 3 * 8 * SEQ, "mixture": {"web": 1.0}},
            {"name": "stage2", "tokens": 5 * 8 * SEQ - 1, "mixture": {"web-filtered": 60, "synthetic": 40}},
        ],
        "seq_len": SEQ, "seed": 7, "doc_ids": True,
    }
    d.update(kw)
    return build(DataConfig, d)


def _all(loader) -> list:
    return [(b.step, b.micro, b.stage, b.tokens.clone(), b.doc_ids.clone(), tuple(b.sources)) for b in loader]


# ---------------------------------------------------------------- packing


def test_pack_documents_rows_and_doc_ids():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12]]
    rows = list(pack_documents(docs, seq_len=4, eos_id=0))
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 11, 0, 12, 0]
    assert [r[0].tolist() for r in rows] == [stream[0:5], stream[5:10], stream[10:15]]
    assert [r[1].tolist() for r in rows] == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert all(r[0].shape == (5,) for r in rows)


def test_block_causal_mask():
    ids = torch.tensor([[0, 0, 1, 1, 1]])
    m = block_causal_mask(ids)[0]
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(m, want.bool())


# ---------------------------------------------------------------- config


def test_config_from_toml_and_validation(root):
    text = f"""
seq_len = 32
seed = 3
[[sources]]
name = "web"
path = "{root / 'web'}"
[[stages]]
name = "s1"
tokens = 1000
mixture = {{ web = 1 }}
"""
    cfg = build(DataConfig, tomllib.loads(text))
    assert cfg.sources[0] == SourceConfig(name="web", path=str(root / "web"))
    assert cfg.stages[0].weights() == {"web": 1.0}
    assert build(DataConfig, json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert StageConfig(name="s", tokens=1, mixture={"a": 60, "b": 40}).weights() == {"a": 0.6, "b": 0.4}
    good = cfg.to_dict()
    bad_cases = [
        ({**good, "seq_lenn": 4}, r"unknown data config key\(s\): 'seq_lenn' \(did you mean 'seq_len'"),
        ({**good, "sources": [{"name": "web", "pth": "x"}]}, r"unknown data.sources\[0\] config key.*did you mean .path."),
        ({**good, "stages": [{"name": "s", "tokens": 5, "mixture": {"wbe": 1}}]}, "unknown source 'wbe'.*'web'"),
        ({**good, "stages": [{"name": "s", "tokens": 5, "mixture": {"web": 0}}]}, "weights must be positive"),
        ({**good, "stages": [{"name": "s", "tokens": 0, "mixture": {"web": 1}}]}, r"tokens=0 must be a positive"),
        ({**good, "sources": good["sources"] * 2}, "duplicate source name"),
        ({**good, "stages": []}, "at least one stage"),
        ({**good, "seq_len": -1}, "data.seq_len"),
    ]
    for d, match in bad_cases:
        with pytest.raises(ConfigError, match=match):
            build(DataConfig, d, "data")


# ---------------------------------------------------------------- loader


def test_schedule_stages_and_mixture(root):
    loader = StagedLoader(_cfg(root), global_batch=8, micro_batch=4)
    assert loader.stage_bounds == [("stage1", 0, 3), ("stage2", 3, 8)]
    assert loader.total_steps == 8 and len(loader) == 16 and loader.stage.name == "stage1"
    batches = list(loader)
    assert len(batches) == 16 and loader.stage.name == "stage2"
    for b in batches:
        assert b.tokens.shape == (4, SEQ + 1) and b.tokens.dtype == torch.int64
        assert b.stage == ("stage1" if b.step < 3 else "stage2")
        allowed = {"web"} if b.step < 3 else {"web-filtered", "synthetic"}
        assert set(b.sources) <= allowed
        assert int(b.tokens.max()) < loader.vocab_size
    # doc ids advance exactly after each EOS inside a row
    for b in batches:
        eos = (b.tokens[:, :-1] == loader.eos_id).int()
        assert torch.equal(b.doc_ids[:, 1:] - b.doc_ids[:, :-1], eos)
        assert torch.all(b.doc_ids[:, 0] == 0)
    big = StagedLoader(_cfg(root, stages=[{"name": "s", "tokens": 400 * 16 * SEQ,
                                            "mixture": {"web-filtered": 60, "synthetic": 40}}]), 16, 16)
    srcs = [s for _, b in zip(range(400), big, strict=False) for s in b.sources]
    assert abs(srcs.count("web-filtered") / len(srcs) - 0.6) < 0.02


def test_deterministic_and_seeded(root):
    a, b = _all(StagedLoader(_cfg(root), 8, 4)), _all(StagedLoader(_cfg(root), 8, 4))
    assert all(torch.equal(x[3], y[3]) and x[5] == y[5] for x, y in zip(a, b, strict=True))
    c = _all(StagedLoader(_cfg(root, seed=8), 8, 4))
    assert not all(torch.equal(x[3], y[3]) for x, y in zip(a, c, strict=True))


def test_epochs_cover_every_document_once_then_reshuffle(root):
    cfg = _cfg(root, stages=[{"name": "s", "tokens": 10**6, "mixture": {"web": 1}}])
    loader = StagedLoader(cfg, 1, 1)
    ds = TokenDataset(root / "web")
    width = SEQ + 1
    n_rows = -(-2 * ds.num_tokens // width) + 1
    stream = torch.cat([next(loader).tokens[0] for _ in range(n_rows)]).numpy()
    epochs = [stream[: ds.num_tokens], stream[ds.num_tokens : 2 * ds.num_tokens]]
    want = sorted(tuple(ds.document(i).tolist()) for i in range(ds.num_documents))
    orders = []
    for ep in epochs:
        cuts = np.flatnonzero(ep == ds.eos_id) + 1
        docs = [tuple(x.tolist()) for x in np.split(ep, cuts)[:-1]]
        assert sorted(docs) == want  # nothing lost, nothing repeated within an epoch
        orders.append(docs)
    assert orders[0] != orders[1]
    assert orders[0] != [tuple(ds.document(i).tolist()) for i in range(ds.num_documents)]


@pytest.mark.parametrize("world, micro", [(2, 4), (2, 1), (4, 2)])
def test_ranks_split_the_global_batch(root, world, micro):
    ref = _all(StagedLoader(_cfg(root), 8, 4))
    ref_rows = {}
    for step, _, _, tok, ids, _ in ref:
        ref_rows.setdefault(step, []).append((tok, ids))
    ranks = [_all(StagedLoader(_cfg(root), 8, micro, rank=r, world_size=world)) for r in range(world)]
    for step, parts in ref_rows.items():
        want = torch.cat([p[0] for p in parts])
        got = torch.cat([b[3] for r in ranks for b in r if b[0] == step])
        assert torch.equal(got, want)
        got_ids = torch.cat([b[4] for r in ranks for b in r if b[0] == step])
        assert torch.equal(got_ids, torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("stop", [1, 5, 6, 11])
def test_resume_is_bitwise_identical(root, stop):
    full = _all(StagedLoader(_cfg(root), 8, 4))
    first = StagedLoader(_cfg(root), 8, 4)
    head = [next(first) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = StagedLoader(_cfg(root), 8, 4)
    resumed.load_state_dict(state)
    assert resumed.stage.name == first.stage.name and len(resumed) == len(full) - stop
    rest = _all(resumed)
    assert len(head) + len(rest) == len(full)
    for got, want in zip([(b.step, b.micro, b.tokens) for b in head] + [(x[0], x[1], x[3]) for x in rest],
                         full, strict=True):
        assert got[:2] == want[:2] and torch.equal(got[2], want[3])


def test_resume_at_step_boundary_on_another_world_size(root):
    full = _all(StagedLoader(_cfg(root), 8, 4))
    first = StagedLoader(_cfg(root), 8, 4)
    for _ in range(4):  # two whole steps
        next(first)
    state = first.state_dict()
    parts = []
    for r in range(2):
        lo = StagedLoader(_cfg(root), 8, 2, rank=r, world_size=2)
        lo.load_state_dict(state)
        parts.append(_all(lo))
    for step in range(2, 8):
        want = torch.cat([x[3] for x in full if x[0] == step])
        got = torch.cat([x[3] for p in parts for x in p if x[0] == step])
        assert torch.equal(got, want)
    mid = StagedLoader(_cfg(root), 8, 4)
    next(mid)
    other = StagedLoader(_cfg(root), 8, 2, rank=0, world_size=2)
    with pytest.raises(EffilmError, match="saved mid-step"):
        other.load_state_dict(mid.state_dict())
    with pytest.raises(EffilmError, match="different data setup.*seed"):
        StagedLoader(_cfg(root, seed=99), 8, 4).load_state_dict(state)


def test_validation_split_is_held_out(root):
    srcs = [{"name": "web", "path": str(root / "web"), "val_sequences": 6},
            {"name": "synthetic", "path": str(root / "synthetic")}]
    stages = [{"name": "s", "tokens": 10**6, "mixture": {"web": 1}}]
    loader = StagedLoader(_cfg(root, sources=srcs, stages=stages), 4, 4)
    val = loader.validation_batches(micro_batch=4)
    assert list(val) == ["web"]
    rows = torch.cat([b.tokens for b in val["web"]])
    assert rows.shape == (6, SEQ + 1)
    again = StagedLoader(_cfg(root, sources=srcs, stages=stages), 4, 4).validation_batches(4)
    assert torch.equal(torch.cat([b.tokens for b in again["web"]]), rows)
    ds = loader.datasets["web"]
    train = set(loader.streams["web"].docs.tolist())
    held = set(range(ds.num_documents)) - train
    assert held and len(train) + len(held) == ds.num_documents
    held_text = {tuple(ds.document(i).tolist()) for i in held}
    train_stream = torch.cat([next(loader).tokens.flatten() for _ in range(30)]).numpy()
    cuts = np.flatnonzero(train_stream == ds.eos_id) + 1
    seen = {tuple(x.tolist()) for x in np.split(train_stream, cuts)[1:-1]}
    assert seen and not (seen & held_text)
    shares = [StagedLoader(_cfg(root, sources=srcs, stages=stages), 4, 2, rank=r, world_size=2)
              .validation_batches(2)["web"] for r in range(2)]
    assert torch.equal(torch.cat([b.tokens for s in shares for b in s]), rows)
    too_many = [{**srcs[0], "val_sequences": 10**5}, srcs[1]]
    with pytest.raises(EffilmError, match="val_sequences=100000 needs"):
        StagedLoader(_cfg(root, sources=too_many, stages=stages), 4, 4)


def test_bad_input_fails_before_start(root, tmp_path):
    srcs = [{"name": "web", "path": str(tmp_path / "missing")}]
    with pytest.raises(EffilmError, match="data source 'web': token dataset not found"):
        StagedLoader(_cfg(root, sources=srcs, stages=[{"name": "s", "tokens": 9, "mixture": {"web": 1}}]), 1, 1)
    import shutil

    shutil.copytree(root / "synthetic", tmp_path / "syn")
    shard = tmp_path / "syn" / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0xFF
    shard.write_bytes(bytes(raw))
    srcs = [{"name": "synthetic", "path": str(tmp_path / "syn")}]
    cfg = _cfg(root, sources=srcs, stages=[{"name": "s", "tokens": 9, "mixture": {"synthetic": 1}}])
    with pytest.raises(EffilmError, match=r"data source 'synthetic': shard .*shard_00000.bin: sha256"):
        StagedLoader(cfg, 1, 1)
    loader = StagedLoader(_cfg(root), 8, 4)
    StagedLoader(_cfg(root), 8, 4, model_vocab_size=loader.vocab_size)
    with pytest.raises(EffilmError, match=f"{loader.vocab_size}-token vocabulary but the model's vocab_size is 256"):
        StagedLoader(_cfg(root), 8, 4, model_vocab_size=256)
    with pytest.raises(EffilmError, match="global_batch=6 must split"):
        StagedLoader(_cfg(root), 6, 4)
    with pytest.raises(EffilmError, match="rank=2"):
        StagedLoader(_cfg(root), 8, 4, rank=2, world_size=2)


def test_sources_must_share_a_tokenizer(root, tmp_path):
    tok2 = train_tokenizer([_jsonl(tmp_path / "t.jsonl", _docs(50, 9, "z"))], tmp_path / "tok2",
                           TokenizerTrainConfig(vocab_size=290))
    tokenize_files([_jsonl(tmp_path / "o.jsonl", _docs(20, 3, "o"))], tok2, tmp_path / "other")
    srcs = [{"name": "web", "path": str(root / "web")}, {"name": "other", "path": str(tmp_path / "other")}]
    cfg = _cfg(root, sources=srcs, stages=[{"name": "s", "tokens": 9, "mixture": {"web": 1, "other": 1}}])
    with pytest.raises(EffilmError, match="different tokenizers"):
        StagedLoader(cfg, 1, 1)
