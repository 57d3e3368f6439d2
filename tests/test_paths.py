"""Every command that reads or writes paths works with relative paths, absolute paths, paths with
``..`` and spaces, and when its outputs are read from another working directory than the one
they were written in (the `make demo` failure: ``demo_out/demo_out/plots/...``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import repo

REPO = repo.REPO
SRC = str(REPO / "src")
RECIPE = REPO / "src/effilm/synth/recipes/default.toml"

RUN_FILE = """\
out_dir = "{runs}"
tokenizer = "{tok}"

[model]
preset = "tiny-dense"
vocab_size = 512
n_layers = 1

[data]
seq_len = 32

[[data.sources]]
name = "textbook"
path = "{shards}"
val_sequences = 2

[[data.stages]]
name = "main"
tokens = 1024
mixture = {{ textbook = 1.0 }}

[train]
global_batch = 4
micro_batch = 4
log_every = 2
eval_every = 4
save_every = 4
"""


def effilm(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "effilm", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"effilm {' '.join(args)} (in {cwd}) exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@pytest.mark.parametrize("style", ["relative", "absolute"])
def test_every_command_with_dotdot_spaces_and_another_working_directory(tmp_path, style):
    root = tmp_path / "a root"
    home = root / "my work"  # where everything is written
    writer, reader = home / "sub dir", root / "elsewhere"  # the two working directories
    writer.mkdir(parents=True)
    reader.mkdir()

    def w(name: str) -> str:  # a path to home/name as the writer names it
        return f"../{name}" if style == "relative" else str(writer / ".." / name)

    def r(name: str) -> str:  # the same path as the reader names it
        return f"../my work/{name}" if style == "relative" else str(reader / ".." / "my work" / name)

    # --- write everything from one working directory
    effilm(writer, "synth", str(RECIPE), "--out", w("synth out"), "--limit", "60")
    effilm(writer, "dedup", w("synth out/textbook/shard-00000.jsonl"), "--out", w("dedup out"),
           "--report", w("reports/dedup.json"))  # fmt: skip
    effilm(writer, "filter", w("dedup out/kept.jsonl"), "--out", w("filter out"), "--report", w("reports/filter.json"))
    effilm(writer, "decontam", "--benchmark", "jsonl:" + w("synth out/quiz.jsonl"), "--corpus", w("dedup out/kept.jsonl"),
           "--report", w("reports/contam.json"), "--clean-out", w("clean out"))  # fmt: skip
    effilm(writer, "tokenizer", "train", "--input", w("dedup out/kept.jsonl"), "--vocab-size", "512", "--out", w("tok dir"))
    effilm(writer, "data", "tokenize", "--input", w("dedup out/kept.jsonl"), "--tokenizer", w("tok dir"),
           "--out", w("sh ards"))  # fmt: skip
    (home / "cfg dir").mkdir()
    (home / "cfg dir/run.toml").write_text(RUN_FILE.format(runs=w("runs dir/r"), tok=w("tok dir"), shards=w("sh ards")))
    effilm(writer, "train", w("cfg dir/run.toml"))
    assert not (writer / "runs dir").exists() and (home / "runs dir/r/final/model.safetensors").is_file()

    # --- read (and write more) from another working directory
    final = r("runs dir/r/final")
    effilm(reader, "train", r("runs dir/r/config.json"), "--resume")  # the run's own config, read from elsewhere
    effilm(reader, "plot", r("runs dir/r"))
    assert (home / "runs dir/r/plots/loss.png").is_file()
    effilm(reader, "plot", r("runs dir/r"), r("runs dir/r"), "--out", r("compare plots"))
    assert (home / "compare plots/compare_loss.png").is_file()
    effilm(reader, "eval", final, "--task", "jsonl:" + r("synth out/quiz.jsonl"), "--scoring", "cloze", "--shots", "0",
           "--corpus-report", r("reports/contam.json"), "--output", r("ev al.json"))  # fmt: skip
    assert json.loads((home / "ev al.json").read_text())["tasks"]
    effilm(reader, "generate", final, "--prompt", "The", "--max-new-tokens", "4")
    effilm(reader, "quantize", final, "--bits", "8", "--out", r("q 8"), "--eval", r("dedup out/kept.jsonl"))
    effilm(reader, "generate", r("q 8"), "--prompt", "The", "--max-new-tokens", "4")
    effilm(reader, "convert", final, r("m q8.gguf"), "--to", "gguf", "--type", "q8_0")
    effilm(reader, "convert", final, r("h f"), "--to", "hf")
    effilm(reader, "eval", r("h f"), "--task", "jsonl:" + r("synth out/quiz.jsonl"), "--scoring", "cloze",
           "--shots", "0", "--output", r("ev al hf.json"))  # fmt: skip
    before = (home / "synth out/manifest.json").read_text()
    effilm(reader, "synth", str(RECIPE), "--out", r("synth out"), "--limit", "60")  # resumes: nothing to redo
    assert (home / "synth out/manifest.json").read_text() == before

    for f in ("reports/dedup.json", "reports/filter.json", "reports/contam.json", "clean out", "tok dir/tokenizer.json",
              "sh ards/manifest.json", "q 8/config.json", "m q8.gguf", "h f/config.json", "ev al hf.json"):
        assert (home / f).exists(), f
    # nothing was written beside the working directories (no doubled or misplaced paths)
    assert _tree(writer) == set() and _tree(reader) == set()
