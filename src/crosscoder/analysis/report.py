"""``report.html``: one self-contained page (inline CSS, JS, PNGs as data URIs, data as embedded JSON;
nothing is fetched from the network).

Sections: summary (class counts by norm alone and after Latent Scaling, the latent layout and its
partition checks when the crosscoder has one, the comparison with another crosscoder when asked,
reconstruction, spliced-in evaluation, ground truth when known), the figures, a sortable and
filterable latent table (text search over latent index, class, flag, pattern, class reason and context
text; filters by class, class by norm, flag, pattern, frequency), and a card per latent, shown when a row
is clicked (the reason for its class, its activation histogram, decoder norms per model, Latent Scaling
nu values, top activating contexts with the activating token marked: :mod:`crosscoder.analysis.cards`,
drawn by :data:`crosscoder.analysis.card_assets.CARD_JS`); the cards of the first rows of the current
view are listed below the table. Script errors are written into ``#js-errors`` (browser tests read the
DOM).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .card_assets import CARD_CSS, CARD_JS
from .cards import card_columns
from .report_assets import CSS, HOOK, JS

TABLE_COLUMNS = (
    "latent",
    "class",
    "norm_class",
    "flag",
    "kind",
    "layout_check",
    "relative_norm",
    "delta_norm",
    "cos_sim",
    "dec_norm_base",
    "dec_norm_ft",
    "pattern",
    "freq",
    "mean_act",
    "beta_ratio_error",
    "beta_ratio_reconstruction",
    "beta_ratio_error_mirror",
    "beta_ratio_reconstruction_mirror",
    "layout_nu_error",
    "layout_nu_reconstruction",
    "dead",
    "planted_class",
    "planted_cos",
    "match_latent",
    "match_cos",
    "match_class",
)
CLASS_OPTIONS = ("base_only", "shared", "ft_only", "other")
FLAG_OPTIONS = ("complete_shrinkage", "latent_decoupling", "scaling_undefined", "too_rare", "dead")
LAYOUT_COLUMNS = ("kind", "layout_check", "layout_nu_error", "layout_nu_reconstruction")


def _clean(v: Any) -> Any:
    """JSON-safe values: NaN/inf -> None, numpy scalars -> Python, floats rounded to 5 significant digits."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return None if not math.isfinite(f) else float(f"{f:.5g}")
    if isinstance(v, Path):
        return str(v)
    return v


def table_rows(
    cols: dict[str, np.ndarray], columns: Sequence[str] = TABLE_COLUMNS, hidden: Sequence[str] = ()
) -> dict[str, Any]:
    """Table data for the page: ``{"columns": [...], "hidden": [...], "rows": [[...], ...]}`` (one row per
    latent, one value per column); ``hidden`` columns (read by the cards) follow ``columns`` in each row
    and are not shown in the table."""
    free_only = "kind" in cols and bool(np.all(cols["kind"] == "free"))  # no layout: no layout columns shown
    names = [c for c in columns if c in cols and not (free_only and c in LAYOUT_COLUMNS)]
    extra = [c for c in hidden if c in cols and c not in names]
    rows = [
        [_clean(cols[c][i].item() if hasattr(cols[c][i], "item") else cols[c][i]) for c in names + extra]
        for i in range(len(cols["latent"]))
    ]
    return {"columns": names + extra, "hidden": extra, "rows": rows}


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items()
    )
    return f"<table class='kv'>{rows}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(_clean(v))
    return str(v)


def _counts_table(counts: dict[str, dict[str, int]]) -> str:
    head = (
        "<tr><th>class</th><th>by relative norm alone</th><th>final (after Latent Scaling)</th>"
        "<th>norm-exclusive kept</th><th>demoted: complete shrinkage</th><th>latent decoupling</th>"
        "<th>scaling undefined</th><th>too rare</th><th>dead</th></tr>"
    )
    body = ""
    for c, r in counts.items():
        cells = [
            r.get("norm", ""),
            r.get("final", ""),
            r.get("surviving", ""),
            r.get("complete_shrinkage", ""),
            r.get("latent_decoupling", ""),
            r.get("scaling_undefined", ""),
            r.get("too_rare", ""),
            r.get("dead", ""),
        ]
        body += f"<tr><th>{c}</th>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>"
    return f"<table class='kv'>{head}{body}</table>"


