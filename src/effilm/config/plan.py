"""Will it fit, and how fast will it decode? The arithmetic behind ``effilm plan``.

For each weight format the plan counts:

- **weights**: the matmul weights (attention, dense MLP, experts) at the format's bits plus its
  scales (int8: one 16-bit scale per output row; int4: a 16-bit scale and a 16-bit zero point per
  group, asymmetric, so 4 + 32/g bits a weight), and everything else (embeddings, LM head, norms,
  router) at 16 bits, as effilm's quantization keeps them in full precision;
- **KV cache**: 16-bit keys and values for ``context`` tokens of ``batch`` sequences;
- **overhead**: ``overhead`` (10%) of the two, for activations, buffers and the runtime.

Predicted decode speed: a decode step reads every *active* weight once (the routed experts only,
for MoE models; the whole LM head; one embedding row) and each sequence's KV cache, and is bound
by memory bandwidth at batch sizes this small, so
``tokens/s per sequence = bandwidth / (active weight bytes + batch * KV bytes at the context)``.
The KV cache is counted full (the end of the context): a lower bound on speed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from effilm.config.cost import kv_cache_bytes_per_token, layer_params, num_params
from effilm.config.model import ModelConfig
from effilm.errors import ConfigError


@dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes
    bandwidth: float  # bytes per second
    note: str


GiB = 1024**3
# Approximate figures, for planning only
DEVICES = {
    "phone-8gb": Device("phone-8gb", 8 * GiB, 50e9, "a phone with 8 GB of LPDDR5 (approximate)"),
    "laptop-16gb": Device("laptop-16gb", 16 * GiB, 100e9, "a laptop with 16 GB of unified memory (approximate)"),
    "laptop-32gb": Device("laptop-32gb", 32 * GiB, 200e9, "a laptop with 32 GB, wider memory bus (approximate)"),
    "ci-2core": Device("ci-2core", 24 * GiB, 30e9, "this project's CI machine: 2 cores, 24 GiB, about 30 GB/s "
                                                  "read (a 1 GiB torch sum, one thread)"),
}
FORMATS = ("fp32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128")


def format_bits(fmt: str, d_model: int) -> float:
    """Bits per matmul weight, scales included (int8's per-row scale spread over a row of about
    ``d_model`` weights)."""
    if fmt == "fp32":
        return 32.0
    if fmt in ("bf16", "fp16"):
        return 16.0
    if fmt == "int8":
        return 8.0 + 16.0 / d_model
    m = re.fullmatch(r"int4-g(\d+)", fmt)
    if m and int(m.group(1)) > 0:
        return 4.0 + 32.0 / int(m.group(1))
    raise ConfigError(f"unknown weight format {fmt!r}; choose from {', '.join(FORMATS)}")


def weight_split(cfg: ModelConfig) -> dict:
    """Parameter counts: the matmul weights (in total, and those one token reads), and the rest
    (embedding, LM head, norms, router, biases): in total, and what one token reads (the whole LM
    head, one embedding row, the norms and routers)."""
    total = active = 0
    for i in range(cfg.n_layers):
        lp = layer_params(cfg, i)
        total += lp.matmul_dense + lp.num_experts * lp.experts_per_expert
        active += lp.matmul_dense + lp.top_k * lp.experts_per_expert
    other = num_params(cfg) - total
    emb = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else emb
    rest = other - emb - head  # norms, routers, biases
    return {"matmul_total": total, "matmul_active": active, "other_total": other,
            "other_active": emb + cfg.d_model + rest}


def plan(cfg: ModelConfig, device: Device, context: int, batch: int = 1, overhead: float = 0.10,
         formats=FORMATS) -> dict:
    """Memory, fit and predicted decode speed of ``cfg`` on ``device`` for each weight format."""
    if context < 1 or batch < 1:
        raise ConfigError(f"--context and --batch must be >= 1 (got {context}, {batch})")
    if context > cfg.max_seq_len:
        raise ConfigError(f"--context {context} exceeds the model's context window ({cfg.max_seq_len})")
    if not 0 <= overhead < 1:
        raise ConfigError(f"--overhead must be in [0, 1), got {overhead}")
    w = weight_split(cfg)
    kv_token = kv_cache_bytes_per_token(cfg, 2)
    kv = kv_token * context * batch
    rows = []
    for fmt in formats:
        bits = format_bits(fmt, cfg.d_model)
        other_bytes = 4 if fmt == "fp32" else 2
        weights = w["matmul_total"] * bits / 8 + w["other_total"] * other_bytes
        read = w["matmul_active"] * bits / 8 + w["other_active"] * other_bytes + kv
        total = (weights + kv) * (1 + overhead)
        rows.append({"format": fmt, "bits_per_matmul_weight": round(bits, 3), "weight_bytes": int(weights),
                     "kv_cache_bytes": int(kv), "total_bytes": int(total), "fits": total <= device.memory,
                     "read_bytes_per_step": int(read),
                     "tokens_per_s": device.bandwidth / read,  # per sequence
                     "tokens_per_s_total": device.bandwidth / read * batch})
    return {"model": cfg.name, "device": device.name, "device_note": device.note, "memory": device.memory,
            "bandwidth": device.bandwidth, "context": context, "batch": batch, "overhead": overhead,
            "kv_cache_bytes_per_token": kv_token, "params": w, "formats": rows}


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str) -> float:
    """``8GiB`` -> bytes (binary), ``8GB`` -> bytes (decimal); a bare number is bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"{what}={text!r}: expected a size such as 8GiB, 16GB or 512MiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = " KMGT".index(unit) if unit else 0
    result = value * (1024 if binary else 1000) ** power
    if result <= 0:
        raise ConfigError(f"{what}={text!r} must be positive")
    return result


def parse_bandwidth(text: str) -> float:
    """``100GB/s`` -> bytes per second."""
    t = str(text).strip()
    if not t.lower().endswith("/s"):
        raise ConfigError(f"--bandwidth={text!r}: expected a rate such as 100GB/s or 50GiB/s")
    return parse_size(t[:-2], "--bandwidth")
