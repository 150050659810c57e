"""Training and evaluation loops (one code path with or without torchrun)."""
from .trainer import SimulatedCrash, TrainingError, load_run_config, train

__all__ = ["train", "load_run_config", "TrainingError", "SimulatedCrash"]
