"""The latent table of a crosscoder over n models (and/or several sites): norms, patterns, classes.

Used for every crosscoder except the classic pair (two models, one site, one width), whose table
(:mod:`crosscoder.analysis.table`) only gains ``dec_norm_0``, ``dec_norm_1`` and ``pattern``
(:func:`two_model_extras`). All norms are in the normalised training space. With ``n`` models
(:class:`~crosscoder.analysis.blocks.BlockLayout`) and ``n_ij`` the decoder norm of latent ``j`` in model
``i`` (over its sites: ``sqrt`` of the summed squared block norms):

* ``dec_norm_<i>`` = ``n_ij``; with several sites also ``dec_norm_<i>_<s>`` (block norm of model ``i`` at
  site ``s``) and ``dec_norm_site_<s>`` (``sqrt`` of the summed squares over the models at site ``s``);
* ``relative_norm_<i>`` = ``n_i / (n_0 + n_i)`` and ``cos_sim_<i>`` = cosine of model ``i``'s and model
  0's decoders (each concatenated over the sites), for ``i >= 1``; NaN when model ``i``'s blocks have
  other widths than model 0's (other spaces);
* ``pattern`` (:mod:`crosscoder.analysis.patterns`: the models with ``n_i >= ratio * max n``,
  ``ratio = band / (1 - band)``), ``n_present``;
* ``ls_model`` (the reference model of Latent Scaling: largest norm), ``nu_error_<i>``,
  ``nu_reconstruction_<i>`` (:mod:`crosscoder.analysis.multi_scaling`);
* activation statistics as in the two-model table (``freq``, ``mean_act``, ``mean_act_all``,
  ``max_act``, ``n_active``, ``dead``);
* ``class_reason``: one line per latent saying why it has its class
  (:func:`crosscoder.analysis.cards.multi_class_reasons`).

**Classes.** ``norm_class`` by pattern alone: ``shared`` (present in every model), ``exclusive`` (one
model), ``partial`` (a proper subset of two or more), ``other`` (no decoder at all). ``class`` keeps that
call unless a ``flag`` says why not (``class`` is then ``other``): ``dead`` (never fired on the scanned
tokens), ``no_decoder``, and for latents claimed absent from some model (``exclusive``, ``partial``):
``too_rare`` (fired on fewer than ``min_active`` tokens), ``scaling_undefined`` (the reference model's
own beta is not positive), ``complete_shrinkage`` (some absent model has ``|nu_error_i| > nu_error_max``:
its activations carry the direction, left in its error) or ``latent_decoupling`` (some absent model has
``|nu_reconstruction_i| > nu_reconstruction_max``: other latents reconstruct it there). Absent models in
another space (NaN ``nu``) are not checked. With two models and one site these are exactly the two-model
rules for ``base_only``/``ft_only``, with the exclusive band's presence ratio in place of the relative-norm
band.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..model import CrossCoder
from .blocks import BlockLayout
from .patterns import model_norms, pattern_strings, presence, presence_ratio_for_band
from .table import Thresholds, activity_columns

MULTI_CLASSES = ("shared", "exclusive", "partial", "other")
MULTI_FLAGS = (
    "complete_shrinkage",
    "latent_decoupling",
    "scaling_undefined",
    "too_rare",
    "dead",
    "no_decoder",
)


def is_classic_pair(layout: BlockLayout) -> bool:
    """Two models, one site, one width: the two-model table and report."""
    return layout.n_blocks == 2 and layout.n_models == 2 and len(set(layout.widths)) == 1


@torch.no_grad()
def block_norms(model: CrossCoder) -> np.ndarray:
    """``[d_latent, n_blocks]`` float64 decoder norms in the normalised space."""
    return model.dec_norms().detach().double().cpu().numpy()


def two_model_extras(cols: dict[str, np.ndarray], t: Thresholds) -> None:
    """Add ``dec_norm_0``, ``dec_norm_1`` and ``pattern`` to a two-model table (in place)."""
    cols["dec_norm_0"] = np.asarray(cols["dec_norm_base"], np.float64).copy()
    cols["dec_norm_1"] = np.asarray(cols["dec_norm_ft"], np.float64).copy()
    norms = np.stack([cols["dec_norm_0"], cols["dec_norm_1"]], 1)
    cols["pattern"] = pattern_strings(presence(norms, presence_ratio_for_band(t.exclusive_band)))


@torch.no_grad()
def decoder_columns(model: CrossCoder, layout: BlockLayout, t: Thresholds) -> dict[str, np.ndarray]:
    """The decoder-only columns (module docstring) and ``present`` (``[d_latent, n_models]`` bool, not a
    table column: :func:`multi_columns` removes it)."""
    bn = block_norms(model)
    mn = model_norms(bn, layout.block_models)
    h, m = mn.shape
    cols: dict[str, np.ndarray] = {"latent": np.arange(h, dtype=np.int64)}
    for i in range(m):
        cols[f"dec_norm_{i}"] = mn[:, i]
    if layout.n_sites > 1:
        for i in range(m):
            for s in range(layout.n_sites):
                b = layout.block(i, s)
                cols[f"dec_norm_{i}_{s}"] = bn[:, b] if b is not None else np.zeros(h)
        for s in range(layout.n_sites):
            at = [b for b in range(layout.n_blocks) if layout.block_sites[b] == s]
            cols[f"dec_norm_site_{s}"] = np.sqrt((bn[:, at] ** 2).sum(1))
    w = (model.W_dec.detach().double() * model.norm_scale.double()[None, :, None]).cpu()  # [h, B, d]
    ref_blocks = [layout.block(0, s) for s in range(layout.n_sites)]
    for i in range(1, m):
        tot = mn[:, 0] + mn[:, i]
        with np.errstate(invalid="ignore", divide="ignore"):
            cols[f"relative_norm_{i}"] = np.where(tot > 0, mn[:, i] / np.maximum(tot, 1e-30), 0.5)
        if not layout.same_space(0, i):
            cols[f"cos_sim_{i}"] = np.full(h, np.nan)
            continue
        pairs = [(a, layout.block(i, s)) for s, a in enumerate(ref_blocks) if a is not None]
        a = torch.cat([w[:, p] for p, _ in pairs], -1)
        c = torch.cat([w[:, q] for _, q in pairs], -1)
        cols[f"cos_sim_{i}"] = torch.nn.functional.cosine_similarity(a, c, dim=-1, eps=1e-30).numpy()
    present = presence(mn, presence_ratio_for_band(t.exclusive_band))
    cols["pattern"] = pattern_strings(present)
    cols["n_present"] = present.sum(1).astype(np.int64)
    cols["present"] = present
    return cols


def multi_columns(
    model: CrossCoder,
    layout: BlockLayout,
    t: Thresholds,
    stats: dict[str, np.ndarray] | None = None,
    scaling: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(columns, present)``: the n-model latent table (``[d_latent]`` columns) and ``present [d_latent,
    n_models]``. ``stats``: :meth:`~crosscoder.analysis.scan.ActivationStats.result`; ``scaling``:
    :meth:`~crosscoder.analysis.multi_scaling.MultiScalingAccumulator.result`."""
    cols = decoder_columns(model, layout, t)
    present = cols.pop("present")
    h, m = present.shape
    cols.update(activity_columns(stats, h))
    nu_e = nu_r = None
    if scaling is not None:
        cols["ls_model"] = np.asarray(scaling["ref"], np.int64)
        nu_e, nu_r = scaling["nu_error"], scaling["nu_reconstruction"]
        for i in range(m):
            cols[f"nu_error_{i}"] = np.asarray(nu_e[i], np.float64)
        for i in range(m):
            cols[f"nu_reconstruction_{i}"] = np.asarray(nu_r[i], np.float64)
    cls, by_norm, flag = multi_classify(
        present, t, cols["n_active"] if stats else None, cols.get("ls_model"), nu_e, nu_r
    )
    cols["class"], cols["norm_class"], cols["flag"] = cls, by_norm, flag
    layout_kinds = getattr(getattr(model, "layout", None), "kinds", None)
    kinds = np.asarray(layout_kinds() if layout_kinds else ["free"] * h, dtype=object)
    cols["kind"] = kinds
    tied = kinds == "designated_shared"  # decoder tied across the models: shared by construction
    cols["class"][tied], cols["flag"][tied] = "shared", ""
    from .cards import multi_class_reasons

    cols["class_reason"] = multi_class_reasons(cols, present, t)
    return cols, present


