"""How well a crosscoder recovered the planted features of a synthetic pair.

For planted feature ``i`` with per-model vector ``v_i = strength_i * dir_i`` (``[n_models, d_model]``,
expressed in the crosscoder's normalised space) and latent ``j`` with decoder ``W_dec[j]`` (normalised
space), the match is the cosine similarity of the two concatenated ``[n_models * d_model]`` vectors.
Reported per planted class:

* ``mean_max_cos``: mean over features of the best match (and ``mean_max_cos_frequent`` over features
  firing at least ``frequent`` of the time);
* for exclusive classes, ``classified``: the fraction whose best latent has relative decoder norm
  ``r = ||d_ft|| / (||d_base|| + ||d_ft||)`` below ``exclusive_band`` (base_only) or above
  ``1 - exclusive_band`` (ft_only): ``crosscoder analyze``'s decoder-norm rule with its default thresholds
  for the architecture (``analysis/table.py``; Latent Scaling, which needs data, is not applied here).

For any number of models, :func:`pattern_recovery` scores whether each planted feature's best latent has
the planted presence subset (``GroundTruth.patterns``) as its presence pattern
(:mod:`crosscoder.analysis.patterns`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..data.synthetic import CLASSES, GroundTruth
from ..errors import CrossCoderError
from ..model import CrossCoder
from .table import Thresholds, decoder_metrics, norm_classes, thresholds_for


def relative_norm(model: CrossCoder) -> torch.Tensor:
    """``[d_latent]`` relative decoder norm of the last model against the first (normalised space)."""
    n = model.dec_norms()
    return n[:, -1] / (n[:, 0] + n[:, -1]).clamp_min(1e-12)


@torch.no_grad()
def recovery(
    model: CrossCoder,
    gt: GroundTruth,
    frequent: float = 0.01,
    band: float | None = None,
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """Recovery of the planted features of ``gt`` (see the module docstring).

    ``classified`` uses ``crosscoder analyze``'s decoder-norm rule
    (:func:`~crosscoder.analysis.table.norm_classes`) with ``thresholds`` (default: analyze's defaults
    for the model's architecture, ``thresholds_for``); ``band`` overrides its ``exclusive_band``. The
    band used is returned as ``exclusive_band``.
    """
    t = thresholds or thresholds_for(model.cfg.arch)
    if band is not None:
        t = dataclasses.replace(t, exclusive_band=band)
        t.validate()
    scale = model.norm_scale.cpu()
    planted = gt.vectors() * scale[None, :, None]  # normalised space
    planted = planted.reshape(planted.shape[0], -1)
    dec = (model.W_dec.detach().cpu() * scale[None, :, None]).reshape(model.cfg.d_latent, -1)
    cos = torch.nn.functional.normalize(planted, dim=-1) @ torch.nn.functional.normalize(dec, dim=-1).T
    best_cos, best = cos.max(dim=1)
    # analyze's class by decoder norm of each feature's best latent
    called = norm_classes(decoder_metrics(model)["relative_norm"], t)[best.numpy()]
    out: dict[str, Any] = {}
    for c in CLASSES:
        idx = [i for i, k in enumerate(gt.classes) if k == c]
        if not idx:
            continue
        idx_t = torch.tensor(idx)
        freq_mask = gt.freq[idx_t] >= frequent
        row: dict[str, Any] = {"n": len(idx), "mean_max_cos": float(best_cos[idx_t].mean())}
        if freq_mask.any():
            row["mean_max_cos_frequent"] = float(best_cos[idx_t][freq_mask].mean())
        if c in ("base_only", "ft_only"):
            row["classified"] = float(np.mean(called[idx] == c))
        out[c] = row
    excl = [i for i, k in enumerate(gt.classes) if k in ("base_only", "ft_only")]
    if excl:
        out["exclusive_classified"] = float(np.mean([called[i] == gt.classes[i] for i in excl]))
    out["exclusive_band"] = float(t.exclusive_band)
    freq_all = gt.freq >= frequent
    out["mean_max_cos_frequent"] = float(best_cos[freq_all].mean()) if freq_all.any() else float("nan")
    return out


def format_recovery(rec: dict[str, Any]) -> str:
    band = rec.get("exclusive_band")
    rule = f"r < {band:g} / r > {1 - band:g}, as crosscoder analyze" if band is not None else "relative norm"
    lines = [
        f"planted-feature recovery (cosine of best latent; exclusive classified by decoder norm: {rule}):"
    ]
    for c in CLASSES:
        if c in rec:
            r = rec[c]
            s = f"  {c:<12} n={r['n']:<4} mean max cos {r['mean_max_cos']:.3f}"
            if "mean_max_cos_frequent" in r:
                s += f" (frequent {r['mean_max_cos_frequent']:.3f})"
            if "classified" in r:
                s += f"  classified {100 * r['classified']:.1f}%"
            lines.append(s)
    if "exclusive_classified" in rec:
        lines.append(f"  exclusive features in the right class: {100 * rec['exclusive_classified']:.1f}%")
    return "\n".join(lines)


@torch.no_grad()
def planted_cosines(model: CrossCoder, gt: GroundTruth) -> torch.Tensor:
    """``[d_latent, n_features]`` cosine of each latent's concatenated decoder ``[n_models * d_model]`` with
    each planted vector (both in the crosscoder's normalised space), for any number of models.

    The planted vector is zero in the models that lack the feature, so the cosine is the match over the
    models where it is present, lowered by whatever decoder norm the latent puts in the other models."""
    m = model.cfg.n_models
    if gt.n_models != m or gt.dirs.shape[-1] != model.cfg.d_model:
        raise CrossCoderError(
            f"ground truth has {gt.n_models} models of width {gt.dirs.shape[-1]}, the crosscoder "
            f"{m} of width {model.cfg.d_model}"
        )
    scale = model.norm_scale.detach().cpu().float()
    planted = (gt.vectors() * scale[None, :, None]).reshape(len(gt.classes), -1)
    dec = (model.W_dec.detach().cpu().float() * scale[None, :, None]).reshape(model.cfg.d_latent, -1)
    return torch.nn.functional.normalize(dec, dim=-1) @ torch.nn.functional.normalize(planted, dim=-1).T


def latent_patterns(model: CrossCoder, band: float | None = None) -> np.ndarray:
    """``[d_latent]`` presence pattern of each latent (``"0+2"``) from its decoder norms in the normalised
    space, as the analysis' ``pattern`` column: present in model ``i`` when its norm is at least
    ``presence_ratio_for_band(band)`` times the largest (``band``: the architecture's ``exclusive_band``)."""
    from ..model import ARCHITECTURES
    from .patterns import model_norms, pattern_strings, presence, presence_ratio_for_band

    if band is None:
        band = ARCHITECTURES[model.cfg.arch].exclusive_band
    with torch.no_grad():
        norms = model.dec_norms().detach().cpu().double().numpy()
    present = presence(model_norms(norms, model.cfg.block_models), presence_ratio_for_band(band))
    return pattern_strings(present)


def pattern_recovery(
    model: CrossCoder,
    gt: GroundTruth,
    patterns: Any = None,
    min_cos: float = 0.7,
    band: float | None = None,
) -> dict[str, Any]:
    """Whether the crosscoder found each planted feature in the right subset of models.

    For planted feature ``i`` its best latent is the one of highest :func:`planted_cosines`; the feature is
    **found** when that cosine is at least ``min_cos`` and **recovered** when it is found and the latent's
    presence pattern equals the planted subset ``gt.patterns[i]``. Latent patterns are ``patterns``
    (``[d_latent]`` strings, e.g. the analysis table's ``pattern`` column, in latent order) when given,
    else :func:`latent_patterns` (``band`` overrides the architecture's ``exclusive_band``). Returns:

    * ``pattern_recovery``: fraction of planted features recovered; ``pattern_match``: fraction whose best
      latent has the planted pattern whatever its cosine; ``found``: fraction found; ``mmcs``: mean over
      features of the best cosine;
    * ``per_pattern``: for each planted pattern, ``n``, ``recovered``, ``found``, ``mmcs`` and ``called``
      (how many of its found features' best latents have each pattern);
    * ``per_class``: ``n``, ``recovered``, ``mmcs`` per planted class; ``min_cos``, ``presence_ratio``.
    """
    from .patterns import presence_ratio_for_band

    cos = planted_cosines(model, gt)
    best_cos, best = (t.numpy() for t in cos.max(0))  # per feature
    if patterns is None:
        lat = latent_patterns(model, band)
    else:
        lat = np.asarray(["" if p is None else str(p) for p in patterns], dtype=object)
        if len(lat) != model.cfg.d_latent:
            raise CrossCoderError(f"patterns: {len(lat)} given for {model.cfg.d_latent} latents")
    planted = np.asarray(gt.patterns, dtype=object)
    called = lat[best]
    found = best_cos >= min_cos
    right = called == planted
    ok = found & right
    if band is None:
        from ..model import ARCHITECTURES

        band = ARCHITECTURES[model.cfg.arch].exclusive_band
    out: dict[str, Any] = {
        "pattern_recovery": float(ok.mean()),
        "pattern_match": float(right.mean()),
        "found": float(found.mean()),
        "mmcs": float(best_cos.mean()),
        "min_cos": min_cos,
        "presence_ratio": None if patterns is not None else presence_ratio_for_band(band),
        "n_features": len(planted),
    }
    per: dict[str, Any] = {}
    for p in sorted(set(planted), key=lambda s: (s.count("+"), s)):
        idx = planted == p
        calls: dict[str, int] = {}
        for c in called[idx & found]:
            calls[c] = calls.get(c, 0) + 1
        per[p] = {
            "n": int(idx.sum()),
            "recovered": float(ok[idx].mean()),
            "found": float(found[idx].mean()),
            "mmcs": float(best_cos[idx].mean()),
            "called": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        }
    out["per_pattern"] = per
    classes = np.asarray(gt.classes, dtype=object)
    out["per_class"] = {
        c: {
            "n": int((classes == c).sum()),
            "recovered": float(ok[classes == c].mean()),
            "mmcs": float(best_cos[classes == c].mean()),
        }
        for c in dict.fromkeys(gt.classes)
    }
    return out


def format_pattern_recovery(res: dict[str, Any]) -> str:
    """Human-readable lines of :func:`pattern_recovery`."""
    lines = [
        f"presence patterns of the planted features: {100 * res['pattern_recovery']:.1f}% recovered "
        f"(best latent at cosine >= {res['min_cos']} with the planted pattern), {100 * res['found']:.1f}% "
        f"found, MMCS {res['mmcs']:.3f}"
    ]
    for p, r in res["per_pattern"].items():
        wrong = {c: k for c, k in r["called"].items() if c != p}
        s = f"  {p:<16} n={r['n']:<4} recovered {100 * r['recovered']:5.1f}%  mmcs {r['mmcs']:.3f}"
        if wrong:
            s += "  called " + ", ".join(f"{c or '-'} x{k}" for c, k in wrong.items())
        lines.append(s)
    return "\n".join(lines)


def classification_scores(
    classes: Any, model: CrossCoder, gt: GroundTruth, min_cos: float = 0.7, norm_classes: Any = None
) -> dict[str, Any]:
    """Compare the analysis' latent classes ``[d_latent]`` (``base_only``/``shared``/``ft_only``/``other``)
    with the planted ground truth.

    * recall: per exclusive planted class, the fraction of planted features whose best latent (highest
      cosine) is called that class;
    * precision: of the latents called ``base_only`` / ``ft_only``, the fraction whose best planted
      feature is of that class with cosine >= ``min_cos``;
    * ``shared_weak_not_ft_only``: fraction of weakened-shared features whose best latent is not called
      ``ft_only``, and ``shared_weak_latents``: latents best matching a weakened-shared feature, called
      ``ft_only`` by norm / finally (Latent Scaling should demote them).

    With ``norm_classes`` (classes by relative norm alone) the same numbers are given for those too.
    """
    import numpy as np

    cos = planted_cosines(model, gt)
    best_feat_cos, best_feat = cos.max(1)  # per latent
    best_latent = cos.argmax(0).numpy()  # per feature
    planted = np.array(gt.classes, dtype=object)
    lat_cls = planted[best_feat.numpy()]
    good = best_feat_cos.numpy() >= min_cos

    def scores(cls: Any) -> dict[str, Any]:
        cls = np.asarray(cls, dtype=object)
        out: dict[str, Any] = {}
        for c in ("base_only", "ft_only"):
            feats = np.where(planted == c)[0]
            called = np.where(cls == c)[0]
            ok = (lat_cls[called] == c) & good[called]
            out[c] = {
                "planted": len(feats),
                "recall": float(np.mean(cls[best_latent[feats]] == c)) if len(feats) else float("nan"),
                "called": len(called),
                "matching": int(ok.sum()),
                "precision": float(ok.mean()) if len(called) else float("nan"),
            }
        excl = np.where(np.isin(planted, ("base_only", "ft_only")))[0]
        called = np.where(np.isin(cls, ("base_only", "ft_only")))[0]
        out["exclusive_recall"] = (
            float(np.mean(cls[best_latent[excl]] == planted[excl])) if len(excl) else float("nan")
        )
        ok = (lat_cls[called] == cls[called]) & good[called]
        out["exclusive_precision"] = float(ok.mean()) if len(called) else float("nan")
        weak = np.where(planted == "shared_weak")[0]
        if len(weak):
            out["shared_weak_not_ft_only"] = float(np.mean(cls[best_latent[weak]] != "ft_only"))
            out["shared_weak_latents_ft_only"] = int(
                ((lat_cls == "shared_weak") & good & (cls == "ft_only")).sum()
            )
        return out

    res = {"min_cos": min_cos, "final": scores(classes)}
    if norm_classes is not None:
        res["norm_only"] = scores(norm_classes)
        weak_lat = (lat_cls == "shared_weak") & good
        res["shared_weak_latents"] = {
            "ft_only_by_norm": int((weak_lat & (np.asarray(norm_classes) == "ft_only")).sum()),
            "ft_only_final": int((weak_lat & (np.asarray(classes) == "ft_only")).sum()),
        }
    return res


def format_scores(res: dict[str, Any]) -> str:
    """Human-readable lines of :func:`classification_scores`."""
    lines = [f"classes against the planted ground truth (match: cosine >= {res['min_cos']}):"]
    for key, label in (("norm_only", "norm alone"), ("final", "with Latent Scaling")):
        if key not in res:
            continue
        s = res[key]
        lines.append(
            f"  {label}: exclusive recall {100 * s['exclusive_recall']:.1f}%, "
            f"precision {100 * s['exclusive_precision']:.1f}%"
        )
        for c in ("base_only", "ft_only"):
            r = s[c]
            lines.append(
                f"    {c:<9} recall {100 * r['recall']:.1f}% of {r['planted']} planted; "
                f"{r['called']} called, {r['matching']} matching ({100 * r['precision']:.1f}%)"
            )
        if "shared_weak_not_ft_only" in s:
            lines.append(
                f"    weakened-shared features not called ft_only: {100 * s['shared_weak_not_ft_only']:.1f}%"
            )
    return "\n".join(lines)


def family_scores(
    cos: torch.Tensor,
    planted_classes: Any,
    latent_classes: Any,
    match_cos: float = 0.9,
    assign_cos: float = 0.5,
) -> dict[str, Any]:
    """Scores of one run of the synthetic-family benchmark (``benchmarks/recovery.py``).

    ``cos`` ``[d_latent, n_features]`` (e.g. :func:`planted_cosines`), ``planted_classes`` ``[n_features]``
    (``shared``/``base_only``/``ft_only``/``shared_weak``), ``latent_classes`` ``[d_latent]`` (the analysis'
    ``class`` column: ``base_only``/``shared``/``ft_only``/``other``). Returns:

    * ``mmcs``: mean over planted features of the max cosine to any latent (and ``mmcs_<class>``);
    * ``recall_<c>`` for ``c`` in base_only, ft_only: fraction of planted ``c`` features having a latent
      at cosine > ``match_cos`` that the analysis called ``c``;
    * ``precision_<c>``: of the latents called ``c`` (``called_<c>`` of them), the fraction whose best
      planted feature (highest cosine) is of class ``c`` with cosine > ``assign_cos`` (NaN if none called).
    """
    import numpy as np

    cos = cos.detach().cpu().double()
    planted = np.asarray(list(planted_classes), dtype=object)
    called = np.asarray(list(latent_classes), dtype=object)
    best_lat = cos.max(0).values.numpy()  # per feature
    feat_cos, feat = (t.numpy() for t in cos.max(1))  # per latent
    out: dict[str, Any] = {"mmcs": float(best_lat.mean())}
    for c in CLASSES:
        if (planted == c).any():
            out[f"mmcs_{c}"] = float(best_lat[planted == c].mean())
    hits = cos.numpy() > match_cos  # [d_latent, n_features]
    for c in ("base_only", "ft_only"):
        feats = planted == c
        lat = called == c
        found = hits[lat][:, feats].any(0) if lat.any() else np.zeros(int(feats.sum()), bool)
        out[f"recall_{c}"] = float(found.mean()) if feats.any() else float("nan")
        good = (planted[feat[lat]] == c) & (feat_cos[lat] > assign_cos)
        out[f"called_{c}"] = int(lat.sum())
        out[f"precision_{c}"] = float(good.mean()) if lat.any() else float("nan")
    return out
