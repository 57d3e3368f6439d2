"""MLX export: mlx-lm (the on-device peer) runs what effilm ships, in fp32 and quantized.

Skipped only when mlx / mlx-lm are missing (the ``mlx-check`` extra; ``dev`` installs it).
``pytest -s`` prints the agreement figures and export sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import effilm
from effilm.config import ModelConfig
from effilm.config.quant import QuantConfig
from effilm.errors import ConfigError
from effilm.formats.convert import ConvertConfig, convert
from effilm.formats.mlx import export_mlx, mlx_dequantize, pack_uint32, unpack_uint32
from effilm.inference.engine import Engine
from effilm.inference.sampling import SamplingParams
from effilm.models.transformer import build_model
from effilm.quant.quantize import quantize_model, save_quantized

mx = pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")
mlx_generate = pytest.importorskip("mlx_lm.generate")
mlx_lm = pytest.importorskip("mlx_lm")

TOL = 1e-3
VOCAB = 211
STEPS = 16

# effilm's tiny models of each family mlx-lm runs (Arctic has no mlx-lm model: GGUF is its route)
FAMILIES = {
    "llama": dict(preset="tiny-dense"),
    "phi3": dict(preset="tiny-dense", hf_architecture="Phi3ForCausalLM", n_kv_heads=3, tie_embeddings=False),
    "mixtral": dict(preset="tiny-moe"),
    "phimoe": dict(preset="tiny-moe", hf_architecture="PhimoeForCausalLM", norm="layernorm", norm_bias=True,
                   attn_bias=True, attn_out_bias=True, lm_head_bias=True, tie_embeddings=False,
                   moe=dict(num_experts=8, top_k=2, expert_ffn_dim=288, router="sparsemixer", renormalize=False)),
    "openelm": dict(preset="tiny-openelm"),
}  # fmt: skip
# widths that groups of 128 divide (the tiny presets' 192 does not)
WIDE = {"llama-d256": dict(preset="tiny-dense", d_model=256, n_heads=4, n_kv_heads=2, ffn_dim=512)}


def family_model(kind: str, seed: int = 0):
    """A tiny effilm model of ``kind`` with random, non-trivial norms and biases (fp32, eval)."""
    over = dict({**FAMILIES, **WIDE}[kind])
    preset = over.pop("preset")
    model = build_model(ModelConfig.from_name(preset, vocab_size=VOCAB, **over), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif "router" in name:
                p.normal_(0.0, 0.5, generator=g)
    return model


def mlx_logits(mlx_model, ids: torch.Tensor) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(mlx_model(mx.array(ids.numpy())).astype(mx.float32)))


def mlx_greedy(mlx_model, prompt: list[int], steps: int = STEPS) -> list[int]:
    """mlx-lm's own generation loop (KV cache, argmax), as ``mlx_lm.generate`` runs it."""
    out = []
    for tok, _ in mlx_generate.generate_step(mx.array(prompt), mlx_model, max_tokens=steps):
        out.append(int(tok.item() if hasattr(tok, "item") else tok))
    return out


def effilm_greedy(model, prompt: list[int], steps: int = STEPS) -> list[int]:
    """effilm's engine (its decode step, greedy, the exact kernel of quantized layers: a parity
    check); no EOS, so it runs all ``steps``."""
    (c,) = Engine(model, None, quant_kernel="exact").generate([prompt], SamplingParams(max_new_tokens=steps))
    return c.token_ids


def check_agreement(model, out: Path, label: str) -> float:
    """mlx-lm's logits and greedy tokens on the export at ``out`` against ``model``'s; returns max |Δ|."""
    mlx_model, _ = mlx_utils.load_model(out)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
    delta = (mlx_logits(mlx_model, ids) - ref).abs().max().item()
    prompt = ids[0, :7].tolist()
    ours, theirs = effilm_greedy(model, prompt), mlx_greedy(mlx_model, prompt)
    size = (out / "model.safetensors").stat().st_size
    print(f"\n[mlx] {label}: max |dlogit| {delta:.2e}, greedy {STEPS} equal: {ours == theirs}, {size:,} bytes")
    assert delta <= TOL, f"{label}: max |dlogit| {delta}"
    assert len(ours) == STEPS and ours == theirs, f"{label}: effilm {ours} vs mlx-lm {theirs}"
    return delta


# ----- the number format -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_mlx_quantize_layout(bits):
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    wq, s, b = mx.quantize(mx.array(w.numpy()), group_size=64, bits=bits)
    import numpy as np

    wq_t = torch.from_numpy(np.array(wq).astype(np.int64)).to(torch.uint32)
    s_t, b_t = torch.from_numpy(np.array(s)), torch.from_numpy(np.array(b))
    assert torch.equal(pack_uint32(unpack_uint32(wq_t, bits), bits), wq_t)  # same bit order both ways
    ref = torch.from_numpy(np.array(mx.dequantize(wq, s, b, group_size=64, bits=bits)))
    torch.testing.assert_close(mlx_dequantize(wq_t, s_t, b_t, bits), ref, atol=1e-6, rtol=0)


