"""The quantization config: how ``effilm quantize`` (and the demo's ship stage) quantize weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from effilm.errors import ConfigError

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")
SCALE_DTYPES = ("float16", "float32")


@dataclass
class QuantConfig:
    """How to quantize a model's weights."""

    bits: int = field(default=8, metadata={"help": f"Bits per weight: one of {BITS}."})
    group_size: int | None = field(
        default=None,
        metadata={"help": f"Group width along the input dim, one of {GROUP_SIZES}; None = one group per output "
                  "channel (int8 default). Required for 4 bits."},
    )  # fmt: skip
    asym: bool = field(default=False, metadata={"help": "Asymmetric ranges (scale + zero point) instead of symmetric."})
    method: str = field(default="rtn", metadata={"help": f"One of {METHODS}: round-to-nearest or GPTQ (calibrated)."})
    scale_dtype: str = field(default="float16", metadata={"help": f"Storage dtype of scales: one of {SCALE_DTYPES}."})
    gptq_damp: float = field(default=0.01, metadata={"help": "GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean."})
    calib_seq_len: int = field(default=256, metadata={"help": "Calibration / evaluation window length in tokens."})
    calib_max_tokens: int = field(default=16384, metadata={"help": "GPTQ: at most this many calibration tokens."})

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"bits={self.bits!r} is not one of {list(BITS)}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size={self.group_size!r} is not one of {list(GROUP_SIZES)} (or None = per channel)")
        if self.bits == 4 and self.group_size is None:
            raise ConfigError("group_size is required for bits=4 (one of 32, 64, 128)")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {list(METHODS)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype={self.scale_dtype!r} is not one of {list(SCALE_DTYPES)}")
        if not 0 <= self.gptq_damp < 1:
            raise ConfigError(f"gptq_damp={self.gptq_damp} must be in [0, 1)")
        for name in ("calib_seq_len", "calib_max_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")

    def to_dict(self) -> dict:
        return asdict(self)
