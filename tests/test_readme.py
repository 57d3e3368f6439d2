"""The README's tour, run as written, in order, in an empty directory.

`.venv/bin/effilm` becomes this interpreter's `-m effilm`, `.venv/bin/torchrun` its
`-m torch.distributed.run` (on a free local port), `src/...` and `configs/...` point into the
repository, and `effilm serve` runs in the background on a free port: the test waits for it,
sends a completion over HTTP and stops it with SIGTERM.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import repo

README = repo.REPO / "README.md"
REPO = README.parent
SRC = str(REPO / "src")


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [ln.split("  #")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith(".venv/bin/effilm ") or ln.startswith(".venv/bin/torchrun ")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(line: str, cwd: Path) -> list[str]:
    words = shlex.split(line)
    args = [str(REPO / a) if a.startswith(("src/", "configs/")) else a for a in words[1:]]
    args = [m for a in args for m in (sorted(glob.glob(str(cwd / a))) if "*" in a else [a])]
    if words[0].endswith("/torchrun"):
        return [sys.executable, "-m", "torch.distributed.run", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", *args]
    return [sys.executable, "-m", "effilm", *args]


def _serve(argv: list[str], cwd: Path, env: dict) -> None:
    import httpx

    port = _free_port()
    argv = [a if a != "8000" else str(port) for a in argv]
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError("effilm serve did not come up")
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "The capital of", "max_tokens": 8},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


@pytest.mark.timeout(900)
def test_readme_tour_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    commands = readme_commands()
    names = ["torchrun" if c.startswith(".venv/bin/torchrun") else shlex.split(c)[1] for c in commands]
    for needed in ("presets", "params", "synth", "dedup", "decontam", "tokenizer", "data", "train", "plot", "eval",
                   "generate", "quantize", "convert", "serve", "torchrun"):
        assert needed in names, f"the README tour lost its {needed} command"
    for line in commands:
        argv = _argv(line, tmp_path)
        if argv[3:4] == ["serve"]:
            _serve(argv, tmp_path, env)
            continue
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert (tmp_path / "shards/manifest.json").is_file() and (tmp_path / "tok/tokenizer.json").is_file()
    assert json.loads((tmp_path / "contamination.json").read_text())
    final = tmp_path / "runs/tour/final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (tmp_path / "runs/tour/plots/loss.png").is_file()
    continued = json.loads((tmp_path / "runs/tour-continued/config.json").read_text())
    assert continued["model"]["init_from"] == str((tmp_path / "runs/tour/final").resolve())
    assert (tmp_path / "runs/tour-continued/final/tokenizer.json").is_file()  # init_from's own tokenizer
    assert json.loads((tmp_path / "chat_shards/manifest.json").read_text())["loss_mask"]
    sft = json.loads((tmp_path / "runs/tour-sft/config.json").read_text())
    assert sft["train"]["objective"] == "sft" and (tmp_path / "runs/tour-sft/final/model.safetensors").is_file()
    dpo = json.loads((tmp_path / "runs/tour-dpo/config.json").read_text())
    assert dpo["train"]["objective"] == "dpo" and dpo["model"]["init_from"].endswith("runs/tour-sft/final")
    assert (tmp_path / "runs/tour-dpo/reference_logps.safetensors").is_file()
    assert (tmp_path / "runs/tour-dpo/plots/rewards.png").is_file()
    chat_eval = json.loads((tmp_path / "chat-eval.json").read_text())["tasks"][0]
    assert "exact_match" in chat_eval["overall"] and len(chat_eval["items"]) == chat_eval["overall"]["exact_match"]["n"]
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "tour.gguf").is_file()
    assert (tmp_path / "tour-int4/config.json").is_file() and (tmp_path / "tour-hf/config.json").is_file()
    assert (tmp_path / "runs/tour-moe/final/model.safetensors").is_file()
    # the Python example, after the tour (it trains on the tour's shards); input_ids is the one name
    # the README leaves to the reader
    import shutil

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    script = "import torch\ninput_ids = torch.randint(0, 1000, (1, 8))\n" + code
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs/api/final/model.safetensors").is_file() and "Completion(" in out.stdout
