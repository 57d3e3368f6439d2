"""`torchrun --nproc_per_node=2 -m effilm train` on CPU (gloo): FSDP2 + expert parallelism.

Two ranks each take half of the global batch. Per-step losses must equal a one-process run's to
1e-5 relative (fp32; the ranks' matmuls see different row counts, so rounding differs), the
reported aux loss likewise, and a checkpoint written by the 2-process run must resume in one process
and finish with weights within 1e-4 (relative to each tensor's largest entry) of the one-process run's (AdamW amplifies rounding on
near-zero gradients; bitwise equality is only claimed for same-world-size resume).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import repo
import torch
from safetensors.torch import load_file
from train_fixtures import make_data, write_run

from effilm.config.run import load_run_config
from effilm.train.loop import train

SRC = str(repo.SRC)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["aux_loss"]) for r in recs if r["kind"] == "train"]


@pytest.mark.dist
def test_torchrun_fsdp_ep_matches_one_process_and_resumes_at_another_world_size(tmp_path):
    torch.set_num_threads(1)
    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data")
    # dropless routing: a capacity limit is per forward pass, so it would depend on the split
    over = ["train.log_every=1", "train.save_every=2", "train.eval_every=0", "optim.lr=1e-2",
            "model.moe.capacity_factor=none", "train.keep_last=10"]
    # one process, micro-batch 8 = the two ranks' micro-batches of 4 together (the load-balancing
    # gradient is taken per global micro-batch, see docs/ARCHITECTURE.md)
    one = train(load_run_config(write_run(data, tmp_path / "one", name="one.toml", model="arctic"),
                                over + ["train.micro_batch=8"]))
    ref = _losses(one.run_dir)
    # two ranks for the whole run; then its step-4 checkpoint is resumed in one process
    toml = write_run(data, tmp_path / "two", name="two.toml", model="arctic")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "effilm", "train", str(toml), *[f"--{o}" for o in over],
           "--train.parallelism=fsdp+ep"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    two = _losses(tmp_path / "two")
    assert [s for s, _, _ in two] == list(range(1, 9))
    for (s, loss, aux), (_, rloss, raux) in zip(two, ref, strict=False):
        assert abs(loss - rloss) <= 1e-5 * abs(rloss), (s, loss, rloss)
        assert abs(aux - raux) <= 1e-5 * abs(raux), (s, aux, raux)
    state = json.loads((tmp_path / "two/checkpoints/step-00000004/trainer_state.json").read_text())
    assert state["world_size"] == 2
    import shutil

    for step in (6, 8):
        shutil.rmtree(tmp_path / f"two/checkpoints/step-{step:08d}")
    shutil.rmtree(tmp_path / "two/final")
    res = train(load_run_config(toml, over + ["train.micro_batch=8"]), resume=True)
    assert res.resumed_from == 4 and res.steps == 8
    a, b = load_file(str(one.final_dir / "model.safetensors")), load_file(str(res.final_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst < 1e-4, worst
    print(json.dumps({"per_step_loss_rel": [abs(x[1] - y[1]) / abs(y[1]) for x, y in zip(two, ref, strict=False)],
                      "final_weights_rel": worst}))


@pytest.mark.dist
def test_torchrun_loss_free_balancing_gives_one_process_biases_and_weights(tmp_path):
    """Loss-free balancing has no split-dependent gradient: 2 ranks (FSDP2 + expert parallelism)
    give the one-process losses (1e-5 relative), weights (1e-4) and the same selection biases."""
    torch.set_num_threads(1)
    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data")
    over = ["train.log_every=1", "train.save_every=0", "train.eval_every=0", "optim.lr=1e-2",
            "model.moe.capacity_factor=none", "model.moe.balance=loss_free", "model.moe.bias_update_rate=0.01"]
    one = train(load_run_config(write_run(data, tmp_path / "one", name="one.toml", model="arctic"),
                                over + ["train.micro_batch=2"]))
    toml = write_run(data, tmp_path / "two", name="two.toml", model="arctic")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "effilm", "train", str(toml), *[f"--{o}" for o in over],
           "--train.parallelism=fsdp+ep", "--train.micro_batch=4"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ref, two = _losses(one.run_dir), _losses(tmp_path / "two")
    assert [s for s, _, _ in two] == [s for s, _, _ in ref] == list(range(1, 9))
    for (s, loss, _), (_, rloss, _) in zip(two, ref, strict=True):
        assert abs(loss - rloss) <= 1e-5 * abs(rloss), (s, loss, rloss)
    a, b = load_file(str(one.final_dir / "model.safetensors")), load_file(str(tmp_path / "two/final/model.safetensors"))
    assert a.keys() == b.keys()
    biases = [k for k in a if k.endswith("router_bias")]
    assert biases and any(bool(a[k].ne(0).any()) for k in biases)
    assert all(torch.equal(a[k], b[k]) for k in biases)
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst < 1e-4, worst
