"""Training and evaluation loops (one code path with or without torchrun)."""
from .trainer import Trainer, TrainingError, load_run_config, train

__all__ = ["train", "Trainer", "load_run_config", "TrainingError"]
