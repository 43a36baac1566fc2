"""Crosscoder architectures and the shared loss/metrics path. Knows nothing of data, training or CLI."""

from .architectures import Architecture, ForwardOut, StepInput
from .crosscoder import CrossCoder
from .losses import LossOutput, compute_loss, model_letter, reconstruction_metrics
from .registry import ARCHITECTURES, architecture_names, get_architecture, register

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CrossCoder",
    "ForwardOut",
    "LossOutput",
    "StepInput",
    "architecture_names",
    "compute_loss",
    "get_architecture",
    "model_letter",
    "reconstruction_metrics",
    "register",
]
