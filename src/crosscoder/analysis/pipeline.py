"""``crosscoder analyze``: the whole model-diffing report of one trained crosscoder.

:func:`analyze` loads the run, streams the paired activations once (activation statistics, Latent
Scaling along both decoders, top activations, explained variance), builds the latent table and its
classes, reads the top contexts, runs the spliced-in evaluation when the two models are known, draws
the figures, and writes ``REPORT_DIR/{latents.parquet, latents.csv, summary.json, report.html, *.png}``.

A crosscoder with a latent layout (dedicated partitions, designated shared latents) gets the ``kind``
column, classes by construction for its constrained latents and a ``layout`` section (see
:mod:`crosscoder.analysis.table`); ``compare_to`` adds the comparison with another crosscoder trained on
the same data (:mod:`crosscoder.analysis.compare`). The settings and their resolution live in
:mod:`crosscoder.analysis.analyze_config`, the summary's text in :mod:`crosscoder.analysis.summary_text`.

This is the report of the classic pair (two models, one site, one width; its table also gets
``dec_norm_0``, ``dec_norm_1`` and the presence ``pattern``). Any other crosscoder (n models, several
sites, mixed widths: :mod:`crosscoder.analysis.blocks`) is handed to
:func:`crosscoder.analysis.multi_pipeline.analyze_multi` after the run and the data are resolved.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CrossCoderError
from ..model import CrossCoder
from .analyze_config import AnalyzeConfig, find_ground_truth, load_run, resolve_cache
from .blocks import block_layout
from .multi import is_classic_pair, pattern_counts, two_model_extras
from .patterns import presence_ratio_for_band
from .summary_text import SPACE_NOTE, _class_note, _json_safe, _layout_note, format_layout


def _say_default(msg: str) -> None:
    print(msg, flush=True)


def card_latents(cols: dict[str, np.ndarray], max_cards: int) -> list[int]:
    """Latents that get contexts: all of them up to ``max_cards``, else norm-exclusive ones first,
    then by freq."""
    h = len(cols["latent"])
    if h <= max_cards:
        return list(range(h))
    excl = np.isin(cols["norm_class"], ("base_only", "ft_only")) | np.isin(
        cols["class"], ("base_only", "ft_only")
    )
    order = np.lexsort((-np.nan_to_num(cols["freq"]), ~excl))
    return sorted(int(i) for i in order[:max_cards])


def _tokenizer(spec: str | None, say: Any) -> Any:
    if not spec:
        return None
    from ..data.collect import load_tokenizer

    try:
        return load_tokenizer(spec)
    except CrossCoderError as e:
        say(f"warning: no tokenizer ({e}); contexts show token ids")
        return None


def eval_sequences(
    cfg: AnalyzeConfig, meta: dict[str, Any], tok: Any, say: Any
) -> tuple[list[Any], dict[str, Any]]:
    """Held-out sequences for the spliced-in evaluation (``--eval-data``, else the cache's dataset after the
    sequences it was collected from) and ``{"dataset", "skip", "held_out"}``."""
    from .spliced import heldout_sequences

    col = meta.get("collect") or {}
    seq_len = int(col.get("seq_len") or 128)
    if cfg.eval_data:
        dataset, skip, held_out = cfg.eval_data, 0, True
    elif col.get("dataset"):
        dataset, skip, held_out = col["dataset"], int(meta.get("n_sequences") or 0), True
    else:
        raise CrossCoderError("spliced-in evaluation: give --eval-data (held-out text)")
    column = col.get("text_column", "text") if not cfg.eval_data else "text"
    seqs = heldout_sequences(
        dataset, tok, seq_len, cfg.eval_sequences, skip, column, bool(col.get("pack", True))
    )
    if not seqs and skip:
        say(
            f"warning: {dataset} has no sequences beyond the {skip} collected; evaluating on its last ones "
            "(not held out from the crosscoder's data)"
        )
        all_seqs = heldout_sequences(dataset, tok, seq_len, 10**9, 0, column, bool(col.get("pack", True)))
        seqs, held_out = all_seqs[-cfg.eval_sequences :], False
    return seqs, {"dataset": dataset, "skip": skip, "held_out": held_out}


def run_spliced(
    cfg: AnalyzeConfig,
    model: CrossCoder,
    meta: dict[str, Any],
    base_spec: str,
    ft_spec: str,
    site: str,
    tok: Any,
    say: Any,
) -> dict[str, Any]:
    """Spliced-in evaluation of the two models on held-out sequences (:func:`eval_sequences`)."""
    from ..data.collect import load_site_model
    from .spliced import spliced_eval

    seqs, where = eval_sequences(cfg, meta, tok, say)
    dev = torch.device(cfg.device)
    base = load_site_model(base_spec, site, tokenizer=tok, device=dev)
    ft = load_site_model(ft_spec, site, tokenizer=tok, device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    res = spliced_eval(model.to(dev), base, ft, seqs, pad, tok.bos_token_id, cfg.eval_batch_size)
    res.update(**where, site=site)
    return res


def analyze(cfg: AnalyzeConfig, say: Any = _say_default) -> dict[str, Any]:
    """Run the analysis; returns the summary (also written to ``summary.json``)."""
    from ..io import atomic_dir, write_json
    from . import plots
    from .cards import ActivationHistogram, histogram_payload
    from .contexts import TopActivations, build_contexts
    from .export_formats import write_exports
    from .recovery import classification_scores, format_scores, planted_cosines
    from .report import render_report
    from .scaling import ScalingAccumulator, check_mode
    from .scan import (
        ActivationStats,
        ReconstructionStats,
        architecture_metrics,
        normalised_model,
        scan,
        select_rows,
    )
    from .spliced import format_spliced
    from .table import class_counts, latent_columns, layout_summary, thresholds_for, write_table

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise CrossCoderError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    model, run_cfg = load_run(cfg.run_dir)
    if cfg.compare_to and model.cfg.n_models != 2:
        raise CrossCoderError(
            f"--compare-to: needs a two-model crosscoder (this one has {model.cfg.n_models} blocks)"
        )
    other = None
    if cfg.compare_to:  # loaded first: a bad folder fails before the scan
        if not 0.0 < cfg.compare_threshold <= 1.0:
            raise CrossCoderError(f"--compare-threshold: must be in (0, 1], got {cfg.compare_threshold}")
        other, _ = load_run(cfg.compare_to)
        if (other.cfg.n_models, other.cfg.d_model) != (model.cfg.n_models, model.cfg.d_model):
            raise CrossCoderError(
                f"--compare-to {cfg.compare_to}: {other.cfg.n_models} models of width "
                f"{other.cfg.d_model}, the run has {model.cfg.n_models} of width {model.cfg.d_model}"
            )
    cache, recorded = resolve_cache(cfg, run_cfg)
    say(f"data: {cache.path} ({cache.n_rows:,} rows{', recorded by the run' if recorded else ''})")
    t = thresholds_for(
        model.cfg.arch,
        exclusive_band=cfg.exclusive_band,
        shared_band=cfg.shared_band,
        nu_error_max=cfg.nu_error_max,
        nu_reconstruction_max=cfg.nu_reconstruction_max,
        min_active=cfg.min_active,
        latent_scaling=cfg.latent_scaling,
    )
    check_mode(cfg.latent_scaling_target)
    blocks = block_layout(model.cfg, cache.meta)
    if not is_classic_pair(blocks):  # n models, several sites or mixed widths
        if cfg.compare_to:
            raise CrossCoderError("--compare-to: needs two models at one site of one width")
        from .multi_pipeline import analyze_multi

        return analyze_multi(cfg, model, cache, blocks, t, t0, say)
    dev = torch.device(cfg.device)
    norm = normalised_model(model).to(dev)
    scale = [float(v) for v in model.norm_scale.tolist()]
    rows = select_rows(cache.n_rows, cfg.max_tokens, cfg.seed)
    h = model.cfg.d_latent
    stats, recon = ActivationStats(h, dev), ReconstructionStats(2)
    scaling = ScalingAccumulator(norm, mode=cfg.latent_scaling_target)
    top, hist = TopActivations(h, cfg.top_k, dev), ActivationHistogram(h, device=dev)
    say(
        f"scanning {len(rows):,} tokens "
        f"(eval mode{', calibrated inference threshold' if model.arch.calibrates else ''})"
    )
    scan(norm, cache, rows, [stats, recon, scaling, top, hist], model.normalization(), cfg.chunk)
    arch_metrics, n_arch = architecture_metrics(norm, cache, rows, model.normalization(), cfg.chunk, dev)
    if arch_metrics:
        say("  " + ", ".join(f"{k} {v:.4f}" for k, v in arch_metrics.items()) + f" ({n_arch:,} tokens)")
    cols = latent_columns(norm, t, stats.result(), scaling.result("ft"), scaling.result("base"))
    two_model_extras(cols, t)
    layout = model.layout
    n_free = int((cols["kind"] == "free").sum())
    summary: dict[str, Any] = {
        "run_dir": str(cfg.run_dir),
        "arch": model.cfg.arch,
        "d_latent": h,
        "d_model": model.cfg.d_model,
        "models": model.cfg.model_names,
        "site": model.cfg.site or cache.meta.get("site"),
        "data": str(cache.path),
        "tokens_scanned": int(len(rows)),
        "norm_scale": scale,
        "space": SPACE_NOTE,
        "thresholds": dataclasses.asdict(t),
        "latent_scaling_target": cfg.latent_scaling_target,
        "reconstruction": recon.result(),
        "classes": class_counts(cols),
        "classes_scope": (
            f"free latents only ({n_free} of {h}): relative-norm classes and Latent Scaling "
            "thresholds; designated shared and dedicated latents are classed by construction "
            "(see layout)"
            if layout.constrained
            else f"all {h} latents"
        ),
        "dead": int(cols["dead"].sum()),
        "presence_ratio": presence_ratio_for_band(t.exclusive_band),
        "pattern_counts": pattern_counts(cols),
        "architecture_metrics": arch_metrics,
        "layout": layout_summary(cols, layout, layout.violations(model.W_enc, model.W_dec, model.norm_scale)),
    }
    if layout.constrained:
        say(format_layout(summary["layout"]))
    if other is not None:
        from .compare import compare_runs, format_comparison

        t_other = thresholds_for(
            other.cfg.arch, exclusive_band=cfg.exclusive_band, shared_band=cfg.shared_band
        )
        summary["comparison"], match_cols = compare_runs(
            model, other, cols["kind"], t_other, cfg.compare_threshold, cfg.run_dir, cfg.compare_to
        )
        cols.update(match_cols)
        say(format_comparison(summary["comparison"]))
    gt_text = None
    gt_path = find_ground_truth(cfg, cache, run_cfg)
    if gt_path is not None:
        from ..data.synthetic import GroundTruth

        gt = GroundTruth.load(gt_path)
        pc = planted_cosines(model, gt)
        best_cos, best = pc.max(1)
        cols["planted_feature"] = best.numpy().astype(np.int64)
        cols["planted_class"] = np.array(gt.classes, dtype=object)[best.numpy()]
        cols["planted_cos"] = best_cos.numpy().astype(np.float64)
        scores = classification_scores(cols["class"], model, gt, cfg.min_cos, cols["norm_class"])
        summary["ground_truth"] = scores
        gt_text = format_scores(scores)
        say(gt_text)
    # Contexts (token text when the cache has token ids and a tokenizer is known).
    meta = cache.meta
    col = meta.get("collect") or {}
    base_spec = cfg.base_model or col.get("base_model")
    ft_spec = cfg.ft_model or col.get("ft_model")
    tok = _tokenizer(base_spec, say)
    has_ids = bool(cache.read_index(np.array([0]))[0, 0] >= 0)
    vals, top_rows = top.result()
    cards = card_latents(cols, cfg.max_cards)
    contexts = build_contexts(
        norm,
        cache,
        model.normalization(),
        cards,
        vals,
        top_rows,
        tok if has_ids else None,
        cfg.context_left,
        cfg.context_right,
    )
    from .story import format_story, story_section

    story = story_section(cols, contexts, meta, tok if has_ids else None, t.latent_scaling)
    if story is not None:  # a corpus with a `domain` column (the demo's)
        summary["story"] = story
        say(format_story(story))
    # Spliced-in evaluation.
    summary["spliced"] = None
    site = cfg.site or model.cfg.site or meta.get("site")
    if cfg.spliced and base_spec and ft_spec and tok is not None and site:
        say(f"spliced-in evaluation at {site} ({cfg.eval_sequences} held-out sequences)")
        try:
            summary["spliced"] = run_spliced(cfg, model, meta, base_spec, ft_spec, site, tok, say)
            say(format_spliced(summary["spliced"]))
        except CrossCoderError as e:
            if cfg.base_model or cfg.ft_model or cfg.eval_data:
                raise
            # models recorded by the cache may be gone (another machine); the rest of the report stands
            summary["spliced_skipped"] = str(e)
            say(f"warning: spliced-in evaluation skipped: {e}")
    elif cfg.spliced:
        summary["spliced_skipped"] = (
            "needs --base-model/--ft-model (or a cache collected from models) and a site"
        )
        say(f"spliced-in evaluation skipped ({summary['spliced_skipped']})")
    spliced = summary["spliced"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_dir(out, replace=True) as tmp:  # an earlier report stays until the new one is complete
        write_table(cols, tmp)
        figs = plots.make_plots(cols, tmp, t, Path(cfg.run_dir))
        info = {
            k: summary[k]
            for k in (
                "run_dir",
                "arch",
                "d_latent",
                "d_model",
                "models",
                "site",
                "data",
                "tokens_scanned",
                "dead",
                "latent_scaling_target",
            )
        }
        info.update(
            {
                f"explained variance ({k[len('explained_variance_') :] or 'both'})": v
                for k, v in summary["reconstruction"].items()
            }
        )
        info.update(arch_metrics)
        notes = [_class_note(t)] + ([_layout_note(n_free, h)] if layout.constrained else [])
        names = [*(model.cfg.model_names or []), None, None][:2]
        render_report(
            tmp / "report.html",
            title=f"Crosscoder diff: {Path(cfg.run_dir).name}",
            info=info,
            counts=summary["classes"],
            cols=cols,
            figures=figs,
            contexts=contexts,
            spliced=spliced,
            ground_truth=gt_text,
            thresholds=summary["thresholds"],
            notes=notes,
            layout=summary["layout"] if layout.constrained else None,
            comparison=summary.get("comparison"),
            histograms=histogram_payload(hist.result(), cards),
            models=[
                f"{role} ({n})" if n else role for role, n in zip(("base", "fine-tuned"), names, strict=True)
            ],
        )
        if cfg.export:
            summary["exports"] = write_exports(tmp, cfg.export, cols, contexts, summary, cache)
        write_json(tmp / "summary.json", _json_safe(summary))
    _usual_permissions(out)
    say(f"report: {out / 'report.html'} ({summary['seconds']}s)")
    return summary


def _usual_permissions(out: Path) -> None:
    """Temporary files and folders are created private (0600/0700); give the report the umask's modes."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    out.chmod(0o777 & ~mask)
    for f in out.iterdir():
        f.chmod(0o666 & ~mask)
