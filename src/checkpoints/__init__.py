"""Checkpoints: the serialized TrainingState and the CheckpointManager that commits, verifies and retires it."""

from .manager import (
    CheckpointCorruptError,
    CheckpointInfo,
    CheckpointManager,
    CheckpointSaveError,
    checkpoint_dir_name,
)
from .retention import RetentionPolicy
from .state import TrainingState

__all__ = [
    "CheckpointCorruptError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointSaveError",
    "RetentionPolicy",
    "TrainingState",
    "checkpoint_dir_name",
]
