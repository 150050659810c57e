"""The training loop (one code path on CPU, one GPU or torchrun) and its data order."""
from .errors import TrainingError, TrainingStopped
from .runfolder import check_new_run_folder, check_resumable
from .trainer import Trainer, train

__all__ = ["train", "Trainer", "TrainingError", "TrainingStopped", "check_resumable", "check_new_run_folder"]
