"""The training loop: configs and overrides, schedules, metrics, checkpoints, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import repo
import torch
from safetensors.torch import load_file
from train_fixtures import make_data, write_run

from effilm.config.reader import parse_value
from effilm.config.run import OptimConfig, RunConfig, load_run_config
from effilm.errors import ConfigError, EffilmError
from effilm.train.loop import TrainingError, train
from effilm.train.optim import make_schedule, param_groups

SRC = str(repo.SRC)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_data(tmp_path_factory.mktemp("traindata"))


def _cfg(data: Path, out: Path, overrides=(), **kw) -> RunConfig:
    return load_run_config(write_run(data, out, name=f"{out.name}.toml", **kw), list(overrides))


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ----- config ----------------------------------------------------------------------------------
def test_run_file_preset_overrides_and_types(data, tmp_path):
    path = write_run(data, tmp_path / "r", model="arctic")
    cfg = load_run_config(path, ["optim.lr=1e-2", "model.moe.num_experts=16", "train.precision=fp32",
                                 "optim.grad_clip=none"])
    assert cfg.model.layer_pattern == "H" and cfg.model.moe.num_experts == 16
    assert cfg.model.moe.expert_ffn_dim == 16  # the run file's moe table merged over the preset's
    assert cfg.optim.lr == 1e-2 and cfg.optim.grad_clip is None
    assert parse_value("[1, 2]") == [1, 2] and parse_value("text") == "text" and parse_value("true") is True
    # the resolved config round-trips through config.json
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'lr'"):
        load_run_config(path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"train\.global_batch='many' should be of type int"):
        load_run_config(path, ["train.global_batch=many"])
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k=.*int"):
        load_run_config(path, ["model.moe.top_k=2.5"])


def test_misspelt_key_in_file_names_it(data, tmp_path):
    path = write_run(data, tmp_path / "r")
    path.write_text(path.read_text().replace("warmup_steps", "warmup_step"))
    with pytest.raises(ConfigError, match=r"warmup_step.*did you mean 'warmup_steps'"):
        load_run_config(path)


# ----- optimizer and schedule ---------------------------------------------------------------------------
def test_param_groups_exclude_norms_biases_embeddings():
    from effilm.config.model import ModelConfig
    from effilm.models.transformer import build_model

    model = build_model(ModelConfig.from_name("tiny-arctic", vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2,
                                              ffn_dim=64, residual_ffn_dim=32, n_layers=1, lm_head_bias=True))
    decay, no_decay = param_groups(model, OptimConfig())
    assert "embed.weight" in no_decay["names"] and "lm_head.bias" in no_decay["names"]
    assert all("norm" not in n for n in decay["names"])
    assert any(n.endswith("experts.w_gate_up") for n in decay["names"]) and any("router" in n for n in decay["names"])
    n_all = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_all


def test_schedules():
    bounds = [("s1", 0, 10), ("s2", 10, 20)]
    cos = make_schedule(OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1), bounds, 20)
    assert cos.lr(0) == pytest.approx(0.5) and cos.lr(1) == pytest.approx(1.0)
    assert cos.lr(2) == pytest.approx(1.0) and 0.1 < cos.lr(19) < 0.12
    assert all(cos.lr(i) >= cos.lr(i + 1) for i in range(1, 19))
    wsd = make_schedule(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=2, decay_fraction=0.2), bounds, 20)
    assert [wsd.lr(i) for i in (2, 10, 15)] == [1.0, 1.0, 1.0]
    assert wsd.lr(19) == pytest.approx(0.1) and wsd.lr(16) < 1.0
    per_stage = make_schedule(OptimConfig(lr=1.0, warmup_steps=2, scope="stage"), bounds, 20)
    assert per_stage.lr(10) == pytest.approx(0.5) and per_stage.lr(9) < 0.2  # restarts at stage 2
    capped = make_schedule(OptimConfig(lr=1.0, warmup_steps=0, scope="stage"), bounds, 12)
    assert capped.lr(11) < capped.lr(10)  # the clipped last stage still decays


# ----- a run ---------------------------------------------------------------------------------------
def test_train_moe_run_metrics_checkpoints_and_final(data, tmp_path):
    cfg = _cfg(data, tmp_path / "moe", model="arctic")
    res = train(cfg)
    assert res.steps == 8 and res.tokens == 8 * 8 * 32
    recs = _records(res.run_dir, "train")
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    for r in recs:
        assert set(r) >= {"loss", "lr", "grad_norm", "tok_per_s", "aux_loss", "z_loss", "dropped_frac",
                          "expert_load", "moe_layers", "active_flops", "stage"}
        assert len(r["expert_load"]) == 2 and all(abs(sum(row) - 1) < 1e-4 for row in r["expert_load"])
        assert 0 <= r["dropped_frac"] < 1 and r["aux_loss"] > 0.5
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert [r["stage"] for r in recs] == ["s1", "s1", "s2", "s2"]
    vals = _records(res.run_dir, "val")
    assert [v["step"] for v in vals] == [4, 8] and set(vals[0]["val_loss"]) == {"web"}
    # checkpoints every 3 steps and at the end, last 2 kept
    names = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000008"]
    state = json.loads((res.run_dir / "checkpoints/step-00000008/trainer_state.json").read_text())
    assert state["schema_version"] == 1 and state["step"] == 8 and state["loader"]["step"] == 8
    # the final model is a plain checkpoint with its tokenizer, and equals the last checkpoint
    from effilm.formats.load import load

    model = load(res.final_dir)
    assert (res.final_dir / "tokenizer.json").is_file()
    last = _weights(res.run_dir / "checkpoints/step-00000008")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in last.items())
    with pytest.raises(EffilmError, match="already holds checkpoints; pass --resume"):
        train(cfg)


def test_aux_loss_and_loss_independent_of_micro_batches(data, tmp_path):
    """The same global batch split into 1 or 4 micro-batches: same reported loss and aux loss."""
    out = {}
    for micro in (8, 2):
        cfg = _cfg(data, tmp_path / f"m{micro}", model="arctic",
                   overrides=[f"train.micro_batch={micro}", "train.max_steps=1", "train.log_every=1",
                              "model.moe.capacity_factor=none"])
        train(cfg)
        out[micro] = _records(Path(cfg.out_dir), "train")[0]
    a, b = out[8], out[2]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
    assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-6)
    assert a["z_loss"] == pytest.approx(b["z_loss"], rel=1e-6)
    assert torch.allclose(torch.tensor(a["expert_load"]), torch.tensor(b["expert_load"]), atol=1e-6)


def test_resume_from_checkpoint_is_bitwise_identical(data, tmp_path):
    full = train(_cfg(data, tmp_path / "full", model="arctic"))
    part = _cfg(data, tmp_path / "part", model="arctic", overrides=["train.max_steps=3"])
    train(part)
    # continue the same run (max_steps lifted) from its step-3 checkpoint
    cont = _cfg(data, tmp_path / "part", model="arctic")
    res = train(cont, resume=True)
    assert res.resumed_from == 3 and res.steps == 8
    a, b = _weights(full.final_dir), _weights(res.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics read as one run: steps rise, none repeated (the capped run logged its last step, 3)
    steps = [r["step"] for r in _records(res.run_dir, "train")]
    assert steps == [2, 3, 4, 6, 8]


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "effilm", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_step(run: Path, step: int, proc, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = run / "metrics.jsonl"
        if m.exists():
            for line in m.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) >= step:
                        return
                except json.JSONDecodeError:
                    pass
        if proc.poll() is not None:
            return
        time.sleep(0.02)
    raise AssertionError("training made no progress")


def test_sigkill_at_any_moment_then_resume_is_bitwise_identical(data, tmp_path):
    """Really kill the trainer (SIGKILL) at several moments; each resumed run ends bitwise equal."""
    ref = train(_cfg(data, tmp_path / "ref", model="arctic", stage_tokens=1536))
    ref_w = _weights(ref.final_dir)
    for i, kill_after in enumerate((1, 4, 7)):
        run = tmp_path / f"k{i}"
        toml = write_run(data, run, name=f"k{i}.toml", model="arctic", stage_tokens=1536)
        proc = _run_cli([str(toml)])
        _wait_for_step(run, kill_after, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        out = subprocess.run([sys.executable, "-m", "effilm", "train", str(toml), "--resume"],
                             env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        got = _weights(run / "final")
        assert all(torch.equal(ref_w[k], got[k]) for k in ref_w), f"kill after step {kill_after}"
        steps = [r["step"] for r in _records(run, "train")]
        assert steps == sorted(set(steps)) and steps[-1] == 12


def test_sigterm_checkpoints_and_stops_cleanly(data, tmp_path):
    run = tmp_path / "term"
    toml = write_run(data, run, model="dense", stage_tokens=4096)
    proc = _run_cli([str(toml)])
    _wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # stopped, not finished: a distinct, documented exit status
    assert "stopped by SIGTERM" in out and "--resume" in out
    from effilm.train.state import latest_valid

    path, state = latest_valid(run)
    assert state["step"] >= 2 and not (run / "final").exists()


def test_leftovers_of_a_crash_are_cleaned_on_resume(data, tmp_path):
    cfg = _cfg(data, tmp_path / "crash", overrides=["train.max_steps=3"])
    train(cfg)
    run = Path(cfg.out_dir)
    partial = run / "checkpoints" / ".step-00000006.abc.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 5, "lo')  # cut short by the crash
    # a corrupted newest checkpoint is skipped (and reported), the one before is used
    good = run / "checkpoints" / "step-00000003"
    broken = run / "checkpoints" / "step-00000004"
    import shutil

    shutil.copytree(good, broken)
    (broken / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step-00000004.*checksum"):
        res = train(_cfg(data, tmp_path / "crash"), resume=True)
    assert res.resumed_from == 3 and not partial.exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)


# ----- failure handling --------------------------------------------------------------------------------
def test_nan_guard_stop_and_skip(data, tmp_path, monkeypatch):
    from effilm.train.objectives import LanguageModeling, MicroLoss

    real = LanguageModeling.micro_loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] in (9, 10):  # both micro-batches of step 5
            return MicroLoss(out.loss * float("nan"), out.loss_sum * float("nan"), out.routing)
        return out

    monkeypatch.setattr(LanguageModeling, "micro_loss", poisoned)
    cfg = _cfg(data, tmp_path / "nan")
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 5.*step-00000003.*untouched"):
        train(cfg)
    from effilm.train.state import latest_valid

    path, state = latest_valid(Path(cfg.out_dir))
    assert state["step"] == 3
    calls["n"] = 0
    res = train(_cfg(data, tmp_path / "skip", overrides=["train.nan_policy=skip"]))
    events = [r for r in _records(res.run_dir, "event") if r["event"] == "nan_skip"]
    assert [e["step"] for e in events] == [5] and res.steps == 8
    assert all(math.isfinite(v.float().sum()) for v in _weights(res.final_dir).values())


@pytest.mark.parametrize("problem", ["missing", "checksum", "vocab", "tokenizer"])
def test_bad_input_fails_before_training(data, tmp_path, problem):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(data, root)
    overrides = []
    if problem == "missing":
        shutil.rmtree(root / "syn")
        match = r"data source 'syn'"
    elif problem == "checksum":
        shard = sorted((root / "web").glob("shard_*.bin"))[0]
        raw = bytearray(shard.read_bytes())
        raw[0] ^= 1
        shard.write_bytes(bytes(raw))
        match = r"sha256|checksum"
    elif problem == "vocab":
        overrides = ["model.vocab_size=256"]
        match = r"vocab"
    else:
        from effilm.config.data import TokenizerTrainConfig
        from effilm.data.tokenizer import train_tokenizer

        other = train_tokenizer([root / "syn.jsonl"], root / "tok2", TokenizerTrainConfig(vocab_size=290))
        overrides = [f"tokenizer={other}"]
        match = r"another tokenizer"
    cfg = _cfg(root, tmp_path / "out", overrides=overrides)
    with pytest.raises(EffilmError, match=match):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(data, tmp_path):
    toml = write_run(data, tmp_path / "cli")
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-m", "effilm", "train", str(toml), "--optim.lr", "abc"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "optim.lr='abc' should be of type float" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "effilm", "train", str(toml), "--print-config", "--train.seed=5"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["train"]["seed"] == 5


def test_contamination_precheck_runs_before_training(data, tmp_path):
    from eval_fixtures import make_mmlu_dir
    from train_fixtures import docs, write_jsonl

    from effilm.config.data import TokenizeConfig
    from effilm.data.shards import tokenize_files

    tests, _ = make_mmlu_dir(tmp_path / "quiz", n_test=6)
    leaked = tests[3]
    texts = docs(60, 9, "web")
    texts[7] = f"Notes. {leaked['question']} {leaked['choices'][leaked['answer']]}. More notes."
    root = tmp_path / "d"
    import shutil

    shutil.copytree(data, root)
    shutil.rmtree(root / "web")
    tokenize_files([write_jsonl(root / "web.jsonl", texts)], root / "tok", root / "web", TokenizeConfig())
    spec = f"mmlu:{tmp_path / 'quiz'},name=quiz"
    cfg = _cfg(root, tmp_path / "pre", overrides=[f'train.precheck_benchmarks=["{spec}"]'])
    with pytest.raises(EffilmError, match=r"web\.jsonl:8.*high_school_physics/3"):
        train(cfg)
    assert not (tmp_path / "pre").exists()
    warn_only = _cfg(root, tmp_path / "pre2", overrides=[f'train.precheck_benchmarks=["{spec}"]',
                                                          "train.precheck_fail=false", "train.max_steps=1"])
    res = train(warn_only)
    assert res.steps == 1


@pytest.mark.slow
def test_compiled_moe_training_matches_eager(data, tmp_path):
    """train.compile on a CPU MoE model: torch.compile cannot trace CPU fp32 grouped_mm, so the
    expert kernel takes the loop path while compiling; losses match the eager run."""
    eager = train(_cfg(data, tmp_path / "eager", model="arctic"))
    compiled = train(_cfg(data, tmp_path / "compiled", ["--train.compile=true"], model="arctic"))
    a, b = _records(eager.run_dir, "train"), _records(compiled.run_dir, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-4), (ra["loss"], rb["loss"])
