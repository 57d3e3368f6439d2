"""Sparse upcycling: dense -> MoE (M) and dense -> Arctic hybrid (H), for full-copy (G=1) and
fine-grained (G=2) experts. The upcycled model computes the dense model's function at step 0; it
trains, resumes and exports like any other MoE model; bad requests are one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import repo
import torch
from safetensors.torch import load_file
from train_fixtures import make_data, write_run

from effilm.config.model import ModelConfig, UpcycleConfig
from effilm.config.run import load_run_config
from effilm.formats.checkpoint import load_state_checked, model_state, save
from effilm.formats.load import load
from effilm.models.moe import MoE
from effilm.models.transformer import build_model
from effilm.models.upcycle import upcycle_state
from effilm.train.loop import train

DENSE = {"preset": "tiny-dense", "vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "ffn_dim": 64}  # fmt: skip


def _dense(seed: int = 0, **kw):
    model = build_model(ModelConfig.from_dict({**DENSE, **kw}), seed=seed)
    with torch.no_grad():  # norms away from 1, so that copying the right norm matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _upcycled(dense, up: UpcycleConfig):
    cfg = ModelConfig.from_dict(up.architecture(dense.cfg.to_dict()))
    model = build_model(cfg, init=False)
    load_state_checked(model, upcycle_state(model_state(dense), dense.cfg, cfg, up), "test")
    return model.eval()


@pytest.mark.parametrize("pattern", ["M", "H", "DM"])
@pytest.mark.parametrize("granularity", [1, 2])
def test_upcycled_model_computes_the_dense_function(pattern, granularity):
    torch.manual_seed(0)
    dense = _dense()
    up = UpcycleConfig(experts=8, top_k=2, pattern=pattern, granularity=granularity)
    moe = _upcycled(dense, up)
    assert "".join(s.kind for s in moe.cfg.layers) == (pattern * 2)[:2]
    assert moe.cfg.moe.expert_ffn_dim == 64 // granularity
    ids = torch.randint(0, 320, (3, 24))
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    diff = float((a - b).abs().max())
    assert diff < 1e-5, diff
    # the MoE layers route and mix for real: several experts are used, with non-trivial weights
    layer = next(m for m in moe.modules() if isinstance(m, MoE))
    x = torch.randn(50, 32)
    _, _, w, ids_k = layer.route(x)
    if granularity == 1:
        assert ids_k.unique().numel() > 2 and w.std() > 0
    elif "M" in pattern:  # fine-grained: the tie-break picks the first K experts, one copy of each slice
        assert sorted(ids_k[0].tolist()) == [0, 1] and torch.allclose(w, torch.full_like(w, 0.5))


def test_a_perturbed_upcycle_is_caught():
    """The check above can fail: with G=2 but no x G scale (or no tie-break), the function changes."""
    dense = _dense()
    up = UpcycleConfig(experts=8, top_k=2, pattern="M", granularity=2)
    moe = _upcycled(dense, up)
    with torch.no_grad():
        for m in moe.modules():
            if isinstance(m, MoE):
                m.experts.w_down.mul_(0.5)
        ids = torch.randint(0, 320, (2, 16))
        assert float((dense(ids).logits - moe(ids).logits).abs().max()) > 1e-3


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(repo.SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "effilm", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upcycle")
    (root / "data").mkdir()
    data = make_data(root / "data")
    res = train(load_run_config(write_run(data, root / "dense", name="dense.toml", model="dense"),
                                ["train.max_steps=4", "train.eval_every=0"]))  # fmt: skip
    return res.final_dir


def test_cli_upcycle_writes_a_checkpoint_with_the_same_function(dense_dir, tmp_path):
    out = _cli("upcycle", str(dense_dir), "--experts", "4", "--top-k", "2", "--pattern", "H", "--granularity", "2",
               "--out", str(tmp_path / "arctic"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "layers HH" in line and "4 experts of width 32, top-2" in line, line
    diff = float(line.rsplit("max |diff| ", 1)[1].split(";")[0])
    assert diff < 1e-5
    model, dense = load(tmp_path / "arctic"), load(dense_dir)
    assert (tmp_path / "arctic" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "arctic" / "config.json").read_text())
    assert meta["upcycle"]["pattern"] == "H" and meta["upcycled_from"] == str(dense_dir)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert float((model(ids).logits - dense(ids).logits).abs().max()) < 1e-5
    # run twice: the second refuses to replace the first without --overwrite
    again = _cli("upcycle", str(dense_dir), "--out", str(tmp_path / "arctic"))
    assert again.returncode != 0 and "--overwrite" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--experts", "2", "--top-k", "4"], "top_k=4 exceeds experts=2"),
    (["--granularity", "3", "--experts", "6", "--top-k", "3"], "granularity=3 does not divide the dense MLP width 64"),
    (["--pattern", "X"], "upcycle.pattern='X'"),
    (["--pattern", "M", "--granularity", "2", "--top-k", "1"], "top_k=1 must be a multiple of the 2 expert slices in M layers"),
])  # fmt: skip
def test_bad_upcycle_requests_are_one_line_errors(dense_dir, tmp_path, args, message):
    out = _cli("upcycle", str(dense_dir), "--out", str(tmp_path / "x"), *args)
    assert out.returncode != 0
    err = out.stderr.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_upcycling_an_moe_model_is_refused(tmp_path):
    save(build_model(ModelConfig.from_name("tiny-moe"), seed=0), tmp_path / "moe")
    out = _cli("upcycle", str(tmp_path / "moe"), "--out", str(tmp_path / "x"))
    assert out.returncode != 0
    err = out.stderr.strip()
    assert "already an MoE model" in err and len(err.splitlines()) == 1, err


def test_run_file_upcycles_at_step_zero_then_trains_resumes_and_exports(dense_dir, tmp_path):
    """[model] init_from = dense + [model.upcycle]: step 0 holds the dense function; the run trains,
    resumes bitwise, and the result exports to HF (Mixtral layout, read back by transformers)."""
    data = dense_dir.parent.parent / "data"
    extra = f'init_from = "{dense_dir}"\nupcycle = {{ experts = 4, top_k = 2, pattern = "M" }}\n'
    toml = write_run(data, tmp_path / "up", name="up.toml", model="dense")
    text = toml.read_text()
    model_table = text.split("[model]\n", 1)[1].split("[data]", 1)[0]
    toml.write_text(text.replace(model_table, extra))
    over = ["train.eval_every=0", "train.save_every=2", "train.keep_last=10"]
    cfg = load_run_config(toml, over)
    assert cfg.model.layer_pattern == "M" and cfg.model.moe.num_experts == 4 and cfg.model.upcycle.experts == 4
    # step 0: the upcycled weights give the dense model's logits
    from effilm.train.init import load_initial_weights

    model = build_model(cfg.model, seed=5)
    load_initial_weights(model, cfg)
    dense = load(dense_dir)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert float((model.eval()(ids).logits - dense(ids).logits).abs().max()) < 1e-5
    full = train(cfg)
    part = tmp_path / "part"
    train(dataclasses.replace(load_run_config(toml, over + ["train.max_steps=3"]), out_dir=str(part)))
    res = train(dataclasses.replace(cfg, out_dir=str(part)), resume=True)
    assert res.resumed_from == 3
    a, b = load_file(str(full.final_dir / "model.safetensors")), load_file(str(res.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trained upcycled model is an ordinary MoE checkpoint: it exports, and transformers agrees
    transformers = pytest.importorskip("transformers")
    from effilm.formats.hf import save_hf

    trained = load(full.final_dir)
    save_hf(trained, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert float((hf(ids).logits - trained(ids).logits).abs().max()) < 1e-4


def test_slice_residual_keeps_the_active_width_and_the_function_when_attention_adds_nothing():
    """H with residual='slice': slice 0 is the residual MLP, two experts per token carry the other
    two slices, so the active MLP width is the dense width. The MoE reads the block's input rather
    than the attention output, so the function is exact when the attention adds nothing (its
    output projection zeroed) and close otherwise."""
    dense = _dense(ffn_dim=96)
    up = UpcycleConfig(experts=4, top_k=2, pattern="H", granularity=3, residual="slice")
    moe = _upcycled(dense, up)
    assert moe.cfg.residual_ffn_dim + moe.cfg.moe.top_k * moe.cfg.moe.expert_ffn_dim == 96
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        near = float((dense(ids).logits - moe(ids).logits).abs().max() / dense(ids).logits.abs().max())
        for m in (dense, moe):
            for block in m.layers:
                block.attn.o.weight.zero_()
        exact = float((dense(ids).logits - moe(ids).logits).abs().max())
    assert exact < 1e-5, exact
    assert 0 < near < 0.5, near


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_upcycles_a_transformers_model_and_transformers_reads_the_result(kind, tmp_path):
    """SRC may be a Hugging Face directory: the upcycled model computes transformers' own logits
    for the dense source, and its Mixtral export is read back by transformers with the same logits."""
    transformers = pytest.importorskip("transformers")
    from hf_models import build_hf

    from effilm.formats.hf import save_hf

    hf = build_hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    out = _cli("upcycle", str(tmp_path / "hf"), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "moe"))
    assert out.returncode == 0, out.stderr
    ids = torch.randint(0, 97, (2, 12))
    model = load(tmp_path / "moe")
    with torch.no_grad():
        ref = hf(ids).logits
        assert float((model(ids).logits - ref).abs().max()) < 1e-4
        save_hf(model, tmp_path / "mixtral")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
        assert float((back(ids).logits - ref).abs().max()) < 1e-4
