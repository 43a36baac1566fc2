"""``crosscoder analyze`` for a crosscoder over n models, several sites or blocks of mixed widths.

Called by :func:`crosscoder.analysis.pipeline.analyze` for every crosscoder but the classic pair. One
streaming pass (activation statistics, Latent Scaling into every model, top activations, explained
variance per model and block), the latent table with presence patterns and classes
(:mod:`crosscoder.analysis.multi`), the checkpoint order and timeline
(:mod:`crosscoder.analysis.checkpoints`), contexts, spliced-in CE/KL per model
(:mod:`crosscoder.analysis.spliced_multi`), figures
(:mod:`crosscoder.analysis.multi_plots`) and ``REPORT_DIR/{latents.parquet, latents.csv, summary.json,
report.html, *.png}``.
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
from .analyze_config import AnalyzeConfig, find_ground_truth
from .blocks import BlockLayout
from .checkpoints import split_spec
from .patterns import presence_ratio_for_band
from .summary_text import SPACE_NOTE, _json_safe
from .table import Thresholds

LS_NOTE = (
    "nu_<target>_<i> = beta of model i / beta of the latent's reference model (ls_model: its largest "
    "decoder norm), both fitted along the reference model's decoder direction (concatenated over its "
    "sites); NaN for models whose blocks have other widths than the reference's"
)


def _card_latents(cols: dict[str, np.ndarray], max_cards: int) -> list[int]:
    """All latents up to ``max_cards``, else those claimed absent somewhere (exclusive, partial) first,
    then by frequency."""
    h = len(cols["latent"])
    if h <= max_cards:
        return list(range(h))
    claims = np.isin(cols["norm_class"], ("exclusive", "partial"))
    order = np.lexsort((-np.nan_to_num(cols["freq"]), ~claims))
    return sorted(int(i) for i in order[:max_cards])


def model_specs(
    cfg: AnalyzeConfig, meta: dict[str, Any], layout: BlockLayout
) -> list[tuple[str, str | None]] | None:
    """``(spec, revision)`` of each model for token text and the spliced-in evaluation: ``--models`` (or,
    for two models, ``--base-model``/``--ft-model``), else the models a collected cache records
    (``meta.json["collect"]``: ``models``, ``revisions``), else None."""
    if cfg.models:
        if len(cfg.models) != layout.n_models:
            raise CrossCoderError(
                f"--models: the crosscoder has {layout.n_models} models, got {len(cfg.models)}"
            )
        return [(m, None) for m in cfg.models]
    if cfg.base_model and cfg.ft_model and layout.n_models == 2:  # two models at several sites / widths
        return [(cfg.base_model, None), (cfg.ft_model, None)]
    col = meta.get("collect") or {}
    if not col:  # not collected from models (a synthetic or converted pair): nothing to load
        return None
    specs = col.get("models") or [m.get("name") for m in meta.get("models") or []]
    if specs and len(specs) == layout.n_models and all(specs):
        revs = col.get("revisions") or [None] * len(specs)
        return [(str(s), r) for s, r in zip(specs, revs, strict=False)]
    return None


def _with_revision(spec: str, revision: str | None) -> str:
    """``spec@revision`` for :func:`crosscoder.data.collect.load_tokenizer` (an existing local path or a spec
    naming its revision: ``spec``)."""
    if not revision or split_spec(spec)[1] is not None or Path(spec).expanduser().exists():
        return spec
    return f"{spec}@{revision}"


def run_spliced_multi(
    cfg: AnalyzeConfig,
    model: CrossCoder,
    meta: dict[str, Any],
    layout: BlockLayout,
    specs: list[tuple[str, str | None]],
    tok: Any,
    say: Any,
) -> dict[str, Any]:
    """Spliced-in CE/KL per model (all of its sites replaced at once) on held-out sequences."""
    from ..data.collect import load_site_model
    from .pipeline import eval_sequences
    from .spliced_multi import spliced_eval_multi

    seqs, where = eval_sequences(cfg, meta, tok, say)
    dev = torch.device(cfg.device)
    sites = [cfg.site] if cfg.site and layout.n_sites == 1 else list(layout.sites)

    def load(i: int) -> Any:
        return load_site_model(specs[i][0], sites, tokenizer=tok, revision=specs[i][1], device=dev)

    def release(_: Any) -> None:
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    res = spliced_eval_multi(
        model.to(dev), layout, load, seqs, pad, tok.bos_token_id, cfg.eval_batch_size, release
    )
    res.update(where)
    return res


def analyze_multi(
    cfg: AnalyzeConfig, model: CrossCoder, cache: Any, layout: BlockLayout, t: Thresholds, t0: float, say: Any
) -> dict[str, Any]:
    """The n-model analysis (module docstring); returns the summary (also written to ``summary.json``)."""
    from ..io import atomic_dir, write_json
    from . import multi_plots, plots
    from . import multi_report as mr
    from .cards import ActivationHistogram, histogram_payload
    from .checkpoints import checkpoint_summary, model_order
    from .contexts import TopActivations, build_contexts
    from .export_formats import write_exports
    from .multi import multi_class_counts, multi_columns, pattern_counts, site_shares
    from .multi_scaling import BlockReconstructionStats, MultiScalingAccumulator
    from .pipeline import _tokenizer, _usual_permissions
    from .report import render_report
    from .scan import ActivationStats, architecture_metrics, normalised_model, scan, select_rows
    from .spliced_multi import format_spliced_multi
    from .table import write_table

    out = Path(cfg.out)
    dev = torch.device(cfg.device)
    norm = normalised_model(model).to(dev)
    rows = select_rows(cache.n_rows, cfg.max_tokens, cfg.seed)
    h = model.cfg.d_latent
    stats, recon = ActivationStats(h, dev), BlockReconstructionStats(layout, model.cfg.d_model)
    scaling = MultiScalingAccumulator(norm, layout, mode=cfg.latent_scaling_target)
    top, hist = TopActivations(h, cfg.top_k, dev), ActivationHistogram(h, device=dev)
    say(
        f"scanning {len(rows):,} tokens ({layout.n_models} models, {layout.n_sites} site(s), "
        f"{layout.n_blocks} blocks; eval mode)"
    )
    scan(norm, cache, rows, [stats, recon, scaling, top, hist], model.normalization(), cfg.chunk)
    arch_metrics, _ = architecture_metrics(norm, cache, rows, model.normalization(), cfg.chunk, dev)
    cols, present = multi_columns(norm, layout, t, stats.result(), scaling.result())
    live = ~cols["dead"]
    order, ckpt = checkpoint_summary(layout.model_names, layout.revisions, present, live)
    steps = model_order(layout.model_names, layout.revisions)[1]
    counts = multi_class_counts(cols)
    pcounts, confirmed = pattern_counts(cols), pattern_counts(cols, confirmed=True)
    ratio = presence_ratio_for_band(t.exclusive_band)
    summary: dict[str, Any] = {
        "run_dir": str(cfg.run_dir),
        "arch": model.cfg.arch,
        "d_latent": h,
        "d_model": model.cfg.d_model,
        "models": layout.model_names,
        "n_models": layout.n_models,
        "n_blocks": layout.n_blocks,
        "site": layout.sites[0],
        "sites": layout.sites,
        "blocks": layout.describe()["blocks"],
        "d_models": layout.widths,
        "data": str(cache.path),
        "tokens_scanned": int(len(rows)),
        "norm_scale": [float(v) for v in model.norm_scale.tolist()],
        "space": SPACE_NOTE,
        "thresholds": dataclasses.asdict(t),
        "presence_ratio": ratio,
        "latent_scaling_target": cfg.latent_scaling_target,
        "latent_scaling": LS_NOTE,
        "reconstruction": recon.result(),
        "classes": counts,
        "pattern_counts": pcounts,
        "pattern_counts_confirmed": confirmed,
        "dead": int(cols["dead"].sum()),
        "model_order": order,
        "checkpoints": ckpt,
        "architecture_metrics": arch_metrics,
    }
    if layout.n_sites > 1:
        summary["site_norm_share"] = site_shares(cols, layout)
    say(
        "classes: "
        + ", ".join(f"{c} {r['final']}" for c, r in counts.items())
        + "; top patterns: "
        + ", ".join(f"{p} {n}" for p, n in list(pcounts.items())[:6])
    )
    gt_path = find_ground_truth(cfg, cache)
    gt_text = None
    if gt_path is not None:  # a planted pair: did each planted feature get a latent with its pattern?
        summary["ground_truth_path"] = str(gt_path)
        gt_text = _ground_truth(model, gt_path, cols, cfg.min_cos, summary, say)
    meta = cache.meta
    specs = model_specs(cfg, meta, layout)
    tok = _tokenizer(_with_revision(*specs[0]), say) if specs else None
    has_ids = bool(cache.read_index(np.array([0]))[0, 0] >= 0)
    vals, top_rows = top.result()
    cards = _card_latents(cols, cfg.max_cards)
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
        proj_blocks=scaling.src_blocks,
    )
    summary["spliced"] = None
    if cfg.spliced and specs and tok is not None:
        say(f"spliced-in evaluation of {layout.n_models} models ({cfg.eval_sequences} held-out sequences)")
        try:
            summary["spliced"] = run_spliced_multi(cfg, model, meta, layout, specs, tok, say)
            say(format_spliced_multi(summary["spliced"]))
        except CrossCoderError as e:
            if cfg.models or cfg.base_model or cfg.eval_data:
                raise
            summary["spliced_skipped"] = str(e)
            say(f"warning: spliced-in evaluation skipped: {e}")
    elif cfg.spliced:
        summary["spliced_skipped"] = "needs --models (or a cache collected from models) and their tokenizer"
        say(f"spliced-in evaluation skipped ({summary['spliced_skipped']})")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_dir(out, replace=True) as tmp:  # an earlier report stays until the new one is complete
        write_table(cols, tmp)
        figs = {
            "norm_heatmap": multi_plots.norm_heatmap(cols, layout, order, tmp / "norm_heatmap.png"),
            "pattern_counts": multi_plots.pattern_bars(
                pcounts, confirmed, layout, tmp / "pattern_counts.png"
            ),
        }
        if layout.n_sites > 1:
            figs["site_norms"] = multi_plots.block_heatmap(cols, layout, order, tmp / "site_norms.png")
        if ckpt["series"]:
            figs["checkpoints"] = multi_plots.checkpoint_timeline(
                live, cols["pattern"], ckpt, order, tmp / "checkpoints.png"
            )
        figs["density"] = plots.density(cols, tmp / "density.png")
        tc = plots.training_curves(Path(cfg.run_dir) / "metrics.jsonl", tmp / "training.png")
        if tc is not None:
            figs["training"] = tc
        info = {
            k: summary[k]
            for k in ("run_dir", "arch", "d_latent", "d_model", "sites", "data", "tokens_scanned", "dead")
        }
        info["models"] = ", ".join(f"{i}: {n}" for i, n in enumerate(layout.model_names))
        info.update({k.replace("_", " "): v for k, v in summary["reconstruction"].items()})
        info.update(arch_metrics)
        sections = [
            (
                "Models" + (" (checkpoint order)" if ckpt["series"] else ""),
                mr.models_table(layout, order, steps, summary["reconstruction"]),
            ),
            ("Presence patterns", mr.patterns_table(pcounts, confirmed, layout)),
        ]
        if layout.n_sites > 1:
            sections.append(
                ("Decoder norm per model and site", mr.sites_table(summary["site_norm_share"], layout, order))
            )
        if ckpt["series"]:
            sections.append(("Checkpoints: latents appearing and vanishing", mr.checkpoints_table(ckpt)))
        render_report(
            tmp / "report.html",
            title=f"Crosscoder over {layout.n_models} models: {Path(cfg.run_dir).name}",
            info=info,
            counts=counts,
            cols=cols,
            figures=figs,
            contexts=contexts,
            spliced=summary["spliced"],
            ground_truth=gt_text,
            thresholds=summary["thresholds"],
            notes=[mr.class_note(t, ratio), LS_NOTE],
            counts_html=mr.counts_table(counts),
            sections=sections,
            columns=mr.table_columns(cols),
            class_names=("shared", "exclusive", "partial", "other"),
            flags=mr.MULTI_FLAGS,
            histograms=histogram_payload(hist.result(), cards),
            models=list(layout.model_names),
        )
        if cfg.export:
            summary["exports"] = write_exports(tmp, cfg.export, cols, contexts, summary, cache)
        write_json(tmp / "summary.json", _json_safe(summary))
    _usual_permissions(out)
    say(f"report: {out / 'report.html'} ({summary['seconds']}s)")
    return summary


def _ground_truth(
    model: Any, gt_path: Path, cols: dict[str, np.ndarray], min_cos: float, summary: dict, say: Any
) -> str | None:
    """Score the analysis' ``pattern`` column against planted presence patterns
    (:func:`~crosscoder.analysis.recovery.pattern_recovery`); adds ``planted_*`` columns and
    ``summary["ground_truth"]``. Returns the report's text, or None when the planted pair does not match."""
    from ..data.synthetic import GroundTruth
    from .recovery import format_pattern_recovery, pattern_recovery, planted_cosines

    gt = GroundTruth.load(gt_path)
    if gt.n_models != len(set(model.cfg.block_model_index())) or model.cfg.block_models is not None:
        summary["ground_truth_skipped"] = f"{gt_path}: planted for {gt.n_models} models, not this model axis"
        return None
    best_cos, best = planted_cosines(model, gt).max(1)  # per latent: its closest planted feature
    cols["planted_feature"] = best.numpy().astype(np.int64)
    cols["planted_pattern"] = np.asarray(gt.patterns, dtype=object)[best.numpy()]
    cols["planted_cos"] = best_cos.numpy().astype(np.float64)
    res = pattern_recovery(model, gt, cols["pattern"], min_cos=min_cos)
    summary["ground_truth"] = res
    text = format_pattern_recovery(res)
    say(text)
    return text
