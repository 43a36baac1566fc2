"""Analysis of trained crosscoders: model-diffing metrics, Latent Scaling, contexts, reports.

Notebook use::

    from crosscoder import CrossCoder
    from crosscoder.analysis import latent_table, latent_scaling
    from crosscoder.data.paired import PairedCache

    cc = CrossCoder.from_pretrained("runs/my-run")
    df = latent_table(cc, PairedCache("caches/my-cache"))       # pandas DataFrame, one row per latent
    df[df["class"] == "ft_only"].sort_values("freq")

``crosscoder analyze`` (:func:`crosscoder.analysis.pipeline.analyze`) writes the full report.
"""

from __future__ import annotations

from typing import Any

from .compare import compare_runs, match_latents
from .recovery import classification_scores, format_recovery, planted_cosines, recovery
from .scaling import LatentScalingResult, ScalingAccumulator, latent_scaling
from .table import (
    CLASS_NAMES,
    Thresholds,
    class_counts,
    classify,
    decoder_metrics,
    latent_columns,
    layout_summary,
    thresholds_for,
)


def latent_table(
    model: Any,
    data: Any = None,
    *,
    thresholds: Thresholds | None = None,
    max_tokens: int | None = 500_000,
    chunk: int = 1024,
    seed: int = 0,
    device: str = "cpu",
    as_dict: bool = False,
) -> Any:
    """One row per latent: decoder metrics (normalised space), classes, and, when ``data`` is given, firing
    frequency, mean activation, dead flag and Latent Scaling from one streaming pass. A crosscoder over n
    models, several sites or mixed widths gets the presence-pattern table
    (:func:`crosscoder.analysis.multi.multi_columns`).

    ``model``: a :class:`~crosscoder.CrossCoder` (as saved: folded) or a folder to load it from;
    ``data``: a :class:`~crosscoder.data.paired.PairedCache` or its folder (raw activations), or None for
    the decoder-only columns. Returns a pandas DataFrame (``as_dict=True``: a dict of numpy arrays).
    """
    from pathlib import Path

    import torch

    from ..data.paired import PairedCache
    from ..model import CrossCoder
    from .blocks import block_layout
    from .multi import is_classic_pair, multi_columns, two_model_extras
    from .scan import ActivationStats, normalised_model, scan, select_rows
    from .table import to_dataframe

    if isinstance(model, (str, Path)):
        model = CrossCoder.from_pretrained(model)
    t = thresholds or thresholds_for(model.cfg.arch)
    norm = normalised_model(model).to(device)
    cache = (
        None
        if data is None
        else (data if isinstance(data, PairedCache) else PairedCache(data, verify="size"))
    )
    layout = block_layout(model.cfg, cache.meta if cache is not None else None)
    if not is_classic_pair(layout):  # n models, several sites or mixed widths
        from .multi_scaling import MultiScalingAccumulator

        stats = ls = None
        if cache is not None:
            acc = ActivationStats(model.cfg.d_latent, device)
            msa = MultiScalingAccumulator(norm, layout)
            rows = select_rows(cache.n_rows, max_tokens, seed)
            with torch.no_grad():
                scan(norm, cache, rows, [acc, msa], model.normalization(), chunk)
            stats, ls = acc.result(), msa.result()
        cols, _ = multi_columns(norm, layout, t, stats, ls)
    elif data is None:
        cols = latent_columns(norm, t)
    else:
        stats = ActivationStats(model.cfg.d_latent, device)
        accs = [stats, ScalingAccumulator(norm)]
        with torch.no_grad():
            scan(norm, cache, select_rows(cache.n_rows, max_tokens, seed), accs, model.normalization(), chunk)
        cols = latent_columns(norm, t, stats.result(), accs[1].result("ft"), accs[1].result("base"))
    if is_classic_pair(layout):
        two_model_extras(cols, t)
    return cols if as_dict else to_dataframe(cols)


__all__ = [
    "CLASS_NAMES",
    "LatentScalingResult",
    "ScalingAccumulator",
    "Thresholds",
    "class_counts",
    "classification_scores",
    "classify",
    "compare_runs",
    "decoder_metrics",
    "format_recovery",
    "latent_columns",
    "latent_scaling",
    "latent_table",
    "layout_summary",
    "match_latents",
    "planted_cosines",
    "recovery",
    "thresholds_for",
]