# ----- fp32: every family ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_mlx_lm_runs_effilm_exports(kind, tmp_path):
    model = family_model(kind)
    info = export_mlx(model, tmp_path / "mlx")
    assert info["bits"] is None and info["quantized_tensors"] == 0
    check_agreement(model, tmp_path / "mlx", f"{kind} fp32 ({info['arch']})")


# ----- quantized: effilm's own codes in MLX's layout -------------------------------------------
QUANT_CASES = [(kind, "rtn", 4, 32) for kind in FAMILIES] + [("llama", "gptq", 4, 64), ("llama-d256", "rtn", 8, 128)]


@pytest.mark.parametrize("kind, method, bits, group", QUANT_CASES, ids=[f"{k}-{m}-int{b}-g{g}" for k, m, b, g in QUANT_CASES])
def test_mlx_lm_runs_effilm_quantized_models(kind, method, bits, group, tmp_path):
    model = family_model(kind)
    qcfg = QuantConfig(bits=bits, group_size=group, asym=True, method=method, calib_seq_len=32)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2)) if method == "gptq" else None
    q, spec = quantize_model(model, qcfg, calib)
    save_quantized(q, spec, tmp_path / "q")
    quantized = effilm.load(tmp_path / "q")  # the effilm int4 model: these codes, scales and zeros
    msg = convert(tmp_path / "q", tmp_path / "mlx", ConvertConfig(to="mlx"))
    assert f"{bits}-bit, groups of {group}, the model's own codes" in msg
    h = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert h["quantization"] == {"group_size": group, "bits": bits}
    check_agreement(quantized, tmp_path / "mlx", f"{kind} {method} int{bits} g{group}")


def test_mlx_quantizes_what_effilm_quantizes(tmp_path):
    """Attention, MLP and experts are quantized; embeddings, head, norms and router are not."""
    from safetensors import safe_open

    export_mlx(family_model("phimoe"), tmp_path / "mlx", bits=4, group_size=32)
    with safe_open(str(tmp_path / "mlx" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.uint32
    quantized = {k.removesuffix(".scales") for k in keys if k.endswith(".scales")}
    assert "model.layers.0.block_sparse_moe.experts.3.w2" in quantized
    assert "model.layers.1.self_attn.o_proj" in quantized
    for plain in ("model.embed_tokens", "lm_head", "model.layers.0.block_sparse_moe.gate", "model.norm"):
        assert plain not in quantized and f"{plain}.weight" in keys


def test_convert_cli_quantizes_on_the_fly_with_a_tokenizer(tmp_path):
    """``effilm convert SRC DST --to mlx --bits 4 --group-size 64`` from a full-precision checkpoint:
    mlx_lm.load opens it (tokenizer included) and it runs as effilm's asymmetric RTN int4 model."""
    from engine_fixtures import VOCAB as TOK_VOCAB
    from engine_fixtures import make_tokenizer

    tok = make_tokenizer(tmp_path, chat_template=False)
    model = build_model(ModelConfig.from_name("tiny-openelm", vocab_size=TOK_VOCAB), seed=4).eval()
    effilm.save(model, tmp_path / "ckpt", tokenizer_dir=tok)
    run = subprocess.run([sys.executable, "-m", "effilm", "convert", str(tmp_path / "ckpt"), str(tmp_path / "mlx"),
                          "--to", "mlx", "--bits", "4", "--group-size", "64"], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "4-bit, groups of 64, RTN, asymmetric" in run.stdout
    mlx_model, tokenizer = mlx_lm.load(str(tmp_path / "mlx"))
    ids = tokenizer.encode("the cat sat on a mat")
    assert ids and max(ids) < TOK_VOCAB and tokenizer.decode(ids).strip() == "the cat sat on a mat"
    same, _ = quantize_model(model, QuantConfig(bits=4, group_size=64, asym=True, scale_dtype="float32"))
    ids = torch.randint(0, TOK_VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        delta = (mlx_logits(mlx_model, ids) - same(ids).logits).abs().max().item()
    assert delta <= TOL


def test_arctic_goes_to_gguf_not_mlx(tmp_path):
    effilm.save(build_model(ModelConfig.from_name("tiny-arctic", vocab_size=VOCAB), seed=0), tmp_path / "arctic")
    with pytest.raises(ConfigError, match="mlx-lm has no Arctic model.*GGUF"):
        convert(tmp_path / "arctic", tmp_path / "mlx", ConvertConfig(to="mlx"))
    assert not (tmp_path / "mlx").exists()


def test_bad_mlx_options_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="bits"):
        ConvertConfig(to="mlx", bits=3)
    with pytest.raises(ConfigError, match="group_size"):
        ConvertConfig(to="mlx", bits=4, group_size=48)
    with pytest.raises(ConfigError, match="only --to mlx"):
        ConvertConfig(to="hf", bits=4)
    model = family_model("llama")
    q, _ = quantize_model(model, QuantConfig(bits=8))  # int8 per channel: no MLX group fits
    with pytest.raises(ConfigError, match="per channel"):
        export_mlx(q, tmp_path / "a")
    with pytest.raises(ConfigError, match="give --bits"):
        export_mlx(family_model("llama"), tmp_path / "b", group_size=64)
