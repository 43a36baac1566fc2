"""Learning-rate and L1-coefficient schedules (pure functions of the step).

* LR multiplier: linear warm-up over the first ``warmup_frac`` of steps (from 1/warmup_steps), constant,
  then linear decay to 0 over the last ``decay_frac`` of steps.
* L1 coefficient: ``l1_coeff * min(1, step / (l1_warmup_frac * total_steps))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(total_steps: int, warmup_frac: float = 0.0, decay_frac: float = 0.2) -> Callable[[int], float]:
    """Multiplier of the base LR at ``step`` (0-based), for ``torch.optim.lr_scheduler.LambdaLR``."""
    warmup = int(round(warmup_frac * total_steps))
    decay = int(round(decay_frac * total_steps))
    decay_start = total_steps - decay

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay > 0 and step >= decay_start:
            return max(0.0, (total_steps - step) / decay)
        return 1.0

    return fn


def l1_coeff_at(step: int, total_steps: int, l1_coeff: float, warmup_frac: float = 0.05) -> float:
    """L1 coefficient at ``step`` (0-based): linear ramp from 0 over the first ``warmup_frac``."""
    warm = warmup_frac * total_steps
    if warm <= 0:
        return l1_coeff
    return l1_coeff * min(1.0, step / math.ceil(warm))
