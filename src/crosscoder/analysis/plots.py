"""Report figures (matplotlib, Agg backend, PNG). Each function takes the latent table columns
(:func:`crosscoder.analysis.table.latent_columns`) and writes one file, returning its path.

With a latent layout the class figures show the ``free`` latents (the ones classed by relative norm);
the Δnorm / nu scatter also marks the dedicated fine-tuned latents (their partition check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .table import Thresholds

COLORS = {"base_only": "#1f77b4", "shared": "#2ca02c", "ft_only": "#d62728", "other": "#9a9a9a"}
ORDER = ("base_only", "shared", "ft_only", "other")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _free(cols: dict[str, np.ndarray]) -> np.ndarray:
    """``[d_latent]`` bool: latents classed by relative norm (all of them without a layout)."""
    return cols["kind"] == "free" if "kind" in cols else np.ones(len(cols["latent"]), bool)


def _scope(cols: dict[str, np.ndarray]) -> str:
    n = int((~_free(cols)).sum())
    return f"; free latents, {n} constrained not shown" if n else ""


def relative_norms(cols: dict[str, np.ndarray], path: Path, t: Thresholds, title: str = "") -> Path:
    """Histogram of the relative decoder norm of live latents, stacked by final class (the trimodal
    picture: base-only near 0, shared near 0.5, fine-tuned-only near 1)."""
    plt = _plt()
    alive = ~cols["dead"] & _free(cols)
    r = cols["relative_norm"][alive]
    cls = cols["class"][alive]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bins = np.linspace(0, 1, 51)
    ax.hist(
        [r[cls == c] for c in ORDER],
        bins=bins,
        stacked=True,
        color=[COLORS[c] for c in ORDER],
        label=[f"{c} ({int((cls == c).sum())})" for c in ORDER],
    )
    for v in (t.exclusive_band, 1 - t.exclusive_band):
        ax.axvline(v, color="k", lw=0.8, ls="--")
    ax.set_xlabel("relative decoder norm  r = |d_ft| / (|d_base| + |d_ft|)   (normalised space)")
    ax.set_ylabel("latents")
    ax.set_title(title or f"Relative decoder norms ({int(alive.sum())} live latents{_scope(cols)})")
    ax.legend(fontsize=8, title="final class", title_fontsize=8)
    return _save(fig, path)


def cosine_shared(cols: dict[str, np.ndarray], path: Path) -> Path:
    """Histogram of the cosine similarity of the base and fine-tuned decoders of shared latents."""
    plt = _plt()
    m = (cols["class"] == "shared") & ~cols["dead"] & _free(cols)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    c = cols["cos_sim"][m]
    lo = max(-1.0, float(np.floor((c.min() if len(c) else -1.0) * 20) / 20 - 0.05))
    ax.hist(c, bins=np.linspace(lo, 1, 61), color=COLORS["shared"])
    ax.set_xlabel("cos(d_base, d_ft)")
    ax.set_ylabel("latents")
    ax.set_title(f"Decoder cosine similarity of shared latents ({int(m.sum())}{_scope(cols)})")
    return _save(fig, path)


def delta_vs_nu(cols: dict[str, np.ndarray], path: Path, t: Thresholds) -> Path:
    """Δnorm against the Latent Scaling ratios nu_error and nu_reconstruction (fitted along the
    fine-tuned decoder) for live latents leaning fine-tuned (Δnorm >= 0.5), coloured by final class;
    latents demoted by Latent Scaling are drawn as crosses."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    leaning = ~cols["dead"] & (cols["delta_norm"] >= 0.5)
    alive = leaning & _free(cols)
    dedicated = leaning & (cols["kind"] == "ft_only") if "kind" in cols else np.zeros_like(alive)
    for ax, key, lim in (
        (axes[0], "beta_ratio_error", t.nu_error_max),
        (axes[1], "beta_ratio_reconstruction", t.nu_reconstruction_max),
    ):
        nu = np.clip(cols[key], -0.5, 1.5)
        for c in ORDER:
            m = alive & (cols["class"] == c) & (cols["flag"] == "") & np.isfinite(nu)
            ax.scatter(nu[m], cols["delta_norm"][m], s=6, c=COLORS[c], label=c, alpha=0.7)
        m = (
            alive
            & np.isin(cols["flag"], ("complete_shrinkage", "latent_decoupling", "scaling_undefined"))
            & np.isfinite(nu)
        )
        ax.scatter(
            nu[m], cols["delta_norm"][m], s=14, c="#ff7f0e", marker="x", label="demoted by Latent Scaling"
        )
        m = dedicated & np.isfinite(nu)
        if m.any():
            ax.scatter(
                nu[m],
                cols["delta_norm"][m],
                s=16,
                c="k",
                marker="D",
                label="dedicated ft_only (partition check)",
            )
        ax.axvline(lim, color="k", lw=0.8, ls="--")
        ax.set_xlabel(f"nu_{key.split('_')[-1]} = beta_base / beta_ft  (clipped to [-0.5, 1.5])")
        ax.set_xlim(-0.55, 1.55)
    axes[0].set_ylabel("Δnorm  (1 = fine-tuned-only)")
    axes[0].set_ylim(0.48, 1.02)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Latent Scaling: is a fine-tuned-only-looking latent present in the base model?", fontsize=10
    )
    return _save(fig, path)


def density(cols: dict[str, np.ndarray], path: Path) -> Path:
    """Histogram of log10 firing frequency of live latents (dead ones counted in the title)."""
    plt = _plt()
    alive = ~cols["dead"] & (cols["freq"] > 0)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if alive.any():
        ax.hist(np.log10(cols["freq"][alive]), bins=60, color="#555")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"Latent density ({int(cols['dead'].sum())} dead of {len(cols['dead'])})")
    return _save(fig, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def training_curves(metrics_path: Path, path: Path) -> Path | None:
    """Loss, L0, explained variance and dead fraction against step from ``metrics.jsonl`` (train and
    ``val/`` rows). None when there is no metrics file."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    plt = _plt()
    panels = (
        ("loss", "l2_loss"),
        ("l0_loss",),
        ("explained_variance", "explained_variance_A", "explained_variance_B"),
        ("dead_fraction",),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    for ax, keys in zip(axes.flat, panels, strict=True):
        for k in keys:
            for prefix, style in (("", "-"), ("val/", "o--")):
                pts = [(r["step"], r[prefix + k]) for r in rows if prefix + k in r and "step" in r]
                if pts:
                    s, v = zip(*pts, strict=True)
                    ax.plot(s, v, style, ms=3, label=prefix + k)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        if keys[0] in ("loss",):
            ax.set_yscale("log")
    fig.suptitle("Training curves (metrics.jsonl)", fontsize=10)
    return _save(fig, path)


def make_plots(
    cols: dict[str, np.ndarray], out_dir: Path, t: Thresholds, run_dir: Path | None = None
) -> dict[str, Path]:
    """All report figures into ``out_dir``; returns ``{name: path}``."""
    out = {
        "relative_norms": relative_norms(cols, out_dir / "relative_norms.png", t),
        "cosine_shared": cosine_shared(cols, out_dir / "cosine_shared.png"),
        "delta_vs_nu": delta_vs_nu(cols, out_dir / "delta_vs_nu.png", t),
        "density": density(cols, out_dir / "density.png"),
    }
    if run_dir is not None:
        tc = training_curves(Path(run_dir) / "metrics.jsonl", out_dir / "training.png")
        if tc is not None:
            out["training"] = tc
    return out