def _layout_table(lay: dict[str, Any]) -> str:
    """Partition sizes, live latents and the dedicated partitions' Latent Scaling check."""
    checks = ("ok", "complete_shrinkage", "latent_decoupling", "scaling_undefined", "too_rare", "dead")
    head = (
        "<tr><th>partition (kind)</th><th>latents</th><th>range</th><th>class by construction</th>"
        "<th>live</th>"
        + "".join(f"<th>check: {c}</th>" for c in checks)
        + "<th>median |nu_error|</th><th>median |nu_reconstruction|</th></tr>"
    )
    by_cons = {
        "base_only": "base_only",
        "ft_only": "ft_only",
        "designated_shared": "shared",
        "free": "relative norm + Latent Scaling",
    }
    body = ""
    for k, r in lay["partitions"].items():
        lo, hi = lay["ranges"][k]
        cells = [r["n"], f"{lo}-{hi - 1}" if hi > lo else "", by_cons[k], r.get("live", "")]
        cells += [r.get(c, "") for c in checks]
        cells += [
            _fmt(r[key]) if key in r else ""
            for key in ("nu_error_median_abs", "nu_reconstruction_median_abs")
        ]
        body += (
            f"<tr><th class='k-{k}'>{k}</th>"
            + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells)
            + "</tr>"
        )
    extra = ""
    ds = lay["partitions"].get("designated_shared", {})
    if ds.get("n"):
        extra += (
            "<p class='note'>Designated shared latents: "
            f"sparsity factor {lay['shared_sparsity_coeff']:g} relative to the others; "
            f"largest |r - 0.5| {_fmt(ds.get('max_abs_relative_norm_minus_half'))}, "
            f"smallest decoder cosine {_fmt(ds.get('min_cos_sim'))}, "
            f"median nu_error {_fmt(ds.get('nu_error_median'))} "
            "(base beta / fine-tuned beta: ~1 when both models use the vector).</p>"
        )
    v = lay.get("violations")
    if v:
        extra += (
            "<p class='note'>Saved weights: largest |entry| of a forbidden block: "
            f"encoder {_fmt(v['forbidden_enc'])}, decoder {_fmt(v['forbidden_dec'])}; "
            "largest difference between the copies of a tied decoder vector "
            f"in the normalised space {_fmt(v['tied_dec'])} (0 by construction).</p>"
        )
    return f"<table class='kv' id='layout-table'>{head}{body}</table>{extra}"


