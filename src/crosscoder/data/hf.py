"""Two aligned Hugging Face activation datasets (the plan's format) -> one paired cache.

Each dataset has one row per token and a vector column (default ``activation``) of width d_model. Row
``i`` of the base dataset and row ``i`` of the fine-tuned dataset are the same token. The pair is
converted once into the memory-mapped paired cache (:mod:`crosscoder.data.paired`) stored under
``$CROSSCODER_CACHE_DIR/converted/<fingerprint>`` (default ``~/.cache/crosscoder``), reused while the
datasets' fingerprints do not change.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_dir
from .paired import PairedCache, PairedCacheWriter


def cache_root() -> Path:
    return Path(os.environ.get("CROSSCODER_CACHE_DIR", Path.home() / ".cache" / "crosscoder"))


def load_activation_dataset(spec: str, flag: str) -> Any:
    """Open a dataset given as a ``save_to_disk`` folder, parquet/json files or folder, or a hub id."""
    import datasets

    p = Path(spec)
    was_enabled = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return _load(spec, p, flag)
    finally:
        datasets.logging.set_verbosity(level)
        if was_enabled:
            datasets.enable_progress_bars()


def _load(spec: str, p: Path, flag: str) -> Any:
    import datasets

    try:
        if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
        elif p.exists():
            files = sorted(str(f) for f in p.rglob("*.parquet")) if p.is_dir() else [str(p)]
            if not files:
                raise DataError(f"{flag} {spec}: folder holds no dataset (no state.json, no parquet files)")
            kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}.get(
                Path(files[0]).suffix
            )
            if kind is None:
                raise DataError(f"{flag} {spec}: unsupported file type {Path(files[0]).suffix!r}")
            if kind == "parquet":
                import pyarrow.parquet as pq

                if sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:
                    raise DataError(f"{flag} {spec}: dataset is empty")
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        else:
            ds = datasets.load_dataset(spec, split="train")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any loading failure -> one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{flag} {spec}: cannot load dataset ({msg})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{flag} {spec}: DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    return ds


def _vector_width(ds: Any, column: str, flag: str, spec: str) -> int:
    if column not in ds.column_names:
        raise DataError(f"{flag} {spec}: no column {column!r} (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"{flag} {spec}: dataset is empty")
    first = ds.with_format("arrow")[0:1].column(column)
    try:
        return len(first[0])
    except TypeError:
        raise DataError(f"{flag} {spec}: column {column!r} is not a vector column") from None


def _chunk(ds: Any, column: str, lo: int, hi: int, d: int) -> np.ndarray:
    """Rows ``lo:hi`` of the vector column as ``[n, d]`` (float16 kept, anything else float32)."""
    col = ds.with_format("arrow")[lo:hi].column(column).combine_chunks()
    values = col.flatten()
    dtype = np.float16 if str(values.type) == "halffloat" else np.float32
    arr = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if arr.size != (hi - lo) * d:
        raise DataError(f"column {column!r}: rows {lo}..{hi - 1} are not all of width {d}")
    return arr.reshape(hi - lo, d)


def fingerprint(base_spec: str, ft_spec: str, base: Any, ft: Any, column: str) -> str:
    h = hashlib.sha256()
    for part in (
        getattr(base, "_fingerprint", base_spec),
        getattr(ft, "_fingerprint", ft_spec),
        column,
        str(len(base)),
        str(len(ft)),
    ):
        h.update(str(part).encode())
    return h.hexdigest()[:16]


def pair_to_cache(
    base_spec: str,
    ft_spec: str,
    column: str = "activation",
    skip_nonfinite: bool = False,
    out: str | Path | None = None,
    chunk: int = 65536,
    verify: str = "crc",
) -> PairedCache:
    """Check the two datasets are aligned, convert them (once) and open the paired cache.

    Raises :class:`DataError` naming the dataset for: a missing column, an empty dataset, different
    lengths or widths, and non-finite rows (unless ``skip_nonfinite``; skipped rows are dropped for both
    models and counted in ``meta.json`` as ``skipped_nonfinite``).
    """
    base = load_activation_dataset(base_spec, "--base-data")
    ft = load_activation_dataset(ft_spec, "--ft-data")
    d_base = _vector_width(base, column, "--base-data", base_spec)
    d_ft = _vector_width(ft, column, "--ft-data", ft_spec)
    if len(base) != len(ft):
        raise DataError(
            f"--base-data {base_spec} has {len(base)} rows but --ft-data {ft_spec} has {len(ft)}: "
            "the datasets must be row-aligned"
        )
    if d_base != d_ft:
        raise DataError(f"--base-data {base_spec} has d_model {d_base} but --ft-data {ft_spec} has {d_ft}")
    fp = fingerprint(base_spec, ft_spec, base, ft, column)
    target = (
        Path(out)
        if out is not None
        else cache_root() / "converted" / f"{fp}{'-skip' if skip_nonfinite else ''}"
    )
    if (target / "meta.json").exists():
        return PairedCache(target, verify=verify)
    try:
        _convert(base, ft, base_spec, ft_spec, column, d_base, skip_nonfinite, target, chunk, fp)
    except OSError:  # another process converted the same pair first (same fingerprint, same result)
        if not (target / "meta.json").exists():
            raise
    return PairedCache(target, verify=verify)


def _convert(
    base: Any,
    ft: Any,
    base_spec: str,
    ft_spec: str,
    column: str,
    d: int,
    skip_nonfinite: bool,
    target: Path,
    chunk: int,
    fp: str,
) -> None:
    d_base = d_ft = d
    skipped = 0
    with atomic_dir(target) as tmp:
        w = PairedCacheWriter(
            tmp,
            2,
            d_base,
            "float32",
            meta={
                "models": [{"name": base_spec}, {"name": ft_spec}],
                "site": None,
                "source": {"base_data": base_spec, "ft_data": ft_spec, "column": column, "fingerprint": fp},
            },
        )
        for lo in range(0, len(base), chunk):
            hi = min(lo + chunk, len(base))
            pair = np.stack([_chunk(base, column, lo, hi, d_base), _chunk(ft, column, lo, hi, d_ft)], axis=1)
            finite = np.isfinite(pair).all(axis=(1, 2))
            if not finite.all():
                bad = lo + int(np.flatnonzero(~finite)[0])
                if not skip_nonfinite:
                    which = "--base-data" if not np.isfinite(pair[bad - lo, 0]).all() else "--ft-data"
                    spec = base_spec if which == "--base-data" else ft_spec
                    raise DataError(
                        f"{which} {spec}: row {bad} has non-finite values (NaN/Inf); "
                        "pass --skip-nonfinite to drop such rows"
                    )
                skipped += int((~finite).sum())
                pair = pair[finite]
            rows = np.arange(lo, hi)[finite] if skipped else np.arange(lo, hi)
            index = np.stack([np.full_like(rows, -1), rows, np.zeros_like(rows)], axis=1)
            w.add(torch.from_numpy(np.ascontiguousarray(pair)), index)
        if w.rows_written + w._pending == 0:
            raise DataError(f"--base-data {base_spec}: no finite rows left")
        w.close({"skipped_nonfinite": skipped})
