"""One config system: plain dataclasses, named presets (data), cost accounting and the one reader."""

from effilm.config.model import LayerShape, ModelConfig, MoEConfig, make_divisible
from effilm.config.presets import preset_names

__all__ = ["LayerShape", "ModelConfig", "MoEConfig", "make_divisible", "preset_names"]
