"""Settings of one synthetic pair (:class:`SyntheticConfig`, every field a ``crosscoder synth`` flag) and
the named presets of the family (see ``docs/synthetic.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError

CLASSES = ("shared", "base_only", "ft_only", "shared_weak")
# magnitude distribution -> (E[mag], E[mag^2])
MAGNITUDES = {
    "uniform": (1.0, 1.0 + 1.0 / 12.0),
    "exponential": (1.0, 2.0),
    "lognormal": (math.exp(0.125), math.exp(0.5)),
}


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class SyntheticConfig:
    """One synthetic pair. Every field is a ``crosscoder synth`` flag (``--n-shared`` ...)."""

    d_model: int = _f(64, "activation width")
    n_shared: int = _f(96, "planted features shared by both models")
    n_base_only: int = _f(32, "planted features of the base model only")
    n_ft_only: int = _f(32, "planted features of the fine-tuned model only")
    n_shared_weak: int = _f(16, "shared features the fine-tuned model amplified (base strength weak_scale)")
    weak_scale: float = _f(0.3, "base strength of the shared_weak features (fine-tuned: 1)")
    shared_drift: float = _f(0.2, "rotation (radians) of every shared feature between the models")
    freq_min: float = _f(0.004, "lowest firing frequency (frequencies are log-uniform)")
    freq_max: float = _f(0.04, "highest firing frequency")
    noise: float = _f(0.02, "std of the isotropic Gaussian noise per coordinate")
    seed: int = _f(1234, "random seed of the features and the rows")
    mean_offset: float = _f(0.0, "per-model constant offset, as a multiple of the feature part's RMS norm")
    offset_drift: float = _f(0.3, "angle (radians) between the two models' offsets (with mean_offset > 0)")
    norm_gap: float = _f(1.0, "factor multiplying the fine-tuned model's whole activation")
    gain_spread: float = _f(0.0, "shared features: ft strength = base strength * exp(gain_spread * N(0,1))")
    magnitude: str = _f(
        "uniform",
        "active magnitudes: uniform (U(0.5,1.5)), exponential (mean 1), lognormal (median 1, sigma 0.5)",
    )
    n_groups: int = _f(0, "groups of co-occurring features (members fire only with their leader)")
    group_size: int = _f(4, "features per group, leader included")
    group_prob: float = _f(0.8, "probability that a member fires when its group's leader fires")

    @property
    def n_features(self) -> int:
        return self.n_shared + self.n_base_only + self.n_ft_only + self.n_shared_weak

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line naming the field) on nonsense values."""
        for name in ("n_shared", "n_base_only", "n_ft_only", "n_shared_weak", "n_groups"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.d_model <= 0:
            raise ConfigError(f"d_model: must be positive, got {self.d_model}")
        if self.n_features <= 0:
            raise ConfigError("n_shared: at least one planted feature is needed (all counts are 0)")
        for name in ("weak_scale", "norm_gap"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}: must be positive, got {v}")
        for name in ("noise", "mean_offset", "gain_spread"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name}: must be >= 0, got {v}")
        for name in ("shared_drift", "offset_drift"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}: must be finite, got {getattr(self, name)}")
        if not 0 < self.freq_min <= 1:
            raise ConfigError(f"freq_min: must be in (0, 1], got {self.freq_min}")
        if not 0 < self.freq_max <= 1:
            raise ConfigError(f"freq_max: must be in (0, 1], got {self.freq_max}")
        if self.freq_min > self.freq_max:
            raise ConfigError(f"freq_min: {self.freq_min} is above freq_max {self.freq_max}")
        if self.magnitude not in MAGNITUDES:
            raise ConfigError(f"magnitude: unknown {self.magnitude!r} (choices: {', '.join(MAGNITUDES)})")
        if not 0 <= self.group_prob <= 1:
            raise ConfigError(f"group_prob: must be in [0, 1], got {self.group_prob}")
        if self.n_groups:
            if self.group_size < 2:
                raise ConfigError(f"group_size: must be >= 2 with n_groups > 0, got {self.group_size}")
            if self.n_groups * self.group_size > self.n_features:
                raise ConfigError(
                    f"n_groups: {self.n_groups} groups of {self.group_size} need "
                    f"{self.n_groups * self.group_size} features, only {self.n_features} planted"
                )


# Named members of the family: overrides of SyntheticConfig (see docs/synthetic.md for their statistics).
_CROWDED = {"d_model": 64, "n_shared": 136, "n_base_only": 48, "n_ft_only": 48, "n_shared_weak": 24}
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "offset": {"mean_offset": 7.0},
    "norm_gap": {"norm_gap": 3.0, "gain_spread": 0.3},
    "crowded": {**_CROWDED, "shared_drift": 0.3, "gain_spread": 0.3},
    "correlated": {
        "n_groups": 16,
        "group_size": 4,
        "group_prob": 0.8,
        "magnitude": "lognormal",
        "freq_min": 0.005,
        "freq_max": 0.05,
    },
    "mixed": {**_CROWDED, "shared_drift": 0.3, "gain_spread": 0.3, "mean_offset": 7.0, "norm_gap": 3.0},
}


def preset_config(name: str, **overrides: Any) -> SyntheticConfig:
    """The preset ``name`` with ``overrides`` (field values) on top, validated."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown {name!r} (choices: {', '.join(PRESETS)})")
    known = {f.name for f in fields(SyntheticConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"{bad[0]}: not a synthetic-pair field")
    cfg = SyntheticConfig(**{**PRESETS[name], **overrides})
    cfg.validate()
    return cfg
