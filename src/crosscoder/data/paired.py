"""The paired activation cache: one memory-mapped index for all models (format v1, docs/data_format.md).

Layout of a cache folder::

    meta.json                     format, n_models, d_model, dtype, counts, shards, running statistics
    shard_00000.acts.npy          [rows, n_models, d_model]  float32 | float16 | uint16 (bfloat16 bits)
    shard_00000.index.npy         [rows, 3] int64: token id, sequence id, position (-1 = unknown)
    ...

Shards are written atomically (temp file + rename) and listed in ``meta.json`` only once complete,
with their byte sizes and CRC32 checksums; ``meta.json`` is rewritten atomically after every shard, so
an interrupted writer leaves a valid cache of the shards done so far (``complete: false``).
Per-model statistics (row count, mean L2 norm, per-dimension mean and variance) are accumulated in
float64 whatever the storage dtype, so normalisation needs no second pass.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_path, read_json, write_json

FORMAT = "crosscoder-paired-cache"
VERSION = 1
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """``x [n, m, d]`` (any float dtype) -> numpy array in the cache's storage dtype."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).contiguous().view(torch.uint16).cpu().numpy()
    return x.to(getattr(torch, dtype)).contiguous().cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Storage array -> float32 tensor (bfloat16 bits are reinterpreted, not converted)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.float()


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


class RunningStats:
    """Per-model count, mean norm, mean and variance (Chan's merge), all in float64."""

    def __init__(self, n_models: int, d_model: int) -> None:
        self.count = 0
        self.norm_sum = np.zeros(n_models, np.float64)
        self.mean = np.zeros((n_models, d_model), np.float64)
        self.m2 = np.zeros((n_models, d_model), np.float64)

    CHUNK = 512  # rows per float64 pass: small temporaries stay in cache (5x faster than one big pass)

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x [n, n_models, d_model]``."""
        x = x.detach()
        for lo in range(0, x.shape[0], self.CHUNK):
            self._update(x[lo : lo + self.CHUNK])

    def _update(self, x: torch.Tensor) -> None:
        xd = x.to(torch.float64).cpu()
        n = xd.shape[0]
        if n == 0:
            return
        self.norm_sum += xd.norm(dim=-1).sum(0).numpy()
        b_mean = xd.mean(0).numpy()
        b_m2 = ((xd - xd.mean(0)) ** 2).sum(0).numpy()
        tot = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * (n / tot)
        self.m2 += b_m2 + delta**2 * (self.count * n / tot)
        self.count = tot

    def to_dict(self) -> dict[str, Any]:
        c = max(self.count, 1)
        return {
            "count": self.count,
            "norm_sum": self.norm_sum.tolist(),
            "mean_norm": (self.norm_sum / c).tolist(),
            "mean": self.mean.tolist(),
            "var": (self.m2 / c).tolist(),
            "m2": self.m2.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunningStats:
        mean = np.asarray(d["mean"], np.float64)
        s = cls(mean.shape[0], mean.shape[1])
        s.count, s.mean = int(d["count"]), mean
        s.norm_sum = np.asarray(d["norm_sum"], np.float64)
        s.m2 = np.asarray(d["m2"], np.float64)
        return s

    def merge(self, other: RunningStats) -> None:
        if other.count == 0:
            return
        tot = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / tot)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / tot)
        self.norm_sum = self.norm_sum + other.norm_sum
        self.count = tot


class PairedCacheWriter:
    """Append paired rows to a cache folder, one shard every ``shard_rows`` rows.

    Reopening an existing, incomplete cache continues it (``rows_written`` tells where it stopped).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_models: int,
        d_model: int,
        dtype: str = "float32",
        shard_rows: int = 1 << 18,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if dtype not in STORAGE:
            raise DataError(f"dtype: unsupported cache dtype {dtype!r} (choices: {', '.join(STORAGE)})")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            self.meta = read_json(meta_path)
            if (self.meta["n_models"], self.meta["d_model"], self.meta["dtype"]) != (
                n_models,
                d_model,
                dtype,
            ):
                raise DataError(
                    f"{meta_path}: existing cache has n_models/d_model/dtype "
                    f"{self.meta['n_models']}/{self.meta['d_model']}/{self.meta['dtype']}"
                )
            self.stats = RunningStats.from_dict(self.meta["stats"])
        else:
            self.meta = {
                "format": FORMAT,
                "version": VERSION,
                "n_models": n_models,
                "d_model": d_model,
                "dtype": dtype,
                "n_rows": 0,
                "shards": [],
                "complete": False,
            }
            self.stats = RunningStats(n_models, d_model)
        if meta:
            self.meta.update({k: v for k, v in meta.items() if k not in ("shards", "n_rows", "stats")})
        #: ``on_shard(meta, index)`` is called before each shard is listed in ``meta.json`` with that
        #: shard's index rows ``[rows, 3]``, so the caller can update ``meta`` for exactly the rows stored
        self.on_shard: Any = None
        self._acts: list[torch.Tensor] = []
        self._index: list[np.ndarray] = []
        self._pending = 0

    @property
    def rows_written(self) -> int:
        """Rows in completed shards (what survives an interruption)."""
        return int(self.meta["n_rows"])

    def add(self, acts: torch.Tensor, index: np.ndarray | torch.Tensor | None = None) -> None:
        """Buffer rows ``acts [n, n_models, d_model]`` with ``index [n, 3]`` (token, sequence, position)."""
        n = acts.shape[0]
        if index is None:
            index = np.full((n, 3), -1, np.int64)
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        if index.shape != (n, 3):
            raise ValueError(f"index must be [n, 3], got {index.shape}")
        self._acts.append(acts.detach().cpu())
        self._index.append(index)
        self._pending += n
        while self._pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        acts = torch.cat(self._acts)
        index = np.concatenate(self._index)
        head, tail = acts[:rows], acts[rows:]
        self._acts, self._index = ([tail], [index[rows:]]) if len(tail) else ([], [])
        self._pending -= rows
        self._write_shard(head, index[:rows])

    def _write_shard(self, acts: torch.Tensor, index: np.ndarray) -> None:
        name = f"shard_{len(self.meta['shards']):05d}"
        entry: dict[str, Any] = {"name": name, "rows": int(acts.shape[0])}
        for suffix, arr in (("acts", to_storage(acts, self.meta["dtype"])), ("index", index)):
            target = self.path / f"{name}.{suffix}.npy"
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
                    fh.flush()
                    os.fsync(fh.fileno())
                entry[f"{suffix}_bytes"] = tmp.stat().st_size
                entry[f"{suffix}_crc32"] = file_crc32(tmp)
        self.stats.update(acts)
        if self.on_shard is not None:  # the caller's meta for exactly these rows (e.g. dropped counts)
            self.on_shard(self.meta, index)
        self.meta["shards"].append(entry)
        self.meta["n_rows"] = int(self.meta["n_rows"]) + entry["rows"]
        self.meta["stats"] = self.stats.to_dict()
        write_json(self.path / "meta.json", self.meta)

    def flush(self) -> None:
        """Write the rows still buffered as a (partial) shard."""
        if self._pending:
            self._flush(self._pending)

    def close(self, extra_meta: dict[str, Any] | None = None) -> None:
        """Write the last partial shard and mark the cache complete."""
        self.flush()
        if extra_meta:
            self.meta.update(extra_meta)
        self.meta["complete"] = True
        self.meta["stats"] = self.stats.to_dict()
        write_json(self.path / "meta.json", self.meta)


