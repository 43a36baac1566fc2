"""Sharded collection under ``torchrun``: each rank collects its share, rank 0 merges one cache.

``torchrun --nproc_per_node=N -m crosscoder collect ... --out CACHE``: rank ``r`` loads every model on its
own device, tokenizes the same text stream and collects the sequences with ``seq_id % N == r`` into
``CACHE/rank_<r>/`` (a complete paired cache of its own, resumable with ``--resume``), with a budget of
``ceil(num_tokens / N)`` rows. Rank 0 then moves every rank's shards into ``CACHE`` (renumbered), merges
their float64 statistics (Chan's parallel formula), counts and provenance into one ``meta.json`` and
removes the rank folders. When the text runs out before the budget, the merged cache holds exactly the
rows a single-process collection of the same text holds (in another order). With ``--max-norm-ratio``
the running median is per rank, so the dropped positions can differ slightly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

from ..distributed import Dist
from ..errors import DataError
from ..io import read_json, write_json
from .paired import RunningStats


def merge_caches(parts: list[Path], out: Path) -> dict[str, Any]:
    """Move the shards of complete caches ``parts`` into ``out`` and write the merged ``meta.json``."""
    metas = [read_json(p / "meta.json") for p in parts]
    for p, m in zip(parts, metas, strict=True):
        if not m.get("complete"):
            raise DataError(f"{p}: rank cache is incomplete; rerun with --resume")
    first = metas[0]
    for p, m in zip(parts[1:], metas[1:], strict=True):
        for key in (
            "n_models",
            "d_model",
            "d_models",
            "dtype",
            "site",
            "sites",
            "blocks",
            "tokenizer_fingerprint",
        ):
            if m.get(key) != first.get(key):
                raise DataError(
                    f"{p}/meta.json: {key} differs from rank 0 ({m.get(key)!r} vs {first.get(key)!r})"
                )
    stats = RunningStats(first["n_models"], first["d_model"])
    shards, dropped = [], {}
    for p, m in zip(parts, metas, strict=True):
        stats.merge(RunningStats.from_dict(m["stats"]))
        for k, v in m.get("dropped", {}).items():
            dropped[k] = dropped.get(k, 0) + int(v)
        for sh in m["shards"]:
            name = f"shard_{len(shards):05d}"
            for suffix in ("acts", "index"):
                os.replace(p / f"{sh['name']}.{suffix}.npy", out / f"{name}.{suffix}.npy")
            shards.append({**sh, "name": name})
    meta = {k: v for k, v in first.items() if k not in ("shards", "stats", "n_rows", "dropped")}
    meta.update(
        shards=shards,
        n_rows=sum(sh["rows"] for sh in shards),
        stats=stats.to_dict(),
        dropped=dropped,
        complete=True,
        world_size=len(parts),
        n_sequences=max(int(m.get("n_sequences", 0)) for m in metas),
        exhausted=all(m.get("exhausted", False) for m in metas),
    )
    write_json(out / "meta.json", meta)
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    return meta


def collect_distributed(cfg: Any, d: Dist, say: Any = print) -> dict[str, Any]:
    """Run this rank's share of ``cfg`` (a :class:`~crosscoder.data.collect.CollectConfig`) and merge."""
    from .collect import collect

    out = Path(cfg.out)
    if d.is_main:
        if (out / "meta.json").is_file():
            meta = read_json(out / "meta.json")
            if cfg.overwrite:
                shutil.rmtree(out)
            elif meta.get("complete") and cfg.resume:
                say(f"{out}: already complete ({meta['n_rows']} rows); nothing to do")
            else:
                raise DataError(f"{out}: exists; pass --resume to continue it or --overwrite to replace it")
        elif out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
            raise DataError(f"{out}: exists; pass --resume to continue it or --overwrite to replace it")
        elif out.exists() and cfg.overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()
    if (out / "meta.json").is_file():
        return {"rows": read_json(out / "meta.json")["n_rows"], "complete": True}
    device = cfg.device
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{d.local_rank}"
    part = dataclasses.replace(
        cfg,
        out=str(out / f"rank_{d.rank:03d}"),
        device=device,
        num_tokens=math.ceil(cfg.num_tokens / d.world_size),
        progress=cfg.progress and d.is_main,
        overwrite=False,
    )
    res = collect(part, say=say if d.is_main else (lambda s: None), rank=d.rank, world_size=d.world_size)
    d.barrier()
    if d.is_main:
        parts = [out / f"rank_{r:03d}" for r in range(d.world_size)]
        meta = merge_caches(parts, out)
        say(f"merged {d.world_size} rank caches into {out} ({meta['n_rows']:,} rows)")
        res = {"rows": meta["n_rows"], "complete": True}
    d.barrier()
    return res
