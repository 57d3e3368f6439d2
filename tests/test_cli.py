"""The command line, run as a user would: real subprocesses of ``python -m effilm``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")


def effilm(*args, check=True, cwd=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "effilm", *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"effilm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_presets_lists_every_preset():
    out = effilm("presets", "--json").stdout
    names = {r["name"] for r in json.loads(out)}
    assert {"arctic", "phi-3-mini-4k", "phi-3-small-8k", "openelm-3b", "tiny-arctic", "mixtral-8x7b"} <= names


@pytest.mark.parametrize("name, total, active", [("arctic", 478.6e9, 17.32e9), ("phi-3.5-moe", 41.87e9, 6.64e9)])
def test_params_json(name, total, active):
    s = json.loads(effilm("params", name, "--json", "--seq-len", "1024").stdout)
    assert isinstance(s["total_params"], int) and isinstance(s["active_params"], int)
    assert abs(s["total_params"] - total) / total < 1e-3 and abs(s["active_params"] - active) / active < 1e-3
    assert s["seq_len"] == 1024 and s["weight_bytes"]["int4"] * 8 == s["weight_bytes"]["fp32"]
    text = effilm("params", name).stdout
    assert "active per token" in text and "KV cache / token bf16" in text


def test_bad_input_is_one_clear_line():
    p = effilm("params", "phi3-mini", check=False)
    assert p.returncode == 2 and "unknown preset 'phi3-mini'" in p.stderr and "did you mean" in p.stderr
    assert "Traceback" not in p.stderr
    p = effilm("convert", "/nonexistent", "/tmp/x", "--to", "hf", check=False)
    assert p.returncode == 2 and "no such model directory" in p.stderr and "Traceback" not in p.stderr


def test_convert_both_ways(tmp_path):
    import effilm as api
    from effilm.config import ModelConfig
    from effilm.models.transformer import build_model

    model = build_model(ModelConfig.from_name("tiny-moe", vocab_size=150), seed=3)
    api.save(model, tmp_path / "ck")
    effilm("convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    effilm("convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "effilm")
    back = api.load(tmp_path / "back")
    ids = torch.randint(0, 150, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model.eval()(ids).logits)
    s = json.loads(effilm("params", str(tmp_path / "hf"), "--json").stdout)
    assert s["total_params"] == model.cfg.num_params()


def test_every_subcommand_has_help():
    out = effilm("-h").stdout
    for cmd in ("presets", "params", "convert", "demo"):
        assert cmd in out
        assert effilm(cmd, "-h").stdout.strip()


# `effilm demo --quick` end to end: tests/test_demo.py (through this same CLI).
