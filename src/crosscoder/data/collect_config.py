"""Settings of ``crosscoder collect`` and the checks on its output folder (resume, overwrite, disk)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError


@dataclass
class CollectConfig:
    """Everything ``crosscoder collect`` needs (the CLI flags)."""

    base_model: str
    ft_model: str
    site: str
    dataset: str
    out: str = ""
    num_tokens: int = 1_000_000
    seq_len: int = 128
    batch_size: int = 32  # sequences per forward
    dtype: str = "bfloat16"  # cache storage dtype
    model_dtype: str = "float32"
    text_column: str = "text"
    split: str = "train"
    dataset_config: str | None = None
    chat_template: str = "none"
    pack: bool = True
    allow_tokenizer_mismatch: bool = False
    max_norm_ratio: float | None = None
    trust_remote_code: bool = False
    base_revision: str | None = None
    ft_revision: str | None = None
    device: str = "auto"
    shard_mb: float = 256.0
    threads: int = 1
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    progress: bool = True


# Fields of meta.json["collect"] that must match for a resume to continue the same stream.
RESUME_KEYS = (
    "base_model",
    "ft_model",
    "site",
    "dataset",
    "dataset_config",
    "split",
    "text_column",
    "chat_template",
    "seq_len",
    "pack",
    "max_norm_ratio",
    "tokenizer_fingerprint",
)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def disk_estimate(num_tokens: int, n_models: int, d_model: int, dtype: str) -> dict[str, int]:
    """Bytes a cache of ``num_tokens`` rows takes: activations, index (3 int64 per row), total."""
    acts = num_tokens * n_models * d_model * BYTES[dtype]
    index = num_tokens * 3 * 8
    return {"acts_bytes": acts, "index_bytes": index, "total_bytes": acts + index}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def prepare_out(cfg: CollectConfig) -> dict[str, Any] | None:
    """Check ``cfg.out`` against --resume/--overwrite; returns the existing meta to resume, else None."""
    from ..io import read_json

    out = Path(cfg.out)
    if out.is_file():
        raise DataError(f"{out}: exists and is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{out}: exists, is not empty and is not a paired cache; choose another --out")
    meta = read_json(meta_path)
    state = "complete" if meta.get("complete") else "incomplete"
    if cfg.overwrite:
        if not cfg.dry_run:
            shutil.rmtree(out)
        return None
    if not cfg.resume:
        raise DataError(
            f"{out}: exists (an {state} cache with {meta.get('n_rows', 0)} rows); "
            "pass --resume to continue it or --overwrite to replace it"
        )
    return meta


def _check_resume(meta: dict[str, Any], record: dict[str, Any], out: str) -> None:
    old = meta.get("collect", {})
    for key in RESUME_KEYS:
        if old.get(key) != record.get(key):
            raise DataError(
                f"{out}/meta.json: cannot resume: {key} was {old.get(key)!r}, now {record.get(key)!r}"
            )
    if meta.get("dtype") != record["dtype"]:
        raise DataError(
            f"{out}/meta.json: cannot resume: dtype was {meta.get('dtype')!r}, now {record['dtype']!r}"
        )
