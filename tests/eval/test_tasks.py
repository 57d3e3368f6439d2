"""Task formats parse; bad rows are skipped and reported, or errors under strict."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import make_mmlu_dir, write_csv

from effilm.errors import ConfigError, EffilmError
from effilm.eval.tasks import TaskConfig, load_task, parse_spec, subject_from_filename


def test_mmlu_dir_splits_and_subjects(tmp_path):
    tests, devs = make_mmlu_dir(tmp_path, n_test=3, n_dev=5)
    task = load_task(f"mmlu:{tmp_path}")
    assert [(i.question, i.choices, i.answer, i.subject) for i in task.items] == [
        (t["question"], t["choices"], t["answer"], t["subject"]) for t in tests]
    assert {s: [i.question for i in v] for s, v in task.dev.items()} == {
        s: [d["question"] for d in v] for s, v in devs.items()}
    assert task.items[0].source.endswith("high_school_physics_test.csv:1")
    assert task.items[0].uid == "high_school_physics/0"
    val = load_task(f"mmlu:{tmp_path},split=val")
    assert len(val.items) == 4 and val.name == f"mmlu:{tmp_path.name}"
    assert len(load_task(f"mmlu:{tmp_path}", TaskConfig(split="dev")).items) == 10


def test_csv_with_sibling_dev_and_quoted_fields(tmp_path):
    make_mmlu_dir(tmp_path)
    f = tmp_path / "test" / "world_religions_test.csv"
    task = load_task(f"csv:{f},name=wr")
    assert task.name == "wr" and len(task.items) == 6 and len(task.dev["world_religions"]) == 5
    g = tmp_path / "anatomy_test.csv"
    g.write_text('"What, in a ""quoted""\nmultiline question?",a,b,c,d,C\n')
    item = load_task(f"csv:{g}").items[0]
    assert item.question == 'What, in a "quoted"\nmultiline question?' and item.answer == 2
    assert subject_from_filename("high_school_physics_test.csv") == "high_school_physics"


def test_bad_csv_rows_skipped_with_file_and_line(tmp_path):
    f = tmp_path / "astronomy_test.csv"
    f.write_text("q1,a,b,c,d,A\nq2,a,b,c,E\nq3,a,b,c,d,Z\nq4,a,b,c,d,b\n")
    task = load_task(f"csv:{f}")
    assert [i.question for i in task.items] == ["q1", "q4"] and task.items[1].answer == 1
    assert [s["source"] for s in task.skipped] == [f"{f}:2", f"{f}:3"]
    assert "expected 6 columns" in task.skipped[0]["reason"] and "'Z'" in task.skipped[1]["reason"]
    with pytest.raises(EffilmError, match=rf"{f}:2: expected 6 columns"):
        load_task(f"csv:{f}", TaskConfig(strict=True))


def test_jsonl_records_and_errors(tmp_path):
    f = tmp_path / "quiz.jsonl"
    good = {"question": "2+2?", "subject": "arith", "choices": ["1", "2", "3", "4"], "answer": 3}
    rows = [good, {**good, "choices": ["1", "2", "3"]}, {**good, "answer": 4}, {**good, "answer": "D"},
            {"subject": "x", "choices": ["a"] * 4, "answer": 0}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task(f"jsonl:{f}")
    assert len(task.items) == 1 and task.items[0].answer == 3 and task.items[0].subject == "arith"
    reasons = [s["reason"] for s in task.skipped]
    assert "has 3 choices, expected 4" in reasons[0] and "not an index" in reasons[1]
    assert "not an index" in reasons[2] and "missing field 'question'" in reasons[3]
    assert task.skipped[0]["source"] == f"{f}:2"
    f.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(EffilmError, match=rf"{f}:2: not valid JSON"):
        load_task(f"jsonl:{f}")


def test_parquet_matches_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_task(f"parquet:{tmp_path / 't.parquet'}"), load_task(f"jsonl:{tmp_path / 't.jsonl'}")
    assert [(i.question, i.choices, i.answer) for i in a.items] == [(i.question, i.choices, i.answer) for i in b.items]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(EffilmError, match="bad.parquet: cannot read parquet"):
        load_task(f"parquet:{tmp_path / 'bad.parquet'}")


def test_unreadable_and_bad_specs(tmp_path):
    with pytest.raises(EffilmError, match="not found"):
        load_task(f"csv:{tmp_path / 'missing.csv'}")
    bad = tmp_path / "x_test.csv"
    bad.write_bytes(b"\xff\xfe\xfa,a,b,c,d,A\n")
    with pytest.raises(EffilmError, match=r"x_test.csv:1: not valid UTF-8"):
        load_task(f"csv:{bad}")
    with pytest.raises(EffilmError, match="did you mean 'mmlu'"):
        parse_spec("mmul:dir")
    with pytest.raises(EffilmError, match="bad option"):
        parse_spec("csv:f.csv,shots=3")
    with pytest.raises(ConfigError, match="num_choices"):
        TaskConfig(num_choices=1)


def test_data_hash_changes_with_content(tmp_path):
    f = tmp_path / "a_test.csv"
    write_csv(f, [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}])
    h1 = load_task(f"csv:{f}").data_hash()
    write_csv(f, [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1}])
    assert load_task(f"csv:{f}").data_hash() != h1


def test_task_with_no_valid_rows_is_an_error(tmp_path):
    f = tmp_path / "law_test.csv"
    f.write_text("q1,a,b,c,d,Q\n")
    with pytest.raises(EffilmError, match=r"no valid items.*law_test.csv:1: answer 'Q'"):
        load_task(f"csv:{f}")
