"""Nothing a user has is lost: every command that writes a directory (or a file) follows the same
destination rules, checked before any work; one run per run directory, as two real processes see.

For each writing command: a foreign non-empty directory is refused and keeps its files; a
destination that is, contains or lies inside a source is refused and the source is untouched;
an earlier output of the same command is replaced only with --overwrite; an unwritable place is
refused before the work starts."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_fixtures import WORDS, add_tokenizer, make_tokenizer, tiny
from plot_fixtures import make_run
from repo import SRC
from train_fixtures import make_data, write_run

from effilm.cli import main
from effilm.outputs import MARK, OutputError, claim_dir, claim_file


# ----- the rules themselves --------------------------------------------------------------------------
def test_claim_dir_rules(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights").write_text("w")
    for dest, match in ((src, "it is the input"), (tmp_path, "it contains the input"), (src / "inner", "lies inside")):
        with pytest.raises(OutputError, match=match):
            claim_dir(dest, "quantize", sources=[src])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty, and not an effilm output"):
        claim_dir(foreign, "quantize", overwrite=True)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / MARK).write_text(json.dumps({"command": "quantize"}))
    with pytest.raises(OutputError, match="holds an earlier `effilm quantize` output; pass --overwrite"):
        claim_dir(earlier, "quantize")
    with pytest.raises(OutputError, match="an earlier `effilm convert` output"):
        claim_dir(earlier, "convert", overwrite=True)  # another command's output is foreign to this one
    assert claim_dir(earlier, "quantize", overwrite=True) == earlier
    assert claim_dir(earlier, "quantize", resumable=True) == earlier
    assert claim_dir(tmp_path / "new" / "deep", "quantize") == tmp_path / "new" / "deep"
    (tmp_path / "afile").write_text("x")
    for dest, match in ((tmp_path / "afile", "exists and is not a directory"),
                        (tmp_path / "afile" / "sub", "is a file, so nothing can be written below it"),
                        (Path("/proc/effilm-out"), "cannot write in /proc")):  # fmt: skip
        with pytest.raises(OutputError, match=match):
            claim_dir(dest, "quantize")
    assert (foreign / "notes.txt").read_text() == "mine" and (src / "weights").read_text() == "w"


def test_claim_file_rules(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("{}\n")
    for dest, kw, match in ((data, {"inputs": [data]}, "it is the input"),
                            (tmp_path, {}, "is a directory; give a file path"),
                            (Path("/proc/effilm.json"), {}, "cannot write in /proc"),
                            (data, {"replace": False}, "exists; pass --overwrite")):  # fmt: skip
        with pytest.raises(OutputError, match=match):
            claim_file(dest, **kw)
    assert claim_file(tmp_path / "report.json", inputs=[data]) == tmp_path / "report.json"


# ----- every writing command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model directory with its tokenizer, a corpus, a quiz and a run directory to plot."""
    root = tmp_path_factory.mktemp("outputs")
    tok = make_tokenizer(root)
    model = add_tokenizer(__import__("effilm").save(tiny("tiny-dense", n_layers=1), root / "model"), tok)
    rng = random.Random(0)
    corpus = root / "corpus" / "docs.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n"
                              for i in range(40)))  # fmt: skip
    quiz = root / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"question": f"What is {w}?", "choices": ["a", "b", "c", "d"], "answer": 1,
                                        "subject": "s"}) + "\n" for w in WORDS[:8]))  # fmt: skip
    run = make_run(root / "runs", "tiny-dense")
    return {"root": root, "tok": tok, "model": model, "corpus": corpus, "quiz": quiz, "run": run}


def _commands(w: dict) -> dict:
    """command -> (argv for a destination, the sources it reads)."""
    m, tok, corpus = str(w["model"]), str(w["tok"]), str(w["corpus"])
    return {
        "quantize": (lambda d: ["quantize", m, "--out", str(d), "--no-rss"], [w["model"]]),
        "convert": (lambda d: ["convert", m, str(d), "--to", "hf"], [w["model"]]),
        "tokenizer train": (lambda d: ["tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--out", str(d)],
                            [w["corpus"]]),  # fmt: skip
        "data tokenize": (lambda d: ["data", "tokenize", "--input", corpus, "--tokenizer", tok, "--out", str(d),
                                     "--quiet"], [w["corpus"], w["tok"]]),  # fmt: skip
        "dedup": (lambda d: ["dedup", corpus, "--out", str(d), "--report", str(w["root"] / "dedup.json")], [w["corpus"]]),
        "filter": (lambda d: ["filter", corpus, "--out", str(d), "--report", str(w["root"] / "filter.json")],
                   [w["corpus"]]),  # fmt: skip
        "decontam": (lambda d: ["decontam", "--benchmark", f"jsonl:{w['quiz']}", "--corpus", corpus, "--report",
                                str(w["root"] / "contam.json"), "--clean-out", str(d)], [w["corpus"]]),  # fmt: skip
        "plot": (lambda d: ["plot", str(w["run"]), "--out", str(d), "--dpi", "30"], [w["run"] / "metrics.jsonl"]),
    }


