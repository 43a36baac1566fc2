"""Compare the latents of a crosscoder with those of another one trained on the same data
(``crosscoder analyze RUN --compare-to OTHER``), typically a dedicated / designated-shared run against a
free crosscoder: does the free crosscoder find the dedicated partitions' directions, and does it call them
base-only, shared or fine-tuned-only by relative decoder norm?

**Similarity.** Latent ``i`` of RUN and latent ``j`` of OTHER are compared model by model: the cosine of
their decoder vectors of model ``m``, ``cos(W_dec[i, m], W'_dec[j, m])``, maximised over the models latent
``i`` may write to (its partition: the base model for ``base_only`` latents, the fine-tuned one for
``ft_only`` latents, both for designated shared and free latents)::

    sim(i, j) = max_{m allowed for i} cos(W_dec[i, m], W'_dec[j, m])

Why per model and not the cosine of the concatenated ``[n_models * d_model]`` decoders:

* a dedicated latent's other-model block is exactly zero, so against a free latent that carries the same
  direction in both models (a shared latent, ``[v, v]``) the concatenated cosine is at most ``1/sqrt(2) =
  0.71``: a concatenated match above 0.9 would exist only for latents the free crosscoder already calls
  exclusive, biasing the partition x class table towards agreement by construction;
* a per-model cosine is scale-free, so it does not depend on the per-model ``norm_scale`` of either run
  (the concatenated cosine is dominated by the model with the larger decoder norm).

Each RUN latent's best match is its ``argmax_j sim(i, j)``; it *matches* when ``sim >= threshold``
(default 0.9). The OTHER latent's class is its **relative-norm class** (``norm_class``:
``r = n_ft / (n_base + n_ft)`` in OTHER's normalised space, thresholds of OTHER's architecture,
:func:`~crosscoder.analysis.table.norm_classes`): decoder-only, no data needed. The reverse direction
(per OTHER class, how many of its latents have a match in RUN, and in which partition) uses the same
``sim``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CrossCoderError
from ..model import CrossCoder
from .table import CLASS_NAMES, KINDS, Thresholds, decoder_metrics, norm_classes

PARTITIONS = ("base_only", "ft_only", "designated_shared", "free")
SIMILARITY_NOTE = (
    "per-model decoder cosine, maximised over the models the RUN latent may write to "
    "(base_only: base, ft_only: fine-tuned, designated_shared/free: both); scale-free, so "
    "independent of either run's norm_scale"
)


def _unit_decoders(model: CrossCoder) -> torch.Tensor:
    """``[n_models, d_latent, d_model]`` float32 unit decoder vectors in the normalised space (zero rows
    stay zero)."""
    w = model.W_dec.detach().float().cpu() * model.norm_scale.detach().float().cpu()[None, :, None]
    return torch.nn.functional.normalize(w, dim=-1, eps=1e-30).permute(1, 0, 2).contiguous()


@torch.no_grad()
def match_latents(model: CrossCoder, other: CrossCoder, chunk: int = 2048) -> dict[str, np.ndarray]:
    """Best match in ``other`` of each latent of ``model`` (module docstring), and the reverse.

    Returns ``match_latent [H]`` (int64), ``match_cos [H]`` (float64) for ``model``'s latents and
    ``reverse_latent [H']``, ``reverse_cos [H']`` for ``other``'s."""
    if (model.cfg.n_models, model.cfg.d_model) != (other.cfg.n_models, other.cfg.d_model):
        raise CrossCoderError(
            f"--compare-to: the runs differ in shape (n_models, d_model) "
            f"{(model.cfg.n_models, model.cfg.d_model)} vs {(other.cfg.n_models, other.cfg.d_model)}"
        )
    a, b = _unit_decoders(model), _unit_decoders(other)  # [M, H, D], [M, H', D]
    m, h, _ = a.shape
    mask = model.layout.model_mask()
    allowed = mask.bool() if mask is not None else torch.ones(h, m, dtype=torch.bool)  # [H, M]
    best_cos = torch.empty(h, dtype=torch.float64)
    best_idx = torch.empty(h, dtype=torch.int64)
    rev_cos = torch.full((b.shape[1],), -2.0, dtype=torch.float64)
    rev_idx = torch.zeros(b.shape[1], dtype=torch.int64)
    for lo in range(0, h, chunk):
        hi = min(lo + chunk, h)
        sim = torch.full((hi - lo, b.shape[1]), -2.0)
        for k in range(m):
            s = a[k, lo:hi] @ b[k].T  # [c, H']
            s = torch.where(allowed[lo:hi, k, None], s, torch.full_like(s, -2.0))
            sim = torch.maximum(sim, s)
        v, i = sim.max(1)
        best_cos[lo:hi], best_idx[lo:hi] = v.double(), i
        rv, ri = sim.max(0)
        better = rv.double() > rev_cos
        rev_cos = torch.where(better, rv.double(), rev_cos)
        rev_idx = torch.where(better, ri + lo, rev_idx)
    return {
        "match_latent": best_idx.numpy(),
        "match_cos": best_cos.numpy(),
        "reverse_latent": rev_idx.numpy(),
        "reverse_cos": rev_cos.numpy(),
    }


