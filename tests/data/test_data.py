"""Reading documents, tokenizing into shards, the manifest and opening a dataset safely."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from effilm.cli import main
from effilm.config.data import TokenizeConfig, TokenizerTrainConfig
from effilm.data.inputs import expand_inputs, iter_file, iter_records
from effilm.data.shards import TokenDataset, tokenize_files
from effilm.data.tokenizer import load_tokenizer, train_tokenizer
from effilm.errors import EffilmError

WORDS = "alpha beta gamma delta river stone tree cloud fox dog cat mat quick brown lazy".split()


def make_docs(n: int, seed: int, tag: str) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{tag}{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({field: d, "id": 1}) + "\n")
    return path


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datatok")
    src = write_jsonl(root / "train.jsonl", make_docs(200, 0, "doc"))
    return train_tokenizer([src], root / "tok", TokenizerTrainConfig(vocab_size=320))


def test_iter_file_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl.gz", ["one", "two"])
    (tmp_path / "b.txt").write_text("first para\nstill first\n\n\n second\n\nthird\n")
    pq.write_table(pa.table({"content": ["p1", None, "p3"]}), tmp_path / "c.parquet")
    jsonl = list(iter_file(tmp_path / "a.jsonl.gz"))
    assert [d.text for d in jsonl] == ["one", "two"] and jsonl[1].record["text"] == "two"
    docs = list(iter_file(tmp_path / "b.txt"))
    assert [d.text for d in docs] == ["first para\nstill first", " second", "third"]
    assert docs[1].where.endswith("b.txt:5") and docs[1].record is None
    whole = list(iter_file(tmp_path / "b.txt", text_split="file"))
    assert len(whole) == 1 and whole[0].text == (tmp_path / "b.txt").read_text()
    lines = list(iter_file(tmp_path / "b.txt", text_split="line"))
    assert [d.text for d in lines] == ["first para", "still first", "", "", " second", "", "third"]
    assert [d.text for d in iter_file(tmp_path / "c.parquet", "content")] == ["p1", "", "p3"]
    # records: JSONL as written, other formats as {"id": where, field: text}
    recs = list(iter_records([tmp_path / "a.jsonl.gz", tmp_path / "b.txt"]))
    assert recs[0][1] == {"text": "one", "id": 1} and recs[2][1] == {"id": recs[2][0], "text": "first para\nstill first"}


def test_directories_expand_to_their_shards_or_every_input_file(tmp_path):
    synth = tmp_path / "synth"  # an `effilm synth` output: shards, a quiz and a manifest
    write_jsonl(synth / "textbook" / "shard-00000.jsonl", ["a"])
    write_jsonl(synth / "web" / "shard-00000.jsonl.gz", ["b"])
    write_jsonl(synth / "quiz.jsonl", ["q"])
    (synth / "manifest.json").write_text("{}")
    assert expand_inputs(synth) == [synth / "textbook/shard-00000.jsonl", synth / "web/shard-00000.jsonl.gz"]
    plain = tmp_path / "plain"
    write_jsonl(plain / "b.jsonl", ["b"])
    (plain / "a.txt").write_text("a")
    (plain / "meta.json").write_text("{}")
    (plain / ".hidden.txt").write_text("h")
    assert expand_inputs([plain, plain / "a.txt"]) == [plain / "a.txt", plain / "b.jsonl"]
    assert expand_inputs(str(plain / "*.txt")) == [plain / "a.txt"]
    for bad, match in ((tmp_path / "nope.jsonl", "input file not found"), (str(tmp_path / "*.md"), "matches no file")):
        with pytest.raises(EffilmError, match=match):
            expand_inputs(bad)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("a.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"a.jsonl:2: no field 'text'"),
        ("a.jsonl", '{"text": "ok"}\n{"text": 3}\n', r"a.jsonl:2: field 'text' is int"),
        ("a.jsonl", '{"text": "ok"}\n\n{broken\n', r"a.jsonl:3: not valid JSON"),
        ("a.csv", "text\nx\n", "unsupported input format"),
        ("a.parquet", "not parquet", "not a readable parquet file"),
    ],
)
def test_iter_file_errors(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(EffilmError, match=match):
        list(iter_file(tmp_path / name))


def test_tokenize_shards_manifest_and_roundtrip(tmp_path, tok_dir):
    docs_a = make_docs(60, 1, "a")
    docs_b = make_docs(30, 2, "b")
    write_jsonl(tmp_path / "a.jsonl.gz", docs_a[:30] + [""] + docs_a[30:])
    (tmp_path / "b.txt").write_text("\n\n".join(docs_b) + "\n")
    out = tmp_path / "ds"
    rc = main(["data", "tokenize", "--input", str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.txt"),
               "--tokenizer", str(tok_dir), "--out", str(out), "--shard-tokens", "500", "--batch-docs", "7",
               "--quiet"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    tok = load_tokenizer(tok_dir)
    assert m["dtype"] == "uint16" and m["eos_id"] == tok.eos_id and m["tokenizer"]["sha256"] == tok.sha256
    assert [i["documents"] for i in m["inputs"]] == [60, 30]
    assert m["inputs"][0]["skipped_empty"] == 1
    assert len(m["shards"]) > 2 and m["documents"] == 90
    assert all(s["tokens"] >= 500 for s in m["shards"][:-1])
    ds = TokenDataset(out)
    assert ds.num_tokens == m["tokens"] == sum(i["tokens"] for i in m["inputs"])
    for i, text in enumerate(docs_a + docs_b):
        d = ds.document(i)
        assert d[-1] == tok.eos_id and tok.eos_id not in d[:-1]
        assert tok.decode(d[:-1]) == text
    # the .bin files concatenated are the documents with EOS between them
    raw = np.concatenate([np.fromfile(out / s["data"], dtype=np.uint16) for s in m["shards"]])
    assert raw.tolist() == sum((tok.encode(t) + [tok.eos_id] for t in docs_a + docs_b), [])


def test_workers_give_identical_output(tmp_path, tok_dir):
    write_jsonl(tmp_path / "a.jsonl", make_docs(120, 3, "w"))
    m1 = tokenize_files([tmp_path / "a.jsonl"], tok_dir, tmp_path / "one", TokenizeConfig(shard_tokens=800, batch_docs=16))
    m2 = tokenize_files([tmp_path / "a.jsonl"], tok_dir, tmp_path / "two",
                        TokenizeConfig(shard_tokens=800, batch_docs=16, workers=2))
    assert m1["shards"] == m2["shards"]
    for s in m1["shards"]:
        assert (tmp_path / "one" / s["data"]).read_bytes() == (tmp_path / "two" / s["data"]).read_bytes()


def test_uint32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    t = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    t.save(str(tmp_path / "tok" / "tokenizer.json"))
    write_jsonl(tmp_path / "a.jsonl", ["w1 w69999 w65536", "w7"])
    m = tokenize_files([tmp_path / "a.jsonl"], tmp_path / "tok", tmp_path / "ds")
    assert m["dtype"] == "uint32"
    ds = TokenDataset(tmp_path / "ds")
    assert ds.document(0).tolist() == [1, 69999, 65536, 70000] and ds.document(1).tolist() == [7, 70000]


def test_failed_run_leaves_no_output_and_keeps_foreign_dirs(tmp_path, tok_dir):
    write_jsonl(tmp_path / "good.jsonl", ["fine"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(EffilmError, match="bad.jsonl:2"):
        tokenize_files([tmp_path / "good.jsonl", tmp_path / "bad.jsonl"], tok_dir, tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EffilmError, match="mine: not empty, and not an effilm output; refusing"):
        tokenize_files([tmp_path / "good.jsonl"], tok_dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(EffilmError, match="input file not found"):
        tokenize_files([tmp_path / "missing.jsonl"], tok_dir, tmp_path / "ds")


def test_open_checks_shards(tmp_path, tok_dir):
    write_jsonl(tmp_path / "a.jsonl", make_docs(40, 4, "c"))
    m = tokenize_files([tmp_path / "a.jsonl"], tok_dir, tmp_path / "ds", TokenizeConfig(shard_tokens=300))
    TokenDataset(tmp_path / "ds")
    bad = tmp_path / "ds" / m["shards"][1]["data"]
    data = bytearray(bad.read_bytes())
    data[3] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(EffilmError, match=rf"shard .*{bad.name}: sha256 .* does not match"):
        TokenDataset(tmp_path / "ds")
    TokenDataset(tmp_path / "ds", verify=False)  # same size: only the checksum can tell
    bad.write_bytes(bytes(data[:-2]))
    with pytest.raises(EffilmError, match=rf"{bad.name}: .* bytes, manifest says"):
        TokenDataset(tmp_path / "ds", verify=False)
    bad.unlink()
    with pytest.raises(EffilmError, match=f"shard file {bad.name} is missing"):
        TokenDataset(tmp_path / "ds")
    with pytest.raises(EffilmError, match="token dataset not found"):
        TokenDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EffilmError, match="no manifest.json"):
        TokenDataset(tmp_path / "empty")


def test_long_documents_are_tokenized_in_pieces_exactly(tmp_path, tok_dir, monkeypatch):
    import effilm.data.tokenizer as T

    rng = random.Random(5)
    words = ["river", "stone", "  double", "tab\tword", "end.", "new\nline", "x"]
    long = " ".join(rng.choice(words) for _ in range(4000))
    write_jsonl(tmp_path / "long.jsonl", [long, "a short one"])
    whole = tokenize_files([tmp_path / "long.jsonl"], tok_dir, tmp_path / "whole")
    monkeypatch.setattr(T, "LONG_TEXT_CHARS", 500)  # the long document now goes in ~50 pieces
    pieces = tokenize_files([tmp_path / "long.jsonl"], tok_dir, tmp_path / "pieces")
    a, b = TokenDataset(tmp_path / "whole"), TokenDataset(tmp_path / "pieces")
    assert whole["tokens"] == pieces["tokens"] and a.num_documents == b.num_documents == 2
    assert all(np.array_equal(a.document(i), b.document(i)) for i in range(2))


def test_a_tokenizer_that_merges_across_spaces_is_refused_for_long_documents(tmp_path, monkeypatch):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, trainers

    import effilm.data.tokenizer as T

    hf = HFTokenizer(models.BPE())  # no pre-tokenizer: "ab cd" becomes one token, across its space
    hf.train_from_iterator(["ab cd  " * 10] * 50, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    write_jsonl(tmp_path / "long.jsonl", ["ab cd  " * 200])  # every cut candidate lies inside an "ab cd"
    monkeypatch.setattr(T, "LONG_TEXT_CHARS", 100)
    with pytest.raises(EffilmError, match="merges tokens across spaces.*split such documents"):
        tokenize_files([tmp_path / "long.jsonl"], tmp_path / "tok", tmp_path / "out")
