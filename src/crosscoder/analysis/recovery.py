"""How well a crosscoder recovered the planted features of a synthetic pair.

For planted feature ``i`` with per-model vector ``v_i = strength_i * dir_i`` (``[n_models, d_model]``,
expressed in the crosscoder's normalised space) and latent ``j`` with decoder ``W_dec[j]`` (normalised
space), the match is the cosine similarity of the two concatenated ``[n_models * d_model]`` vectors.
Reported per planted class:

* ``mean_max_cos``: mean over features of the best match (and ``mean_max_cos_frequent`` over features
  firing at least ``frequent`` of the time);
* for exclusive classes, ``classified``: the fraction whose best latent has relative decoder norm
  ``r = ||d_ft|| / (||d_base|| + ||d_ft||)`` below ``band`` (base_only) or above ``1 - band`` (ft_only).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.synthetic import CLASSES, GroundTruth
from ..model import CrossCoder


def relative_norm(model: CrossCoder) -> torch.Tensor:
    """``[d_latent]`` relative decoder norm of the last model against the first (normalised space)."""
    n = model.dec_norms()
    return n[:, -1] / (n[:, 0] + n[:, -1]).clamp_min(1e-12)


@torch.no_grad()
def recovery(model: CrossCoder, gt: GroundTruth, frequent: float = 0.01, band: float = 0.1) -> dict[str, Any]:
    scale = model.norm_scale.cpu()
    planted = gt.vectors() * scale[None, :, None]  # normalised space
    planted = planted.reshape(planted.shape[0], -1)
    dec = (model.W_dec.detach().cpu() * scale[None, :, None]).reshape(model.cfg.d_latent, -1)
    cos = torch.nn.functional.normalize(planted, dim=-1) @ torch.nn.functional.normalize(dec, dim=-1).T
    best_cos, best = cos.max(dim=1)
    r = relative_norm(model.cpu())[best]
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
        if c == "base_only":
            row["classified"] = float((r[idx_t] < band).float().mean())
        elif c == "ft_only":
            row["classified"] = float((r[idx_t] > 1 - band).float().mean())
        out[c] = row
    excl = [i for i, k in enumerate(gt.classes) if k in ("base_only", "ft_only")]
    if excl:
        ok = [(r[i] < band) if gt.classes[i] == "base_only" else (r[i] > 1 - band) for i in excl]
        out["exclusive_classified"] = float(torch.stack(ok).float().mean())
    freq_all = gt.freq >= frequent
    out["mean_max_cos_frequent"] = float(best_cos[freq_all].mean()) if freq_all.any() else float("nan")
    return out


def format_recovery(rec: dict[str, Any]) -> str:
    lines = ["planted-feature recovery (cosine of best latent; exclusive classified by relative norm):"]
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
