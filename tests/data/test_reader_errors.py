"""Every command that reads text goes through one reader, so every one of them turns a bad input
into one line naming the file (and the line): non-UTF-8 bytes, a truncated .gz, a directory where a
file is expected. A UTF-8 byte-order mark is not an error: it is dropped."""

from __future__ import annotations

import gzip
import json

import pytest
from engine_fixtures import add_tokenizer, make_tokenizer, tiny

from effilm.cli import main
from effilm.errors import EffilmError
from effilm.io import iter_jsonl, read_lines

GOOD = {"id": "a", "text": "a plain document about rivers and stones " * 3}


def _write_bad(root, kind: str):
    """A corpus file with one problem, and (file, line) the error must name."""
    good = json.dumps(GOOD) + "\n"
    if kind == "non-utf8":
        p = root / "bad.jsonl"
        p.write_bytes(good.encode() + b'{"id": "b", "text": "caf\xe9"}\n')
        return p, f"{p}:2: not valid UTF-8"
    if kind == "truncated-gz":
        p = root / "bad.jsonl.gz"
        data = gzip.compress((good * 200).encode())
        p.write_bytes(data[: len(data) // 2])
        return p, f"{p}: truncated or corrupt gzip data"
    if kind == "directory":
        p = root / "dir.jsonl"
        p.mkdir()
        return p, f"{p}: is a directory"  # a directory named like a file: the reader says so
    raise AssertionError(kind)


KINDS = ["non-utf8", "truncated-gz", "directory"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    tok = make_tokenizer(root)
    return add_tokenizer(__import__("effilm").save(tiny("tiny-dense", n_layers=1), root / "model"), tok), tok


def _commands(bad, tmp, model_dir, tok) -> dict:
    quiz = tmp / "quiz.jsonl"
    quiz.write_text(json.dumps({"question": "What?", "choices": ["a", "b", "c", "d"], "answer": 0}) + "\n")
    return {
        "data tokenize": ["data", "tokenize", "--input", str(bad), "--tokenizer", str(tok), "--out", str(tmp / "o1")],
        "tokenizer train": ["tokenizer", "train", "--input", str(bad), "--vocab-size", "300", "--out", str(tmp / "o2")],
        "dedup": ["dedup", str(bad), "--out", str(tmp / "o3"), "--report", str(tmp / "r3.json")],
        "filter": ["filter", str(bad), "--out", str(tmp / "o4"), "--report", str(tmp / "r4.json")],
        "decontam corpus": ["decontam", "--benchmark", f"jsonl:{quiz}", "--corpus", str(bad), "--report",
                            str(tmp / "r5.json")],  # fmt: skip
        "decontam benchmark": ["decontam", "--benchmark", f"jsonl:{bad}", "--corpus", str(quiz), "--report",
                               str(tmp / "r6.json")],  # fmt: skip
        "eval task": ["eval", str(model_dir), "--task", f"jsonl:{bad}", "--output", str(tmp / "r7.json")],
        "eval ppl task": ["eval", str(model_dir), "--task", f"ppl:{bad}", "--output", str(tmp / "r8.json")],
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_reader_names_the_file_and_line(model, tmp_path, capsys, kind):
    model_dir, tok = model
    bad, expected = _write_bad(tmp_path, kind)
    for name, argv in _commands(bad, tmp_path, model_dir, tok).items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, (name, err)
        if kind == "directory":  # where a directory of inputs is allowed, an empty one says so
            assert f"{bad}: is a directory" in err or f"input directory {bad} holds no input file" in err, (name, err)
        else:
            assert expected in err, (name, err)


def test_synth_recipe_and_topics_files(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(b'name = "caf\xe9"\n')
    assert main(["synth", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert f"{recipe}: not a valid recipe" in capsys.readouterr().err
    assert main(["synth", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path}: recipe is not a file" in capsys.readouterr().err
    (tmp_path / "topics.txt").write_bytes(b"tides\n\xff\n")
    recipe.write_text('topics_file = "topics.txt"\n')
    assert main(["synth", str(recipe), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert f"{tmp_path / 'topics.txt'}:2: not valid UTF-8" in capsys.readouterr().err


def test_byte_order_marks_are_dropped(tmp_path):
    from effilm.eval.tasks import load_task

    jsonl = tmp_path / "q.jsonl"
    rec = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "s"}
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    assert [r for _, r in iter_jsonl(jsonl)] == [rec]
    assert load_task(f"jsonl:{jsonl}").items[0].answer == 2
    csv = tmp_path / "s_test.csv"
    csv.write_bytes("\ufeffWhat is 2+2?,3,4,5,6,B\n".encode())
    item = load_task(f"csv:{csv}").items[0]
    assert item.question == "What is 2+2?" and item.answer == 1
    assert list(read_lines(csv))[0][1].startswith("What")


@pytest.mark.parametrize("kind", KINDS)
def test_reader_errors_directly(tmp_path, kind):
    import re

    bad, expected = _write_bad(tmp_path, kind)
    with pytest.raises(EffilmError, match=re.escape(expected)):
        list(read_lines(bad))
