"""Presence patterns: which models a latent is present in, from its decoder norms.

With ``n[i]`` the decoder norm of a latent in model ``i`` (normalised space; with several sites, the
model's norm over all its sites, ``sqrt(sum of squares)``), the latent is **present** in model ``i`` when

    n[i] >= presence_ratio * max_j n[j]

and its ``pattern`` is the sorted indices of the models it is present in, joined by ``+`` (``"0+2"``).
A latent whose decoder is zero in every model has the empty pattern ``""``.

The default ``presence_ratio`` is ``band / (1 - band)`` with ``band`` the architecture's exclusive band
(:attr:`~crosscoder.model.architectures.base.Architecture.exclusive_band`): for two models, pattern ``"0"``
is then exactly the relative-norm call ``r < band`` (base-only by norm), ``"1"`` is ``r > 1 - band``
(fine-tuned-only by norm) and ``"0+1"`` is everything in between, so the two-model pattern agrees with the
``norm_class`` column.
"""

from __future__ import annotations

import numpy as np


def presence_ratio_for_band(band: float) -> float:
    """The presence ratio that makes two-model patterns agree with the relative-norm band."""
    return band / (1.0 - band)


def model_norms(block_norms: np.ndarray, block_models: list[int] | None = None) -> np.ndarray:
    """``block_norms [d_latent, n_blocks]`` -> ``[d_latent, n_models]``: each model's norm over its blocks
    (``sqrt`` of the summed squares; the identity when every block is its own model)."""
    bn = np.asarray(block_norms, np.float64)
    if block_models is None:
        return bn
    idx = np.asarray(block_models, np.int64)
    out = np.zeros((bn.shape[0], int(idx.max()) + 1), np.float64)
    np.add.at(out.T, idx, (bn**2).T)
    return np.sqrt(out)


def presence(norms: np.ndarray, ratio: float) -> np.ndarray:
    """``norms [d_latent, n_models]`` -> ``present [d_latent, n_models]`` (bool)."""
    n = np.asarray(norms, np.float64)
    mx = n.max(axis=1, keepdims=True)
    return (n >= ratio * mx) & (mx > 0)


def pattern_strings(present: np.ndarray) -> np.ndarray:
    """``present [d_latent, n_models]`` -> object array of patterns (``"0+2"``; ``""`` when none)."""
    p = np.asarray(present, bool)
    return np.array(["+".join(str(i) for i in np.flatnonzero(row)) for row in p], dtype=object)


def parse_pattern(s: str) -> frozenset[int]:
    """``"0+2"`` -> ``{0, 2}`` (``""`` -> the empty set)."""
    return frozenset(int(t) for t in s.split("+")) if s else frozenset()
