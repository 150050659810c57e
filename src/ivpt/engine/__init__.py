"""The training loop (one code path on CPU, one GPU or torchrun) and its data order."""
from .trainer import Trainer, TrainingError, load_run_config, train

__all__ = ["train", "Trainer", "load_run_config", "TrainingError"]
