"""What the report's latent cards show beyond the table: activation histograms and the reason for a class.

**Activation histogram.** :class:`ActivationHistogram` is a scan accumulator
(:func:`crosscoder.analysis.scan.scan`): per latent it counts its nonzero activations on the scanned rows
in ``n_bins`` (32) equal bins over ``[0, hi]``, ``hi`` the smallest power of two that is at least the
latent's largest activation. ``hi`` is only known at the end of the pass, so each latent's range starts at
its first chunk's maximum (rounded up to a power of two) and doubles when a later chunk exceeds it, adding
adjacent bins pairwise: bin ``b`` of range ``2^e`` is bins ``2b`` and ``2b + 1`` of range ``2^(e-1)``,
exactly, because every bin width is a power of two (an activation ``a`` lies in bin
``floor(a / width)``, the last bin also holding ``a = hi``). The result is the histogram of the
activations over the final range, whatever the chunking; it costs ``O(nonzero activations)`` per chunk and
``[d_latent, n_bins]`` counts.

**Class reasons.** :func:`class_reasons` (two models) and :func:`multi_class_reasons` (n models) give each
latent one line stating why it has its class: the decided ``class``, ``norm_class`` and ``flag`` columns
(from :func:`~crosscoder.analysis.table.classify` / :func:`~crosscoder.analysis.multi.multi_classify`)
choose the sentence, which always starts with ``class:``, and the numbers are the table's own, compared with
the thresholds the decision used (printed with enough digits for the comparison to read true). They fill
the ``class_reason`` column.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .patterns import presence_ratio_for_band
from .table import Thresholds

HIST_BINS = 32
_NONE = -100_000  # exponent of a latent that has not fired yet
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


class ActivationHistogram:
    """Per-latent histogram of the nonzero activations: ``counts [d_latent, n_bins]`` over ``[0, hi]``,
    ``hi [d_latent]`` a power of two (module docstring)."""

    def __init__(self, d_latent: int, n_bins: int = HIST_BINS, device: str | torch.device = "cpu") -> None:
        if n_bins < 1 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two, got {n_bins}")
        self.n_bins, self.shift = n_bins, n_bins.bit_length() - 1
        self.counts = torch.zeros(d_latent, n_bins, dtype=torch.long, device=device)
        self.exp = torch.full((d_latent,), _NONE, dtype=torch.long, device=device)  # hi = 2**exp

    @torch.no_grad()
    def update(
        self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: np.ndarray | None = None
    ) -> None:
        """``f [n, d_latent]``; ``x``, ``x_hat`` and ``rows`` are not used."""
        f = f.detach().float()
        fmax = f.amax(0)  # [h]
        mant, e = torch.frexp(fmax.clamp_min(torch.finfo(torch.float32).tiny))  # fmax = mant * 2**e
        need = e.long() - (mant == 0.5).long()  # smallest E with 2**E >= fmax
        grow = (fmax > 0) & (need > self.exp)
        if bool(grow.any()):
            idx = torch.nonzero(grow).flatten()
            old = self.exp[idx]
            k = torch.where(old == _NONE, 0, need[idx] - old).clamp(max=62)  # range doubles k times
            dest = torch.arange(self.n_bins, device=f.device)[None, :] >> k[:, None]  # [g, n_bins]
            merged = torch.zeros_like(self.counts[idx]).scatter_add_(1, dest, self.counts[idx])
            self.counts[idx] = merged
            self.exp[idx] = need[idx]
        r, c = torch.nonzero(f > 0, as_tuple=True)
        if r.numel() == 0:
            return
        a = f[r, c]
        scale = torch.exp2((self.shift - self.exp[c]).float())  # 1 / bin width, a power of two
        b = torch.floor(a * scale).long().clamp_(max=self.n_bins - 1)
        self.counts.view(-1).index_add_(0, c * self.n_bins + b, torch.ones_like(b))

    def result(self) -> dict[str, np.ndarray]:
        """``counts [d_latent, n_bins]`` int64 and ``hi [d_latent]`` float64 (0 for a latent that never
        fired); bin ``b`` of latent ``j`` is ``[b, b + 1) * hi[j] / n_bins``."""
        exp = self.exp.cpu().numpy()
        hi = np.where(exp == _NONE, 0.0, np.ldexp(1.0, np.maximum(exp, -1000)))
        return {"counts": self.counts.cpu().numpy(), "hi": hi}


def histogram_payload(hist: dict[str, np.ndarray], latents: Sequence[int]) -> dict[str, Any]:
    """The report's compact form for ``latents`` that fired: ``{"bins": n_bins, "latents": {"<j>": {"hi":
    hi, "c": counts up to the last nonzero bin}}}``."""
    counts, hi = hist["counts"], hist["hi"]
    out: dict[str, Any] = {}
    for j in latents:
        nz = np.flatnonzero(counts[j])
        if len(nz):
            out[str(int(j))] = {"hi": float(hi[j]), "c": [int(v) for v in counts[j, : nz[-1] + 1]]}
    return {"bins": int(counts.shape[1]), "latents": out}


def _num(v: float, op: str | None = None, thr: float | None = None) -> str:
    """``v`` with 3 significant digits, more (up to 6) when needed for ``v op thr`` to read true."""
    s = f"{v:.3g}"
    if op is None or thr is None or not np.isfinite(v):
        return s
    for d in (3, 4, 5, 6):
        s = f"{v:.{d}g}"
        if _OPS[op](float(s), thr):
            break
    return s


def _ineq(v: float, op: str, thr: float) -> str:
    """``"0.97 > 0.9"``: ``v`` against the threshold ``thr`` (``op`` is the comparison that holds)."""
    return f"{_num(v, op, thr)} {op} {thr:.4g}"


def _cmp(name: str, v: float, op: str, thr: float) -> str:
    return f"{name} {_ineq(v, op, thr)}"


def _norm_text(nc: str, r: float, t: Thresholds) -> str:
    """Why the relative norm ``r`` gives ``nc``."""
    band = t.exclusive_band
    if nc == "base_only":
        return "relative norm " + _cmp("r", r, "<", band)
    if nc == "ft_only":
        return "relative norm " + _cmp("r", r, ">", 1 - band)
    d = abs(r - 0.5)
    if nc == "shared":
        return f"{_cmp('|r - 0.5|', d, '<=', t.shared_band)} (r {_num(r)})"
    return (
        f"relative norm r {_num(r)} is neither exclusive ({band:g} <= r <= {1 - band:g}) "
        f"nor shared ({_cmp('|r - 0.5|', d, '>', t.shared_band)})"
    )


def _nu_text(nu_e: float, nu_r: float, t: Thresholds) -> str:
    e_op = "<=" if abs(nu_e) <= t.nu_error_max else ">"
    r_op = "<=" if abs(nu_r) <= t.nu_reconstruction_max else ">"
    e = _cmp("|nu_e|", abs(nu_e), e_op, t.nu_error_max)
    return f"{e}, {_cmp('|nu_r|', abs(nu_r), r_op, t.nu_reconstruction_max)}"


def _reason2(c: dict[str, Any], t: Thresholds, scanned: bool) -> str:
    """One latent of the two-model table (``c``: its row)."""
    cls, nc, flag, kind = c["class"], c["norm_class"], c["flag"], c.get("kind", "free")
    n = int(c["n_active"])
    if kind in ("base_only", "ft_only"):
        check = c.get("layout_check", "")
        if check == "ok" and np.isfinite(c["layout_nu_error"]) and np.isfinite(c["layout_nu_reconstruction"]):
            check = f"ok, {_nu_text(c['layout_nu_error'], c['layout_nu_reconstruction'], t)}"
        check = check or "not run (no data)"
        return f"{cls}: by construction (dedicated {kind} latent); partition check: {check}"
    if kind == "designated_shared":
        return (
            f"{cls}: by construction (designated shared latent, one decoder vector for both models); "
            f"nu_e {_num(c['layout_nu_error'])} (~1 when both models use it)"
        )
    norm = _norm_text(nc, float(c["relative_norm"]), t)
    if flag == "dead":
        return f"{cls}: never fired on the scanned tokens (by norm {nc}: {norm})"
    if nc == "shared":
        return f"{cls}: {norm}; decoder cosine {_num(float(c['cos_sim']))}"
    if nc not in ("base_only", "ft_only"):
        return f"{cls}: {norm}"
    mirror = nc == "base_only"
    other = "fine-tuned" if mirror else "base"
    along = "along the base decoder (mirror fit)" if mirror else "along the fine-tuned decoder"
    sfx = "_mirror" if mirror else ""
    nu_e, nu_r = float(c[f"beta_ratio_error{sfx}"]), float(c[f"beta_ratio_reconstruction{sfx}"])
    says = f"{cls}: {norm} says {nc}, but"
    if flag == "too_rare":
        return f"{says} it fired on only {n} scanned tokens (< {t.min_active})"
    if flag == "scaling_undefined":
        return (
            f"{says} Latent Scaling {along} is undefined (NaN nu: its own model's beta is not positive, or "
            "the latent is constant)"
        )
    if flag == "complete_shrinkage":
        return (
            f"{says} Latent Scaling {along} finds {_cmp('|nu_e|', abs(nu_e), '>', t.nu_error_max)}: the "
            f"{other} model's activations carry its direction (complete shrinkage)"
        )
    if flag == "latent_decoupling":
        return (
            f"{says} Latent Scaling {along} finds "
            f"{_cmp('|nu_r|', abs(nu_r), '>', t.nu_reconstruction_max)}: the {other} model's reconstruction "
            f"carries it through other latents (latent decoupling; "
            f"{_cmp('|nu_e|', abs(nu_e), '<=', t.nu_error_max)})"
        )
    if not scanned:
        return f"{cls}: {norm} (no data scanned: activity and Latent Scaling not checked)"
    text = f"{cls}: {norm}, fired on {n} scanned tokens (>= {t.min_active})"
    if not t.latent_scaling:
        return text + "; Latent Scaling off"
    if not (np.isfinite(nu_e) and np.isfinite(nu_r)):
        return text + "; Latent Scaling not fitted"
    return (
        f"{text}, and Latent Scaling {along} confirms it: {_nu_text(nu_e, nu_r, t)}, the {other} model "
        "neither carries nor reconstructs it"
    )


def class_reasons(cols: dict[str, np.ndarray], t: Thresholds) -> np.ndarray:
    """``[d_latent]`` object array: why each latent of a two-model table
    (:func:`~crosscoder.analysis.table.latent_columns`, its classes decided) has its ``class``."""
    scanned = bool(np.any(np.asarray(cols["n_active"]) >= 0))
    keys = [k for k in cols if k.startswith(("beta_ratio_", "layout_")) or k in _ROW_KEYS]
    out = np.empty(len(cols["latent"]), dtype=object)
    for j in range(len(out)):
        out[j] = _reason2({k: cols[k][j] for k in keys}, t, scanned)
    return out


_ROW_KEYS = ("class", "norm_class", "flag", "kind", "n_active", "relative_norm", "cos_sim")


def _models(idx: Sequence[int]) -> str:
    idx = list(idx)
    return ("model " if len(idx) == 1 else "models ") + ", ".join(str(i) for i in idx)


def _pattern_text(nc: str, norms: np.ndarray, present: np.ndarray, ratio: float) -> str:
    """Why the decoder norms ``[n_models]`` give the pattern (and ``nc``)."""
    mx = float(norms.max())
    rel = norms / mx
    pres, absent = np.flatnonzero(present), np.flatnonzero(~present)
    if nc == "shared":
        low = _ineq(rel.min(), ">=", ratio)
        return f"present in all {len(norms)} models (smallest norm {low} x the largest)"
    top = float(rel[absent].max())
    where = (
        f"present only in model {pres[0]}"
        if len(pres) == 1
        else f"present in {_models(pres)}, absent from {_models(absent)}"
    )
    return f"{where} (largest absent norm {_ineq(top, '<', ratio)} x the largest)"


def _reason_n(
    c: dict[str, Any], norms: np.ndarray, present: np.ndarray, t: Thresholds, ratio: float, scanned: bool
) -> str:
    """One latent of the n-model table (``c``: its row; ``norms``, ``present`` ``[n_models]``)."""
    cls, nc, flag, kind = c["class"], c["norm_class"], c["flag"], c.get("kind", "free")
    if kind == "designated_shared":
        return f"{cls}: by construction (designated shared latent, one decoder vector tied across the models)"
    if flag == "no_decoder" or nc == "other":
        return f"{cls}: no decoder in any model (every decoder norm is 0)"
    pat = _pattern_text(nc, norms, present, ratio)
    if flag == "dead":
        return f"{cls}: never fired on the scanned tokens ({nc} by pattern: {pat})"
    if nc == "shared":
        return f"{cls}: {pat}"
    n = int(c["n_active"])
    says = f"{cls}: {pat} says {nc}, but"
    if flag == "too_rare":
        return f"{says} it fired on only {n} scanned tokens (< {t.min_active})"
    ref = int(c["ls_model"]) if "ls_model" in c else -1
    along = f"along model {ref}'s decoder (its largest norm)"
    absent = np.flatnonzero(~present)
    nu_e = np.array([c.get(f"nu_error_{i}", np.nan) for i in range(len(norms))], np.float64)
    nu_r = np.array([c.get(f"nu_reconstruction_{i}", np.nan) for i in range(len(norms))], np.float64)
    if flag == "scaling_undefined":
        return f"{says} Latent Scaling {along} is undefined (model {ref}'s own beta is not positive)"
    if flag == "complete_shrinkage":
        i = next(i for i in absent if abs(nu_e[i]) > t.nu_error_max)
        return (
            f"{says} Latent Scaling {along} finds absent model {i} with "
            f"{_cmp('|nu_e|', abs(nu_e[i]), '>', t.nu_error_max)}: its activations carry the direction "
            "(complete shrinkage)"
        )
    if flag == "latent_decoupling":
        i = next(i for i in absent if abs(nu_r[i]) > t.nu_reconstruction_max)
        return (
            f"{says} Latent Scaling {along} finds absent model {i} with "
            f"{_cmp('|nu_r|', abs(nu_r[i]), '>', t.nu_reconstruction_max)}: other latents reconstruct it "
            "there (latent decoupling)"
        )
    if not scanned:
        return f"{cls}: {pat} (no data scanned: activity and Latent Scaling not checked)"
    text = f"{cls}: {pat}, fired on {n} scanned tokens (>= {t.min_active})"
    if not t.latent_scaling or ref < 0:
        return text + "; Latent Scaling off"
    checked = [i for i in absent if np.isfinite(nu_e[i]) and np.isfinite(nu_r[i])]
    skipped = [i for i in absent if i not in checked]
    tail = f" ({_models(skipped)} of another width: not checked)" if skipped else ""
    if not checked:
        return f"{text}; no absent model of the reference's width to check with Latent Scaling{tail}"
    ie = max(checked, key=lambda i: abs(nu_e[i]))
    ir = max(checked, key=lambda i: abs(nu_r[i]))
    return (
        f"{text}, and Latent Scaling {along} confirms no absent model carries it: largest "
        f"{_cmp('|nu_e|', abs(nu_e[ie]), '<=', t.nu_error_max)} (model {ie}), largest "
        f"{_cmp('|nu_r|', abs(nu_r[ir]), '<=', t.nu_reconstruction_max)} (model {ir}){tail}"
    )


def multi_class_reasons(cols: dict[str, np.ndarray], present: np.ndarray, t: Thresholds) -> np.ndarray:
    """``[d_latent]`` object array: why each latent of an n-model table
    (:func:`~crosscoder.analysis.multi.multi_columns`; ``present [d_latent, n_models]``) has its ``class``."""
    present = np.asarray(present, bool)
    m = present.shape[1]
    norms = np.stack([np.asarray(cols[f"dec_norm_{i}"], np.float64) for i in range(m)], 1)
    scanned = bool(np.any(np.asarray(cols["n_active"]) >= 0))
    ratio = presence_ratio_for_band(t.exclusive_band)
    keys = [k for k in cols if k.startswith(("nu_error_", "nu_reconstruction_")) or k in _ROW_KEYS]
    keys += ["ls_model"] if "ls_model" in cols else []
    out = np.empty(len(cols["latent"]), dtype=object)
    for j in range(len(out)):
        out[j] = _reason_n({k: cols[k][j] for k in keys}, norms[j], present[j], t, ratio, scanned)
    return out


def card_columns(cols: dict[str, np.ndarray]) -> list[str]:
    """Columns the page's cards read that its latent table does not show (embedded, hidden in the table):
    ``class_reason``, ``n_active``, ``max_act`` and the per-model ``dec_norm_<i>``, ``nu_error_<i>``,
    ``nu_reconstruction_<i>``."""
    per_model = [
        c
        for pre in ("dec_norm_", "nu_error_", "nu_reconstruction_")
        for c in sorted(
            (c for c in cols if c.startswith(pre) and c[len(pre) :].isdigit()),
            key=lambda c: int(c[len(pre) :]),
        )
    ]
    return [c for c in ("class_reason", "n_active", "max_act", *per_model) if c in cols]
