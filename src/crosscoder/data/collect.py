"""Collect aligned activations of n models (the first is the reference) at one or several sites, through
nnsight, into a paired cache.

Alignment rules (the same for ``crosscoder collect`` and the on-the-fly buffer):

* ONE tokenization (the reference model's tokenizer) feeds every model; a tokenizer that disagrees with
  the reference on a sample is refused (:func:`~crosscoder.data.text.check_tokenizer_set`);
* batches are left-padded, as nnsight pads, with explicit ``attention_mask`` and ``position_ids`` counted
  from each row's first real token (GPT-2-style models would otherwise shift padded rows);
* the same positions are kept for every model: padding and BOS positions (any token equal to BOS) are
  dropped for all, and with ``max_norm_ratio`` a position is dropped for all when any block's norm
  exceeds ``max_norm_ratio`` times that block's running median norm (last 8192 kept rows);
* one forward per model reads all its sites and stops after the last one (``tracer.stop()``), under
  ``torch.no_grad()``.

Blocks are (model, site) pairs in model-major order; the cache holds ``[rows, n_blocks, d_model]`` with
``d_model`` the largest width and narrower blocks zero-padded (``meta.json["d_models"]``).

The models are loaded by :mod:`crosscoder.data.site_model` (``import nnsight`` happens only in
:func:`~crosscoder.data.site_model.wrap_nnsight`: it costs ~2.4 s), the rows aligned by
:mod:`crosscoder.data.pair_collector`; :func:`collect` runs a collection into a paired cache.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .collect_config import (  # noqa: F401 - re-exported
    BYTES,
    STREAM_FIELDS,
    CollectConfig,
    _check_resume,
    _gb,
    disk_estimate,
    model_record,
    prepare_out,
)
from .pair_collector import NormFilter, PairCollector, build_collector, sequence_slice  # noqa: F401
from .site_model import (  # noqa: F401 - re-exported: this module's API before the split
    TORCH_DTYPES,
    SiteModel,
    check_site,
    from_pretrained,
    load_hf_model,
    load_site_model,
    load_tokenizer,
    parse_model_spec,
    quiet_transformers,
    resolve_device,
    wrap_nnsight,
)
from .text import TokenSequence, make_batch  # noqa: F401 - make_batch is part of this API


def collect(
    cfg: CollectConfig,
    on_batch: Callable[[int], None] | None = None,
    say: Callable[[str], None] = print,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Run a collection into ``cfg.out`` (resumable); returns a summary dict.

    ``on_batch(rows_total)`` is called after every model batch (tests use it to measure memory).
    ``rank``/``world_size``: collect only the sequences with ``seq_id % world_size == rank``
    (see :mod:`crosscoder.data.collect_dist`).
    """
    from .. import __version__
    from .paired import PairedCache, PairedCacheWriter
    from .text import prepare_stream

    if not cfg.out and not cfg.dry_run:
        raise DataError("--out: required")
    if cfg.dtype not in BYTES:
        raise DataError(f"--dtype: must be one of {', '.join(BYTES)}, got {cfg.dtype!r}")
    if cfg.num_tokens <= 0 or cfg.batch_size <= 0:
        raise DataError("--num-tokens and --batch-size must be positive")
    specs = cfg.model_specs()  # [(spec as given, revision)], the reference first
    sites = cfg.site_list()
    record = model_record(specs, sites)
    torch.set_num_threads(cfg.threads)
    existing = prepare_out(cfg) if cfg.out else None
    if existing is not None and existing.get("complete"):
        if existing.get("collect"):  # the models and sites at least must be the same
            _check_resume(existing, record, cfg.out)
        say(f"{cfg.out}: already complete ({existing['n_rows']} rows); nothing to do")
        return {"rows": existing["n_rows"], "complete": True, "resumed": True}
    tokenizers = [(spec, load_tokenizer(spec, rev, cfg.trust_remote_code)) for spec, rev in specs]
    sequences, tok_info = prepare_stream(
        cfg.dataset,
        tokenizers,
        text_column=cfg.text_column,
        chat_template=cfg.chat_template,
        seq_len=cfg.seq_len,
        pack=cfg.pack,
        split=cfg.split,
        dataset_config=cfg.dataset_config,
        allow_mismatch=cfg.allow_tokenizer_mismatch,
    )
    device = resolve_device(cfg.device)
    collector = build_collector(
        [spec for spec, _ in specs],
        sites,
        tokenizer=tokenizers[0][1],
        model_dtype=cfg.model_dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        revisions=[rev for _, rev in specs],
        max_norm_ratio=cfg.max_norm_ratio,
    )
    d_models = collector.d_models
    d_model, n_blocks = max(d_models), len(d_models)
    est = disk_estimate(cfg.num_tokens, n_blocks, d_model, cfg.dtype, d_models)
    free_dir = Path(cfg.out).resolve() if cfg.out else Path.cwd()
    while not free_dir.exists():
        free_dir = free_dir.parent
    free = shutil.disk_usage(free_dir).free
    shape = f"{len(specs)} models" + (f" x {len(sites)} sites" if len(sites) > 1 else "")
    widths = "/".join(map(str, d_models))
    padded = (
        f" (widths {widths} zero-padded to {d_model}; real {_gb(est['real_acts_bytes'])})"
        if len(set(d_models)) > 1
        else ""
    )
    say(
        f"disk estimate: {cfg.num_tokens:,} tokens x {shape} x {d_model} ({cfg.dtype}) = "
        f"{_gb(est['acts_bytes'])}{padded} + index {_gb(est['index_bytes'])} = {_gb(est['total_bytes'])} "
        f"(free: {_gb(free)})"
    )
    if est["total_bytes"] > free:
        say("warning: the estimate exceeds the free disk space")
    if cfg.dry_run:
        return {"dry_run": True, "d_model": d_model, "d_models": d_models, **est, "free_bytes": free}

    record.update({k: getattr(cfg, k) for k in (*STREAM_FIELDS, "model_dtype", "num_tokens", "batch_size")})
    record["tokenizer_fingerprint"] = tok_info["base"]
    record["dtype"] = cfg.dtype
    if existing is not None:
        _check_resume(existing, record, cfg.out)
    meta = {
        "models": [{"name": m.name, "revision": m.revision} for m in collector.models],
        "site": sites[0],
        "sites": sites,
        "blocks": [{"model": i, "site": j} for i, j in collector.blocks],
        "d_models": d_models,
        "tokenizer": tok_info,
        "tokenizer_fingerprint": tok_info["base"],
        "collect": record,
        "library_version": __version__,
    }
    row_bytes = n_blocks * d_model * BYTES[cfg.dtype] + 24
    shard_rows = max(1, int(cfg.shard_mb * 1e6 // row_bytes))
    writer = PairedCacheWriter(cfg.out, n_blocks, d_model, cfg.dtype, shard_rows=shard_rows, meta=meta)
    total = writer.rows_written
    committed = {k: int(v) for k, v in (writer.meta.get("dropped") or {}).items()}

    def commit_dropped(meta: dict[str, Any], index: np.ndarray) -> None:
        # a shard ending inside sequence s: the drops of the sequences before s are final; s's own are
        # committed with a later shard (or at the end), and a resume re-reads s from its start
        for k, c in collector.take_dropped(int(index[-1, 1]) - 1).items():
            committed[k] = committed.get(k, 0) + c
        meta["dropped"] = dict(committed)

    writer.on_shard = commit_dropped
    last_seq, last_pos = -1, -1
    if total:
        done = PairedCache(cfg.out, verify="size", require_complete=False)
        last_seq, last_pos = (int(v) for v in done.read_index(np.array([total - 1]))[0, 1:])
        if collector.filter is not None:
            tail = np.arange(max(0, total - collector.filter.window), total)
            collector.filter.seed(done.read(tail).norm(dim=-1).numpy())
        say(f"resuming {cfg.out} after {total:,} rows (sequence {last_seq}, position {last_pos})")
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.num_tokens, initial=total, unit="tok", desc="collect", disable=not cfg.progress)
    n_seq = 0
    for acts, index in collector.iter_rows(
        sequence_slice(sequences(), start=max(last_seq, 0), rank=rank, world_size=world_size), cfg.batch_size
    ):
        if last_seq >= 0:
            new = (index[:, 1] > last_seq) | (index[:, 2] > last_pos)
            acts, index = acts[new], index[new]
        take = min(len(acts), cfg.num_tokens - total)
        if take > 0:
            writer.add(acts[:take].cpu(), index[:take].cpu())
            total += take
            n_seq = int(index[take - 1, 1]) + 1
        bar.update(max(take, 0))
        if on_batch is not None:
            on_batch(total)
        if total >= cfg.num_tokens:
            break
    bar.close()
    if total == 0:
        raise DataError(f"{cfg.dataset}: no tokens to collect (empty texts, or every position dropped)")
    if total < cfg.num_tokens:
        say(f"warning: dataset exhausted after {total:,} tokens (asked for {cfg.num_tokens:,})")
    seconds = time.perf_counter() - t0
    writer.flush()
    for k, c in collector.take_dropped(n_seq - 1).items():  # every sequence the cache has rows of
        committed[k] = committed.get(k, 0) + c
    dropped = dict(committed)
    writer.close(
        {
            "dropped": dropped,
            "n_sequences": max(n_seq, int(writer.meta.get("n_sequences", 0))),
            "exhausted": total < cfg.num_tokens,
        }
    )
    new_rows = collector.kept
    say(f"collected {total:,} rows into {cfg.out} ({new_rows / max(seconds, 1e-9):,.0f} tokens/s this run)")
    return {
        "rows": total,
        "complete": True,
        "resumed": existing is not None,
        "seconds": seconds,
        "tokens_per_s": new_rows / max(seconds, 1e-9),
        "d_model": d_model,
        "d_models": d_models,
        "dropped": dropped,
    }
