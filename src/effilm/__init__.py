"""effilm: efficient language models, from config to served checkpoint.

The top-level names are imported lazily so that ``import effilm`` has no side effects and
stays cheap; ``effilm.load`` and friends import torch on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "save_hf", "save", "ModelConfig", "MoEConfig", "build_model", "generate"]

_LAZY = {
    "load": ("effilm.formats.load", "load"),
    "save": ("effilm.formats.checkpoint", "save"),
    "save_hf": ("effilm.formats.hf", "save_hf"),
    "ModelConfig": ("effilm.config", "ModelConfig"),
    "MoEConfig": ("effilm.config", "MoEConfig"),
    "build_model": ("effilm.models.transformer", "build_model"),
    "generate": ("effilm.inference.engine", "generate"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'effilm' has no attribute {name!r}")
