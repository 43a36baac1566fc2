"""A family of synthetic model pairs with planted features of known class (see ``docs/synthetic.md``).

Each planted feature ``i`` has a unit direction per model ``dirs[i, m]`` and a strength per model
``strength[i, m]`` (0 where the model lacks it). Paired activations ``x[n, m]`` (``[n_rows, 2, d_model]``)::

    x[n, m] = sum_i a[n, i] * strength[i, m] * dirs[i, m] + offset[m] + noise * g_m * eps[n, m]

with ``g = (1, norm_gap)`` and ``a[n, i] = active[n, i] * mag[n, i]`` shared by both models (one token,
one set of active concepts). ``active`` is Bernoulli(``freq_i``) (log-uniform in ``[freq_min,
freq_max]``) except for members of co-occurring groups (below); ``mag`` is drawn from ``magnitude``.
Classes planted:

* ``shared``      in both models; the fine-tuned direction is the base one rotated by ``shared_drift``
  radians and its strength is the base one times ``exp(gain_spread * N(0, 1))`` (recorded in ``gain``);
* ``base_only``   base model only;  ``ft_only`` fine-tuned model only;
* ``shared_weak`` shared, but the base model's strength is ``weak_scale`` times the fine-tuned one
  (fine-tuning amplified a concept the base model already had; its ground-truth class is ``shared``).

The fine-tuned model's whole activation (features, offset, noise) is multiplied by ``norm_gap``; the
strengths and offsets of :class:`GroundTruth` include that factor, so ``vectors()`` is what each feature
adds to each model's raw activation.

Groups: ``n_groups`` disjoint groups of ``group_size`` features drawn at random among all features. The
first member is the leader and fires as usual (Bernoulli of its frequency); every other member fires
only together with its leader, independently with probability ``group_prob`` (so its frequency is
``group_prob`` times the leader's, which is what ``GroundTruth.freq`` records).

Offsets: with ``mean_offset > 0`` model ``m`` gets a constant vector of norm ``mean_offset`` times the RMS
norm of its feature part, ``sqrt(E||sum_i a_i strength_im dirs_im||^2)`` (computed exactly from the
frequencies, groups, magnitude moments and vectors: :meth:`GroundTruth.feature_rms`). The fine-tuned
offset direction is the base one rotated by ``offset_drift`` radians towards a random direction.

With every new knob neutral (the defaults) no extra random numbers are drawn: ``SyntheticConfig()`` gives
the same pair, bit for bit, as before the knobs existed. The settings and the presets live in
:mod:`crosscoder.data.synthetic_config`.

More than two models (``n_models > 2``, preset ``multi``): features are planted in presence subsets of
the models (:mod:`crosscoder.data.synthetic_multi`); ``x`` is then ``[n_rows, n_models, d_model]`` and
every per-model tensor below has ``n_models`` rows. Each feature's subset is recorded in
``GroundTruth.patterns`` (``"0+2"`` strings, as :mod:`crosscoder.analysis.patterns`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError  # noqa: F401 - re-exported (importable from here before the split)
from .synthetic_config import (  # noqa: F401 - re-exported: this module's API before the split
    _CROWDED,
    ALL_PRESETS,
    CLASSES,
    MAGNITUDES,
    MULTI_CLASSES,
    MULTI_PRESETS,
    PRESETS,
    SyntheticConfig,
    _f,
    preset_config,
)


def presence_patterns(strength: torch.Tensor) -> list[str]:
    """``strength [n_features, n_models]`` -> each feature's presence subset, ``"0+2"`` (models with a
    non-zero strength)."""
    return ["+".join(str(m) for m in torch.nonzero(row > 0).flatten().tolist()) for row in strength]


@dataclass
class GroundTruth:
    """Planted features; ``M`` = number of models (2 for a pair)."""

    dirs: torch.Tensor  # [n_features, M, d_model] unit vectors (zeros where absent)
    strength: torch.Tensor  # [n_features, M], norm gaps and gains included
    freq: torch.Tensor  # [n_features] marginal firing frequency
    classes: list[str]  # planted class per feature
    config: SyntheticConfig
    offset: torch.Tensor | None = None  # [M, d_model] constant per-model offset (zeros: none)
    # planted re-weighting (1: none; norm gaps excluded): [n_features] ft/base for a pair,
    # [n_features, M] per model with n_models > 2
    gain: torch.Tensor | None = None
    groups: torch.Tensor | None = None  # [n_groups, group_size] feature indices, leader first
    patterns: list[str] | None = None  # presence subset per feature, "0+2" (default: strength > 0)

    def __post_init__(self) -> None:
        n, d = self.dirs.shape[0], self.dirs.shape[-1]
        if self.offset is None:
            self.offset = torch.zeros(self.n_models, d)
        if self.gain is None:
            self.gain = torch.ones(n)
        if self.groups is None:
            self.groups = torch.zeros(0, max(self.config.group_size, 0), dtype=torch.long)
        if self.patterns is None:
            self.patterns = presence_patterns(self.strength)

    @property
    def n_models(self) -> int:
        return int(self.dirs.shape[1])

    def model_gaps(self) -> torch.Tensor:
        """``[M]`` factor multiplying each model's whole activation: ``(1, norm_gap)`` for a pair,
        ``norm_gap ** (m / (M - 1))`` for model ``m`` of ``M``."""
        m = self.n_models
        if m == 2:
            return torch.tensor([1.0, self.config.norm_gap])
        return torch.tensor([self.config.norm_gap ** (i / (m - 1)) for i in range(m)])

    def vectors(self) -> torch.Tensor:
        """``[n_features, M, d_model]``: strength-weighted directions (what each feature adds)."""
        return self.dirs * self.strength[..., None]

    def expected_active(self) -> float:
        """Expected number of active planted features per token (sum of frequencies)."""
        return float(self.freq.double().sum())

    def coactivation(self) -> torch.Tensor:
        """``[n_features, n_features]`` float64: P(i and j active) off the diagonal, P(i active) on it."""
        f = self.freq.double()
        p = torch.outer(f, f)
        p2 = self.config.group_prob
        for grp in self.groups.tolist():
            lead, mem = grp[0], grp[1:]
            for a in mem:
                p[lead, a] = p[a, lead] = f[lead] * p2
                for b in mem:
                    p[a, b] = f[lead] * p2 * p2
        p.fill_diagonal_(0.0)
        return p + torch.diag(f)

    def feature_rms(self) -> torch.Tensor:
        """``[M]`` float64: ``sqrt(E||sum_i a_i v_im||^2)`` per model, exact for the generative model."""
        mean, second = MAGNITUDES[self.config.magnitude]
        p = self.coactivation()
        m = p * mean**2
        m.diagonal().copy_(p.diagonal() * second)
        v = self.vectors().double()  # [F, M, d]
        return torch.stack(
            [(m * (v[:, k] @ v[:, k].T)).sum().clamp_min(0).sqrt() for k in range(self.n_models)]
        )

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_path, write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        t = {
            "dirs": self.dirs,
            "strength": self.strength,
            "freq": self.freq,
            "offset": self.offset,
            "gain": self.gain,
        }
        if self.groups.numel():
            t["groups"] = self.groups
        with atomic_path(path / "ground_truth.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in t.items()}, str(tmp))
        write_json(
            path / "ground_truth.json",
            {"classes": self.classes, "patterns": self.patterns, "config": asdict(self.config)},
        )

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        """Read a folder written by :meth:`save` (older folders lack offset, gain, groups and patterns:
        defaults)."""
        import json

        from safetensors.torch import load_file

        path = Path(path)
        t = load_file(str(path / "ground_truth.safetensors"))
        meta = json.loads((path / "ground_truth.json").read_text())
        known = {f.name for f in fields(SyntheticConfig)}
        cfg = SyntheticConfig(**{k: v for k, v in meta["config"].items() if k in known})
        return cls(
            t["dirs"],
            t["strength"],
            t["freq"],
            meta["classes"],
            cfg,
            t.get("offset"),
            t.get("gain"),
            t.get("groups"),
            meta.get("patterns"),
        )


def plant(cfg: SyntheticConfig) -> GroundTruth:
    """Draw the planted features (deterministic in ``cfg.seed``)."""
    cfg.validate()
    if cfg.n_models > 2:
        from .synthetic_multi import plant_multi

        return plant_multi(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    n, d = cfg.n_features, cfg.d_model
    base = torch.randn(n, d, generator=g)
    base = base / base.norm(dim=-1, keepdim=True)
    other = torch.randn(n, d, generator=g)
    other = other - (other * base).sum(-1, keepdim=True) * base
    other = other / other.norm(dim=-1, keepdim=True)
    theta = cfg.shared_drift
    ft = math.cos(theta) * base + math.sin(theta) * other
    classes = (
        ["shared"] * cfg.n_shared
        + ["base_only"] * cfg.n_base_only
        + ["ft_only"] * cfg.n_ft_only
        + ["shared_weak"] * cfg.n_shared_weak
    )
    strength = torch.ones(n, 2)
    for i, c in enumerate(classes):
        if c == "base_only":
            strength[i, 1] = 0.0
        elif c == "ft_only":
            strength[i, 0] = 0.0
        elif c == "shared_weak":
            strength[i, 0] = cfg.weak_scale
    dirs = torch.stack([base, ft], dim=1) * (strength > 0)[..., None]
    u = torch.rand(n, generator=g)
    freq = torch.exp(math.log(cfg.freq_min) + u * (math.log(cfg.freq_max) - math.log(cfg.freq_min)))
    # New knobs: each draws from `g` only when it is not neutral, after everything above.
    gain = torch.ones(n)
    if cfg.gain_spread > 0:
        z = torch.randn(n, generator=g)
        shared = torch.tensor([c == "shared" for c in classes])
        gain = torch.where(shared, torch.exp(cfg.gain_spread * z), gain)
        strength[:, 1] = strength[:, 1] * gain
    groups = None
    if cfg.n_groups:
        groups = torch.randperm(n, generator=g)[: cfg.n_groups * cfg.group_size].view(cfg.n_groups, -1)
        freq[groups[:, 1:]] = freq[groups[:, :1]] * cfg.group_prob
    if cfg.norm_gap != 1.0:
        strength[:, 1] = strength[:, 1] * cfg.norm_gap
    gt = GroundTruth(
        dirs=dirs, strength=strength, freq=freq, classes=classes, config=cfg, gain=gain, groups=groups
    )
    if cfg.mean_offset > 0:
        o = torch.randn(2, d, generator=g, dtype=torch.float64)
        o0 = o[0] / o[0].norm()
        o1 = o[1] - (o[1] @ o0) * o0
        o1 = math.cos(cfg.offset_drift) * o0 + math.sin(cfg.offset_drift) * o1 / o1.norm()
        rms = gt.feature_rms()
        gt.offset = (torch.stack([o0, o1]) * (cfg.mean_offset * rms)[:, None]).float()
    return gt


def _magnitudes(kind: str, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return 0.5 + torch.rand(shape, generator=generator)
    if kind == "exponential":
        return -torch.log1p(-torch.rand(shape, generator=generator))
    return torch.exp(0.5 * torch.randn(shape, generator=generator))  # lognormal, median 1


def activity(gt: GroundTruth, n_rows: int, generator: torch.Generator) -> torch.Tensor:
    """``a [n_rows, n_features]``: the active features' magnitudes (0 where inactive) of ``n_rows`` tokens."""
    cfg, freq = gt.config, gt.freq
    u = torch.rand(n_rows, freq.shape[0], generator=generator)
    active = u < freq
    if gt.groups.numel():
        lead, mem = gt.groups[:, :1], gt.groups[:, 1:]  # [G, 1], [G, S-1]
        active[:, mem.reshape(-1)] = (active[:, lead] & (u[:, mem] < cfg.group_prob)).reshape(n_rows, -1)
    return active * _magnitudes(cfg.magnitude, (n_rows, freq.shape[0]), generator)


