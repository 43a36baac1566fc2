"""Settings of ``crosscoder analyze`` (:class:`AnalyzeConfig`) and what they resolve to: the saved run,
its paired data and, for a synthetic pair, the planted ground truth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CrossCoderError
from ..model import CrossCoder


@dataclass
class AnalyzeConfig:
    """Options of ``crosscoder analyze`` (the CLI flags)."""

    run_dir: str
    out: str
    cache: str | None = None
    base_data: str | None = None
    ft_data: str | None = None
    column: str = "activation"
    base_model: str | None = None
    ft_model: str | None = None
    models: list[str] | None = None  # n models: one spec per model (reference first), else the cache's
    site: str | None = None
    eval_data: str | None = None
    eval_sequences: int = 64
    eval_batch_size: int = 16
    spliced: bool = True
    max_tokens: int | None = 500_000
    chunk: int = 1024
    top_k: int = 8
    context_left: int = 10
    context_right: int = 3
    max_cards: int = 1000
    exclusive_band: float | None = None
    shared_band: float | None = None
    nu_error_max: float | None = None
    nu_reconstruction_max: float | None = None
    min_active: int | None = None
    latent_scaling: bool = True
    latent_scaling_target: str = "intercept"  # intercept | bias_free | literal (scaling.MODES)
    min_cos: float = 0.7
    ground_truth: str | None = None
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    overwrite: bool = False
    compare_to: str | None = None  # another crosscoder folder (same data): partition x class table
    compare_threshold: float = 0.9
    export: list[str] | None = None  # neuronpedia | saedashboard (export_formats.FORMATS)


def load_run(run_dir: str | Path) -> tuple[CrossCoder, dict[str, Any]]:
    """The saved crosscoder and its ``config.json`` (``{}`` for a folder with only the model)."""
    run_dir = Path(run_dir)
    model = CrossCoder.from_pretrained(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    return model, cfg


def resolve_cache(cfg: AnalyzeConfig, run_cfg: dict[str, Any]) -> Any:
    from .scan import open_pair

    if cfg.cache or cfg.base_data or cfg.ft_data:
        if (cfg.base_data is None) != (cfg.ft_data is None):
            raise CrossCoderError("--base-data and --ft-data must be given together")
        return open_pair(cfg.cache, cfg.base_data, cfg.ft_data, cfg.column), False
    recorded = (run_cfg.get("source") or {}).get("cache_path")
    if recorded and Path(recorded).is_dir():
        return open_pair(recorded), True
    raise CrossCoderError(
        "analyze: give --cache, or --base-data and --ft-data (the run records no usable cache)"
    )


def find_ground_truth(cfg: AnalyzeConfig, cache: Any, run_cfg: dict[str, Any] | None = None) -> Path | None:
    """Planted features of a synthetic pair: ``--ground-truth``, else ``CACHE/ground_truth`` (the built-in
    pair) or ``ground_truth`` beside ``--base-data``, or beside the ``base_data`` the run recorded in its
    ``config.json`` (``crosscoder synth`` output trained with ``--base-data``, analyzed with no data flag)."""
    cands = [Path(cfg.ground_truth)] if cfg.ground_truth else [Path(cache.path) / "ground_truth"]
    recorded = ((run_cfg or {}).get("data") or {}).get("base_data")
    base_data = cfg.base_data or recorded
    if base_data and not cfg.ground_truth:
        cands.append(Path(base_data).parent / "ground_truth")
    for c in cands:
        if (c / "ground_truth.json").is_file():
            return c
    if cfg.ground_truth:
        raise CrossCoderError(f"{cfg.ground_truth}: no ground_truth.json")
    return None
