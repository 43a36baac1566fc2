"""The latent table: decoder-norm diffing metrics, activation statistics, Latent Scaling and classes.

All norms are measured in the crosscoder's **normalised training space**: a saved crosscoder is folded
(its weights apply to raw activations and ``norm_scale`` records the factors), so the decoder of model
``m`` is multiplied back by ``norm_scale[m]`` (:meth:`CrossCoder.dec_norms`). With ``n_b = ||d_base||``
and ``n_f = ||d_ft||`` for one latent:

* ``relative_norm``  r = n_f / (n_b + n_f)                                  (Kissane / Anthropic)
* ``delta_norm``     Δ = ((n_f - n_b) / max(n_f, n_b) + 1) / 2              (Minder et al.)
* ``cos_sim``        cosine of ``d_base`` and ``d_ft`` (scale-free)

both 0 = base-only, 0.5 = equal, 1 = fine-tuned-only.

Classification (:class:`Thresholds`, defaults per architecture from its ``exclusive_band``,
:func:`thresholds_for`):

1. by norm: ``base_only`` if r < band, ``ft_only`` if r > 1 - band, ``shared`` if |r - 0.5| <=
   ``shared_band``, else ``other`` (``norm_class``);
2. a norm-exclusive latent keeps its call only if it fired on at least ``min_active`` scanned tokens
   and Latent Scaling finds the other model does not carry its direction: ``|nu_error| <= nu_error_max``
   and ``|nu_reconstruction| <= nu_reconstruction_max`` (``nu`` fitted along the fine-tuned decoder for
   ``ft_only`` candidates, mirrored along the base decoder for ``base_only`` ones). Otherwise it becomes
   ``other`` with ``flag`` ``complete_shrinkage`` (``nu_error`` too high), ``latent_decoupling``
   (``nu_reconstruction`` too high), ``scaling_undefined`` (its own model's beta is not positive) or
   ``too_rare``; latents that never fired are ``other`` / ``dead``.

**Latent layout** (``--dedicated-base/--dedicated-ft/--shared-latents``, :mod:`crosscoder.model.layout`):
the column ``kind`` says what each latent is by construction (``free``, ``designated_shared``,
``base_only``, ``ft_only``). The rules above decide the ``class`` of ``free`` latents only; a constrained
latent's ``class`` is its construction (``base_only``, ``ft_only``, and ``shared`` for designated shared
latents) with ``flag`` empty, and :func:`class_counts` counts free latents only. ``norm_class`` stays the
relative-norm call for every latent (exactly 0, 1 and 0.5 for the constrained ones). Latent Scaling still
runs for the dedicated latents: ``layout_nu_error`` / ``layout_nu_reconstruction`` hold the ratio along
the latent's own model's decoder (the mirror fit for ``base_only``, the fine-tuned fit for ``ft_only``;
for designated shared latents the fine-tuned fit, ~1 when both models use the vector), and
``layout_check`` says whether the partition holds by the same thresholds: ``ok``, or the reason
(``complete_shrinkage``, ``latent_decoupling``, ``scaling_undefined``, ``too_rare``, ``dead``); empty for
free latents and when no data was scanned. :func:`layout_summary` aggregates them per partition.
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
#: ``kind`` column values (:meth:`crosscoder.model.layout.LatentLayout.kinds`), and the class each
#: constrained kind has by construction.
KINDS = ("free", "designated_shared", "base_only", "ft_only")
KIND_CLASS = {"designated_shared": "shared", "base_only": "base_only", "ft_only": "ft_only"}
LAYOUT_CHECKS = ("ok",) + FLAGS


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
            raise CrossCoderError(
                f"shared_band: must be in [0, 0.5 - exclusive_band), got {self.shared_band}"
            )


def thresholds_for(arch: str, **overrides: Any) -> Thresholds:
    """The default thresholds of ``arch`` (its ``exclusive_band``, e.g. 0.25 for BatchTopK, whose exclusive
    latents keep a small residual norm in the other model) with ``overrides`` (None values ignored)."""
    cls = ARCHITECTURES.get(arch)
    base = Thresholds(exclusive_band=cls.exclusive_band) if cls is not None else Thresholds()
    t = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    t.validate()
    return t


def activity_columns(stats: dict[str, Any] | None, d_latent: int) -> dict[str, np.ndarray]:
    """``freq``, ``mean_act``, ``mean_act_all``, ``max_act``, ``n_active``, ``dead`` (each ``[d_latent]``)
    from :meth:`~crosscoder.analysis.scan.ActivationStats.result` (NaN / -1 / False without a scan)."""
    st = stats or {}
    nan = np.full(d_latent, np.nan)
    cols = {
        k: np.asarray(st.get(k, nan), np.float64) for k in ("freq", "mean_act", "mean_act_all", "max_act")
    }
    cols["n_active"] = np.asarray(st.get("n_active", np.full(d_latent, -1)), np.int64)
    cols["dead"] = np.asarray(st.get("dead", np.zeros(d_latent, bool)), bool)
    return cols


@torch.no_grad()
def decoder_metrics(model: CrossCoder) -> dict[str, np.ndarray]:
    """Per-latent decoder metrics in the normalised space, each ``[d_latent]`` float64:
    ``dec_norm_base``, ``dec_norm_ft``, ``relative_norm``, ``delta_norm``, ``cos_sim``."""
    if model.cfg.n_models != 2:
        raise CrossCoderError(
            f"diffing metrics need a two-model crosscoder (this one has {model.cfg.n_models})"
        )
    norms = model.dec_norms().detach().double().cpu()  # [h, 2]
    n_b, n_f = norms[:, 0], norms[:, 1]
    tot = n_b + n_f
    r = torch.where(tot > 0, n_f / tot.clamp_min(1e-30), torch.full_like(tot, 0.5))
    mx = torch.maximum(n_b, n_f)
    delta = torch.where(mx > 0, ((n_f - n_b) / mx.clamp_min(1e-30) + 1) / 2, torch.full_like(mx, 0.5))
    w = model.W_dec.detach().double().cpu()
    cos = torch.nn.functional.cosine_similarity(w[:, 0], w[:, 1], dim=-1, eps=1e-30)
    return {
        "dec_norm_base": n_b.numpy(),
        "dec_norm_ft": n_f.numpy(),
        "relative_norm": r.numpy(),
        "delta_norm": delta.numpy(),
        "cos_sim": cos.numpy(),
    }


def norm_classes(relative_norm: np.ndarray, t: Thresholds) -> np.ndarray:
    """``[d_latent]`` class by relative norm alone (object array of class names)."""
    r = np.asarray(relative_norm, np.float64)
    out = np.full(r.shape, "other", dtype=object)
    out[np.abs(r - 0.5) <= t.shared_band] = "shared"
    out[r < t.exclusive_band] = "base_only"
    out[r > 1 - t.exclusive_band] = "ft_only"
    return out


def classify(
    relative_norm: np.ndarray,
    t: Thresholds,
    n_active: np.ndarray | None = None,
    nu_ft: tuple[np.ndarray, np.ndarray] | None = None,
    nu_base: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final classes. ``nu_ft = (nu_error, nu_reconstruction)`` fitted along the fine-tuned decoder,
    ``nu_base`` the mirror along the base decoder (each ``[d_latent]``).

    Returns ``(class, norm_class, flag)``, each an object array ``[d_latent]``.
    """
    by_norm = norm_classes(relative_norm, t)
    flag = exclusive_flags(by_norm, t, n_active, nu_ft, nu_base)
    cls = by_norm.copy()
    cls[flag != ""] = "other"
    return cls, by_norm, flag


