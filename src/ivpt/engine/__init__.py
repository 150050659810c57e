"""The training loop (one code path on CPU, one GPU or torchrun) and its data order."""
from .trainer import (
    Trainer,
    TrainingError,
    TrainingStopped,
    check_new_run_folder,
    check_resumable,
    config_changes,
    load_run_config,
    train,
)

__all__ = ["train", "Trainer", "load_run_config", "TrainingError", "TrainingStopped", "check_resumable",
           "check_new_run_folder", "config_changes"]
