"""The fast (packed CPU) kernels of quantized layers: within bf16 rounding of the exact path, the
fallbacks, the switch, and checkpoints that never see the packed layout."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import assert_steps_match_forward

from effilm.config.model import ModelConfig
from effilm.config.quant import QuantConfig
from effilm.errors import ConfigError
from effilm.formats.load import load
from effilm.inference.engine import Engine, SamplingParams
from effilm.models.quantized import QuantExperts, QuantLinear, rtn, set_kernel, using_kernel
from effilm.models.transformer import build_model
from effilm.quant.quantize import quantize_model, save_quantized

# The fast kernels round activations, scales and outputs to bf16 (8-bit mantissa, 2^-9 relative):
# one projection's output is within REL_TOL (relative L2) of the exact path's
REL_TOL = 1e-2

FAST_CASES = [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32), QuantConfig(bits=4, group_size=64, asym=True),
              QuantConfig(bits=4, group_size=128)]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _linear(cfg: QuantConfig, n_out: int = 96, n_in: int = 256, bias: bool = True, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    ql = QuantLinear(n_in, n_out, bias, cfg)
    ql.qweight.set_codes(rtn(torch.randn(n_out, n_in, generator=g), cfg))
    if bias:
        ql.bias.data = torch.randn(n_out, generator=g)
    return ql


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _model(preset="tiny-dense", **kw):
    return build_model(ModelConfig.from_name(preset, vocab_size=384, tie_embeddings=False, init_std=0.08, **kw),
                       seed=0).eval()


@pytest.mark.parametrize("cfg", FAST_CASES, ids=lambda c: f"int{c.bits}-g{c.group_size}-{'asym' if c.asym else 'sym'}")
@pytest.mark.parametrize("rows", [1, 5])
def test_fast_kernel_within_bf16_rounding_of_exact(cfg, rows):
    ql = _linear(cfg)
    assert ql.qweight.fast_unsupported() is None
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = ql(x)
        ql.kernel = "fast"
        fast = ql(x)
    assert fast.shape == exact.shape and fast.dtype == torch.float32
    assert 0 < _rel(fast, exact) <= REL_TOL  # not the exact path, and close to it
    ql.kernel = "exact"
    assert torch.equal(ql(x), exact)


@pytest.mark.parametrize("cfg, n_out, n_in, why", [
    (QuantConfig(bits=8, asym=True), 96, 256, "asymmetric int8"),
    (QuantConfig(bits=8, group_size=32), 96, 256, "int8 with groups"),
    (QuantConfig(bits=8), 96, 48, "multiple of 32"),
    (QuantConfig(bits=4, group_size=32), 40, 256, "multiple of 16"),
])  # fmt: skip
def test_unsupported_shapes_take_the_exact_path(cfg, n_out, n_in, why):
    ql = _linear(cfg, n_out, n_in)
    assert why in ql.qweight.fast_unsupported()
    x = torch.randn(3, n_in)
    with torch.no_grad():
        exact = ql(x)
        ql.kernel = "fast"
        assert torch.equal(ql(x), exact)
    assert ql.qweight.fast_form() is None


def test_fast_kernel_edge_inputs():
    """Weights off the CPU are not the fast kernels' (CUDA, meta: the exact path); an empty batch
    and weights built in inference mode (no version counter) still work."""
    meta = QuantLinear(256, 96, False, QuantConfig(bits=8)).to("meta")
    assert "meta" in meta.qweight.fast_unsupported()
    cfg = QuantConfig(bits=4, group_size=32)
    with torch.inference_mode():
        ql = _linear(cfg, bias=False)
    ql.kernel = "fast"
    with torch.no_grad():
        assert ql(torch.randn(0, 256)).shape == (0, 96)
        exact = _linear(cfg, bias=False)(x := torch.randn(4, 256))
        assert _rel(ql(x), exact) <= REL_TOL
    assert ql.qweight.fast_form() is ql.qweight.fast_form()


def test_set_kernel_switch_and_scope():
    model, _ = quantize_model(_model(), QuantConfig(bits=4, group_size=32))
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.kernel == "exact" for m in mods)  # exact by default: what parity checks see
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids).logits
        with using_kernel(model, "fast"):
            assert all(m.kernel == "fast" for m in mods)
            fast = model(ids).logits
        assert all(m.kernel == "exact" for m in mods)
        assert torch.equal(model(ids).logits, exact)
    assert not torch.equal(fast, exact) and (fast - exact).abs().max() < 0.25
    assert set_kernel(model, "fast") == len(mods)  # every tiny-dense projection is supported
    with pytest.raises(ConfigError, match="kernel"):
        set_kernel(model, "turbo")


def test_engine_turns_fast_on_by_default_and_exact_on_request():
    model, _ = quantize_model(_model(), QuantConfig(bits=8))
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    engine = Engine(model, None)
    assert engine.quant_kernel == "fast" and engine.fast_quant_weights == len(mods)
    assert all(m.kernel == "fast" for m in mods)
    Engine(model, None, quant_kernel="exact")
    assert all(m.kernel == "exact" for m in mods)
    with pytest.raises(ConfigError):
        Engine(model, None, quant_kernel="nope")
    fp = _model()
    assert Engine(fp, None).fast_quant_weights == 0  # no quantized layers: nothing to switch


@pytest.mark.parametrize("preset, cfg", [
    ("tiny-dense", QuantConfig(bits=8)),
    ("tiny-dense", QuantConfig(bits=4, group_size=32)),
    ("tiny-dense", QuantConfig(bits=4, group_size=64, asym=True)),
    ("tiny-moe", QuantConfig(bits=4, group_size=32, asym=True)),
])  # fmt: skip
def test_fast_decode_close_to_exact_decode(preset, cfg):
    """The engine's steps (prefill + decode; MoE: the chosen experts through the packed kernels):
    teacher-forced logits of the fast kernels against the exact ones, and greedy tokens."""
    from effilm.inference.decode import DecodePlan, decode_step, prefill

    model, _ = quantize_model(_model(preset), cfg)
    if preset == "tiny-moe":
        assert all(isinstance(b.moe.experts, QuantExperts) for b in model.layers)
    seq = torch.randint(0, 384, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    out = {}
    for kernel in ("exact", "fast"):
        set_kernel(model, kernel)
        cache = model.new_cache(1, 32)
        rows = [prefill(model, torch.tensor([seq[:8]]), cache, None, None)]
        plan = DecodePlan(model)
        rows += [decode_step(model, torch.tensor([t]), cache, None, None, plan) for t in seq[8:]]
        out[kernel] = torch.cat(rows)
    delta = (out["fast"] - out["exact"]).abs().max().item()
    agree = (out["fast"].argmax(-1) == out["exact"].argmax(-1)).float().mean().item()
    print(f"\n[kernels] {preset} int{cfg.bits}: max |dlogit| {delta:.3e}, argmax agreement {agree:.3f}")
    assert delta > 0 and agree >= 0.8
    if preset == "tiny-dense":  # MoE: a near-tie in the router may pick another expert, a larger jump
        assert delta < 0.5


def test_packed_layout_never_reaches_a_checkpoint(tmp_path):
    """The packed form is built on first use beside the codes, never in the state dict; a checkpoint
    saved after fast decoding holds the original codes and loads to the same model; changed codes
    rebuild the packed form."""
    model, spec = quantize_model(_model(), QuantConfig(bits=4, group_size=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Engine(model, None).generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))
    qw = model.layers[0].attn.qkv.qweight
    form = qw.fast_form()
    assert form is not None and qw.fast_form() is form  # cached
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    save_quantized(model, spec, tmp_path / "q")
    loaded = load(tmp_path / "q")
    assert all(torch.equal(loaded.state_dict()[k], before[k]) for k in before)
    assert all(m.kernel == "exact" for m in loaded.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        qw.q.copy_(loaded.layers[1].attn.qkv.qweight.q)  # new codes: the packed form follows
    assert qw.fast_form() is not form


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-arctic"])
def test_exact_decode_of_int4_experts_matches_forward(preset):
    """Quantized experts of any format take the engine's decode step (one chosen expert's codes at a
    time); with the exact kernel it gives Transformer.forward's logits."""
    from effilm.inference.decode import supports

    model, _ = quantize_model(_model(preset), QuantConfig(bits=4, group_size=32, asym=True))
    assert supports(model)
    assert_steps_match_forward(model, [5, 6, 7, 8, 9, 10], (3, 4), tol=1e-4, check_prefill=False)


@pytest.mark.parametrize("cfg", [QuantConfig(bits=8), QuantConfig(bits=8, asym=True), QuantConfig(bits=8, group_size=32),
                                 QuantConfig(bits=4, group_size=32), QuantConfig(bits=4, group_size=64, asym=True)])
def test_dequantize_is_the_codes_bit_for_bit(cfg):
    """The exact path's in-place dequantization equals the reference formula exactly, whole or per
    expert."""
    from effilm.models.quantized import QuantWeight, dequantize_codes

    w = torch.randn(3, 48, 128, generator=torch.Generator().manual_seed(0))
    qw = QuantWeight(w.shape, cfg)
    qw.set_codes(rtn(w, cfg))
    ref = dequantize_codes(qw.codes())
    assert torch.equal(qw.dequantize(), ref)
    assert all(torch.equal(qw.dequantize(e), ref[e]) for e in range(3))
