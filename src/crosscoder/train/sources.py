"""Pick the batch source of a run: paired cache, HF dataset pair, on-the-fly buffer, or synthetic pair."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..config import DEFAULT_VAL_TOKENS, RunConfig
from ..data.loader import BatchSource, CacheBatches
from ..data.paired import PairedCache
from ..distributed import LOCAL, Dist
from ..errors import DataError
from ..normalization import Normalization, estimate_streaming

SYNTH_MAX_ROWS = 2_000_000
NORM_CHUNK_BYTES = 32 << 20  # float32 bytes read at a time to estimate the normalisation (x3 in float64)


def norm_chunk_rows(cache: PairedCache) -> int:
    """Rows per chunk of the normalisation passes: ``NORM_CHUNK_BYTES`` of float32 rows (at most 8192), so
    memory stays bounded whatever the width (8192 rows of 2 x 2304 were 150 MB, x3 with the float64
    copies)."""
    return max(64, min(8192, NORM_CHUNK_BYTES // (4 * cache.n_models * cache.d_model)))


def estimate_normalization(
    cache: PairedCache, center: bool, scaling: bool, sample: int, seed: int
) -> Normalization:
    """The run's input map ``norm_scale * (x - norm_mean)`` (see :mod:`crosscoder.normalization`).

    Means come from the cache's exact float64 statistics when it has them, norms from a seeded sample of
    ``sample`` rows (``E||x - mu||`` is not a stored statistic); without centring, stored mean norms are
    used directly when present (the plan's mean-inclusive scaling).
    """
    has_stats = bool(cache.stats and cache.stats.get("count", 0) > 0)
    if not center and not scaling:
        return Normalization.identity(cache.n_models)
    if not center and has_stats:
        return Normalization(cache.norm_scale())
    rows = np.sort(
        np.random.default_rng(seed).choice(cache.n_rows, size=min(sample, cache.n_rows), replace=False)
    )
    mean = torch.tensor(cache.stats["mean"], dtype=torch.float64) if has_stats and center else None

    def chunks():  # the sample in chunks: memory stays at one chunk whatever d_model
        step = norm_chunk_rows(cache)
        for lo in range(0, len(rows), step):
            yield cache.read(rows[lo : lo + step])

    return estimate_streaming(chunks, center=center, scaling=scaling, mean=mean)


def training_space_mean(cache: PairedCache, norm: Normalization, sample: int, seed: int) -> torch.Tensor:
    """``[n_models, d_model]``: the data mean after ``norm`` (0 when centred), for ``b_dec_init="mean"``."""
    if norm.mean is not None:
        return torch.zeros(cache.n_models, cache.d_model)
    if cache.stats and cache.stats.get("count", 0) > 0:
        mu = torch.tensor(cache.stats["mean"], dtype=torch.float32)
    else:
        rows = np.sort(
            np.random.default_rng(seed).choice(cache.n_rows, size=min(sample, cache.n_rows), replace=False)
        )
        total = torch.zeros(cache.n_models, cache.d_model, dtype=torch.float64)
        step = norm_chunk_rows(cache)
        for lo in range(0, len(rows), step):
            total += cache.read(rows[lo : lo + step]).double().sum(0)
        mu = (total / len(rows)).float()
    return norm.apply(mu[None])[0]


def resolve_val_tokens(cfg: RunConfig, n_rows: int, where: str) -> int:
    """The held-out rows: ``val_tokens`` when given, else ``min(65536, n_rows // 10)`` (printed when the
    data is too small for 65,536). An explicit request that leaves less than one batch to train on is
    refused."""
    tc = cfg.train
    if tc.val_tokens is not None:
        if n_rows - tc.val_tokens < tc.batch_size:
            raise DataError(
                f"{where}: {n_rows} rows, too few for val_tokens={tc.val_tokens} plus one batch "
                f"({tc.batch_size}); lower --val-tokens"
            )
        return tc.val_tokens
    val = min(DEFAULT_VAL_TOKENS, n_rows // 10)
    if val < DEFAULT_VAL_TOKENS:
        print(
            f"note: {where} has {n_rows} rows; holding out {val} (10%) for validation instead of "
            f"{DEFAULT_VAL_TOKENS} (set --val-tokens to choose)"
        )
    return val


def synthetic_cache(cfg: RunConfig) -> PairedCache:
    """The built-in synthetic pair (cached under the crosscoder cache folder, deterministic)."""
    from ..data.hf import cache_root
    from ..data.synthetic import SyntheticConfig, write_cache

    scfg = SyntheticConfig()
    val = DEFAULT_VAL_TOKENS if cfg.train.val_tokens is None else cfg.train.val_tokens
    rows = min(cfg.train.num_tokens, SYNTH_MAX_ROWS) + val
    key = hashlib.sha256(json.dumps([asdict(scfg), rows]).encode()).hexdigest()[:16]
    path = cache_root() / "synthetic" / key
    if not (path / "meta.json").exists():
        try:
            write_cache(scfg, rows, path)
        except OSError:  # another process (or rank) finished the same deterministic cache first
            if not (path / "meta.json").exists():
                raise
    return PairedCache(path, verify="size")


def make_source(
    cfg: RunConfig, device: torch.device, dist: Dist = LOCAL
) -> tuple[BatchSource, dict[str, Any]]:
    """Build the run's batch source (this rank's share under torchrun); also returns information
    recorded in ``config.json``."""
    d = cfg.data
    if d.base_model or d.ft_model or d.dataset:
        missing = [n for n in ("base_model", "ft_model", "site", "dataset") if not getattr(d, n)]
        if missing:
            raise DataError(
                "on-the-fly training needs " + ", ".join("--" + m.replace("_", "-") for m in missing)
            )
        from ..data.buffer_source import buffer_source

        src = buffer_source(cfg, device, dist)  # under torchrun: this rank's share of the text
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
        if cfg.train.val_tokens is None:  # the pair is generated with the default held-out rows on top
            cfg.train.val_tokens = DEFAULT_VAL_TOKENS
        cache = synthetic_cache(cfg)
        info["source"] = {"synthetic": True}
        info["ground_truth"] = str(cache.path / "ground_truth")
    info["cache_path"] = str(cache.path)
    info["fingerprints"] = {"cache": _cache_fingerprint(cache)}
    models = cache.meta.get("models") or []
    info["model_names"] = [m.get("name") for m in models] or None
    info["site"] = d.site or cache.meta.get("site")
    info["blocks"] = block_info(cache.meta)
    where = str(d.base_data) if d.base_data and not d.cache else str(cache.path)
    cfg.train.val_tokens = resolve_val_tokens(cfg, cache.n_rows, where)
    norm = estimate_normalization(cache, d.norm_center, d.norm_scaling, d.norm_sample_tokens, cfg.train.seed)
    src = CacheBatches(
        cache,
        cfg.train.batch_size,
        cfg.train.seed,
        norm,
        val_tokens=cfg.train.val_tokens,
        prefetch=d.prefetch,
        device=device,
        info=info,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    if cfg.train.b_dec_init == "mean":
        src.train_mean = training_space_mean(cache, norm, d.norm_sample_tokens, cfg.train.seed)
    return src, info


def block_info(meta: dict[str, Any]) -> dict[str, Any]:
    """The block description of a cache's ``meta.json`` as :class:`~crosscoder.config.CrossCoderConfig`
    fields: ``d_models`` when widths differ, and ``sites``/``block_models``/``block_sites`` when the
    model axis holds (model, site) blocks. Empty for a same-width one-site cache."""
    out: dict[str, Any] = {}
    widths = meta.get("d_models")
    if widths is not None and any(int(w) != int(meta["d_model"]) for w in widths):
        out["d_models"] = [int(w) for w in widths]
    sites, blocks = meta.get("sites"), meta.get("blocks")
    if blocks and (len(sites or []) > 1 or len(blocks) != len(meta.get("models") or blocks)):
        out["sites"] = list(sites) if sites else None
        out["block_models"] = [int(b["model"]) for b in blocks]
        out["block_sites"] = [int(b.get("site", 0)) for b in blocks]
    return out


def _cache_fingerprint(cache: PairedCache) -> str:
    h = hashlib.sha256()
    for sh in cache.meta["shards"]:
        h.update(f"{sh['rows']}:{sh.get('acts_crc32')}:{sh.get('index_crc32')}".encode())
    return h.hexdigest()[:16]