def _comparison_table(cmp: dict[str, Any]) -> str:
    """Partition x relative-norm class of the best matches in the other crosscoder, and the reverse."""
    classes = ("base_only", "shared", "ft_only", "other")
    head = (
        "<tr><th>partition of this run</th><th>latents</th><th>matched</th><th>unmatched</th>"
        + "".join(f"<th>match is {c}</th>" for c in classes)
        + "<th>median best cosine</th></tr>"
    )
    body = ""
    for p, r in cmp["table"].items():
        cells = (
            [r["n"], r["matched"], r["unmatched"]] + [r[c] for c in classes] + [_fmt(r["median_best_cos"])]
        )
        body += f"<tr><th class='k-{p}'>{p}</th>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>"
    parts = sorted(
        {k for r in cmp["reverse"].values() for k in r if k not in ("n", "matched")},
        key=lambda k: ("base_only", "ft_only", "designated_shared", "free").index(k),
    )
    rhead = (
        "<tr><th>class in the other run</th><th>latents</th><th>matched here</th>"
        + "".join(f"<th>in {k}</th>" for k in parts)
        + "</tr>"
    )
    rbody = "".join(
        f"<tr><th class='c-{c}'>{c}</th><td>{r['n']}</td><td>{r['matched']}</td>"
        + "".join(f"<td>{r.get(k, '')}</td>" for k in parts)
        + "</tr>"
        for c, r in cmp["reverse"].items()
    )
    same = {
        True: "yes (same data fingerprints)",
        False: "NO: the runs record different data",
        None: "unknown (no fingerprints recorded)",
    }[cmp.get("same_data")]
    return (
        f"<p class='note'>Other run: {html.escape(str(cmp['other_run']))} ({html.escape(cmp['other_arch'])}, "
        f"{cmp['other_d_latent']} latents); same data: {same}. "
        f"Similarity: {html.escape(cmp['similarity'])}; a latent matches when its best similarity is "
        f"&ge; {cmp['threshold']:g}. Class of the match: {html.escape(cmp['other_class_rule'])}.</p>"
        f"<table class='kv' id='comparison-table'>{head}{body}</table>"
        "<p class='note'>Reverse: the other run's latents by class, with a match in this run "
        "(same similarity, same threshold) and the partition of that match.</p>"
        f"<table class='kv' id='comparison-reverse'>{rhead}{rbody}</table>"
    )


def _spliced_table(sp: dict[str, Any]) -> str:
    if "models" in sp:  # n models / several sites
        from .multi_report import spliced_table_multi

        return spliced_table_multi(sp)
    keys = ("ce_clean", "ce_spliced", "ce_zero", "frac_recovered", "kl_spliced", "kl_zero")
    head = "<tr><th>model</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    body = "".join(
        f"<tr><th>{m}</th>" + "".join(f"<td>{_fmt(sp[m][k])}</td>" for k in keys) + "</tr>"
        for m in ("base", "ft")
    )
    s = sp["ft_swap"]
    extra = (
        f"<p>Fine-tuned model with the <b>base</b> reconstruction swapped in: CE {s['ce_base_recon']:.4f} "
        f"(KL to clean {s['kl_base_recon']:.4f}); with the base model's raw activation: CE "
        f"{s['ce_base_acts']:.4f} (KL {s['kl_base_acts']:.4f}). {sp['n_sequences']} held-out sequences, "
        f"{sp['n_predictions']} predictions at replaced positions; held out: {sp.get('held_out', '?')}.</p>"
    )
    return f"<table class='kv'>{head}{body}</table>{extra}"


