"""The training loop (one code path on CPU, one GPU or torchrun) and its data order."""
from .errors import TrainingError, TrainingStopped
from .runfolder import STARTS_FILE, check_new_run_folder, check_resumable, has_started_starts
from .run import train
from .trainer import Trainer

__all__ = ["train", "Trainer", "TrainingError", "TrainingStopped", "check_resumable", "check_new_run_folder",
           "has_started_starts", "STARTS_FILE"]
