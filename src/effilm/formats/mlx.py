"""MLX export: a directory that Apple's ``mlx-lm`` opens (``mlx_lm.load``), full precision or quantized.

The layout is the Hugging Face one of :mod:`effilm.formats.hf` (mlx-lm reads those checkpoints, and
folds per-expert MoE weights into its own stacked layout on load), with what mlx-lm needs beside it:
the legacy ``rope_scaling`` entry for LongRoPE, explicit zero biases where mlx-lm's PhiMoE always
has them, and, when quantized, MLX's affine layout:

* a quantized ``NAME.weight`` is uint32 ``[..., out, in * bits / 32]``: the unsigned codes packed
  along ``in``, code ``j`` of each word in bits ``[j * bits, (j + 1) * bits)`` (``mlx.core.quantize``'s
  order);
* ``NAME.scales`` and ``NAME.biases`` are ``[..., out, in / group]``, and a weight is
  ``scale * code + bias``;
* ``config.json`` gets ``"quantization": {"group_size": G, "bits": B}``; mlx-lm quantizes exactly the
  layers whose ``.scales`` the file holds.

The codes are effilm's own (:mod:`effilm.models.quantized`): a quantized effilm model keeps its RTN
or GPTQ codes, and a full-precision one is quantized here by asymmetric RTN. Asymmetric codes
``(q - z) * s`` become ``bias = -s * z``; symmetric ones are shifted by ``2^(bits-1)`` to unsigned.
Quantized are the attention and MLP projections and the experts; the embeddings, LM head, norms
and MoE router stay in full precision, as effilm keeps them (``mlx_lm.convert -q`` would quantize
the embeddings, head and router too).

mlx-lm has no Arctic model: Arctic's on-device route is GGUF (:mod:`effilm.formats.gguf`).
"""

from __future__ import annotations

import os

import torch

from effilm.config.hf import choose_architecture, config_to_hf
from effilm.config.quant import QuantConfig
from effilm.errors import ConfigError
from effilm.formats.hf import key_rules, refuse_routing_bias, write_model_dir
from effilm.models.quantized import Codes, QuantExperts, QuantLinear, rtn, target_names

# HF architectures whose layout mlx-lm reads (its llama, phi3, mixtral, phimoe and openelm models)
MLX_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
                     "PhimoeForCausalLM", "OpenELMForCausalLM")  # fmt: skip
MLX_BITS = (4, 8)
MLX_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mlx_lm.convert's default
DTYPES = ("float32", "float16", "bfloat16")


def check_exportable(cfg, arch: str | None = None) -> str:
    """The architecture ``cfg`` is written as; a clear error when mlx-lm cannot run it."""
    arch = arch or choose_architecture(cfg)
    if arch == "ArcticForCausalLM":
        raise ConfigError("cannot export Arctic to MLX: mlx-lm has no Arctic model; Arctic's on-device route is "
                          "GGUF (effilm convert SRC model.gguf --to gguf)")  # fmt: skip
    if arch not in MLX_ARCHITECTURES:
        raise ConfigError(f"cannot export {arch} to MLX: mlx-lm reads {list(MLX_ARCHITECTURES)}")
    standard_head = cfg.head_dim * cfg.n_heads == cfg.d_model
    if arch in ("MixtralForCausalLM", "PhimoeForCausalLM") and not standard_head:
        raise ConfigError(f"cannot export to MLX as {arch}: mlx-lm takes head_dim = hidden/heads, "
                          f"this model has {cfg.head_dim} x {cfg.n_heads} heads for hidden {cfg.d_model}")  # fmt: skip
    return arch


