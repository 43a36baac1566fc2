"""The latent table: decoder-norm diffing metrics, activation statistics, Latent Scaling and classes.

All norms are measured in the crosscoder's **normalised training space**: a saved crosscoder is folded
(its weights apply to raw activations and ``norm_scale`` records the factors), so the decoder of model
``m`` is multiplied back by ``norm_scale[m]`` (:meth:`CrossCoder.dec_norms`). With ``n_b = ||d_base||``
and ``n_f = ||d_ft||`` for one latent:

* ``relative_norm``  r = n_f / (n_b + n_f)                                  (Kissane / Anthropic)
* ``delta_norm``     Δ = ((n_f - n_b) / max(n_f, n_b) + 1) / 2              (Minder et al.)
* ``cos_sim``        cosine of ``d_base`` and ``d_ft`` (scale-free)

both 0 = base-only, 0.5 = equal, 1 = fine-tuned-only.

Classification (:class:`Thresholds`, defaults per architecture from its ``exclusive_band``, :func:`thresholds_for`):

1. by norm: ``base_only`` if r < band, ``ft_only`` if r > 1 - band, ``shared`` if |r - 0.5| <=
   ``shared_band``, else ``other`` (``norm_class``);
2. a norm-exclusive latent keeps its call only if it fired on at least ``min_active`` scanned tokens
   and Latent Scaling finds the other model does not carry its direction: ``|nu_error| <= nu_error_max``
   and ``|nu_reconstruction| <= nu_reconstruction_max`` (``nu`` fitted along the fine-tuned decoder for
   ``ft_only`` candidates, mirrored along the base decoder for ``base_only`` ones). Otherwise it becomes
   ``other`` with ``flag`` ``complete_shrinkage`` (``nu_error`` too high), ``latent_decoupling``
   (``nu_reconstruction`` too high), ``scaling_undefined`` (its own model's beta is not positive) or
   ``too_rare``; latents that never fired are ``other`` / ``dead``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CrossCoderError
from ..model import ARCHITECTURES, CrossCoder
from .scaling import LatentScalingResult

CLASS_NAMES = ("base_only", "shared", "ft_only", "other")
FLAGS = ("complete_shrinkage", "latent_decoupling", "scaling_undefined", "too_rare", "dead")


@dataclass
class Thresholds:
    """Classification thresholds (see the module docstring)."""

    exclusive_band: float = 0.1
    shared_band: float = 0.2
    nu_error_max: float = 0.2
    nu_reconstruction_max: float = 0.2
    min_active: int = 20
    latent_scaling: bool = True

    def validate(self) -> None:
        if not 0.0 < self.exclusive_band < 0.5:
            raise CrossCoderError(f"exclusive_band: must be in (0, 0.5), got {self.exclusive_band}")
        if not 0.0 <= self.shared_band < 0.5 - self.exclusive_band:
            raise CrossCoderError(f"shared_band: must be in [0, 0.5 - exclusive_band), got {self.shared_band}")


def thresholds_for(arch: str, **overrides: Any) -> Thresholds:
    """The default thresholds of ``arch`` (its ``exclusive_band``, e.g. 0.25 for BatchTopK, whose exclusive
    latents keep a small residual norm in the other model) with ``overrides`` (None values ignored)."""
    cls = ARCHITECTURES.get(arch)
    base = Thresholds(exclusive_band=cls.exclusive_band) if cls is not None else Thresholds()
    t = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    t.validate()
    return t


@torch.no_grad()
def decoder_metrics(model: CrossCoder) -> dict[str, np.ndarray]:
    """Per-latent decoder metrics in the normalised space, each ``[d_latent]`` float64:
    ``dec_norm_base``, ``dec_norm_ft``, ``relative_norm``, ``delta_norm``, ``cos_sim``."""
    if model.cfg.n_models != 2:
        raise CrossCoderError(f"diffing metrics need a two-model crosscoder (this one has {model.cfg.n_models})")
    norms = model.dec_norms().detach().double().cpu()  # [h, 2]
    n_b, n_f = norms[:, 0], norms[:, 1]
    tot = n_b + n_f
    r = torch.where(tot > 0, n_f / tot.clamp_min(1e-30), torch.full_like(tot, 0.5))
    mx = torch.maximum(n_b, n_f)
    delta = torch.where(mx > 0, ((n_f - n_b) / mx.clamp_min(1e-30) + 1) / 2, torch.full_like(mx, 0.5))
    w = model.W_dec.detach().double().cpu()
    cos = torch.nn.functional.cosine_similarity(w[:, 0], w[:, 1], dim=-1, eps=1e-30)
    return {"dec_norm_base": n_b.numpy(), "dec_norm_ft": n_f.numpy(), "relative_norm": r.numpy(),
            "delta_norm": delta.numpy(), "cos_sim": cos.numpy()}


def norm_classes(relative_norm: np.ndarray, t: Thresholds) -> np.ndarray:
    """``[d_latent]`` class by relative norm alone (object array of class names)."""
    r = np.asarray(relative_norm, np.float64)
    out = np.full(r.shape, "other", dtype=object)
    out[np.abs(r - 0.5) <= t.shared_band] = "shared"
    out[r < t.exclusive_band] = "base_only"
    out[r > 1 - t.exclusive_band] = "ft_only"
    return out


def classify(relative_norm: np.ndarray, t: Thresholds, n_active: np.ndarray | None = None,
             nu_ft: tuple[np.ndarray, np.ndarray] | None = None,
             nu_base: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final classes. ``nu_ft = (nu_error, nu_reconstruction)`` fitted along the fine-tuned decoder,
    ``nu_base`` the mirror along the base decoder (each ``[d_latent]``).

    Returns ``(class, norm_class, flag)``, each an object array ``[d_latent]``.
    """
    by_norm = norm_classes(relative_norm, t)
    cls = by_norm.copy()
    flag = np.full(cls.shape, "", dtype=object)
    if n_active is not None:
        n_active = np.asarray(n_active)
        dead = n_active == 0
        rare = (n_active < t.min_active) & ~dead & np.isin(by_norm, ("base_only", "ft_only"))
        flag[rare], cls[rare] = "too_rare", "other"
        flag[dead], cls[dead] = "dead", "other"
    if t.latent_scaling:
        for name, nus in (("ft_only", nu_ft), ("base_only", nu_base)):
            if nus is None:
                continue
            nu_e, nu_r = (np.asarray(v, np.float64) for v in nus)
            cand = cls == name
            # NaN: the own model's beta is not positive (the latent does not explain its own model).
            undefined = cand & (np.isnan(nu_e) | np.isnan(nu_r))
            # |nu|: a base share of either sign (an anti-aligned direction is still present) counts.
            shrink = cand & ~undefined & (np.abs(nu_e) > t.nu_error_max)
            decouple = cand & ~undefined & ~shrink & (np.abs(nu_r) > t.nu_reconstruction_max)
            for mask, name_ in ((undefined, "scaling_undefined"), (shrink, "complete_shrinkage"),
                                (decouple, "latent_decoupling")):
                flag[mask], cls[mask] = name_, "other"
    return cls, by_norm, flag


