"""The training loop (one code path on CPU, one GPU or torchrun) and its data order."""
from .errors import TrainingError, TrainingStopped
from .runfolder import check_new_run_folder, check_resumable, config_changes, load_run_config
from .trainer import Trainer, train

__all__ = ["train", "Trainer", "load_run_config", "TrainingError", "TrainingStopped", "check_resumable",
           "check_new_run_folder", "config_changes"]
