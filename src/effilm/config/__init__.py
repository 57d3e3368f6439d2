"""One config system: plain dataclasses, named presets, TOML run files and dotted overrides."""

from effilm.config.model import LayerShape, ModelConfig, MoEConfig, make_divisible
from effilm.config.presets import get_preset, preset_names

__all__ = ["LayerShape", "ModelConfig", "MoEConfig", "get_preset", "make_divisible", "preset_names"]
