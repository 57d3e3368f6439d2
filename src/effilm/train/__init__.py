"""Training: the loop, checkpoints, metrics, the optimizer and parallelism.

``from effilm.train import train`` is the entry point (``effilm.train.loop.train``).
"""

from effilm.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
