"""A synthetic model pair with planted features of known class.

Each planted feature ``i`` has a unit direction per model ``dirs[i, m]`` and a strength per model
``strength[i, m]`` (0 where the model lacks it). Paired activations are::

    x[n, m] = sum_i a[n, i] * strength[i, m] * dirs[i, m] + noise * eps[n, m]

with ``a[n, i] = Bernoulli(freq_i) * Uniform(0.5, 1.5)`` shared by both models (one token, one set of
active concepts). Classes planted:

* ``shared``      in both models; the fine-tuned direction is the base one rotated by ``shared_drift``;
* ``base_only``   base model only;  ``ft_only`` fine-tuned model only;
* ``shared_weak`` shared, but the base model's strength is ``weak_scale`` times the fine-tuned one
  (fine-tuning amplified a concept the base model already had; its ground-truth class is ``shared``).

Frequencies are log-uniform in ``[freq_min, freq_max]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CLASSES = ("shared", "base_only", "ft_only", "shared_weak")


@dataclass
class SyntheticConfig:
    d_model: int = 64
    n_shared: int = 96
    n_base_only: int = 32
    n_ft_only: int = 32
    n_shared_weak: int = 16
    weak_scale: float = 0.3
    shared_drift: float = 0.2
    freq_min: float = 0.004
    freq_max: float = 0.04
    noise: float = 0.02
    seed: int = 1234

    @property
    def n_features(self) -> int:
        return self.n_shared + self.n_base_only + self.n_ft_only + self.n_shared_weak


@dataclass
class GroundTruth:
    dirs: torch.Tensor  # [n_features, 2, d_model] unit vectors (zeros where absent)
    strength: torch.Tensor  # [n_features, 2]
    freq: torch.Tensor  # [n_features]
    classes: list[str]  # planted class per feature
    config: SyntheticConfig

    def vectors(self) -> torch.Tensor:
        """``[n_features, 2, d_model]``: strength-weighted directions (what each feature adds)."""
        return self.dirs * self.strength[..., None]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_path, write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "ground_truth.safetensors") as tmp:
            save_file({"dirs": self.dirs, "strength": self.strength, "freq": self.freq}, str(tmp))
        write_json(path / "ground_truth.json", {"classes": self.classes, "config": asdict(self.config)})

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        import json

        from safetensors.torch import load_file

        path = Path(path)
        t = load_file(str(path / "ground_truth.safetensors"))
        meta = json.loads((path / "ground_truth.json").read_text())
        return cls(t["dirs"], t["strength"], t["freq"], meta["classes"], SyntheticConfig(**meta["config"]))


def plant(cfg: SyntheticConfig) -> GroundTruth:
    """Draw the planted features (deterministic in ``cfg.seed``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, d = cfg.n_features, cfg.d_model
    base = torch.randn(n, d, generator=g)
    base = base / base.norm(dim=-1, keepdim=True)
    other = torch.randn(n, d, generator=g)
    other = other - (other * base).sum(-1, keepdim=True) * base
    other = other / other.norm(dim=-1, keepdim=True)
    theta = cfg.shared_drift
    ft = math.cos(theta) * base + math.sin(theta) * other
    classes = (["shared"] * cfg.n_shared + ["base_only"] * cfg.n_base_only + ["ft_only"] * cfg.n_ft_only
               + ["shared_weak"] * cfg.n_shared_weak)
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
    return GroundTruth(dirs=dirs, strength=strength, freq=freq, classes=classes, config=cfg)


def sample(gt: GroundTruth, n_rows: int, generator: torch.Generator) -> torch.Tensor:
    """``n_rows`` paired activations ``[n_rows, 2, d_model]`` float32."""
    freq = gt.freq
    active = torch.rand(n_rows, freq.shape[0], generator=generator) < freq
    mag = 0.5 + torch.rand(n_rows, freq.shape[0], generator=generator)
    a = active * mag  # [n, F]
    vec = gt.vectors().reshape(freq.shape[0], -1)  # [F, 2*d]
    x = (a @ vec).view(n_rows, 2, -1)
    return x + gt.config.noise * torch.randn(x.shape, generator=generator)


def generate(cfg: SyntheticConfig, n_rows: int, chunk: int = 65536) -> tuple[GroundTruth, Any]:
    """Planted features and an iterator of activation chunks ``[<=chunk, 2, d_model]``."""
    gt = plant(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def chunks():
        done = 0
        while done < n_rows:
            n = min(chunk, n_rows - done)
            yield sample(gt, n, g)
            done += n

    return gt, chunks()


def write_cache(cfg: SyntheticConfig, n_rows: int, path: str | Path) -> GroundTruth:
    """Generate ``n_rows`` rows into a paired cache at ``path`` (built atomically) with the ground truth."""
    from ..io import atomic_dir
    from .paired import PairedCacheWriter

    gt, chunks = generate(cfg, n_rows)
    with atomic_dir(path) as tmp:
        w = PairedCacheWriter(tmp, 2, cfg.d_model, "float32", shard_rows=1 << 20,
                              meta={"models": [{"name": "synthetic-base"}, {"name": "synthetic-ft"}],
                                    "site": "synthetic", "source": {"synthetic": asdict(cfg), "rows": n_rows}})
        for x in chunks:
            w.add(x)
        w.close()
        gt.save(tmp / "ground_truth")
    return gt


def write_hf_pair(cfg: SyntheticConfig, n_rows: int, out: str | Path, column: str = "activation") -> GroundTruth:
    """``crosscoder synth``: two aligned HF datasets (``OUT/base``, ``OUT/ft``) plus ``OUT/ground_truth``."""
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
