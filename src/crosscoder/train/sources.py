"""Pick the batch source of a run: paired cache, HF dataset pair, on-the-fly buffer, or synthetic pair."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..data.loader import BatchSource, CacheBatches
from ..data.paired import PairedCache
from ..distributed import LOCAL, Dist
from ..errors import DataError

SYNTH_MAX_ROWS = 2_000_000


def estimate_norm_scale(cache: PairedCache, sample: int, seed: int) -> list[float]:
    """sqrt(d_model) / mean row norm per model, from stored statistics or a seeded sample."""
    if cache.stats and cache.stats.get("count", 0) > 0:
        return cache.norm_scale()
    rows = np.random.default_rng(seed).choice(cache.n_rows, size=min(sample, cache.n_rows), replace=False)
    norms = cache.read(np.sort(rows)).norm(dim=-1).double().mean(0)
    return [float(cache.d_model ** 0.5 / max(v, 1e-12)) for v in norms.tolist()]


def synthetic_cache(cfg: RunConfig) -> PairedCache:
    """The built-in synthetic pair (cached under the crosscoder cache folder, deterministic)."""
    from ..data.hf import cache_root
    from ..data.synthetic import SyntheticConfig, write_cache

    scfg = SyntheticConfig()
    rows = min(cfg.train.num_tokens, SYNTH_MAX_ROWS) + cfg.train.val_tokens
    key = hashlib.sha256(json.dumps([asdict(scfg), rows]).encode()).hexdigest()[:16]
    path = cache_root() / "synthetic" / key
    if not (path / "meta.json").exists():
        try:
            write_cache(scfg, rows, path)
        except OSError:  # another process (or rank) finished the same deterministic cache first
            if not (path / "meta.json").exists():
                raise
    return PairedCache(path, verify="size")


def make_source(cfg: RunConfig, device: torch.device, dist: Dist = LOCAL) -> tuple[BatchSource, dict[str, Any]]:
    """Build the run's batch source (this rank's share under torchrun); also returns information
    recorded in ``config.json``."""
    d = cfg.data
    if d.base_model or d.ft_model or d.dataset:
        if dist.enabled:
            raise DataError("on-the-fly training runs on one process; under torchrun, `crosscoder collect` "
                            "a cache first and train with --cache")
        missing = [n for n in ("base_model", "ft_model", "site", "dataset") if not getattr(d, n)]
        if missing:
            raise DataError("on-the-fly training needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        from ..data.buffer import buffer_source

        src = buffer_source(cfg, device)
        return src, dict(src.info)
    info: dict[str, Any] = {}
    if d.cache:
        cache = PairedCache(d.cache, verify=d.verify_cache)
        info["source"] = {"cache": str(d.cache)}
    elif d.base_data or d.ft_data:
        if not (d.base_data and d.ft_data):
            raise DataError("--base-data and --ft-data must be given together")
        from ..data.hf import pair_to_cache

        cache = pair_to_cache(d.base_data, d.ft_data, d.column, d.skip_nonfinite, verify=d.verify_cache)
        info["source"] = {"base_data": d.base_data, "ft_data": d.ft_data, "column": d.column}
        info["skipped_nonfinite"] = cache.meta.get("skipped_nonfinite", 0)
    else:
        cache = synthetic_cache(cfg)
        info["source"] = {"synthetic": True}
        info["ground_truth"] = str(cache.path / "ground_truth")
    info["cache_path"] = str(cache.path)
    info["fingerprints"] = {"cache": _cache_fingerprint(cache)}
    models = cache.meta.get("models") or []
    info["model_names"] = [m.get("name") for m in models] or None
    info["site"] = cache.meta.get("site")
    if cache.n_rows <= cfg.train.val_tokens:
        raise DataError(f"{cache.path}: {cache.n_rows} rows, not more than val_tokens={cfg.train.val_tokens}")
    scale = (estimate_norm_scale(cache, d.norm_sample_tokens, cfg.train.seed) if d.norm_scaling
             else [1.0] * cache.n_models)
    src = CacheBatches(cache, cfg.train.batch_size, cfg.train.seed, scale, val_tokens=cfg.train.val_tokens,
                       prefetch=d.prefetch, device=device, info=info, rank=dist.rank, world_size=dist.world_size)
    return src, info


def _cache_fingerprint(cache: PairedCache) -> str:
    h = hashlib.sha256()
    for sh in cache.meta["shards"]:
        h.update(f"{sh['rows']}:{sh.get('acts_crc32')}:{sh.get('index_crc32')}".encode())
    return h.hexdigest()[:16]