def render_report(
    path: Path,
    *,
    title: str,
    info: dict[str, Any],
    counts: dict[str, dict[str, int]],
    cols: dict[str, np.ndarray],
    figures: dict[str, Path],
    contexts: dict[int, list[dict[str, Any]]],
    spliced: dict[str, Any] | None = None,
    ground_truth: str | None = None,
    thresholds: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    layout: dict[str, Any] | None = None,
    comparison: dict[str, Any] | None = None,
    counts_html: str | None = None,
    sections: Sequence[tuple[str, str]] = (),
    columns: Sequence[str] = TABLE_COLUMNS,
    class_names: Sequence[str] = CLASS_OPTIONS,
    flags: Sequence[str] = FLAG_OPTIONS,
    histograms: dict[str, Any] | None = None,
    models: Sequence[str] | None = None,
) -> Path:
    """Write the page to ``path`` (atomically). ``layout``: :func:`~crosscoder.analysis.table.layout_summary`
    (a constrained crosscoder); ``comparison``: :func:`~crosscoder.analysis.compare.compare_runs`' summary.
    For n models (:mod:`crosscoder.analysis.multi_report`): ``counts_html`` replaces the class table,
    ``sections`` ``(title, html)`` follow it, ``columns`` are the latent table's columns, ``class_names``
    and ``flags`` the filter choices. ``histograms``: :func:`~crosscoder.analysis.cards.histogram_payload`;
    ``models``: a label per model for the cards' decoder-norm bars."""
    from ..io import atomic_path

    data = {
        "table": table_rows(cols, columns, card_columns(cols)),
        "contexts": {str(k): v for k, v in contexts.items()},
        "hist": histograms or {"bins": 0, "latents": {}},
        "models": list(models or []),
        "thresholds": thresholds or {},
    }
    payload = json.dumps(_clean(data), separators=(",", ":")).replace("</", "<\\/")
    opts = lambda vals: "<option value=''>all</option>" + "".join(f"<option>{v}</option>" for v in vals)  # noqa: E731
    figs = "".join(_img(p) for p in figures.values())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}{CARD_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div id='js-errors' data-count='0'></div><script>{HOOK}</script>",
        "<div class='note'>status: <span id='status'>loading</span></div>",
        "<div class='overview'><h2>Summary</h2>",
        _kv_table(info),
        "<p class='note'>Decoder norms, relative norms, Δnorm and Latent Scaling are computed in the "
        "crosscoder's normalised training space: the saved (folded) weights are unfolded with the "
        "recorded norm_scale factors.</p>",
        "<h3>Latent classes" + (" (free latents only)" if layout else "") + "</h3>",
        counts_html if counts_html is not None else _counts_table(counts),
    ]
    for head, body in sections:
        parts += [f"<h3>{html.escape(head)}</h3>", body]
    if layout:
        parts += ["<h3>Latent layout (classes by construction)</h3>", _layout_table(layout)]
    if comparison:
        parts += [
            "<h3 id='comparison'>Comparison with another crosscoder</h3>",
            _comparison_table(comparison),
        ]
    if thresholds:
        parts += ["<p class='note'>Thresholds: " + html.escape(json.dumps(_clean(thresholds))) + "</p>"]
    for n in notes or []:
        parts.append(f"<p class='note'>{html.escape(n)}</p>")
    if spliced:
        parts += ["<h3>Spliced-in evaluation</h3>", _spliced_table(spliced)]
    if ground_truth:
        parts += ["<h3>Planted ground truth</h3>", f"<pre>{html.escape(ground_truth)}</pre>"]
    parts += [
        "<h2>Figures</h2>",
        f"<div class='figs'>{figs}</div></div>",
        "<h2 id='latents-section'>Latents</h2><div id='controls'>",
        "<label>search <input id='f-search' type='search' placeholder='latent, class, reason, context text' "
        "style='width:240px'></label>",
        f"<label>class <select id='f-class'>{opts(class_names)}</select></label>",
        f"<label>class by norm <select id='f-norm'>{opts(class_names)}</select></label>",
        "<label>pattern <input id='f-pattern' style='width:70px'></label>" if "pattern" in cols else "",
        (
            "<label>kind <select id='f-kind'>"
            f"{opts(('free', 'designated_shared', 'base_only', 'ft_only'))}</select></label>"
            if layout
            else ""
        ),
        f"<label>flag <select id='f-flag'>{opts(('any', *flags))}</select></label>",
        "<label>min freq <input id='f-freq' type='number' step='0.0001' value='0' "
        "style='width:80px'></label>",
        "<label>latent # <input id='f-latent' style='width:70px'></label>",
        "<label><input id='f-alive' type='checkbox' checked> live only</label>",
        "<label>rows <input id='f-limit' type='number' value='200' style='width:70px'></label>",
        "<label>cards <input id='f-cards' type='number' value='12' style='width:60px'></label>",
        "<span id='count'></span></div>",
        "<div id='card'><p class='note'>Click a row to show its card.</p></div>",
        "<div style='max-height:520px;overflow:auto'><table id='latents'>"
        "<thead><tr id='thead'></tr></thead><tbody id='tbody'></tbody></table></div>",
        "<h2>Latent cards (first rows of the current view)</h2><div id='cards'></div>",
        f"<script type='application/json' id='report-data'>{payload}</script>",
        f"<script>{CARD_JS}</script><script>{JS}</script></body></html>",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(parts), encoding="utf-8")
    return path
