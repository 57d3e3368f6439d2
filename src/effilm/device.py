"""The one device picker: ``auto`` means the GPU when there is one, else the CPU."""

from __future__ import annotations

from effilm.errors import EffilmError


def resolve_device(name: str = "auto", local_rank: int | None = None):
    """The ``torch.device`` for ``name``: ``auto`` (cuda when available, else cpu), ``cpu``,
    ``cuda`` or ``cuda:N``. Under torchrun, ``local_rank`` picks the process's GPU for ``auto`` and
    ``cuda``. A CUDA device that is not there is an error naming it, never a deep torch failure."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise EffilmError(f"device {name!r}: {exc} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EffilmError(f"device {name!r}: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
        if device.index >= torch.cuda.device_count():
            raise EffilmError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