def norm_classes(present: np.ndarray) -> np.ndarray:
    """``present [d_latent, n_models]`` -> ``[d_latent]`` object array: shared / exclusive / partial /
    other."""
    k = np.asarray(present, bool).sum(1)
    m = present.shape[1]
    out = np.full(k.shape, "partial", dtype=object)
    out[k == m] = "shared"
    out[k == 1] = "exclusive"
    out[k == 0] = "other"
    return out


def multi_classify(
    present: np.ndarray,
    t: Thresholds,
    n_active: np.ndarray | None = None,
    ref: np.ndarray | None = None,
    nu_error: np.ndarray | None = None,
    nu_reconstruction: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(class, norm_class, flag)`` (module docstring). ``present [d_latent, n_models]``, ``n_active
    [d_latent]``, ``ref [d_latent]``, ``nu_* [n_models, d_latent]``."""
    present = np.asarray(present, bool)
    h, m = present.shape
    by_norm = norm_classes(present)
    flag = np.full(h, "", dtype=object)
    claims = np.isin(by_norm, ("exclusive", "partial"))
    flag[by_norm == "other"] = "no_decoder"
    if n_active is not None:
        n_active = np.asarray(n_active)
        flag[(n_active < t.min_active) & (n_active > 0) & claims] = "too_rare"
        flag[n_active == 0] = "dead"
    if t.latent_scaling and nu_error is not None and nu_reconstruction is not None and ref is not None:
        cols = np.arange(h)
        nu_e, nu_r = np.asarray(nu_error, np.float64), np.asarray(nu_reconstruction, np.float64)
        cand = claims & (flag == "")
        undefined = cand & np.isnan(nu_e[ref, cols])
        absent = ~present.T  # [m, h]
        with np.errstate(invalid="ignore"):
            shrink = cand & ~undefined & np.any(absent & (np.abs(nu_e) > t.nu_error_max), axis=0)
            decouple = (
                cand
                & ~undefined
                & ~shrink
                & np.any(absent & (np.abs(nu_r) > t.nu_reconstruction_max), axis=0)
            )
        flag[undefined] = "scaling_undefined"
        flag[shrink] = "complete_shrinkage"
        flag[decouple] = "latent_decoupling"
    cls = by_norm.copy()
    cls[flag != ""] = "other"
    return cls, by_norm, flag


def multi_class_counts(cols: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Per class: latents so called by pattern alone (``norm``), after the checks (``final``), and for
    ``exclusive``/``partial`` how many lost the call and why (over ``free`` latents)."""
    free = cols["kind"] == "free" if "kind" in cols else np.ones(len(cols["latent"]), bool)
    nc, c, fl = cols["norm_class"][free], cols["class"][free], cols["flag"][free]
    out: dict[str, dict[str, int]] = {}
    for name in MULTI_CLASSES:
        by_norm = nc == name
        row = {"norm": int(by_norm.sum()), "final": int((c == name).sum())}
        if name in ("exclusive", "partial"):
            for f in MULTI_FLAGS:
                row[f] = int((by_norm & (fl == f)).sum())
        out[name] = row
    return out


def pattern_counts(cols: dict[str, np.ndarray], confirmed: bool = False) -> dict[str, int]:
    """``{pattern: latents}`` over live latents (``confirmed``: only those whose ``class`` is not
    ``other``), most frequent first; the empty pattern is written ``"none"``."""
    keep = ~np.asarray(cols["dead"], bool)
    if confirmed:
        keep &= cols["class"] != "other"
    pats, counts = np.unique(cols["pattern"][keep].astype(str), return_counts=True)
    order = sorted(range(len(pats)), key=lambda i: (-counts[i], len(pats[i].split("+")), pats[i]))
    return {(str(pats[i]) or "none"): int(counts[i]) for i in order}


def site_shares(cols: dict[str, np.ndarray], layout: BlockLayout) -> dict[str, Any]:
    """Share of the live latents' summed squared decoder norm per model, per site and per block (model x
    site), for ``summary.json`` and the report."""
    live = ~np.asarray(cols["dead"], bool)
    m, s = layout.n_models, layout.n_sites
    sq = np.zeros((m, s))
    for i in range(m):
        for j in range(s):
            key = f"dec_norm_{i}_{j}" if s > 1 else f"dec_norm_{i}"
            if key in cols:
                sq[i, j] = float((cols[key][live] ** 2).sum())
    tot = sq.sum() or 1.0
    return {
        "per_model": [float(v) for v in sq.sum(1) / tot],
        "per_site": [float(v) for v in sq.sum(0) / tot],
        "per_block": [[float(v) for v in row] for row in sq / tot],
    }
