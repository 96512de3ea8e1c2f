"""Training: config, the pretraining loop (DDP / FSDP2 under torchrun), checkpoints, metrics."""
from gptkern.train.config import TrainConfig
from gptkern.train.trainer import Trainer, TrainingError, train

__all__ = ["TrainConfig", "Trainer", "TrainingError", "train"]