COMMANDS = ["quantize", "convert", "tokenizer train", "data tokenize", "dedup", "filter", "decontam", "plot"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_writing_command_follows_the_destination_rules(world, tmp_path, capsys, command):
    argv, sources = _commands(world)[command]
    # a foreign non-empty directory: refused, its file intact
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(argv(foreign)) == 2
    assert "not empty, and not an effilm output" in capsys.readouterr().err
    assert main([*argv(foreign), "--overwrite"]) == 2  # --overwrite never reaches a foreign directory
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["notes.txt"]
    # a destination that is, contains or lies inside a source: refused, the source untouched
    src = Path(sources[0])
    before = {p: p.read_bytes() for p in ([src] if src.is_file() else src.rglob("*")) if p.is_file()}
    for dest in (src, src.parent, src / "inside") if src.is_dir() else (src.parent,):
        assert main([*argv(dest), "--overwrite"]) == 2, dest
        err = capsys.readouterr().err
        assert "the input" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in before} == before
    # an earlier output of the same command: replaced only with --overwrite
    out = tmp_path / "out"
    assert main(argv(out)) == 0
    first = sorted(p.name for p in out.iterdir())
    assert MARK in first and len(first) > 1
    capsys.readouterr()
    assert main(argv(out)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*argv(out), "--overwrite"]) == 0
    # a place nothing can be written: refused before any work
    assert main(argv(Path("/proc/effilm-out"))) == 2
    assert "cannot write in /proc" in capsys.readouterr().err


def test_output_files_are_never_an_input_or_a_directory(world, tmp_path, capsys):
    corpus = str(world["corpus"])
    cases = [
        (["dedup", corpus, "--out", str(tmp_path / "o1"), "--report", corpus], "it is the input"),
        (["filter", corpus, "--out", str(tmp_path / "o2"), "--report", str(tmp_path)], "is a directory"),
        (["decontam", "--benchmark", f"jsonl:{world['quiz']}", "--corpus", corpus, "--report", corpus], "it is the input"),
        (["eval", str(world["model"]), "--task", f"jsonl:{world['quiz']}", "--output", str(tmp_path)], "is a directory"),
        (["eval", str(world["model"]), "--task", f"jsonl:{world['quiz']}", "--output", "/proc/r.json"], "cannot write"),
        (["convert", str(world["model"]), str(tmp_path), "--to", "gguf"], "is a directory"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, (argv, err)
    assert not list(tmp_path.iterdir()) and json.loads(world["corpus"].read_text().splitlines()[0])["id"] == "d0"
    gguf = tmp_path / "m.gguf"
    gguf.write_text("an older file")
    assert main(["convert", str(world["model"]), str(gguf), "--to", "gguf"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and gguf.read_text() == "an older file"


def test_quantizing_a_quantized_model_is_refused(world, tmp_path, capsys):
    assert main(["quantize", str(world["model"]), "--out", str(tmp_path / "q"), "--no-rss"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "q"), "--out", str(tmp_path / "qq"), "--no-rss"]) == 2
    assert "already quantized" in capsys.readouterr().err and not (tmp_path / "qq").exists()


def test_demo_and_synth_and_train_destinations(world, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for argv in (["demo", "--quick", "--out", str(foreign), "--overwrite"], ["synth", "--out", str(foreign)]):
        assert main(argv) == 2, argv
        assert "not empty, and not an effilm output" in capsys.readouterr().err
    # synth resumes its own output (no --overwrite needed): the second run writes nothing new
    assert main(["synth", "--out", str(tmp_path / "s"), "--limit", "5"]) == 0
    capsys.readouterr()
    assert main(["synth", "--out", str(tmp_path / "s"), "--limit", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["written_shards"] == 0
    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data")
    run_file = write_run(data, foreign)
    assert main(["train", str(run_file)]) == 2
    assert "out_dir" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"
    inside = write_run(data, data / "web" / "run", name="inside.toml")  # the run directory inside a data source
    assert main(["train", str(inside)]) == 2
    assert "lies inside the input" in capsys.readouterr().err


# ----- one run per run directory ----------------------------------------------------------------------
def _train_proc(run_file: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "effilm", "train", str(run_file), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_two_runs_on_one_run_directory(tmp_path):
    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data")
    run = tmp_path / "run"
    run_file = write_run(data, run, stage_tokens=24_576)  # long enough to overlap the second process
    first = _train_proc(run_file)
    deadline = time.monotonic() + 120
    while not (run / ".lock").is_file() or not (run / ".lock").read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    holder = json.loads((run / ".lock").read_text())
    assert holder["pid"] == first.pid
    first.send_signal(signal.SIGSTOP)  # hold the first run mid-way, however fast it trains
    t0 = time.monotonic()
    second = _train_proc(run_file)
    out, err = second.communicate(timeout=120)
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and time.monotonic() - t0 < 60
    assert f"{run / '.lock'}: the run directory is in use by another run, pid {first.pid}" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert (run / ".lock").read_text() == ""  # released on exit
    # a run killed while holding the lock: the next one takes the stale lock over, with a warning
    killed = _train_proc(write_run(data, tmp_path / "run2", name="run2.toml", stage_tokens=24_576))
    while not (tmp_path / "run2" / ".lock").is_file() or not (tmp_path / "run2" / ".lock").read_text():
        assert killed.poll() is None
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert json.loads((tmp_path / "run2" / ".lock").read_text())["pid"] == killed.pid  # left behind
    again = subprocess.run([sys.executable, "-m", "effilm", "train", str(data / "run2.toml"), "--resume",
                            "--no-progress"], env=dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1"),
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"warning: {tmp_path / 'run2' / '.lock'}: taking over a stale lock left by pid {killed.pid}" in again.stderr
