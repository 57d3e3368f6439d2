"""Measured decode speed, for ``effilm plan --measure``: effilm's engine on the model itself (fp32,
and int8 and int4 weights quantized in memory), and llama.cpp on a GGUF export when
``llama-cpp-python`` is installed."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from effilm.errors import EffilmError


def decode_tokens_per_s(model, *, context: int, batch: int, new_tokens: int = 32, repeats: int = 3,
                        quant_kernel: str = "fast") -> float:
    """Per-sequence decode tokens/s of effilm's engine: ``batch`` sequences with a prompt of
    ``context - new_tokens`` tokens, greedy, median of ``repeats`` (prefill excluded: the time to
    the first token is subtracted). ``quant_kernel``: the kernel of quantized layers (the engine's)."""
    import torch

    from effilm.inference.engine import Engine
    from effilm.inference.sampling import SamplingParams

    engine = Engine(model, None, quant_kernel=quant_kernel)
    new_tokens = max(2, min(new_tokens, context - 1))
    prompt_len = max(1, context - new_tokens)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    rates = []
    for _ in range(repeats + 1):  # the first run warms up
        first = None
        steps = 0
        for ev in engine.stream(prompts, SamplingParams(max_new_tokens=new_tokens)):
            if ev.index == 0 and ev.token_id is not None:
                steps += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        if first is not None and steps > 1:
            rates.append((steps - 1) / (end - first))
    if not rates:
        raise EffilmError("decode measurement produced no tokens")
    return statistics.median(rates[1:] or rates)


def measure_formats(model, *, context: int, batch: int, new_tokens: int = 32,
                    quant_kernel: str = "fast") -> dict[str, float]:
    """Decode tokens/s per sequence for fp32 and for int8 / int4 (g32) weights quantized in memory,
    the quantized layers on ``quant_kernel`` (the engine's default: the fast packed CPU kernels)."""
    import copy

    from effilm.config.quant import QuantConfig
    from effilm.quant.quantize import quantize_model

    out = {"fp32": decode_tokens_per_s(copy.deepcopy(model), context=context, batch=batch, new_tokens=new_tokens)}
    for fmt, qcfg in (("int8", QuantConfig(bits=8)), ("int4-g32", QuantConfig(bits=4, group_size=32))):
        q, _ = quantize_model(copy.deepcopy(model), qcfg)
        out[fmt] = decode_tokens_per_s(q, context=context, batch=batch, new_tokens=new_tokens,
                                       quant_kernel=quant_kernel)
    return out


def llama_cpp_tokens_per_s(model, tokenizer_dir, *, context: int, new_tokens: int = 32) -> dict | None:
    """Decode tokens/s of llama.cpp (``llama-cpp-python``) on a q8_0 GGUF export, or None when it
    is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from effilm.formats.gguf import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(model, Path(tmp) / "m.gguf", "q8_0", tokenizer_dir=tokenizer_dir, name="plan")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=1, verbose=False)
        prompt = list(range(3, 3 + max(1, context - new_tokens)))
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
        return {"q8_0": new_tokens / (time.perf_counter() - t0)}