def exclusive_flags(
    candidates: np.ndarray,
    t: Thresholds,
    n_active: np.ndarray | None = None,
    nu_ft: tuple[np.ndarray, np.ndarray] | None = None,
    nu_base: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Why each ``base_only`` / ``ft_only`` entry of ``candidates`` does not hold (``""`` when it does; other
    entries get ``""`` or ``dead``): ``dead`` (never fired), ``too_rare`` (fewer than ``min_active``
    scanned tokens), then with Latent Scaling ``scaling_undefined``, ``complete_shrinkage`` (``|nu_error|``
    too high), ``latent_decoupling`` (``|nu_reconstruction|`` too high); ``nu_ft`` is used for ``ft_only``
    candidates, ``nu_base`` (the mirror fit) for ``base_only`` ones. :func:`classify` demotes flagged
    latents; ``crosscoder analyze`` also checks the dedicated partitions with it."""
    cand_cls = np.asarray(candidates, dtype=object)
    flag = np.full(cand_cls.shape, "", dtype=object)
    excl = np.isin(cand_cls, ("base_only", "ft_only"))
    if n_active is not None:
        n_active = np.asarray(n_active)
        dead = n_active == 0
        rare = (n_active < t.min_active) & ~dead & excl
        flag[rare] = "too_rare"
        flag[dead] = "dead"
    if t.latent_scaling:
        for name, nus in (("ft_only", nu_ft), ("base_only", nu_base)):
            if nus is None:
                continue
            nu_e, nu_r = (np.asarray(v, np.float64) for v in nus)
            cand = (cand_cls == name) & (flag == "")
            # NaN: the own model's beta is not positive (the latent does not explain its own model).
            undefined = cand & (np.isnan(nu_e) | np.isnan(nu_r))
            # |nu|: a base share of either sign (an anti-aligned direction is still present) counts.
            shrink = cand & ~undefined & (np.abs(nu_e) > t.nu_error_max)
            decouple = cand & ~undefined & ~shrink & (np.abs(nu_r) > t.nu_reconstruction_max)
            for mask, name_ in (
                (undefined, "scaling_undefined"),
                (shrink, "complete_shrinkage"),
                (decouple, "latent_decoupling"),
            ):
                flag[mask] = name_
    return flag


def latent_columns(
    model: CrossCoder,
    thresholds: Thresholds | None = None,
    stats: dict[str, np.ndarray] | None = None,
    scaling_ft: LatentScalingResult | None = None,
    scaling_base: LatentScalingResult | None = None,
) -> dict[str, np.ndarray]:
    """The latent table as a dict of equal-length ``[d_latent]`` columns (no pandas needed).

    ``stats``: :meth:`crosscoder.analysis.scan.ActivationStats.result`; ``scaling_*``: Latent Scaling
    along the fine-tuned / base decoders. Missing parts leave their columns NaN. ``class_reason``: one line
    per latent saying why it has its class (:func:`crosscoder.analysis.cards.class_reasons`).
    """
    t = thresholds or thresholds_for(model.cfg.arch)
    cols: dict[str, np.ndarray] = {"latent": np.arange(model.cfg.d_latent, dtype=np.int64)}
    cols.update(decoder_metrics(model))
    h = model.cfg.d_latent
    nan = np.full(h, np.nan)
    cols.update(activity_columns(stats, h))
    nu_ft = nu_base = None
    if scaling_ft is not None:
        nu_ft = (scaling_ft.nu_error.numpy(), scaling_ft.nu_reconstruction.numpy())
        cols["beta_ratio_error"], cols["beta_ratio_reconstruction"] = (v.astype(np.float64) for v in nu_ft)
        for target in ("error", "reconstruction"):
            beta = getattr(scaling_ft, f"beta_{target}").numpy().astype(np.float64)
            cols[f"beta_{target}_base"], cols[f"beta_{target}_ft"] = beta[0], beta[1]
    else:
        for k in (
            "beta_ratio_error",
            "beta_ratio_reconstruction",
            "beta_error_base",
            "beta_error_ft",
            "beta_reconstruction_base",
            "beta_reconstruction_ft",
        ):
            cols[k] = nan.copy()
    if scaling_base is not None:
        nu_base = (scaling_base.nu_error.numpy(), scaling_base.nu_reconstruction.numpy())
        cols["beta_ratio_error_mirror"], cols["beta_ratio_reconstruction_mirror"] = (
            v.astype(np.float64) for v in nu_base
        )
    else:
        cols["beta_ratio_error_mirror"], cols["beta_ratio_reconstruction_mirror"] = nan.copy(), nan.copy()
    n_active = cols["n_active"] if stats else None
    cls, by_norm, flag = classify(cols["relative_norm"], t, n_active, nu_ft, nu_base)
    cols["class"], cols["norm_class"], cols["flag"] = cls, by_norm, flag
    layout = getattr(model, "layout", None)
    kinds = layout.kinds() if layout is not None else ["free"] * h
    add_layout_columns(cols, kinds, t, n_active, nu_ft, nu_base)
    from .cards import class_reasons

    cols["class_reason"] = class_reasons(cols, t)
    return cols


def add_layout_columns(
    cols: dict[str, np.ndarray],
    kinds: list[str],
    t: Thresholds,
    n_active: np.ndarray | None = None,
    nu_ft: tuple[np.ndarray, np.ndarray] | None = None,
    nu_base: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """The layout columns (module docstring): ``kind``, ``layout_nu_error``, ``layout_nu_reconstruction``,
    ``layout_check``; constrained latents get their class by construction and an empty ``flag``."""
    kind = np.asarray(kinds, dtype=object)
    h = len(kind)
    cols["kind"] = kind
    nu_e, nu_r = np.full(h, np.nan), np.full(h, np.nan)
    for name, nus in (("ft_only", nu_ft), ("designated_shared", nu_ft), ("base_only", nu_base)):
        if nus is not None:
            m = kind == name
            nu_e[m], nu_r[m] = np.asarray(nus[0], np.float64)[m], np.asarray(nus[1], np.float64)[m]
    cols["layout_nu_error"], cols["layout_nu_reconstruction"] = nu_e, nu_r
    check = np.full(h, "", dtype=object)
    if n_active is not None:  # data scanned: dedicated latents checked, designated shared ones for activity
        dedicated = np.isin(kind, ("base_only", "ft_only"))
        flags = exclusive_flags(kind, t, n_active, nu_ft, nu_base)
        check[dedicated] = np.where(flags[dedicated] == "", "ok", flags[dedicated])
        shared = kind == "designated_shared"
        check[shared] = np.where(np.asarray(n_active)[shared] == 0, "dead", "ok")
    cols["layout_check"] = check
    for k, c in KIND_CLASS.items():
        m = kind == k
        cols["class"][m] = c
        cols["flag"][m] = ""


def class_counts(cols: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Per class: latents called so by norm alone, latents that keep the call, and why the rest lost it.
    Over the ``free`` latents only when the table has a ``kind`` column (constrained latents are classed by
    construction: :func:`layout_summary`)."""
    if "kind" in cols:
        free = cols["kind"] == "free"
        cols = {k: cols[k][free] for k in ("norm_class", "class", "flag")}
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


def _median(v: np.ndarray) -> float:
    v = np.asarray(v, np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def layout_summary(
    cols: dict[str, np.ndarray], layout: Any, violations: dict[str, float] | None = None
) -> dict[str, Any]:
    """Per partition (``kind``) of a table from :func:`latent_columns`: size, live latents, and for the
    dedicated ones the partition check (``layout_check`` counts, median ``|nu|`` along their own model's
    decoder); for designated shared latents the largest ``|r - 0.5|`` and the smallest decoder cosine (0 and
    1 by construction) and the median ``nu`` (~1 when both models use them). ``layout``: the model's
    :class:`~crosscoder.model.layout.LatentLayout`; ``violations``: its
    :meth:`~crosscoder.model.layout.LatentLayout.violations` on the saved weights (all 0.0 expected)."""
    kind = cols["kind"]
    scanned = bool(np.any(cols["n_active"] >= 0))
    out: dict[str, Any] = {"constrained": bool(layout.constrained), **layout.describe()}
    parts: dict[str, Any] = {}
    for k in ("base_only", "ft_only", "designated_shared", "free"):
        m = kind == k
        row: dict[str, Any] = {"n": int(m.sum())}
        if scanned:
            row["live"] = int((m & ~cols["dead"]).sum())
        if k in ("base_only", "ft_only") and m.any():
            if scanned:
                for c in LAYOUT_CHECKS:
                    row[c] = int((m & (cols["layout_check"] == c)).sum())
            row["nu_error_median_abs"] = _median(np.abs(cols["layout_nu_error"][m]))
            row["nu_reconstruction_median_abs"] = _median(np.abs(cols["layout_nu_reconstruction"][m]))
        if k == "designated_shared" and m.any():
            row["max_abs_relative_norm_minus_half"] = float(np.max(np.abs(cols["relative_norm"][m] - 0.5)))
            row["min_cos_sim"] = float(np.min(cols["cos_sim"][m]))
            row["nu_error_median"] = _median(cols["layout_nu_error"][m])
            row["nu_reconstruction_median"] = _median(cols["layout_nu_reconstruction"][m])
        parts[k] = row
    out["partitions"] = parts
    if violations is not None:
        out["violations"] = violations
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

    table = pa.table(
        {k: (pa.array(v.astype(str)) if v.dtype == object else pa.array(v)) for k, v in cols.items()}
    )
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "latents.parquet") as tmp:
        pq.write_table(table, str(tmp))
    with atomic_path(out_dir / "latents.csv") as tmp:
        pacsv.write_csv(table, str(tmp))
