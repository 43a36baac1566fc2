"""``crosscoder analyze --export neuronpedia|saedashboard``: the latents that got top contexts, written in
the layouts of Neuronpedia's export/import files and of SAEDashboard's ``SaeVisData.save_json``.

Both are built only from what ``analyze`` already computed: the latent table (``cols``) and the top
contexts (:func:`crosscoder.analysis.contexts.build_contexts`: per latent the top-``k`` activating tokens
with a window of per-token activations). There is no unembedding, no logit or activation histogram and no
neuron/feature correlation table, so those fields stay empty (see docs/analysis.md, "Exporting to
Neuronpedia and SAEDashboard", for each field, the upstream sources checked and what is omitted).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CrossCoderError

FORMATS = ("neuronpedia", "saedashboard")
BATCH = 2048  # features per Neuronpedia batch file (as neuronpedia-utils' converters)


def parse_exports(values: Iterable[str] | None) -> list[str]:
    """``["neuronpedia,saedashboard", "neuronpedia"]`` -> ``["neuronpedia", "saedashboard"]`` (de-duplicated,
    in order); an unknown name raises a one-line :class:`CrossCoderError`."""
    out: list[str] = []
    for v in values or []:
        for name in (s.strip().lower() for s in str(v).split(",")):
            if not name:
                continue
            if name not in FORMATS:
                raise CrossCoderError(f"--export: unknown format {name!r} (choose from {', '.join(FORMATS)})")
            if name not in out:
                out.append(name)
    return out


def _slug(s: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-") or "model"


def _layer(site: Any) -> int:
    """Layer number of a module path (``transformer.h.1`` -> 1); 0 without one."""
    nums = re.findall(r"\d+", str(site or ""))
    return int(nums[-1]) if nums else 0


def _py(v: Any) -> Any:
    """A table cell as JSON: numpy scalars/arrays to Python, non-finite floats to ``None``."""
    if isinstance(v, np.ndarray):
        return [_py(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _extras(cols: dict[str, np.ndarray], j: int) -> dict[str, Any]:
    """Every latent-table column of latent ``j`` (decoder norms, relative norm, class, pattern...)."""
    return {k: _py(np.asarray(v)[j]) for k, v in cols.items()}


def _token_ids(cache: Any, item: dict[str, Any]) -> list[int] | None:
    """Token ids of a context window read back from the cache (``None`` when the cache has none or the
    window's rows are not the contiguous run of its sequence)."""
    if cache is None or item.get("seq", -1) < 0:
        return None
    n, mark, row = len(item["tokens"]), int(item["mark"]), int(item["row"])
    rows = np.arange(row - mark, row - mark + n)
    if rows[0] < 0 or rows[-1] >= cache.n_rows:
        return None
    idx = cache.read_index(rows)
    if np.any(idx[:, 1] != item["seq"]) or np.any(idx[:, 0] < 0):
        return None
    return [int(t) for t in idx[:, 0]]


def export_latents(cols: dict[str, np.ndarray], contexts: dict[int, list[dict[str, Any]]]) -> list[int]:
    """The exported latents: those with top contexts (``--max-cards``) that fired in the scan."""
    dead = np.asarray(cols.get("dead", np.zeros(len(cols["latent"]), bool)), bool)
    return sorted(j for j, items in contexts.items() if items and not dead[j])


def write_exports(
    tmp: Path,
    formats: Sequence[str] | None,
    cols: dict[str, np.ndarray],
    contexts: dict[int, list[dict[str, Any]]],
    summary: dict[str, Any],
    cache: Any = None,
) -> dict[str, str]:
    """Write each format of ``formats`` under ``tmp/<format>/`` (``tmp``: the report's temporary folder,
    renamed into place with the rest of the report). Returns ``{format: folder}`` (relative)."""
    names = parse_exports(formats)
    latents = export_latents(cols, contexts) if names else []
    written = {}
    for name in names:
        writer = _neuronpedia if name == "neuronpedia" else _saedashboard
        writer(tmp / name, latents, cols, contexts, summary, cache)
        written[name] = name
    return written


def _meta(summary: dict[str, Any]) -> tuple[str, str, str, list[str]]:
    models = [str(m) for m in (summary.get("models") or ["model"])]
    site = summary.get("site") or ""
    run = Path(str(summary.get("run_dir") or "run")).name
    source_id = f"{_layer(site)}-crosscoder-{_slug(run)}"
    return _slug(models[0]), source_id, str(site), models


def _write_jsonl_gz(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, allow_nan=False) + "\n")


def _activation_row(model_id: str, source_id: str, j: int, k: int, item: dict[str, Any]) -> dict[str, Any]:
    values = [float(v) for v in item["acts"]]
    top = int(np.argmax(values)) if values else 0
    return {
        "id": f"{model_id}@{source_id}:{j}:{k}",
        "modelId": model_id,
        "layer": source_id,
        "index": j,
        "tokens": list(item["tokens"]),
        "values": values,
        "maxValue": values[top] if values else 0.0,
        "maxValueTokenIndex": top,
        "minValue": min(values) if values else 0.0,
        "qualifyingTokenIndex": int(item["mark"]),
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
        "lossValues": [],
        "logitContributions": None,
        "binMin": None,
        "binMax": None,
        "binContains": None,
        "dataIndex": None,
        "dataSource": None,
    }