def latent_columns(model: CrossCoder, thresholds: Thresholds | None = None,
                   stats: dict[str, np.ndarray] | None = None, scaling_ft: LatentScalingResult | None = None,
                   scaling_base: LatentScalingResult | None = None) -> dict[str, np.ndarray]:
    """The latent table as a dict of equal-length ``[d_latent]`` columns (no pandas needed).

    ``stats``: :meth:`crosscoder.analysis.scan.ActivationStats.result`; ``scaling_*``: Latent Scaling
    along the fine-tuned / base decoders. Missing parts leave their columns NaN.
    """
    t = thresholds or thresholds_for(model.cfg.arch)
    cols: dict[str, np.ndarray] = {"latent": np.arange(model.cfg.d_latent, dtype=np.int64)}
    cols.update(decoder_metrics(model))
    h = model.cfg.d_latent
    nan = np.full(h, np.nan)
    st = stats or {}
    for k in ("freq", "mean_act", "mean_act_all", "max_act"):
        cols[k] = np.asarray(st.get(k, nan), np.float64)
    cols["n_active"] = np.asarray(st.get("n_active", np.full(h, -1)), np.int64)
    cols["dead"] = np.asarray(st.get("dead", np.zeros(h, bool)), bool)
    nu_ft = nu_base = None
    if scaling_ft is not None:
        nu_ft = (scaling_ft.nu_error.numpy(), scaling_ft.nu_reconstruction.numpy())
        cols["beta_ratio_error"], cols["beta_ratio_reconstruction"] = (v.astype(np.float64) for v in nu_ft)
        for target in ("error", "reconstruction"):
            beta = getattr(scaling_ft, f"beta_{target}").numpy().astype(np.float64)
            cols[f"beta_{target}_base"], cols[f"beta_{target}_ft"] = beta[0], beta[1]
    else:
        for k in ("beta_ratio_error", "beta_ratio_reconstruction", "beta_error_base", "beta_error_ft",
                  "beta_reconstruction_base", "beta_reconstruction_ft"):
            cols[k] = nan.copy()
    if scaling_base is not None:
        nu_base = (scaling_base.nu_error.numpy(), scaling_base.nu_reconstruction.numpy())
        cols["beta_ratio_error_mirror"], cols["beta_ratio_reconstruction_mirror"] = (v.astype(np.float64) for v in nu_base)
    else:
        cols["beta_ratio_error_mirror"], cols["beta_ratio_reconstruction_mirror"] = nan.copy(), nan.copy()
    cls, by_norm, flag = classify(cols["relative_norm"], t, cols["n_active"] if stats else None, nu_ft, nu_base)
    cols["class"], cols["norm_class"], cols["flag"] = cls, by_norm, flag
    return cols


def class_counts(cols: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Per class: latents called so by norm alone, latents that keep the call, and why the rest lost it."""
    out: dict[str, dict[str, int]] = {}
    for c in CLASS_NAMES:
        by_norm = cols["norm_class"] == c
        row = {"norm": int(by_norm.sum()), "final": int((cols["class"] == c).sum())}
        if c in ("base_only", "ft_only"):
            row["surviving"] = int((by_norm & (cols["class"] == c)).sum())
            for fl in FLAGS:
                row[fl] = int((by_norm & (cols["flag"] == fl)).sum())
        out[c] = row
    return out


def to_dataframe(cols: dict[str, np.ndarray]) -> Any:
    """Columns -> ``pandas.DataFrame`` (imported here only: the CLI writes with pyarrow)."""
    import pandas as pd

    df = pd.DataFrame({k: (v.astype(str) if v.dtype == object else v) for k, v in cols.items()})
    return df


def write_table(cols: dict[str, np.ndarray], out_dir: Any) -> None:
    """Write ``latents.parquet`` and ``latents.csv`` (atomically) with pyarrow."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ..io import atomic_path

    table = pa.table({k: (pa.array(v.astype(str)) if v.dtype == object else pa.array(v)) for k, v in cols.items()})
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "latents.parquet") as tmp:
        pq.write_table(table, str(tmp))
    with atomic_path(out_dir / "latents.csv") as tmp:
        pacsv.write_csv(table, str(tmp))
