"""The README's commands, run as written (with `.venv/bin/effilm` replaced by this interpreter)."""

import glob
import re
import shlex
from pathlib import Path

from test_cli import effilm

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [ln.split("#")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith(".venv/bin/effilm ")]


def test_readme_data_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in readme_commands():
        args = shlex.split(line)[1:]
        if args[0] in ("synth", "dedup", "tokenizer", "data"):
            args = [str(REPO / a) if a.startswith("src/") else a for a in args]
            expanded = [m for a in args for m in (sorted(glob.glob(a)) if "*" in a else [a])]
            effilm(*expanded, cwd=tmp_path)
            ran += 1
    assert ran == 4
    assert (tmp_path / "shards" / "manifest.json").is_file()
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
