"""``crosscoder export CACHE OUT``: a paired cache -> the plan's format, one aligned HF dataset per model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NAME = "export"
HELP = (
    "export a paired cache as aligned Hugging Face datasets (OUT/base, OUT/ft), "
    "readable by train --base-data/--ft-data"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", metavar="CACHE", help="paired cache folder (from `crosscoder collect`)")
    parser.add_argument(
        "out", metavar="OUT", help="folder to create, holding one save_to_disk dataset per model"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16"),
        help="dtype of the activation column (default: float32)",
    )
    parser.add_argument(
        "--column", default="activation", help="name of the vector column (default: activation)"
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=65536, help="rows converted at a time (memory bound)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def export_cache(
    cache_path: str,
    out: str,
    dtype: str = "float32",
    column: str = "activation",
    chunk_rows: int = 65536,
    overwrite: bool = False,
) -> list[str]:
    """Write ``OUT/<name>`` for each model (``base``, ``ft``; ``model_<i>`` beyond two): a ``save_to_disk``
    dataset with ``column`` (``[d_model]`` vectors), ``token_id``, ``sequence_id`` and ``position``; row ``i``
    is the same token in every dataset. Returns the dataset folders."""

    import datasets
    import numpy as np

    from ..data.paired import PairedCache
    from ..errors import DataError

    cache = PairedCache(cache_path, verify="size")
    target = Path(out)
    if target.exists() and not overwrite:
        raise DataError(f"{target}: exists (pass --overwrite to replace it)")
    blocks = cache.meta.get("blocks")
    if blocks and len(cache.meta.get("sites") or [None]) > 1:  # (model, site) blocks
        names = [f"model_{b['model']}_site_{b['site']}" for b in blocks]
    else:
        names = ["base", "ft"] if cache.n_models == 2 else [f"model_{i}" for i in range(cache.n_models)]
    widths = [int(w) for w in cache.meta.get("d_models") or [cache.d_model] * cache.n_models]
    features = [
        datasets.Features(
            {
                column: datasets.List(datasets.Value(dtype), length=w),
                "token_id": datasets.Value("int64"),
                "sequence_id": datasets.Value("int64"),
                "position": datasets.Value("int64"),
            }
        )
        for w in widths
    ]
    np_dtype = np.float32 if dtype == "float32" else np.float16
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        _write(cache, target, names, column, features, np_dtype, chunk_rows)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return [str(target / n) for n in names]


def _write(
    cache: Any,
    target: Path,
    names: list[str],
    column: str,
    features: list[Any],
    np_dtype: Any,
    chunk_rows: int,
) -> None:
    """One dataset per block; block ``m`` keeps its own width (the cache's zero padding is dropped)."""
    import tempfile

    import datasets
    import numpy as np
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    from ..io import atomic_dir, write_json

    widths = [int(w) for w in cache.meta.get("d_models") or [cache.d_model] * cache.n_models]
    blocks = cache.meta.get("blocks")
    with atomic_dir(target, replace=True) as tmp, tempfile.TemporaryDirectory(dir=tmp) as scratch:
        for m, name in enumerate(names):
            arrow = Path(scratch) / f"{name}.arrow"
            writer = ArrowWriter(path=str(arrow), features=features[m])
            d = widths[m]
            for lo in range(0, cache.n_rows, chunk_rows):
                rows = np.arange(lo, min(lo + chunk_rows, cache.n_rows))
                acts = cache.read(rows)[:, m, :d].numpy().astype(np_dtype)  # [n, d_m]
                index = cache.read_index(rows)  # [n, 3]
                vec = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), d)
                writer.write_table(
                    pa.table(
                        {
                            column: vec,
                            "token_id": index[:, 0],
                            "sequence_id": index[:, 1],
                            "position": index[:, 2],
                        }
                    )
                )
            writer.finalize()
            datasets.Dataset.from_file(str(arrow)).save_to_disk(str(tmp / name))
        models = [m.get("name") if isinstance(m, dict) else m for m in cache.meta.get("models") or []]
        write_json(
            tmp / "export.json",
            {
                "cache": str(cache.path),
                "rows": cache.n_rows,
                "d_model": cache.d_model,
                "d_models": dict(zip(names, widths, strict=True)),
                "models": dict(zip(names, models, strict=False))
                if not blocks or len(models) == len(names)
                else {n: models[b["model"]] for n, b in zip(names, blocks, strict=True)},
                "site": cache.meta.get("site"),
                "sites": cache.meta.get("sites"),
                "column": column,
                "dtype": np.dtype(np_dtype).name,
                "norm_scale": cache.norm_scale() if cache.stats else None,
            },
        )


def run(args: argparse.Namespace) -> int:
    folders = export_cache(args.cache, args.out, args.dtype, args.column, args.chunk_rows, args.overwrite)
    print(f"exported {args.cache} -> " + ", ".join(folders))
    if len(folders) == 2:
        print(f"train on it with: crosscoder train --base-data {folders[0]} --ft-data {folders[1]}")
    return 0
