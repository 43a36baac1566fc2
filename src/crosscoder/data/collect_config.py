"""Settings of ``crosscoder collect`` and the checks on its output folder (resume, overwrite, disk)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError


@dataclass
class CollectConfig:
    """Everything ``crosscoder collect`` needs (the CLI flags).

    Models: ``models`` (``--model``, repeated, the reference first) or the two-model spelling
    ``base_model``/``ft_model``; sites: ``sites`` (``--site``, repeated) or one ``site``. Use
    :meth:`model_specs` and :meth:`site_list` for the resolved lists.
    """

    base_model: str | None = None
    ft_model: str | None = None
    site: str | None = None
    dataset: str = ""
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
    models: list[str] | None = None
    sites: list[str] | None = None

    def model_specs(self) -> list[tuple[str, str | None]]:
        """``(spec as given, revision)`` per model, the reference first. ``--base-revision`` /
        ``--ft-revision`` apply to the first / second model; a spec may carry its own ``@revision``."""
        from .site_model import parse_model_spec

        pair = [m for m in (self.base_model, self.ft_model) if m]
        if self.models and pair:
            raise DataError(
                "--model: give the models as --model (repeated) or as --base-model/--ft-model, not both"
            )
        if not self.models and len(pair) == 1:
            which = "--ft-model" if self.base_model else "--base-model"
            raise DataError(f"{which}: required with {'--base-model' if self.base_model else '--ft-model'}")
        specs = list(self.models) if self.models else pair
        flag = "--model" if self.models else None
        if len(specs) < 2:
            raise DataError(
                f"--model: a crosscoder compares at least two models, got {len(specs)} "
                "(--model A --model B ..., or --base-model A --ft-model B)"
            )
        revs: list[str | None] = [self.base_revision, self.ft_revision] + [None] * (len(specs) - 2)
        out = []
        for i, (spec, rev) in enumerate(zip(specs, revs, strict=True)):
            f = flag or ("--base-model" if i == 0 else "--ft-model")
            if not spec:
                raise DataError(f"{f}: empty model name")
            out.append((spec, parse_model_spec(spec, rev, f)[1]))
        return out

    def site_list(self) -> list[str]:
        """The module paths to read (``sites``, else ``[site]``), in the order given."""
        sites = list(self.sites) if self.sites else ([self.site] if self.site else [])
        if not sites:
            raise DataError("--site: required (a module path, e.g. model.layers.13)")
        if self.sites and self.site and self.site != sites[0]:
            raise DataError(f"--site: site {self.site!r} differs from the first of sites {sites}")
        dup = next((s for i, s in enumerate(sites) if s in sites[:i]), None)
        if dup is not None:
            raise DataError(f"--site {dup}: given twice")
        return sites


# CollectConfig fields that define the token stream (recorded in meta.json["collect"]).
STREAM_FIELDS = (
    "dataset",
    "dataset_config",
    "split",
    "text_column",
    "chat_template",
    "seq_len",
    "pack",
    "max_norm_ratio",
)
# Fields of meta.json["collect"] that must match for a resume to continue the same stream.
RESUME_KEYS = (
    "models",
    "revisions",
    "base_model",
    "ft_model",
    "sites",
    "site",
    *STREAM_FIELDS,
    "tokenizer_fingerprint",
)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def disk_estimate(
    num_tokens: int, n_models: int, d_model: int, dtype: str, d_models: list[int] | None = None
) -> dict[str, int]:
    """Bytes a cache of ``num_tokens`` rows of ``n_models`` blocks takes: activations (zero-padded to
    ``d_model``), index (3 int64 per row), total; ``real_acts_bytes``: the activations without padding
    (``d_models``: each block's width)."""
    acts = num_tokens * n_models * d_model * BYTES[dtype]
    real = num_tokens * sum(d_models) * BYTES[dtype] if d_models else acts
    index = num_tokens * 3 * 8
    return {"acts_bytes": acts, "real_acts_bytes": real, "index_bytes": index, "total_bytes": acts + index}


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


def _old_record(old: dict[str, Any]) -> dict[str, Any]:
    """A cache's ``collect`` record with the n-model keys filled in for caches written before them (two
    models, one site; their revisions were not recorded, so they are not compared)."""
    old = dict(old)
    if "models" not in old and old.get("base_model") and old.get("ft_model"):
        old["models"] = [old["base_model"], old["ft_model"]]
    if "sites" not in old and old.get("site"):
        old["sites"] = [old["site"]]
    return old


def model_record(specs: list[tuple[str, str | None]], sites: list[str]) -> dict[str, Any]:
    """The model and site part of ``meta.json["collect"]``: ``models`` (specs as given), ``revisions``
    (asked for), ``sites``, ``site`` (the first) and, for two models, ``base_model``/``ft_model``."""
    record: dict[str, Any] = {"models": [spec for spec, _ in specs], "revisions": [rev for _, rev in specs]}
    if len(specs) == 2:  # the two-model keys of caches written before --model (they still resume)
        record["base_model"], record["ft_model"] = record["models"]
    record.update(sites=list(sites), site=sites[0])
    return record


def _check_resume(meta: dict[str, Any], record: dict[str, Any], out: str) -> None:
    """Refuse (one line naming the first differing setting) to continue ``meta``'s collection with the
    settings ``record``; only the keys ``record`` has are compared beyond the model and site keys."""
    raw = meta.get("collect", {})
    old = _old_record(raw)
    model_keys = ("models", "revisions", "base_model", "ft_model", "sites", "site")
    for key in RESUME_KEYS:
        if (key == "revisions" and key not in raw) or (key not in record and key not in model_keys):
            continue
        if old.get(key) != record.get(key):
            raise DataError(
                f"{out}/meta.json: cannot resume: {key} was {old.get(key)!r}, now {record.get(key)!r}"
            )
    if "dtype" in record and meta.get("dtype") != record["dtype"]:
        raise DataError(
            f"{out}/meta.json: cannot resume: dtype was {meta.get('dtype')!r}, now {record['dtype']!r}"
        )
