"""Pretraining: the engine, training-state checkpoints, model-folder export and the training loop."""

from .checkpoint import latest_checkpoint
from .config import PretrainConfig
from .engine import Engine
from .export import export_model_folder, load_model_folder
from .train import train

__all__ = ["Engine", "PretrainConfig", "export_model_folder", "latest_checkpoint", "load_model_folder", "train"]
