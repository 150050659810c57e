"""The training loop (one code path on CPU, one GPU or torchrun) and its data order."""
from .errors import TrainingError, TrainingStopped
from .runfolder import check_new_run_folder, check_resumable
from .run import train
from .trainer import Trainer

__all__ = ["train", "Trainer", "TrainingError", "TrainingStopped", "check_resumable", "check_new_run_folder"]