def sample(gt: GroundTruth, n_rows: int, generator: torch.Generator) -> torch.Tensor:
    """``n_rows`` paired activations ``[n_rows, M, d_model]`` float32."""
    cfg = gt.config
    a = activity(gt, n_rows, generator)  # [n, F]
    vec = gt.vectors().reshape(a.shape[1], -1)  # [F, M*d]
    x = (a @ vec).view(n_rows, gt.n_models, -1)
    if bool(gt.offset.any()):
        x = x + gt.offset
    eps = torch.randn(x.shape, generator=generator)
    if cfg.norm_gap != 1.0:
        if gt.n_models == 2:
            eps[:, 1] *= cfg.norm_gap
        else:
            eps *= gt.model_gaps()[None, :, None]
    return x + cfg.noise * eps


def generate(cfg: SyntheticConfig, n_rows: int, chunk: int = 65536) -> tuple[GroundTruth, Any]:
    """Planted features and an iterator of activation chunks ``[<=chunk, n_models, d_model]``."""
    gt = plant(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def chunks():
        done = 0
        while done < n_rows:
            n = min(chunk, n_rows - done)
            yield sample(gt, n, g)
            done += n

    return gt, chunks()


def model_names(n_models: int) -> list[str]:
    """Names recorded in a synthetic cache: ``synthetic-base``/``synthetic-ft`` for a pair, else
    ``synthetic_0`` .. ``synthetic_<n-1>``."""
    if n_models == 2:
        return ["synthetic-base", "synthetic-ft"]
    return [f"synthetic_{i}" for i in range(n_models)]


def write_cache(cfg: SyntheticConfig, n_rows: int, path: str | Path) -> GroundTruth:
    """Generate ``n_rows`` rows into a paired cache at ``path`` (built atomically) with the ground truth in
    ``path/ground_truth`` (where ``crosscoder analyze`` looks for it)."""
    from ..io import atomic_dir
    from .paired import PairedCacheWriter

    gt, chunks = generate(cfg, n_rows)
    m = cfg.n_models
    with atomic_dir(path) as tmp:
        w = PairedCacheWriter(
            tmp,
            m,
            cfg.d_model,
            "float32",
            shard_rows=1 << 20 if m == 2 else 1 << 18,
            meta={
                "models": [{"name": n} for n in model_names(m)],
                "site": "synthetic",
                "source": {"synthetic": asdict(cfg), "rows": n_rows},
            },
        )
        for x in chunks:
            w.add(x)
        w.close()
        gt.save(tmp / "ground_truth")
    return gt


def write_hf_pair(
    cfg: SyntheticConfig, n_rows: int, out: str | Path, column: str = "activation"
) -> GroundTruth:
    """``crosscoder synth``: two aligned HF datasets (``OUT/base``, ``OUT/ft``) plus ``OUT/ground_truth``."""
    if cfg.n_models != 2:
        raise ConfigError(f"n_models: an HF pair holds 2 models, got {cfg.n_models} (write a cache instead)")
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from ..io import atomic_dir

    gt, chunks = generate(cfg, n_rows)
    parts = [c.numpy() for c in chunks]
    x = np.concatenate(parts)
    with atomic_dir(out) as tmp:
        for m, name in enumerate(("base", "ft")):
            flat = pa.array(np.ascontiguousarray(x[:, m, :]).reshape(-1), pa.float32())
            col = pa.FixedSizeListArray.from_arrays(flat, cfg.d_model)
            Dataset(InMemoryTable(pa.table({column: col}))).save_to_disk(str(tmp / name))
        gt.save(tmp / "ground_truth")
    return gt


def write_multi(cfg: SyntheticConfig, n_rows: int, out: str | Path) -> GroundTruth:
    """``crosscoder synth`` with ``n_models > 2``: a paired cache ``OUT/cache`` (its ground truth inside,
    ``OUT/cache/ground_truth``, for ``crosscoder analyze --cache``) plus ``OUT/ground_truth``, built
    atomically."""
    from ..io import atomic_dir

    with atomic_dir(out) as tmp:
        gt = write_cache(cfg, n_rows, tmp / "cache")
        gt.save(tmp / "ground_truth")
    return gt
