"""Data path against the training step: rows/s out of a memory-mapped paired cache vs rows/s consumed.

    python benchmarks/bench_data.py --arch batchtopk --d-model 256 --dict-size 8192 --batch-size 2048 \
        --threads 2 --rows 131072

Writes a cache of ``--rows`` random rows (in a temporary folder), then measures, in one process:

* ``loader_rows_per_s``: :class:`~crosscoder.data.loader.CacheBatches` (seeded shuffle, random-row
  gather from the memory maps, normalisation) with its prefetch thread, batches pulled back to back;
* ``loader_sync_rows_per_s``: the same without the prefetch thread (``prefetch=0``);
* ``step_tokens_per_s``: the training step (``crosscoder.bench.run_bench``) at the given sizes;
* ``trained_from_cache_tokens_per_s``: steps fed by the prefetching loader (loading overlapped).

``ratio`` = loader rows/s / step tokens/s (the target is >= 5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from crosscoder.bench import add_shape_arguments, build_step, run_bench
from crosscoder.data.loader import CacheBatches
from crosscoder.data.paired import PairedCache, PairedCacheWriter


def write_cache(path: str, rows: int, n_models: int, d_model: int, dtype: str) -> PairedCache:
    w = PairedCacheWriter(path, n_models, d_model, dtype=dtype, shard_rows=1 << 16)
    g = torch.Generator().manual_seed(0)
    for i in range(0, rows, 1 << 14):
        w.add(torch.randn(min(1 << 14, rows - i), n_models, d_model, generator=g))
    w.close()
    return PairedCache(path, verify="size")


def loader_rate(cache: PairedCache, batch_size: int, n_batches: int, prefetch: int) -> float:
    src = CacheBatches(cache, batch_size, seed=0, norm=[1.0] * cache.n_models, prefetch=prefetch)
    try:
        src.next_batch()  # start the thread / warm up
        t = time.perf_counter()
        for _ in range(n_batches):
            src.next_batch()
        return n_batches * batch_size / (time.perf_counter() - t)
    finally:
        src.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p, arch="batchtopk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="cache storage dtype"
    )
    p.add_argument("--batches", type=int, default=30, help="batches timed per loader measurement")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        cache = write_cache(tmp, a.rows, a.n_models, a.d_model, a.dtype)
        pre, sync = [], []
        for _ in range(a.rounds):
            pre.append(loader_rate(cache, a.batch_size, a.batches, prefetch=4))
            sync.append(loader_rate(cache, a.batch_size, a.batches, prefetch=0))
        step = run_bench(
            a.arch,
            a.d_model,
            a.dict_size,
            a.batch_size,
            a.k,
            steps=a.steps,
            warmup=1,
            threads=a.threads,
            n_models=a.n_models,
        )
        ts = build_step(a.arch, a.d_model, a.dict_size, a.batch_size, a.k, a.steps + 1, torch.device("cpu"))
        src = CacheBatches(cache, a.batch_size, seed=0, norm=[1.0] * a.n_models, prefetch=4)
        try:
            ts(src.next_batch(), 0)
            times = []
            for i in range(a.steps):
                t = time.perf_counter()
                ts(src.next_batch(), i + 1)
                times.append(time.perf_counter() - t)
        finally:
            src.close()
    rate = statistics.median(pre)
    out = {
        "arch": a.arch,
        "d_model": a.d_model,
        "n_models": a.n_models,
        "dict_size": a.dict_size,
        "batch_size": a.batch_size,
        "threads": a.threads,
        "cache_rows": a.rows,
        "cache_dtype": a.dtype,
        "loader_rows_per_s": rate,
        "loader_sync_rows_per_s": statistics.median(sync),
        "step_tokens_per_s": step["tokens_per_s"],
        "trained_from_cache_tokens_per_s": a.batch_size / statistics.median(times),
        "ratio": rate / step["tokens_per_s"],
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