def _fingerprints(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return dict((cfg.get("data") or {}).get("fingerprints") or {})


def compare_runs(
    model: CrossCoder,
    other: CrossCoder,
    kinds: np.ndarray,
    t_other: Thresholds,
    threshold: float = 0.9,
    run_dir: str | Path | None = None,
    other_dir: str | Path | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The partition x class table of ``model`` (RUN, latent kinds ``kinds [H]``) against ``other``.

    Returns ``(summary, columns)``: ``summary`` for ``summary.json`` (key ``comparison``) and the report;
    ``columns`` to add to RUN's latent table: ``match_latent``, ``match_cos`` (best match in OTHER, always
    given), ``match_class`` (OTHER's relative-norm class of the match, ``unmatched`` below ``threshold``),
    ``match_kind`` (the match's kind in OTHER, ``free`` for a free crosscoder; ``unmatched`` likewise).
    """
    if not 0.0 < threshold <= 1.0:
        raise CrossCoderError(f"--compare-threshold: must be in (0, 1], got {threshold}")
    if other.cfg.n_models != 2:
        raise CrossCoderError("--compare-to: the other crosscoder must have two models")
    res = match_latents(model, other)
    other_cls = norm_classes(decoder_metrics(other)["relative_norm"], t_other)
    other_kind = np.asarray(other.layout.kinds(), dtype=object)
    kinds = np.asarray(kinds, dtype=object)
    matched = res["match_cos"] >= threshold
    m_cls = np.where(matched, other_cls[res["match_latent"]], "unmatched").astype(object)
    m_kind = np.where(matched, other_kind[res["match_latent"]], "unmatched").astype(object)
    table: dict[str, dict[str, Any]] = {}
    for p in PARTITIONS:
        sel = kinds == p
        if not sel.any():
            continue
        row: dict[str, Any] = {
            "n": int(sel.sum()),
            "matched": int((sel & matched).sum()),
            "unmatched": int((sel & ~matched).sum()),
        }
        for c in CLASS_NAMES:
            row[c] = int((sel & (m_cls == c)).sum())
        row["distinct_matches"] = int(len(np.unique(res["match_latent"][sel & matched])))
        row["median_best_cos"] = float(np.median(res["match_cos"][sel]))
        table[p] = row
    rev_matched = res["reverse_cos"] >= threshold
    rev_part = np.asarray(kinds)[res["reverse_latent"]]
    reverse: dict[str, dict[str, Any]] = {}
    for c in CLASS_NAMES:
        sel = other_cls == c
        row = {"n": int(sel.sum()), "matched": int((sel & rev_matched).sum())}
        for p in PARTITIONS:
            if (kinds == p).any():
                row[p] = int((sel & rev_matched & (rev_part == p)).sum())
        reverse[c] = row
    fp_a = _fingerprints(run_dir) if run_dir else {}
    fp_b = _fingerprints(other_dir) if other_dir else {}
    same_data = (fp_a == fp_b) if fp_a and fp_b else None
    summary = {
        "other_run": str(other_dir) if other_dir is not None else None,
        "other_arch": other.cfg.arch,
        "other_d_latent": other.cfg.d_latent,
        "other_constrained": bool(other.layout.constrained),
        "same_data": same_data,
        "similarity": SIMILARITY_NOTE,
        "threshold": threshold,
        "other_class_rule": (
            f"relative norm alone in OTHER's normalised space: r < {t_other.exclusive_band:g} "
            f"base_only, r > {1 - t_other.exclusive_band:g} ft_only, |r - 0.5| <= "
            f"{t_other.shared_band:g} shared, else other"
        ),
        "other_classes": {c: int((other_cls == c).sum()) for c in CLASS_NAMES},
        "table": table,
        "reverse": reverse,
    }
    cols = {
        "match_latent": res["match_latent"].astype(np.int64),
        "match_cos": res["match_cos"].astype(np.float64),
        "match_class": m_cls,
        "match_kind": m_kind,
    }
    return summary, cols


def format_comparison(s: dict[str, Any]) -> str:
    """Human-readable lines of :func:`compare_runs`'s summary."""
    lines = [
        f"comparison with {s['other_run']} ({s['other_arch']}, {s['other_d_latent']} latents): best match by "
        f"per-model decoder cosine >= {s['threshold']:g}; OTHER's class by relative norm"
    ]
    if s.get("same_data") is False:
        lines.append("  warning: the runs record different data fingerprints")
    head = f"  {'partition':<18}{'n':>6}{'matched':>9}" + "".join(f"{c:>11}" for c in CLASS_NAMES)
    lines.append(head)
    for p, r in s["table"].items():
        lines.append(f"  {p:<18}{r['n']:>6}{r['matched']:>9}" + "".join(f"{r[c]:>11}" for c in CLASS_NAMES))
    return "\n".join(lines)


__all__ = ["KINDS", "PARTITIONS", "compare_runs", "format_comparison", "match_latents"]
