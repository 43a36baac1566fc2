"""Text of the analysis summary: the terminal lines of a latent layout, the notes on the report page and
the JSON-safe form of ``summary.json``."""

from __future__ import annotations

from typing import Any

SPACE_NOTE = (
    "decoder norms, relative norms, delta norms and Latent Scaling are computed in the crosscoder's "
    "normalised training space (the saved folded weights are unfolded with the recorded norm_scale)"
)


def _class_note(t: Any) -> str:
    return (
        f"Classes: relative norm r < {t.exclusive_band} -> base_only, "
        f"r > {1 - t.exclusive_band:.2f} -> ft_only, |r - 0.5| <= {t.shared_band} -> shared, else other. "
        f"Norm-exclusive latents keep the call only if they fired on >= {t.min_active} scanned tokens "
        f"and Latent Scaling gives |nu_error| <= {t.nu_error_max} and "
        f"|nu_reconstruction| <= {t.nu_reconstruction_max} (nu = other model's beta / own model's beta)."
    )


def _layout_note(n_free: int, h: int) -> str:
    return (
        f"Latent layout: the class counts above cover the {n_free} free latents of {h}. Designated shared "
        "latents (decoder tied across models) are class shared by construction, dedicated latents class "
        "base_only / ft_only by construction (column kind); Latent Scaling still checks the dedicated "
        "partitions with the same thresholds (columns layout_check, layout_nu_error, "
        "layout_nu_reconstruction: nu along the latent's own model's decoder)."
    )


def format_layout(lay: dict[str, Any]) -> str:
    """Lines for the terminal: partition sizes and checks
    (:func:`~crosscoder.analysis.table.layout_summary`)."""
    p = lay["partitions"]
    lines = [
        f"latent layout: base_only {p['base_only']['n']}, ft_only {p['ft_only']['n']}, designated_shared "
        f"{p['designated_shared']['n']} (sparsity factor {lay['shared_sparsity_coeff']:g}), "
        f"free {p['free']['n']}"
    ]
    for k in ("base_only", "ft_only"):
        r = p[k]
        if r["n"] and "ok" in r:
            lines.append(
                f"  {k}: partition holds for {r['ok']} of {r['n']} by Latent Scaling (median |nu_error| "
                f"{r['nu_error_median_abs']:.3g}, "
                f"|nu_reconstruction| {r['nu_reconstruction_median_abs']:.3g}; "
                f"dead {r['dead']}, too rare {r['too_rare']})"
            )
    v = lay.get("violations")
    if v:
        lines.append(
            f"  saved weights: forbidden blocks max |w| enc {v['forbidden_enc']:.3g} "
            f"dec {v['forbidden_dec']:.3g}; "
            f"tied decoders max difference {v['tied_dec']:.3g} (normalised space)"
        )
    return "\n".join(lines)


def _json_safe(v: Any) -> Any:
    from .report import _clean

    return _clean(v)
