"""Weight-only quantization of a model: round-to-nearest or GPTQ codes put into quantized layers.

The number format and the layers live in :mod:`effilm.models.quantized`; the config in
:mod:`effilm.config.quant`. ``quantize_model(model, cfg, calib_ids)`` replaces every target module
in place and returns the spec that goes into the checkpoint's ``config.json``.
"""

from __future__ import annotations

import torch

from effilm.config.quant import QuantConfig
from effilm.errors import ConfigError
from effilm.models.quantized import (
    FULL_PRECISION,
    Codes,
    QuantExperts,
    QuantLinear,
    check_shape,
    quantized_module,
    rtn,
    set_module,
    target_names,
    weights_of,
)
from effilm.quant.gptq import gptq_codes


def quant_spec(cfg: QuantConfig, targets: list[str]) -> dict:
    return {**cfg.to_dict(), "targets": targets, "full_precision": FULL_PRECISION}


@torch.no_grad()
def apply_codes(model, codes: dict[str, Codes | tuple[Codes, Codes]], cfg: QuantConfig):
    """Replace each target module in ``model`` by its quantized form holding ``codes``."""
    for name, c in codes.items():
        module = model.get_submodule(name)
        qm = quantized_module(name, module, cfg)
        if isinstance(qm, QuantLinear):
            qm.qweight.set_codes(c)
            if qm.bias is not None:
                qm.bias.copy_(module.bias)
        else:
            qm.gate_up_q.set_codes(c[0])
            qm.down_q.set_codes(c[1])
        set_module(model, name, qm)
    return model


def quantize_model(model, cfg: QuantConfig, calib_ids: torch.Tensor | None = None):
    """Quantize ``model`` (in place) and return ``(model, spec)``; ``spec`` goes into config.json.

    ``calib_ids`` [N, T] token ids are required by GPTQ and ignored by RTN.
    """
    model.eval()
    done = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))]
    if done:
        raise ConfigError(f"the model is already quantized ({len(done)} quantized modules, e.g. {done[0]}); "
                          "quantize the full-precision model it came from")  # fmt: skip
    targets = target_names(model)
    for name in targets:  # fail on a bad group size before any work
        for w in weights_of(model.get_submodule(name)):
            check_shape(name, w.shape, cfg.group_size, cfg.bits)
    if cfg.method == "gptq":
        if calib_ids is None:
            raise ConfigError("method='gptq' needs calibration text (--calib FILE)")
        codes = gptq_codes(model, targets, calib_ids, cfg)
    else:
        codes = {}
        for name in targets:
            ws = weights_of(model.get_submodule(name))
            cs = tuple(rtn(w, cfg, name) for w in ws)
            codes[name] = cs[0] if len(cs) == 1 else cs
    apply_codes(model, codes, cfg)
    return model, quant_spec(cfg, targets)


def save_quantized(model, spec: dict, out) -> None:
    """Write a quantized effilm checkpoint directory (atomically)."""
    from effilm.formats.checkpoint import save

    save(model, out, extra={"quantization": spec})


def weight_bytes(model) -> int:
    """Bytes of every stored tensor (parameters and persistent buffers, a tied head once)."""
    from effilm.formats.checkpoint import model_state

    return sum(t.numel() * t.element_size() for t in model_state(model).values())
