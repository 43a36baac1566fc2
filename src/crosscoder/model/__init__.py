"""Crosscoder architectures and the shared loss/metrics path. Knows nothing of data, training or CLI."""

from .crosscoder import CrossCoder
from .losses import LossOutput, compute_loss, model_letter, reconstruction_metrics
from .registry import ARCHITECTURES, Architecture, get_architecture, register

__all__ = ["ARCHITECTURES", "Architecture", "CrossCoder", "LossOutput", "compute_loss", "get_architecture",
           "model_letter", "reconstruction_metrics", "register"]
