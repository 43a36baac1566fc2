"""Training: loop, schedules, checkpoints, logging (and the choice of batch source)."""

from .trainer import Interrupted, run_training

__all__ = ["Interrupted", "run_training"]
