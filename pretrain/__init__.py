"""Pretraining: the engine, training-state checkpoints and the training loop (model folders: ``atlasformer.checkpoints``)."""

from .checkpoint import latest_checkpoint
from .config import PretrainConfig
from .engine import Engine
from .train import train

__all__ = ["Engine", "PretrainConfig", "latest_checkpoint", "train"]
