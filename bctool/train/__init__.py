"""Training: the loop, the config, and the tasks (what a step computes)."""

from bctool.train.config import TrainConfig
from bctool.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
