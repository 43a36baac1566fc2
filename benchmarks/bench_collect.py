"""Collection and cache-reading throughput (issue 3). Prints one JSON object.

1. Collection: tokens/s of the library's nnsight path (``PairCollector.rows``: trace, ``tracer.stop()``
   after the site, BOS/pad masking, both models) against a plain forward-hook loop doing the same work
   (hook on the site that raises to stop the forward, same batches, same masking), on the same models.
   Rounds alternate between the two so that a busy machine affects both alike; medians are reported.
   Target: nnsight's overhead under 15%.
2. Cache reading: rows/s of ``CacheBatches`` (shuffled across shards, normalised, prefetch thread) on a
   cache written for the purpose, against the tokens/s a BatchTopK training step consumes at the same
   width (measured here with the library's loss path, or given with ``--train-tokens-per-s``).
   Target: reading at least 5x faster than training consumes.

Usage::

    python benchmarks/bench_collect.py [--layers 6 --d-model 256 --site-layer 3 --seq-len 128 --batch 16]
        [--rounds 7] [--cache-rows 500000] [--train-tokens-per-s N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class _Stop(Exception):
    pass


def make_models(folder: Path, layers: int, d_model: int, vocab: int, seq_len: int) -> tuple[Path, Path]:
    """Two randomly initialised GPT-2-style models (throughput does not depend on the weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from crosscoder.data.collect import quiet_transformers
    from crosscoder.data.demo_pair import train_tokenizer

    quiet_transformers()
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 50, 300)
    paths = []
    for i, name in enumerate(("base", "ft")):
        torch.manual_seed(i)
        cfg = GPT2Config(
            vocab_size=vocab,
            n_positions=max(seq_len, 128),
            n_embd=d_model,
            n_layer=layers,
            n_head=max(1, d_model // 64),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        GPT2LMHeadModel(cfg).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]


def hook_rows(models: list, site: str, batch: dict, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain forward-hook equivalent of ``PairCollector.rows`` (same masking and gather)."""
    keep = batch["attention_mask"].bool() & (batch["input_ids"] != bos)
    outs = []
    for m in models:
        got = {}

        def hook(mod, inp, out, got=got):
            got["h"] = out[0] if isinstance(out, tuple) else out
            raise _Stop

        h = m.get_submodule(site).register_forward_hook(hook)
        try:
            with torch.no_grad():
                m(**batch)
        except _Stop:
            pass
        finally:
            h.remove()
        outs.append(got["h"][keep])
    return torch.stack(outs, 1).float(), keep.sum()


def bench_collection(args: argparse.Namespace, folder: Path) -> dict:
    from crosscoder.data.collect import build_collector, load_tokenizer, make_batch
    from crosscoder.data.text import TokenSequence

    base, ft = make_models(folder, args.layers, args.d_model, args.vocab, args.seq_len)
    site = f"transformer.h.{args.site_layer}"
    tok = load_tokenizer(str(base))
    col = build_collector(str(base), str(ft), site, tokenizer=tok, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(args.batches):  # mixed lengths: padding included, as in a truncating collection
        seqs = [
            TokenSequence(
                b * args.batch + i,
                [tok.bos_token_id]
                + torch.randint(
                    1,
                    args.vocab,
                    (int(torch.randint(args.seq_len // 2, args.seq_len, (1,), generator=g)),),
                    generator=g,
                ).tolist(),
            )
            for i in range(args.batch)
        ]
        batches.append(seqs)
    hf = [m.hf for m in col.models]
    a, _ = col.rows(batches[0])  # warm-up + parity check
    b, _ = hook_rows(hf, site, make_batch(batches[0], col.pad_id), tok.bos_token_id)
    max_diff = float((a - b).abs().max())
    nn_rates, hook_rates = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        n = sum(len(col.rows(s)[0]) for s in batches)
        nn_rates.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        n = sum(int(hook_rows(hf, site, make_batch(s, col.pad_id), tok.bos_token_id)[1]) for s in batches)
        hook_rates.append(n / (time.perf_counter() - t))
    nn_med, hook_med = statistics.median(nn_rates), statistics.median(hook_rates)
    return {
        "model": f"GPT-2 {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, site {site}",
        "batch": (
            f"{args.batch} x <= {args.seq_len} tokens, {args.batches} batches per round, {args.rounds} rounds"
        ),
        "nnsight_tokens_per_s": round(nn_med),
        "hooks_tokens_per_s": round(hook_med),
        "nnsight_overhead_pct": round(100 * (hook_med / nn_med - 1), 2),
        "nnsight_rounds": [round(r) for r in nn_rates],
        "hooks_rounds": [round(r) for r in hook_rates],
        "max_abs_diff_nnsight_vs_hooks": max_diff,
    }


def train_tokens_per_s(d_model: int, d_latent: int, k: int, batch: int, steps: int = 8) -> float:
    """Tokens/s of the library's BatchTopK step (forward, loss, backward, Adam) at this width."""
    from crosscoder.config import CrossCoderConfig
    from crosscoder.model import CrossCoder, compute_loss

    model = CrossCoder(
        CrossCoderConfig(arch="batchtopk", d_latent=d_latent, k=k, n_models=2, d_model=d_model)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 2, d_model)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = compute_loss(model, x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[2:])


def bench_cache(args: argparse.Namespace, folder: Path) -> dict:
    from crosscoder.data.loader import CacheBatches
    from crosscoder.data.paired import PairedCache, PairedCacheWriter

    d, rows = args.cache_d_model, args.cache_rows
    w = PairedCacheWriter(folder / "cache", 2, d, args.cache_dtype, shard_rows=rows // 8)
    t = time.perf_counter()
    for lo in range(0, rows, 65536):
        n = min(65536, rows - lo)
        w.add(
            torch.randn(n, 2, d),
            np.stack([np.zeros(n, np.int64), np.arange(lo, lo + n), np.zeros(n, np.int64)], 1),
        )
    w.close()
    write_s = time.perf_counter() - t
    cache = PairedCache(folder / "cache", verify="size")
    src = CacheBatches(cache, args.train_batch, seed=0, norm=cache.norm_scale(), prefetch=4)
    src.next_batch()
    n_batches = min(rows // args.train_batch - 1, 400)
    t = time.perf_counter()
    for _ in range(n_batches):
        src.next_batch()
    read = n_batches * args.train_batch / (time.perf_counter() - t)
    src.close()
    train = args.train_tokens_per_s or train_tokens_per_s(d, args.d_latent, args.k, args.train_batch)
    return {
        "cache": (
            f"{rows} rows x [2, {d}] {args.cache_dtype}, 8 shards, shuffled batches of {args.train_batch}"
        ),
        "write_rows_per_s": round(rows / write_s),
        "read_rows_per_s": round(read),
        "train_tokens_per_s": round(train),
        "train_step": (
            "given"
            if args.train_tokens_per_s
            else f"measured: batchtopk d_latent {args.d_latent}, k {args.k}, batch {args.train_batch}"
        ),
        "read_over_train": round(read / train, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--site-layer", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cache-rows", type=int, default=500_000)
    p.add_argument("--cache-d-model", type=int, default=256)
    p.add_argument("--cache-dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--train-batch", type=int, default=1024)
    p.add_argument("--d-latent", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--train-tokens-per-s", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"threads": args.threads, "torch": torch.__version__}
        out["collection"] = bench_collection(args, Path(tmp))
        out["cache_read"] = bench_cache(args, Path(tmp))
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
