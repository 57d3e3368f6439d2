"""Quality filters: each heuristic, its report entry and the rejects file."""

from __future__ import annotations

import json

import pytest

from effilm.cli import main
from effilm.config.reader import build
from effilm.data.filters import FilterConfig, check, filter_files
from effilm.errors import ConfigError

GOOD = ("Rivers carry water from high ground to the sea. Along the way they shape valleys, "
        "feed farms and give towns their reason to exist. Engineers measure their flow in cubic metres per second.")

CASES = {
    "good": (GOOD, None),
    "empty": ("   \n", "empty"),
    "boiler": ("Once upon a time " + GOOD, "boilerplate"),
    "short": ("Too short to teach anything.", "length"),
    "loop": ("the cat sat on the mat " * 10, "repetition"),
    "symbols": (" ".join(f"{i} + {i * 3} = {i * 4} ;" for i in range(1, 9)) + " done", "non_alpha"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_filter(name):
    text, expected = CASES[name]
    verdict = check({"text": text}, FilterConfig())
    assert (verdict[0] if verdict else None) == expected


def test_truncation_from_finish_reason_and_punctuation():
    rec = {"text": GOOD, "provenance": {"finish_reason": "length"}}
    assert check(rec, FilterConfig())[0] == "truncated"
    cut = {"text": GOOD[:-1] + " and then the"}
    assert check(cut, FilterConfig()) is None
    assert check(cut, FilterConfig(require_end_punctuation=True))[0] == "truncated"
    assert check(cut, FilterConfig(require_end_punctuation=True, disabled=["truncated"])) is None


def test_report_counts_examples_and_rejects_file(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    recs = [{"id": k, "text": v[0]} for k, v in sorted(CASES.items())]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = filter_files([path], tmp_path / "out", tmp_path / "r.json")
    s = report["summary"]
    assert s["input_records"] == 6 and s["kept"] == 1 and s["rejected"] == 5
    assert all(s[f"rejected_{f}"] == 1 for f in ("empty", "boilerplate", "length", "repetition", "non_alpha"))
    assert report["filters"]["boilerplate"]["examples"][0]["id"] == "boiler"
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejects) == ["boiler", "empty", "loop", "short", "symbols"]
    assert all("_rejected" in r for r in rejects)
    assert main(["filter", str(path), "--out", str(tmp_path / "o2"), "--report", str(tmp_path / "r2.json"),
                 "--min-words", "2", "--disabled", "repetition", "non_alpha"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 4


def test_config_errors_name_the_field(tmp_path, capsys):
    args = ["filter", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit):
        main([*args, "--min-word", "3"])
    assert "unrecognized arguments: --min-word 3 (--min-word: did you mean --min-words" in capsys.readouterr().err
    assert main([*args, "--min-words", "many"]) == 2
    assert "min_words='many' should be of type int, not str" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown filters config key.*did you mean 'min_words'"):
        build(FilterConfig, {"min_word": 3}, "filters")
    with pytest.raises(ConfigError, match="unknown filter"):
        FilterConfig(disabled=["vibes"])