class PairedCache:
    """Read-only view of a cache folder. Rows are read through memory maps.

    ``verify``: "size" checks every shard's byte size and header at open; "crc" also checks CRC32
    checksums (reads every byte once). A truncated or corrupted shard raises :class:`DataError` naming it.
    """

    def __init__(self, path: str | os.PathLike, verify: str = "crc", require_complete: bool = True) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.path}: not a paired activation cache (no meta.json)")
        try:
            self.meta = read_json(meta_path)
        except ValueError as e:
            raise DataError(f"{meta_path}: unreadable ({e})") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: unknown format {self.meta.get('format')!r}")
        if require_complete and not self.meta.get("complete", False):
            raise DataError(f"{self.path}: cache is incomplete (interrupted collection? resume it first)")
        if self.meta["n_rows"] == 0:
            raise DataError(f"{self.path}: cache is empty")
        self.n_models, self.d_model, self.dtype = (
            self.meta["n_models"],
            self.meta["d_model"],
            self.meta["dtype"],
        )
        self.acts: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        for sh in self.meta["shards"]:
            for suffix, store in (("acts", self.acts), ("index", self.index)):
                f = self.path / f"{sh['name']}.{suffix}.npy"
                if not f.is_file():
                    raise DataError(f"{f}: shard file missing")
                if f.stat().st_size != sh[f"{suffix}_bytes"]:
                    raise DataError(
                        f"{f}: truncated or corrupted shard ({f.stat().st_size} bytes, "
                        f"expected {sh[f'{suffix}_bytes']})"
                    )
                if verify == "crc" and file_crc32(f) != sh[f"{suffix}_crc32"]:
                    raise DataError(f"{f}: corrupted shard (CRC32 mismatch)")
                try:
                    arr = np.load(f, mmap_mode="r")
                except Exception as e:  # noqa: BLE001
                    raise DataError(f"{f}: unreadable shard ({e})") from None
                if arr.shape[0] != sh["rows"]:
                    raise DataError(f"{f}: has {arr.shape[0]} rows, meta.json says {sh['rows']}")
                store.append(arr)
        self.offsets = np.cumsum([0] + [sh["rows"] for sh in self.meta["shards"]])
        self.n_rows = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def stats(self) -> dict[str, Any] | None:
        return self.meta.get("stats")

    def norm_scale(self) -> list[float]:
        """Factor per model mapping the stored mean L2 norm to sqrt(d_model)."""
        mean_norm = self.meta["stats"]["mean_norm"]
        return [math.sqrt(self.d_model) / max(float(v), 1e-12) for v in mean_norm]

    def _gather(self, arrays: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        shard_of = np.searchsorted(self.offsets, srt, side="right") - 1
        out = np.empty((len(rows),) + arrays[0].shape[1:], arrays[0].dtype)
        bounds = np.searchsorted(shard_of, np.arange(len(arrays) + 1))
        for s in range(len(arrays)):
            lo, hi = bounds[s], bounds[s + 1]
            if hi > lo:
                out[order[lo:hi]] = arrays[s][srt[lo:hi] - self.offsets[s]]
        return out

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows (any order) -> float32 tensor ``[len(rows), n_models, d_model]`` in that order."""
        return from_storage(self._gather(self.acts, rows), self.dtype)

    def read_index(self, rows: np.ndarray) -> np.ndarray:
        """Rows -> ``[len(rows), 3]`` int64 (token id, sequence id, position)."""
        return self._gather(self.index, rows)
