"""Settings of one synthetic pair or n-model set (:class:`SyntheticConfig`, every field a ``crosscoder
synth`` flag), the presence subsets of the n-model generator and the named presets of the family (see
``docs/synthetic.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError

CLASSES = ("shared", "base_only", "ft_only", "shared_weak")
# planted classes of the n-model generator (n_models > 2): every model, every model with a strength ramp,
# one model only, a proper subset of two or more models
MULTI_CLASSES = ("shared", "shared_weak", "exclusive", "subset")
MAX_MODELS = 8
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
    """One synthetic pair (``n_models`` 2) or set of ``n_models`` models. Every field is a ``crosscoder
    synth`` flag (``--n-shared`` ...)."""

    d_model: int = _f(64, "activation width")
    n_shared: int = _f(96, "planted features shared by all models")
    n_base_only: int = _f(32, "planted features of the base model only (two models)")
    n_ft_only: int = _f(32, "planted features of the fine-tuned model only (two models)")
    n_shared_weak: int = _f(
        16,
        "shared features the later models amplified (first model's strength weak_scale; with n_models > 2 "
        "a geometric ramp up to 1 at the last model)",
    )
    weak_scale: float = _f(0.3, "first model's strength of the shared_weak features (last model: 1)")
    shared_drift: float = _f(
        0.2, "rotation (radians) of every shared feature between consecutive models (a random walk)"
    )
    freq_min: float = _f(0.004, "lowest firing frequency (frequencies are log-uniform)")
    freq_max: float = _f(0.04, "highest firing frequency")
    noise: float = _f(0.02, "std of the isotropic Gaussian noise per coordinate")
    seed: int = _f(1234, "random seed of the features and the rows")
    mean_offset: float = _f(0.0, "per-model constant offset, as a multiple of the feature part's RMS norm")
    offset_drift: float = _f(
        0.3, "angle (radians) between consecutive models' offsets (with mean_offset > 0)"
    )
    norm_gap: float = _f(
        1.0,
        "factor multiplying the fine-tuned (last) model's whole activation; with n_models > 2 model m "
        "gets norm_gap ** (m / (n_models - 1))",
    )
    gain_spread: float = _f(
        0.0,
        "shared features: ft strength = base strength * exp(gain_spread * N(0,1)); with n_models > 2 "
        "each model's strength of a shared or subset feature gets a factor exp(gain_spread * N(0,1/2))",
    )
    magnitude: str = _f(
        "uniform",
        "active magnitudes: uniform (U(0.5,1.5)), exponential (mean 1), lognormal (median 1, sigma 0.5)",
    )
    n_groups: int = _f(0, "groups of co-occurring features (members fire only with their leader)")
    group_size: int = _f(4, "features per group, leader included")
    group_prob: float = _f(0.8, "probability that a member fires when its group's leader fires")
    n_models: int = _f(
        2,
        f"models (2..{MAX_MODELS}); with more than 2, features are planted in the presence subsets of "
        "--subsets (n_base_only / n_ft_only are then unused) and synth writes a paired cache",
    )
    subsets: str = _f(
        "auto",
        "n_models > 2: planted presence subsets, comma list of '0+2' patterns, each optionally ':COUNT' "
        "(default count subset_size); 'auto': every single model, the ranges {0..j} and {j..n-1}, "
        "{i, i+2}, {0, n-1} and {1..n-2}",
    )
    subset_size: int = _f(12, "n_models > 2: features planted in each subset of --subsets")

    def subset_counts(self) -> list[tuple[tuple[int, ...], int]]:
        """``[(models, count), ...]``: the presence subsets planted with ``n_models > 2`` (empty for two
        models), sorted by size then members."""
        if self.n_models <= 2:
            return []
        return parse_subsets(self.subsets, self.n_models, self.subset_size)

    @property
    def n_features(self) -> int:
        if self.n_models > 2:
            return self.n_shared + self.n_shared_weak + sum(c for _, c in self.subset_counts())
        return self.n_shared + self.n_base_only + self.n_ft_only + self.n_shared_weak

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line naming the field) on nonsense values."""
        for name in ("n_shared", "n_base_only", "n_ft_only", "n_shared_weak", "n_groups"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.d_model <= 0:
            raise ConfigError(f"d_model: must be positive, got {self.d_model}")
        if not 2 <= self.n_models <= MAX_MODELS:
            raise ConfigError(f"n_models: must be in 2..{MAX_MODELS}, got {self.n_models}")
        if self.subset_size < 0:
            raise ConfigError(f"subset_size: must be >= 0, got {self.subset_size}")
        self.subset_counts()  # raises on a bad --subsets
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


def auto_subsets(n: int) -> list[tuple[int, ...]]:
    """The default presence subsets of ``n`` models: every single model, the checkpoint-like ranges
    ``{0..j}`` and ``{j..n-1}`` (``1 <= j <= n-2``), the pairs ``{i, i+2}``, ``{0, n-1}`` and the middle
    ``{1..n-2}``; proper subsets only, each once, sorted by size then members."""
    subs = {(i,) for i in range(n)}
    subs |= {tuple(range(j + 1)) for j in range(1, n - 1)} | {tuple(range(j, n)) for j in range(1, n - 1)}
    subs |= {(i, i + 2) for i in range(n - 2)} | {(0, n - 1), tuple(range(1, n - 1))}
    return sorted((s for s in subs if 0 < len(s) < n), key=lambda s: (len(s), s))


def parse_subsets(spec: str, n: int, count: int) -> list[tuple[tuple[int, ...], int]]:
    """``"0+1,1+2+3:8"`` -> ``[((0, 1), count), ((1, 2, 3), 8)]`` (``"auto"``: :func:`auto_subsets`), sorted
    by size then members; :class:`ConfigError` naming ``subsets`` on a bad entry."""
    if spec.strip() == "auto":
        return [(s, count) for s in auto_subsets(n)]
    out: dict[tuple[int, ...], int] = {}
    for item in (t.strip() for t in spec.split(",")):
        if not item:
            continue
        pat, _, num = item.partition(":")
        try:
            members = tuple(sorted({int(t) for t in pat.split("+")}))
            c = int(num) if num else count
        except ValueError:
            raise ConfigError(f"subsets: bad entry {item!r} (expected e.g. '0+2' or '0+2:16')") from None
        if not members or members[0] < 0 or members[-1] >= n:
            raise ConfigError(f"subsets: {item!r} names a model outside 0..{n - 1}")
        if c < 0:
            raise ConfigError(f"subsets: negative count in {item!r}")
        if members in out:
            raise ConfigError(f"subsets: {'+'.join(map(str, members))} given twice")
        out[members] = c
    return sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0]))


