"""Figures for n models (3..8 read well), several sites and checkpoint series (matplotlib, Agg, PNG).

* :func:`norm_heatmap`: latents x models decoder norms, each latent's row divided by its largest entry,
  latents grouped by pattern (most frequent patterns first), models in display order (by step for a
  checkpoint series);
* :func:`pattern_bars`: latent counts of the most frequent patterns (live latents; confirmed ones, whose
  class is not ``other``, overlaid);
* :func:`block_heatmap`: the same as :func:`norm_heatmap` over blocks (model x site) with several sites,
  and the share of decoder norm per model and site;
* :func:`checkpoint_timeline`: for a checkpoint series, latents present at each checkpoint and how many
  appear (first present) and vanish (last present) there, overall and for the most frequent patterns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .blocks import BlockLayout
from .plots import _plt, _save

MAX_ROWS = 4000  # heat-map rows drawn (an even subsample of each pattern group beyond that)


def _short(name: str, n: int = 18) -> str:
    s = str(name).rstrip("/").split("/")[-1]
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def model_labels(names: list[str], n: int = 18) -> list[str]:
    """Short labels: the names without their common prefix (cut back to a ``/`` or ``@``),
    truncated to ``n`` characters."""
    names = [str(v).rstrip("/") for v in names]
    pre = names[0] if len(names) > 1 else ""
    for v in names[1:]:
        while not v.startswith(pre):
            pre = pre[:-1]
    cut = max(pre.rfind("/"), pre.rfind("@")) + 1 if pre else 0
    rest = [v[cut:] or v for v in names]
    return [_short(v, n) for v in rest]


def _pattern_groups(
    cols: dict[str, np.ndarray], live: np.ndarray, top: int = 12
) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Row order of the live latents grouped by pattern (the ``top`` largest groups, largest first, then
    every other pattern together) and ``(label, start, stop)`` of each group in that order."""
    pats = cols["pattern"].astype(str)
    idx = np.flatnonzero(live)
    uniq, counts = np.unique(pats[idx], return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], uniq[i]))
    rows, groups, pos = [], [], 0
    for i in order[:top]:
        g = idx[pats[idx] == uniq[i]]
        rows.append(g)
        groups.append((uniq[i] or "none", pos, pos + len(g)))
        pos += len(g)
    rest = [uniq[i] for i in order[top:]]
    if rest:
        g = idx[np.isin(pats[idx], rest)]
        g = g[np.argsort(pats[g], kind="stable")]
        rows.append(g)
        groups.append((f"{len(rest)} other patterns", pos, pos + len(g)))
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), groups


def _subsample(
    rows: np.ndarray, groups: list[tuple[str, int, int]]
) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    if len(rows) <= MAX_ROWS:
        return rows, groups
    keep, out, pos = [], [], 0
    for name, a, b in groups:
        n = max(1, round((b - a) * MAX_ROWS / len(rows)))
        sel = rows[a:b][np.linspace(0, b - a - 1, n).astype(int)]
        keep.append(sel)
        out.append((name, pos, pos + len(sel)))
        pos += len(sel)
    return np.concatenate(keep), out


def _heat(
    ax: Any, mat: np.ndarray, groups: list[tuple[str, int, int]], labels: list[str], max_labels: int = 14
) -> Any:
    mx = mat.max(1, keepdims=True)
    im = ax.imshow(
        mat / np.where(mx > 0, mx, 1.0),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0,
        vmax=1,
    )
    ax.set_xticks(range(len(labels)))
    crowded = len(labels) > 4 or sum(len(x) for x in labels) > 48  # long names would run into each other
    ax.set_xticklabels(labels, rotation=35 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    ticks, names = [], []
    gap = mat.shape[0] / 45  # rows between two labels (about 45 fit the figure's height)
    for name, a, b in groups:
        if a:
            ax.axhline(a - 0.5, color="w", lw=0.6)
        mid = (a + b - 1) / 2
        if len(ticks) < max_labels and (not ticks or mid - ticks[-1] >= gap):
            ticks.append(mid)
            names.append(f"{name} ({b - a})")
    ax.set_yticks(ticks)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_ylabel("latents grouped by pattern (count)")
    return im


def norm_heatmap(cols: dict[str, np.ndarray], layout: BlockLayout, order: list[int], path: Path) -> Path:
    """Latents x models decoder norms (row / row max), grouped by pattern, models in ``order``."""
    plt = _plt()
    live = ~np.asarray(cols["dead"], bool)
    rows, groups = _subsample(*_pattern_groups(cols, live))
    mat = (
        np.stack([cols[f"dec_norm_{i}"][rows] for i in order], 1) if len(rows) else np.zeros((0, len(order)))
    )
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(order), 6.5))
    if len(rows):
        labels = model_labels(layout.model_names)
        im = _heat(ax, mat, groups, [f"{i}: {labels[i]}" for i in order])
        fig.colorbar(im, ax=ax, fraction=0.06, pad=0.02, label="decoder norm / latent's largest")
    ax.set_title(f"Decoder norm per model ({len(rows)} of {int(live.sum())} live latents)", fontsize=10)
    return _save(fig, path)


