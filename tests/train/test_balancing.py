"""Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3): the selection bias, its
update rule, checkpoints and resume, split invariance, balance metrics, and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import make_data, write_run

from effilm.config.model import ModelConfig, MoEConfig
from effilm.config.run import load_run_config
from effilm.errors import ConfigError, EffilmError
from effilm.models.moe import MoE, balance_summary, update_selection_biases
from effilm.models.transformer import build_model
from effilm.train.loop import train

LOSS_FREE = ["model.moe.balance=loss_free", "model.moe.capacity_factor=none", "model.moe.bias_update_rate=0.01"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_data(tmp_path_factory.mktemp("baldata"))


def _run(data: Path, out: Path, overrides=(), resume=False):
    return train(load_run_config(write_run(data, out, name=f"{out.name}.toml", model="arctic"), list(overrides)),
                 resume=resume)


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _loss_free(preset: str) -> ModelConfig:
    return ModelConfig.from_dict({"preset": preset, "moe": {"balance": "loss_free"}})


def _biases(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith("router_bias")}


# ----- the router ------------------------------------------------------------------------------
def test_selection_bias_chooses_experts_but_never_weights_them():
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=6, top_k=2, expert_ffn_dim=8, balance="loss_free"))
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    torch.nn.init.normal_(moe.experts.w_gate_up, std=0.1)
    torch.nn.init.normal_(moe.experts.w_down, std=0.1)
    x = torch.randn(40, 16)
    _, probs, w0, ids0 = moe.route(x)
    assert torch.equal(moe.router_bias, torch.zeros(6))
    assert torch.equal(ids0, probs.topk(2).indices)  # a zero bias changes nothing
    moe.router_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0]))
    _, probs, w, ids = moe.route(x)
    assert (ids.sort(dim=-1).values == torch.tensor([4, 5])).all()  # the bias decides the choice...
    expect = probs[:, 4:6] / probs[:, 4:6].sum(-1, keepdim=True)  # ...the unbiased scores the weights
    assert torch.allclose(w.sort(-1).values, expect.sort(-1).values, atol=1e-7)
    assert "router_bias" in moe.state_dict()  # a buffer: checkpointed, not an optimizer parameter
    assert "router_bias" not in dict(moe.named_parameters())


def test_bias_update_moves_by_gamma_times_sign_of_the_load_gap():
    cfg = _loss_free("tiny-arctic")
    model = build_model(cfg, seed=0)
    n_moe = sum(isinstance(m, MoE) for m in model.modules())
    E = cfg.moe.num_experts
    counts = torch.ones(n_moe, E)  # the mean load is 1: expert 0 overloaded, expert 2 idle, the rest at the mean
    counts[:, 0], counts[:, 2] = 2.0, 0.0
    update_selection_biases(model, counts, 0.01)
    update_selection_biases(model, counts, 0.01)
    for m in (m for m in model.modules() if isinstance(m, MoE)):
        expect = torch.zeros(E)
        expect[0], expect[2] = -0.02, 0.02
        assert torch.allclose(m.router_bias, expect)
    with pytest.raises(ValueError, match="rows of routing counts"):
        update_selection_biases(model, counts[:1], 0.01)


def test_balance_summary():
    s = balance_summary(torch.tensor([[4.0, 4.0, 4.0, 4.0], [13.0, 2.0, 0.0, 1.0]]))
    assert s["load_max_over_mean"] == [1.0, 3.25] and s["starved_frac"] == [0.0, 0.25]  # 0 < 4/4; 1 is not


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="moe.balance"):
        MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, balance="magic")
    with pytest.raises(ConfigError, match="sparsemixer"):
        MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, router="sparsemixer", balance="loss_free")
    with pytest.raises(ConfigError, match="bias_update_rate"):
        MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, bias_update_rate=-1)


# ----- training ----------------------------------------------------------------------------------
def test_loss_free_run_updates_biases_from_the_global_load_and_logs_balance(data, tmp_path):
    res = _run(data, tmp_path / "one", LOSS_FREE + ["train.max_steps=1", "train.log_every=1"])
    rec = _records(res.run_dir)[0]
    state = load_file(str(res.final_dir / "model.safetensors"))
    biases = _biases(state)
    assert len(biases) == len(rec["expert_load"]) == 2
    for (_, bias), load in zip(sorted(biases.items()), rec["expert_load"], strict=True):
        load = torch.tensor(load)
        assert torch.allclose(bias, 0.01 * torch.sign(load.mean() - load), atol=1e-7), (bias, load)
    # balance is reported per layer, and agrees with the logged loads
    E = len(rec["expert_load"][0])
    assert rec["load_max_over_mean"] == [pytest.approx(max(r) * E, rel=1e-3) for r in rec["expert_load"]]
    assert rec["starved_frac"] == [pytest.approx(sum(x < 0.25 / E for x in r) / E) for r in rec["expert_load"]]
    assert rec["aux_loss"] > 0.5  # still reported, though not trained on


def test_loss_free_is_split_invariant_but_the_switch_loss_is_not(data, tmp_path):
    """The same global batch as 1, 2 or 8 micro-batches: with loss-free balancing the losses (1e-5
    relative) and weights (1e-4) agree and the biases are identical; the Switch loss's gradient
    depends on the split, so with it the weights drift apart (the comparison can fail)."""
    base = ["train.max_steps=6", "train.log_every=1", "train.save_every=0", "train.eval_every=0", "optim.lr=1e-2"]
    finals, losses = {}, {}
    for micro in (8, 4, 1):
        res = _run(data, tmp_path / f"lf{micro}", LOSS_FREE + base + [f"train.micro_batch={micro}"])
        finals[micro] = load_file(str(res.final_dir / "model.safetensors"))
        losses[micro] = [r["loss"] for r in _records(res.run_dir)]
    ref = finals[8]
    assert any(bool(b.ne(0).any()) for b in _biases(ref).values())
    for micro in (4, 1):
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses[micro], losses[8], strict=True)), losses
        worst = max(float((finals[micro][k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref)
        assert worst < 1e-4, (micro, worst)
        assert all(torch.equal(finals[micro][k], ref[k]) for k in _biases(ref))
    switch = {}
    for micro in (8, 1):
        res = _run(data, tmp_path / f"sw{micro}", base + [f"train.micro_batch={micro}", "model.moe.capacity_factor=none",
                                                       "model.moe.aux_loss_coef=0.1"])
        switch[micro] = load_file(str(res.final_dir / "model.safetensors"))
    drift = max(float((switch[1][k] - switch[8][k]).abs().max() / switch[8][k].abs().max()) for k in switch[8])
    print(f"loss-free worst weight diff {worst:.2e}; Switch-loss drift {drift:.2e}")
    assert drift > 1e-3, drift


def test_loss_free_resume_is_bitwise_identical(data, tmp_path):
    full = _run(data, tmp_path / "full", LOSS_FREE)
    _run(data, tmp_path / "part", LOSS_FREE + ["train.max_steps=3"])
    res = _run(data, tmp_path / "part", LOSS_FREE, resume=True)
    assert res.resumed_from == 3
    a, b = load_file(str(full.final_dir / "model.safetensors")), load_file(str(res.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and _biases(a) and all(torch.equal(a[k], b[k]) for k in a)


# ----- leaving effilm ----------------------------------------------------------------------------
def test_exports_refuse_a_model_that_routes_with_a_bias(tmp_path):
    from effilm.formats.gguf import gguf_tensors
    from effilm.formats.hf import save_hf

    model = build_model(_loss_free("tiny-moe"), seed=0)
    save_hf(model, tmp_path / "zero")  # an all-zero bias changes nothing: exported without it
    assert not any("bias" in k for k in load_file(str(tmp_path / "zero" / "model.safetensors")))
    next(m for m in model.modules() if isinstance(m, MoE)).router_bias[1] = 0.3
    with pytest.raises(EffilmError, match="selection bias .*MoE layers \\[0\\].*Hugging Face"):
        save_hf(model, tmp_path / "hf")
    with pytest.raises(EffilmError, match="GGUF format has no place"):
        gguf_tensors(model)


def test_generation_routes_with_the_bias(tmp_path):
    """The engine's decode steps choose experts with the selection bias, as Transformer.forward does;
    a checkpoint round trip and quantization keep it."""
    from engine_fixtures import assert_steps_match_forward

    from effilm.formats.checkpoint import save
    from effilm.formats.load import load

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({"preset": "tiny-moe", "init_std": 0.08, "moe": {"balance": "loss_free"}}))
    for m in model.modules():
        if isinstance(m, MoE):
            m.router_bias.copy_(torch.randn_like(m.router_bias) * 0.2)  # large enough to change choices
    model.eval()
    save(model, tmp_path / "m")
    model = load(tmp_path / "m")
    assert all(bool(m.router_bias.ne(0).any()) for m in model.modules() if isinstance(m, MoE))
    from effilm.config.quant import QuantConfig
    from effilm.quant.pipeline import quantize_dir

    quantize_dir(tmp_path / "m", tmp_path / "q", QuantConfig(bits=8), compare_rtn=False)  # the bias stays fp32
    q_biases = [m.router_bias for m in load(tmp_path / "q").modules() if isinstance(m, MoE)]
    assert all(torch.equal(a, m.router_bias) for a, m in zip(q_biases, (m for m in model.modules() if isinstance(m, MoE))))
    assert_steps_match_forward(model, [5, 6, 7, 8, 9, 10, 11])