def _neuronpedia(
    out: Path, latents: list[int], cols: dict, contexts: dict, summary: dict[str, Any], cache: Any
) -> None:
    """``out/<modelId>/<sourceId>/``: ``source.jsonl``, ``features/batch-N.jsonl.gz``,
    ``activations/batch-N.jsonl.gz`` (Neuronpedia's import layout) and ``crosscoder/batch-N.jsonl.gz``
    (the crosscoder's own per-latent values, keyed like the features)."""
    model_id, source_id, site, models = _meta(summary)
    root = out / model_id / source_id
    root.mkdir(parents=True, exist_ok=True)
    source = {
        "id": source_id,
        "modelId": model_id,
        "setName": source_id.split("-", 1)[1],
        "hookName": site,
        "visibility": "PRIVATE",
        "dataset": str(summary.get("data") or ""),
        "num_prompts": None,
        "num_tokens_in_prompt": None,
        "crosscoder_models": models,
        "crosscoder_tokens_scanned": summary.get("tokens_scanned"),
        "createdAt": datetime.now(timezone.utc).isoformat(),
    }
    (root / "source.jsonl").write_text(json.dumps(source, default=str) + "\n")
    empty = ("topkCosSimIndices", "topkCosSimValues", "neuron_alignment_indices", "neuron_alignment_values")
    empty += ("neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson")
    empty += ("correlated_neurons_l1", "correlated_features_indices", "correlated_features_pearson")
    empty += ("correlated_features_l1", "neg_str", "neg_values", "pos_str", "pos_values")
    empty += ("freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights")
    empty += ("logits_hist_data_bar_values", "decoder_weights_dist", "vector")
    for b, lo in enumerate(range(0, max(len(latents), 1), BATCH)):
        part = latents[lo : lo + BATCH]
        feats, acts, extra = [], [], []
        for j in part:
            key = {"modelId": model_id, "layer": source_id, "index": j}
            feats.append(
                {
                    **key,
                    "maxActApprox": _py(np.asarray(cols["max_act"])[j]) if "max_act" in cols else None,
                    "frac_nonzero": _py(np.asarray(cols["freq"])[j]) if "freq" in cols else None,
                    "hasVector": False,
                    "vectorLabel": None,
                    "hookName": site,
                    **{k: [] for k in empty},
                }
            )
            acts += [_activation_row(model_id, source_id, j, k, it) for k, it in enumerate(contexts[j])]
            extra.append({**key, "crosscoder": _extras(cols, j)})
        _write_jsonl_gz(root / "features" / f"batch-{b}.jsonl.gz", feats)
        _write_jsonl_gz(root / "activations" / f"batch-{b}.jsonl.gz", acts)
        _write_jsonl_gz(root / "crosscoder" / f"batch-{b}.jsonl.gz", extra)


def _saedashboard(
    out: Path, latents: list[int], cols: dict, contexts: dict, summary: dict[str, Any], cache: Any
) -> None:
    """``out/sae_vis_data.json``: ``SaeVisData.save_json``'s ``{"feature_data_dict", "feature_stats"}``
    with the top-activation sequence group filled, plus ``crosscoder_extras`` per latent."""
    out.mkdir(parents=True, exist_ok=True)
    freq = np.asarray(cols.get("freq", np.full(len(cols["latent"]), np.nan)), np.float64)
    max_act = np.asarray(cols.get("max_act", np.full(len(cols["latent"]), np.nan)), np.float64)
    feature_data: dict[str, Any] = {}
    for j in latents:
        seqs = []
        for k, it in enumerate(contexts[j]):
            seqs.append(
                {
                    "original_index": k,
                    "qualifying_token_index": int(it["mark"]),
                    "token_ids": _token_ids(cache, it) or [],
                    "feat_acts": [float(v) for v in it["acts"]],
                    "loss_contribution": [],
                    "token_logits": [],
                    "top_token_ids": [],
                    "top_logits": [],
                    "bottom_token_ids": [],
                    "bottom_logits": [],
                    "crosscoder_tokens": list(it["tokens"]),
                }
            )
        top = max((float(it["act"]) for it in contexts[j]), default=0.0)
        density = float(freq[j]) if np.isfinite(freq[j]) else 0.0
        feature_data[str(j)] = {
            "feature_tables_data": {},
            "acts_histogram_data": {
                "bar_heights": [],
                "bar_values": [],
                "tick_vals": [],
                "title": f"ACTIVATIONS<br>DENSITY = {100 * density:.3f}%",
            },
            "logits_table_data": {},
            "logits_histogram_data": {"bar_heights": [], "bar_values": [], "tick_vals": [], "title": None},
            "sequence_data": {
                "seq_group_data": [{"title": f"TOP ACTIVATIONS<br>MAX = {top:.3f}", "seq_data": seqs}]
            },
            "crosscoder_extras": _extras(cols, j),
        }
    data = {
        "feature_data_dict": feature_data,
        "feature_stats": {
            "feature_indices": latents,
            "max": [_py(max_act[j]) for j in latents],
            "frac_nonzero": [_py(freq[j]) for j in latents],
        },
        "crosscoder": {
            "models": [str(m) for m in (summary.get("models") or [])],
            "site": summary.get("site"),
            "run_dir": str(summary.get("run_dir") or ""),
            "tokens_scanned": summary.get("tokens_scanned"),
        },
    }
    (out / "sae_vis_data.json").write_text(json.dumps(data, allow_nan=False, default=str))