# Named members of the family: overrides of SyntheticConfig (see docs/synthetic.md for their statistics).
# PRESETS: the two-model pairs.
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
# Members with more than two models (``crosscoder synth`` writes a paired cache for them).
MULTI_PRESETS: dict[str, dict[str, Any]] = {
    # four models (a checkpoint-like series): 224 features, 140-152 per model (default: 144, crowded 208)
    "multi": {
        "n_models": 4,
        "n_shared": 64,
        "n_shared_weak": 16,
        "weak_scale": 0.5,
        "subsets": "auto",
        "subset_size": 12,
        "shared_drift": 0.2,
        "gain_spread": 0.3,
        "mean_offset": 7.0,
        "norm_gap": 3.0,
    },
}


ALL_PRESETS: dict[str, dict[str, Any]] = {**PRESETS, **MULTI_PRESETS}


def preset_config(name: str, **overrides: Any) -> SyntheticConfig:
    """The preset ``name`` with ``overrides`` (field values) on top, validated."""
    if name not in ALL_PRESETS:
        raise ConfigError(f"preset: unknown {name!r} (choices: {', '.join(ALL_PRESETS)})")
    known = {f.name for f in fields(SyntheticConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"{bad[0]}: not a synthetic-pair field")
    cfg = SyntheticConfig(**{**ALL_PRESETS[name], **overrides})
    cfg.validate()
    return cfg
