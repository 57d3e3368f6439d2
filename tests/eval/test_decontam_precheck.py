"""The training pre-check: raw sources behind token datasets scanned against named benchmarks."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import make_mmlu_dir, train_tokenizer

from effilm.errors import EffilmError
from effilm.eval.decontam import DecontamConfig
from effilm.eval.decontam_scan import precheck, source_files

CFG = DecontamConfig(n=5)
FILLER = ("The river runs past the old mill and the children walk to school along its bank every morning. "
          "Farmers bring their grain to town on market days, and the baker sells bread by the bridge.")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tests, _ = make_mmlu_dir(root, n_test=6)
    tok_dir = tmp_path_factory.mktemp("tok")
    train_tokenizer().save(str(tok_dir / "tokenizer.json"))
    return {"spec": f"mmlu:{root},name=quiz", "tests": tests, "tok_dir": tok_dir}


def tokenize(src_files, tok_dir, out):
    from effilm.data.shards import tokenize_files

    tokenize_files([str(f) for f in src_files], tok_dir, out)
    return out


def write_text(path, paragraphs):
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def test_planted_leak_in_a_token_dataset_is_an_error_naming_file_and_item(bench, tmp_path):
    leaked = bench["tests"][3]  # high_school_physics/3
    leak = f"Review notes. {leaked['question'].upper()} The answer: {leaked['choices'][leaked['answer']]}. More notes."
    clean = write_text(tmp_path / "clean.txt", [FILLER] * 3)
    dirty = write_text(tmp_path / "dirty.txt", [FILLER, FILLER, leak, FILLER])
    ds = tokenize([clean, dirty], bench["tok_dir"], tmp_path / "ds")
    summary = precheck([ds], [bench["spec"]], CFG)
    b = summary["benchmarks"][0]
    assert b["contaminated"] == 1 and b["contaminated_ids"] == ["high_school_physics/3"]
    assert [h["location"] for h in summary["hits"]] == [f"{dirty}:5"]  # the third paragraph starts on line 5
    assert summary["files"] == [str(clean), str(dirty)] and not summary["clean"]
    # the summary doubles as `effilm eval`'s corpus report: contamination beside each score
    from effilm.eval.report import contamination_for
    from effilm.eval.tasks import load_task

    cont = contamination_for(load_task(bench["spec"]), summary)
    assert cont == {"contaminated": 1, "items": 12, "contaminated_ids": ["high_school_physics/3"]}
    with pytest.raises(EffilmError) as err:
        precheck([ds], [bench["spec"]], CFG, fail_on_contamination=True)
    msg = str(err.value)
    assert f"{dirty}:5" in msg and "high_school_physics/3" in msg and "quiz: 1/12" in msg


def test_clean_sources_pass(bench, tmp_path):
    common = write_text(tmp_path / "common.txt", [FILLER, "The following are multiple choice questions about energy."])
    ds = tokenize([common], bench["tok_dir"], tmp_path / "ds")
    summary = precheck([ds, common], [bench["spec"]], CFG, fail_on_contamination=True)
    assert summary["clean"] and summary["contaminated_items"] == 0 and summary["documents"] == 4


def test_raw_jsonl_source_with_leak_mid_document(bench, tmp_path):
    leaked = bench["tests"][8]
    text = f"{FILLER} {leaked['question'].replace('?', '!!')} {leaked['choices'][leaked['answer']]} {FILLER}"
    f = tmp_path / "web.jsonl"
    f.write_text(json.dumps({"text": FILLER}) + "\n" + json.dumps({"text": text}) + "\n")
    summary = precheck([f], [bench["spec"]], CFG)
    assert summary["benchmarks"][0]["contaminated_ids"] == [bench["tests"][8]["subject"] + "/2"]
    assert summary["hits"][0]["location"] == f"{f}:2"


def test_gone_or_changed_source_is_a_clear_error(bench, tmp_path):
    src = write_text(tmp_path / "book.txt", [FILLER])
    ds = tokenize([src], bench["tok_dir"], tmp_path / "ds")
    assert [f["path"] for f in source_files([ds])] == [str(src)]
    src.write_text(FILLER + " changed\n")
    with pytest.raises(EffilmError, match="changed since it was tokenized"):
        precheck([ds], [bench["spec"]], CFG)
    src.unlink()
    with pytest.raises(EffilmError, match="book.txt named in manifest.json is gone"):
        precheck([ds], [bench["spec"]], CFG)
    with pytest.raises(EffilmError, match="not found"):
        precheck([tmp_path / "nothing.jsonl"], [bench["spec"]], CFG)