# ----- the number format -----------------------------------------------------------------------
def pack_uint32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., n] -> uint32 [..., n * bits / 32], code j of a word in bits j*bits.. ."""
    per = 32 // bits
    u = u.to(torch.int64).reshape(*u.shape[:-1], u.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (u << shifts).sum(-1).to(torch.uint32)


def unpack_uint32(p: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (p.to(torch.int64)[..., None] >> shifts) & (2**bits - 1)
    return u.reshape(*p.shape[:-1], p.shape[-1] * per)


def mlx_affine(c: Codes, bits: int) -> dict[str, torch.Tensor]:
    """effilm codes as MLX's ``weight`` (packed), ``scales`` and ``biases`` (fp32, exact)."""
    if c.zeros is None:  # symmetric: q in [-2^(b-1), 2^(b-1) - 1], w = q * s
        offset = float(2 ** (bits - 1))
        u, z = c.q + offset, torch.full_like(c.scales, offset)
    else:
        u, z = c.q, c.zeros
    s = c.scales.float()
    return {"weight": pack_uint32(u.round(), bits), "scales": s, "biases": -s * z.float()}


def mlx_dequantize(weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 weight an MLX quantized triple stands for (tests and checks)."""
    u = unpack_uint32(weight, bits).float()
    g = u.shape[-1] // scales.shape[-1]
    u = u.reshape(*u.shape[:-1], scales.shape[-1], g)
    return (u * scales[..., None].float() + biases[..., None].float()).reshape(*u.shape[:-2], -1)


# ----- what to quantize ------------------------------------------------------------------------
def _quantized_format(model) -> tuple[int, int] | None:
    """(bits, group size) of an already-quantized effilm model; None when it is full precision."""
    found = set()
    for name, m in model.named_modules():
        ws = [m.qweight] if isinstance(m, QuantLinear) else [m.gate_up_q, m.down_q] if isinstance(m, QuantExperts) else []
        for w in ws:
            group = w.shape[-1] // w.scales.shape[-1]
            if group not in MLX_GROUP_SIZES:
                raise ConfigError(f"{name}: quantized with one group of {group} per row (per channel); MLX takes "
                                  f"groups of {list(MLX_GROUP_SIZES)}: quantize with --group-size, or convert the "
                                  "full-precision model with --bits")  # fmt: skip
            found.add((w.bits, group))
    if len(found) > 1:
        raise ConfigError(f"the model mixes quantization formats {sorted(found)}; MLX's config holds one")
    return found.pop() if found else None


def _plan(model, bits: int | None, group_size: int | None, dtype: str | None):
    """``(bits, group, rtn_cfg, source)``: the format, and the RTN config when quantizing here."""
    have = _quantized_format(model)
    if have is not None:
        if (bits or have[0], group_size or have[1]) != have:
            raise ConfigError(f"the model is already quantized to {have[0]} bits in groups of {have[1]}; convert it "
                              "without --bits/--group-size, or convert its full-precision model")  # fmt: skip
        return have[0], have[1], None, "the model's own codes"
    if bits is None:
        if group_size is not None:
            raise ConfigError("group_size: give --bits too (4 or 8) to quantize")
        return None, None, None, "full precision"
    group = group_size or DEFAULT_GROUP_SIZE
    scale_dtype = "float32" if dtype in (None, "float32") else "float16"
    return bits, group, QuantConfig(bits=bits, group_size=group, asym=True, scale_dtype=scale_dtype), "RTN, asymmetric"


def _source(model, ours: str, targets: set[str], rtn_cfg: QuantConfig | None):
    """The tensor or :class:`Codes` behind effilm name ``ours``."""
    mod_name, attr = ours.rsplit(".", 1)
    m = model.get_submodule(mod_name)
    if isinstance(m, QuantLinear):
        return m.qweight.codes() if attr == "weight" else getattr(m, attr).detach()
    if isinstance(m, QuantExperts):
        return (m.gate_up_q if attr == "w_gate_up" else m.down_q).codes()
    t = getattr(m, attr).detach()
    if rtn_cfg is not None and mod_name in targets and attr in ("weight", "w_gate_up", "w_down"):
        return rtn(t, rtn_cfg, ours)
    return t


# ----- the export ------------------------------------------------------------------------------
def mlx_state(model, arch: str, bits: int | None, rtn_cfg: QuantConfig | None) -> dict[str, torch.Tensor]:
    """Every tensor of the export under mlx-lm's (HF) names; quantized ones as weight/scales/biases."""
    refuse_routing_bias(model, "MLX")
    cfg = model.cfg
    targets = set(target_names(model))
    out: dict[str, torch.Tensor] = {}
    for r in key_rules(cfg, arch):
        src = _source(model, r.ours, targets, rtn_cfg)
        if isinstance(src, Codes):
            pieces = {f".{k}": v for k, v in mlx_affine(src, bits).items()}
            parts = [p.removesuffix(".weight") for p in r.parts]
        else:
            pieces, parts = {"": src}, list(r.parts)
        for suffix, t in pieces.items():
            for e in range(r.num_experts or 1):
                te = t[e] if r.num_experts else t
                for name, piece in zip(parts, te.split(list(r.sizes), dim=0)):
                    out[name.format(e=e) + suffix] = piece.contiguous()
    if arch == "PhimoeForCausalLM":  # mlx-lm's PhiMoE always has these biases and an untied head
        for i, s in enumerate(cfg.layers):
            p = f"model.layers.{i}.self_attn"
            for n, rows in (("q", s.n_heads), ("k", s.n_kv_heads), ("v", s.n_kv_heads), ("o", 0)):
                out.setdefault(f"{p}.{n}_proj.bias", torch.zeros(rows * cfg.head_dim if rows else cfg.d_model))
        out.setdefault("lm_head.weight", out["model.embed_tokens.weight"].clone())
        out.setdefault("lm_head.bias", torch.zeros(cfg.vocab_size))
    return out


def mlx_config(cfg, arch: str) -> dict:
    """config.json for mlx-lm: the HF config plus the legacy ``rope_scaling`` mlx-lm reads."""
    h = config_to_hf(cfg, arch)
    rp = h.get("rope_parameters") or {}
    if rp.get("rope_type") == "longrope":
        h["rope_scaling"] = {"type": "longrope", **{k: v for k, v in rp.items() if k not in ("rope_type", "rope_theta")}}
    if arch == "PhimoeForCausalLM":
        h["tie_word_embeddings"] = False
    return h


def export_mlx(model, path: str | os.PathLike, bits: int | None = None, group_size: int | None = None,
               dtype: str | None = None, tokenizer_dir: str | os.PathLike | None = None,
               mark: str | None = None, arch: str | None = None) -> dict:
    """Write ``model`` as a directory ``mlx_lm.load`` opens; quantized (``bits`` 4 or 8, groups of
    ``group_size``) in MLX's affine layout from effilm's own codes. Returns a summary dict."""
    if bits is not None and bits not in MLX_BITS:
        raise ConfigError(f"bits={bits!r}: MLX export quantizes to one of {list(MLX_BITS)}")
    if group_size is not None and group_size not in MLX_GROUP_SIZES:
        raise ConfigError(f"group_size={group_size!r}: MLX groups are one of {list(MLX_GROUP_SIZES)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    cfg = model.cfg
    arch = check_exportable(cfg, arch)
    bits, group, rtn_cfg, source = _plan(model, bits, group_size, dtype)
    h = mlx_config(cfg, arch)
    with torch.no_grad():
        state = mlx_state(model, arch, bits, rtn_cfg)
    if dtype is not None:
        state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
        h["dtype"] = dtype
    if bits is not None:
        h["quantization"] = {"group_size": group, "bits": bits}
        h["quantization_config"] = dict(h["quantization"])
    path = write_model_dir(path, state, h, "mlx", tokenizer_dir, mark)
    quantized = sorted({k.removesuffix(".scales") for k in state if k.endswith(".scales")})
    notes = []
    if cfg.sliding_window is not None and arch != "MistralForCausalLM":
        notes.append(f"mlx-lm's {arch} ignores the sliding window: outputs differ past {cfg.sliding_window} tokens")
    if cfg.rope_type == "longrope":
        notes.append(f"mlx-lm's LongRoPE always applies the long factors: outputs differ within the original "
                     f"{cfg.rope_original_max_seq_len} tokens")  # fmt: skip
    return {"path": path, "arch": arch, "bits": bits, "group_size": group, "source": source, "notes": notes,
            "quantized_tensors": len(quantized), "bytes": (path / "model.safetensors").stat().st_size}  # fmt: skip
