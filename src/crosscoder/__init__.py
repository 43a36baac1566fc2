"""crosscoder: train and analyse crosscoders for model diffing (base vs fine-tuned LLMs)."""

__version__ = "0.1.0"

from .config import CrossCoderConfig, DataConfig, RunConfig, TrainConfig  # noqa: E402
from .model import CrossCoder  # noqa: E402

__all__ = ["CrossCoder", "CrossCoderConfig", "DataConfig", "RunConfig", "TrainConfig", "__version__"]