def block_heatmap(cols: dict[str, np.ndarray], layout: BlockLayout, order: list[int], path: Path) -> Path:
    """Latents x blocks (model x site) decoder norms, and the share of the squared norm per model and site."""
    plt = _plt()
    live = ~np.asarray(cols["dead"], bool)
    rows, groups = _subsample(*_pattern_groups(cols, live))
    keys = [(i, s) for i in order for s in range(layout.n_sites)]
    mat = (
        np.stack([cols[f"dec_norm_{i}_{s}"][rows] for i, s in keys], 1)
        if len(rows)
        else np.zeros((0, len(keys)))
    )
    fig, (ax, ax2) = plt.subplots(
        1,
        2,
        figsize=(min(20.0, 3.5 + 0.55 * len(keys) + 0.5 * layout.n_sites), 6.5),
        gridspec_kw={"width_ratios": [len(keys), 2 + layout.n_sites]},
    )
    if len(rows):
        _heat(ax, mat, groups, [f"{i}/{_short(layout.sites[s], 12)}" for i, s in keys])
    ax.set_title("Decoder norm per block (model/site)\nrow / row max", fontsize=9)
    sq = np.array(
        [[float((cols[f"dec_norm_{i}_{s}"][live] ** 2).sum()) for s in range(layout.n_sites)] for i in order]
    )
    share = sq / (sq.sum() or 1.0)
    im = ax2.imshow(share, cmap="magma", aspect="auto", vmin=0, vmax=max(float(share.max()), 1e-12))
    for (a, b), v in np.ndenumerate(share):
        ax2.text(
            b, a, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < share.max() / 2 else "k"
        )
    ax2.set_xticks(range(layout.n_sites))
    ax2.set_xticklabels([_short(s, 12) for s in layout.sites], rotation=45, ha="right", fontsize=8)
    ax2.set_yticks(range(len(order)))
    labels = model_labels(layout.model_names)
    ax2.set_yticklabels([f"{i}: {labels[i]}" for i in order], fontsize=8)
    ax2.set_title("Share of squared\ndecoder norm (live latents)", fontsize=9)
    fig.colorbar(im, ax=ax2, fraction=0.08)
    return _save(fig, path)


def pattern_bars(
    counts: dict[str, int], confirmed: dict[str, int], layout: BlockLayout, path: Path, top: int = 20
) -> Path:
    """Bar chart of the ``top`` most frequent patterns (``counts``: live latents; ``confirmed``: of them,
    those whose class is not ``other``)."""
    plt = _plt()
    items = list(counts.items())[:top]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(items) + 2), 3.8))
    x = np.arange(len(items))
    ax.bar(x, [c for _, c in items], color="#bbb", label="live latents")
    ax.bar(
        x,
        [confirmed.get(p, 0) for p, _ in items],
        width=0.5,
        color="#2c7fb8",
        label="confirmed (class not other)",
    )
    ax.set_xticks(x)
    ax.set_xticklabels([p for p, _ in items], rotation=60 if len(items) > 8 else 0, fontsize=8)
    for xi, (_, c) in zip(x, items, strict=True):
        ax.text(xi, c, str(c), ha="center", va="bottom", fontsize=7)
    if items and items[0][1] > 30 * max(1, items[-1][1]):
        ax.set_yscale("log")
    ax.set_xlabel("pattern (models present)")
    ax.set_ylabel("latents")
    labels = model_labels(layout.model_names, 24)
    legend = "\n".join(
        "; ".join(f"{i} = {labels[i]}" for i in range(lo, min(lo + 4, layout.n_models)))
        for lo in range(0, layout.n_models, 4)
    )
    ax.set_title(f"Latents per pattern (top {len(items)} of {len(counts)})\n{legend}", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def checkpoint_timeline(
    live: np.ndarray, patterns: np.ndarray, info: dict[str, Any], order: list[int], path: Path, top: int = 12
) -> Path:
    """For a checkpoint series (``info`` from :func:`crosscoder.analysis.checkpoints.checkpoint_summary`):
    latents present at each checkpoint, appearing (first present) and vanishing (last present) there; and
    the ``top`` most frequent patterns as rows over the checkpoints (a filled cell: present there)."""
    from .patterns import parse_pattern

    plt = _plt()
    steps = info["steps"]
    x = np.arange(len(steps))
    pats = np.asarray(patterns).astype(str)[np.asarray(live, bool)]
    uniq, cnt = np.unique(pats[pats != ""], return_counts=True)
    tops = [(uniq[i], int(cnt[i])) for i in np.argsort(-cnt, kind="stable")[:top]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    ax.plot(x, info["present"], "o-", color="k", label="present")
    ax.bar(x - 0.2, info["appear"], width=0.4, color="#2ca02c", label="appear (first present)")
    ax.bar(x + 0.2, info["vanish"], width=0.4, color="#d62728", label="vanish (last present)")
    ax.set_title(
        f"Live latents per checkpoint ({info['contiguous']} present on one unbroken run of checkpoints, "
        f"{info['gapped']} with gaps)",
        fontsize=9,
    )
    ax.set_ylabel("latents")
    ax.legend(fontsize=7)
    ax2 = axes[1]
    grid = np.array([[k in parse_pattern(p) for k in order] for p, _ in tops], float).reshape(
        len(tops), len(order)
    )
    ax2.imshow(grid, cmap="Greens", aspect="auto", vmin=0, vmax=1.3, interpolation="nearest")
    ax2.set_yticks(range(len(tops)))
    ax2.set_yticklabels([f"{p} ({c})" for p, c in tops], fontsize=7)
    ax2.set_title(f"Top {len(tops)} patterns over the checkpoints (latents)", fontsize=9)
    for a in axes:
        a.set_xticks(x)
        a.set_xticklabels([str(s) for s in steps], rotation=45 if len(steps) > 6 else 0, fontsize=8)
        a.set_xlabel("checkpoint step")
    return _save(fig, path)
