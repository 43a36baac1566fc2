"""Planted features of ``n_models > 2`` models (preset ``multi``; see ``docs/synthetic.md``).

Each feature is present in a subset of the models (its ``pattern``, ``"0+2"``):

* ``shared``       every model;
* ``shared_weak``  every model, strength ``weak_scale ** (1 - m / (M - 1))`` in model ``m`` (a feature the
  later models amplified: ``weak_scale`` in the first model, 1 in the last);
* ``exclusive``    one model only, and ``subset``: a proper subset of two or more models, ``subset_size``
  features (or the count given) per subset of ``cfg.subsets`` (``auto``: every single model, the
  checkpoint-like ranges ``{0..j}`` / ``{j..M-1}``, the pairs ``{i, i+2}``, ``{0, M-1}``, the middle).

Directions drift as a random walk along the models: model ``m``'s direction is model ``m-1``'s rotated by
``shared_drift`` radians towards a fresh random orthogonal direction (a feature present in models 1 and 3
differs by two steps). ``shared`` and ``subset`` features get a strength ``exp(gain_spread * N(0, 1/2))``
per model (recorded in ``gain [F, M]``): the strengths of any two models differ by a factor
``exp(gain_spread * N(0, 1))``, as a pair's fine-tuned/base gain. Model ``m``'s whole activation is
multiplied by ``norm_gap ** (m / (M - 1))`` (1 for the first model, ``norm_gap`` for the last); with
``mean_offset > 0`` model ``m`` gets a constant offset of norm ``mean_offset`` times its feature-part RMS
norm, its direction a random walk with step ``offset_drift``. Groups of co-occurring features work as for
a pair.
"""

from __future__ import annotations

import math

import torch

from .synthetic import GroundTruth
from .synthetic_config import SyntheticConfig


def _walk(start: torch.Tensor, n_steps: int, angle: float, g: torch.Generator) -> torch.Tensor:
    """``start [F, d]`` unit rows -> ``[F, n_steps + 1, d]``: each step rotates the previous direction by
    ``angle`` towards a fresh random direction orthogonal to it."""
    out = [start]
    cur = start
    for _ in range(n_steps):
        other = torch.randn(start.shape, generator=g, dtype=start.dtype)
        other = other - (other * cur).sum(-1, keepdim=True) * cur
        other = other / other.norm(dim=-1, keepdim=True)
        cur = math.cos(angle) * cur + math.sin(angle) * other
        cur = cur / cur.norm(dim=-1, keepdim=True)
        out.append(cur)
    return torch.stack(out, dim=1)


def plant_multi(cfg: SyntheticConfig) -> GroundTruth:
    """Draw the planted features of ``cfg.n_models > 2`` models (deterministic in ``cfg.seed``)."""
    cfg.validate()
    g = torch.Generator().manual_seed(cfg.seed)
    m, d = cfg.n_models, cfg.d_model
    present: list[list[int]] = [list(range(m))] * (cfg.n_shared + cfg.n_shared_weak)
    classes = ["shared"] * cfg.n_shared + ["shared_weak"] * cfg.n_shared_weak
    for members, count in cfg.subset_counts():
        present += [list(members)] * count
        classes += ["exclusive" if len(members) == 1 else "subset"] * count
    n = len(classes)
    mask = torch.zeros(n, m)
    for i, members in enumerate(present):
        mask[i, members] = 1.0
    start = torch.randn(n, d, generator=g)
    dirs = _walk(start / start.norm(dim=-1, keepdim=True), m - 1, cfg.shared_drift, g) * mask[..., None]
    u = torch.rand(n, generator=g)
    freq = torch.exp(math.log(cfg.freq_min) + u * (math.log(cfg.freq_max) - math.log(cfg.freq_min)))
    strength = mask.clone()
    weak = torch.tensor([c == "shared_weak" for c in classes])
    ramp = torch.tensor([cfg.weak_scale ** (1 - k / (m - 1)) for k in range(m)])
    strength[weak] = ramp
    gain = torch.ones(n, m)
    if cfg.gain_spread > 0:
        # per model exp(gain_spread * N(0, 1/2)): two models' strengths differ by exp(gain_spread * N(0, 1)),
        # the spread of a pair's ft/base gain
        z = torch.randn(n, m, generator=g) / math.sqrt(2.0)
        spread = torch.tensor([c in ("shared", "subset") for c in classes])
        gain = torch.where(spread[:, None], torch.exp(cfg.gain_spread * z), gain)
        strength = strength * gain
    groups = None
    if cfg.n_groups:
        groups = torch.randperm(n, generator=g)[: cfg.n_groups * cfg.group_size].view(cfg.n_groups, -1)
        freq[groups[:, 1:]] = freq[groups[:, :1]] * cfg.group_prob
    patterns = ["+".join(map(str, p)) for p in present]
    gt = GroundTruth(
        dirs=dirs,
        strength=strength,
        freq=freq,
        classes=classes,
        config=cfg,
        gain=gain,
        groups=groups,
        patterns=patterns,
    )
    gt.strength = strength * gt.model_gaps()[None, :]
    if cfg.mean_offset > 0:
        o = torch.randn(d, generator=g, dtype=torch.float64)
        walk = _walk((o / o.norm())[None], m - 1, cfg.offset_drift, g)[0]  # [M, d]
        gt.offset = (walk * (cfg.mean_offset * gt.feature_rms())[:, None]).float()
    return gt
