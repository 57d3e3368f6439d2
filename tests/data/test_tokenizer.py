"""Tokenizer training, loading without transformers, HF interop and the vocab check."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from repo import SRC

from effilm.cli import main
from effilm.config.data import TokenizerTrainConfig
from effilm.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer
from effilm.errors import ConfigError, EffilmError

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis turns light into chemical energy in plants.",
    "Naïve café owners serve crème brûlée — ünïcödé and emoji 🙂 too.",
    "def add(a, b):\n    return a + b\n",
]


def _corpus(root: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        for i in range(40):
            fh.write(json.dumps({"body": SAMPLES[i % len(SAMPLES)] + f" line {i}"}) + "\n")
    (root / "b.txt").write_text("\n\n".join(SAMPLES * 5), encoding="utf-8")
    pq.write_table(pa.table({"body": SAMPLES * 5}), root / "c.parquet")
    return [root / "a.jsonl.gz", root / "b.txt", root / "c.parquet"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    files = _corpus(root)
    rc = main(["tokenizer", "train", "--input", *map(str, files), "--vocab-size", "400",
               "--text-field", "body", "--out", str(root / "tok")])
    assert rc == 0
    return root / "tok"


def test_saved_files_and_special_tokens(tok_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file()
    tok = load_tokenizer(tok_dir)
    assert tok.token_to_id("<|endoftext|>") == tok.eos_id == tok.bos_id
    assert tok.token_to_id("<|pad|>") == tok.pad_id != tok.eos_id
    assert 256 + 6 <= tok.vocab_size <= 400
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids and tok.eos_id not in ids
        assert tok.decode(ids) == text  # byte-level BPE round-trips any text
    # merges were learnt from the corpus: common words take fewer tokens than bytes
    assert len(tok.encode(SAMPLES[0])) < len(SAMPLES[0].encode())


def test_autotokenizer_loads_and_agrees(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    assert len(hf) == tok.vocab_size
    for text in SAMPLES:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.token_to_id("<|user|>") in list(ids)


def test_load_does_not_import_transformers(tok_dir):
    code = (
        "import sys; from effilm.data.tokenizer import load_tokenizer; "
        f"t = load_tokenizer({str(tok_dir)!r}); assert t.decode(t.encode('hello')) == 'hello'; "
        "print('transformers' in sys.modules)"
    )
    src = str(SRC)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src},
                         check=True)
    assert out.stdout.strip() == "False"


def test_loads_a_plain_hf_directory_without_config(tmp_path, tok_dir):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path)  # falls back on well-known special token names
    assert tok.eos_id == load_tokenizer(tok_dir).eos_id
    assert tok.chat_template is None
    assert load_tokenizer(tmp_path / "tokenizer.json").vocab_size == tok.vocab_size


def test_check_vocab(tok_dir):
    tok = load_tokenizer(tok_dir)
    check_vocab(tok, tok.vocab_size)
    check_vocab(tok_dir, tok.vocab_size + 64)  # a padded embedding table is fine
    with pytest.raises(EffilmError, match=f"{tok.vocab_size} tokens but the model's vocab_size is 300"):
        check_vocab(tok, 300)
    with pytest.raises(EffilmError, match="must be equal"):
        check_vocab(tok, tok.vocab_size + 64, strict=True)


def test_bad_inputs(tmp_path):
    with pytest.raises(EffilmError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(EffilmError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad")
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerTrainConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="text_split"):
        TokenizerTrainConfig(text_split="lines")
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    with pytest.raises(EffilmError, match=r"x.jsonl:2: no field 'text'"):
        train_tokenizer([tmp_path / "x.jsonl"], tmp_path / "out", TokenizerTrainConfig(vocab_size=300))
    assert not (tmp_path / "out").exists()
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.jsonl"), "--vocab-size", "300",
                 "--out", str(tmp_path / "o")]) == 2


def test_a_smaller_vocabulary_than_asked_is_reported_and_no_text_is_refused(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("ab ab ab ba ba\n")
    with pytest.warns(UserWarning, match=r"tokenizer .*tok: the text allowed only \d+ tokens of the 5000 requested"):
        assert main(["tokenizer", "train", "--input", str(tmp_path / "tiny.txt"), "--vocab-size", "5000",
                     "--out", str(tmp_path / "tok")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "tok" / "training_report.json").read_text())
    assert report["requested_vocab_size"] == 5000 and report["vocab_size"] < 5000 and "note" in report
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "blank.txt"), "--out", str(tmp_path / "t2")]) == 2
    assert "no text in 1 input file(s)" in capsys.readouterr().err and not (tmp_path / "t2").exists()
