"""HTML pieces of ``report.html`` for n models, several sites and checkpoint series (the page itself is
:func:`crosscoder.analysis.report.render_report`)."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from .blocks import BlockLayout
from .multi import MULTI_FLAGS


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if not np.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(head: list[str], rows: list[list[Any]], tid: str = "") -> str:
    h = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
    body = "".join(
        f"<tr><th>{_fmt(r[0])}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in r[1:]) + "</tr>" for r in rows
    )
    id_attr = f" id='{tid}'" if tid else ""
    return f"<table class='kv'{id_attr}>{h}{body}</table>"


def table_columns(cols: dict[str, np.ndarray]) -> list[str]:
    """Columns of the page's latent table (per-block norms and ``nu_reconstruction_<i>`` stay in
    ``latents.parquet``)."""
    names = ["latent", "class", "norm_class", "flag", "pattern", "n_present", "ls_model", "kind"]
    names += sorted(
        (c for c in cols if c.startswith("dec_norm_") and c[9:].isdigit()), key=lambda c: int(c[9:])
    )
    names += [c for c in cols if c.startswith("dec_norm_site_")]
    for pre in ("relative_norm_", "cos_sim_", "nu_error_"):
        names += sorted(
            (c for c in cols if c.startswith(pre) and c[len(pre) :].isdigit()),
            key=lambda c: int(c[len(pre) :]),
        )
    names += ["freq", "mean_act", "dead", "planted_feature", "planted_pattern", "planted_cos"]
    return [c for c in names if c in cols]


def counts_table(counts: dict[str, dict[str, int]]) -> str:
    head = ["class", "by pattern alone", "final"] + [f"lost: {f.replace('_', ' ')}" for f in MULTI_FLAGS]
    rows = [[c, r["norm"], r["final"]] + [r.get(f, "") for f in MULTI_FLAGS] for c, r in counts.items()]
    return _table(head, rows, "class-table")


def models_table(
    layout: BlockLayout, order: list[int], steps: list[int] | None, recon: dict[str, float]
) -> str:
    head = ["model", "name", "step", "blocks (site: width)", "explained variance"]
    rows = []
    for i in order:
        blocks = ", ".join(
            f"{layout.sites[layout.block_sites[b]]}: {layout.widths[b]}" for b in layout.blocks_of(i)
        )
        rows.append(
            [
                i,
                layout.model_names[i],
                steps[i] if steps else "",
                blocks,
                recon.get(f"explained_variance_{i}", ""),
            ]
        )
    return _table(head, rows, "models-table")


def patterns_table(
    counts: dict[str, int], confirmed: dict[str, int], layout: BlockLayout, top: int = 30
) -> str:
    head = ["pattern", "models", "live latents", "confirmed (class not other)"]
    rows = []
    for p, c in list(counts.items())[:top]:
        names = "" if p == "none" else ", ".join(layout.model_names[int(i)] for i in p.split("+"))
        rows.append([p, names, c, confirmed.get(p, 0)])
    more = (
        f"<p class='note'>{len(counts) - top} more patterns in summary.json.</p>" if len(counts) > top else ""
    )
    return _table(head, rows, "pattern-table") + more


def sites_table(shares: dict[str, Any], layout: BlockLayout, order: list[int]) -> str:
    head = ["model"] + list(layout.sites) + ["all sites"]
    rows = [
        [f"{i}: {layout.model_names[i]}"] + list(shares["per_block"][i]) + [shares["per_model"][i]]
        for i in order
    ]
    rows.append(["all models"] + list(shares["per_site"]) + [1.0])
    return (
        "<p class='note'>Share of the live latents' summed squared decoder norm (normalised space) per "
        "model and site.</p>" + _table(head, rows, "site-table")
    )


def checkpoints_table(info: dict[str, Any]) -> str:
    head = ["step", "model", "present", "appear (first present)", "vanish (last present)"]
    rows = [
        [s, m, p, a, v]
        for s, m, p, a, v in zip(
            info["steps"], info["models"], info["present"], info["appear"], info["vanish"], strict=True
        )
    ]
    return (
        f"<p class='note'>Models ordered by the step in their names. {info['contiguous']} live latents are "
        f"present on one unbroken run of checkpoints, {info['gapped']} have gaps.</p>"
        + _table(head, rows, "checkpoint-table")
    )


def spliced_table_multi(sp: dict[str, Any]) -> str:
    keys = ("ce_clean", "ce_spliced", "ce_zero", "frac_recovered", "kl_spliced", "kl_zero")
    rows = [[f"{i}: {r['name']}"] + [r[k] for k in keys] for i, r in enumerate(sp["models"])]
    return _table(["model"] + list(keys), rows, "spliced-table") + (
        f"<p>All sites of a model ({html.escape(', '.join(sp['sites']))}) replaced at once. "
        f"{sp['n_sequences']} held-out sequences, {sp['n_predictions']} predictions at replaced positions; "
        f"held out: {sp.get('held_out', '?')}.</p>"
    )


def class_note(t: Any, ratio: float) -> str:
    return (
        f"Patterns: latent present in model i when its decoder norm there is >= {ratio:.3g} x its largest "
        f"model norm (exclusive band {t.exclusive_band}: ratio band / (1 - band)). Classes: shared (every "
        "model), exclusive (one), partial (a proper subset of two or more). A latent claimed absent from a "
        f"model keeps its class only if it fired on >= {t.min_active} scanned tokens and Latent Scaling "
        "along its largest-norm model's decoder (ls_model) gives, for every absent model of the same width, "
        f"|nu_error| <= {t.nu_error_max} and |nu_reconstruction| <= {t.nu_reconstruction_max}; otherwise "
        "class other with a flag."
    )
