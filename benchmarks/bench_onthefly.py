"""On-the-fly training: time the training loop blocks in ``next_batch`` with and without the overlapped
refill (the next generation of the buffer built in a background thread while the step runs).

    python benchmarks/bench_onthefly.py --threads 1 --steps 96 --repeats 3

Builds (once, offline, under ``--root``) a GPT-2 pair of the demo kind at the given sizes (the weights'
quality does not matter for timing), then for each mode runs ``--steps`` training steps
(:class:`~crosscoder.train.step.TrainStep`, BatchTopK) fed by :class:`~crosscoder.data.buffer.Buffer`,
timing each ``next_batch`` and each step. The first generation (built before training can start, in
both modes) is excluded. Prints one JSON object:

* ``sync`` / ``overlap``: medians over ``--repeats`` of ``total_s`` (loop wall time), ``blocked_s`` (inside
  ``next_batch``), ``blocked_frac``, ``tokens_per_s``, ``build_s`` (building generations, forwards
  included), ``step_s`` (training steps);
* ``overlap_saving``: 1 - overlap total / sync total; ``hidden_frac``: the share of the refill work that
  no longer blocks training, ``1 - overlap blocked / sync blocked``;
* ``same_rows``: both modes served identical batches (the overlap is timing-independent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from crosscoder.bench import build_step
from crosscoder.config import CrossCoderConfig, DataConfig, RunConfig, TrainConfig
from crosscoder.data.buffer import buffer_source
from crosscoder.data.demo_pair import SMALL, build_demo_pair, code_documents, prose_documents


def make_pair(args: argparse.Namespace) -> tuple[str, str, str]:
    cfg = dataclasses.replace(
        SMALL,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=max(1, args.n_embd // 32),
        seq_len=args.seq_len,
        base_steps=4,
        ft_steps=2,
        wide_steps=2,
        n_checkpoints=1,
    )
    pair = build_demo_pair(cfg, root=Path(args.root) / "pair")
    corpus = Path(args.root) / "corpus.jsonl"
    if not corpus.exists():
        docs = prose_documents(600_000) + code_documents(600_000)
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(pair.base), str(pair.ft), str(corpus)


def run(args: argparse.Namespace, base: str, ft: str, corpus: str, overlap: bool) -> tuple[dict, float]:
    cfg = RunConfig(
        model=CrossCoderConfig(arch="batchtopk", d_latent=args.dict_size, k=args.k),
        train=TrainConfig(batch_size=args.batch_size, val_tokens=0, seed=0),
        data=DataConfig(
            base_model=base,
            ft_model=ft,
            site=f"transformer.h.{args.n_layer - 1}",
            dataset=corpus,
            seq_len=args.seq_len,
            model_batch_size=args.model_batch_size,
            buffer_tokens=args.buffer_tokens,
        ),
    )
    buf = buffer_source(cfg, "cpu")
    buf.overlap = overlap
    step = build_step(
        "batchtopk", buf.d_model, args.dict_size, args.batch_size, args.k, args.steps + 1, torch.device("cpu")
    )
    checksum = 0.0
    try:
        x = buf.next_batch()  # the first generation: built before training can start, in both modes
        step(x, 0)
        build0 = buf.build_s
        blocked = stepping = 0.0
        t0 = time.perf_counter()
        for i in range(1, args.steps + 1):
            t = time.perf_counter()
            x = buf.next_batch()
            t1 = time.perf_counter()
            checksum += float(x.double().sum())
            step(x, i)
            stepping += time.perf_counter() - t1
            blocked += t1 - t
        total = time.perf_counter() - t0
    finally:
        buf.close()
    out = {
        "total_s": total,
        "blocked_s": blocked,
        "blocked_frac": blocked / total,
        "step_s": stepping,
        "build_s": buf.build_s - build0,
        "tokens_per_s": args.steps * args.batch_size / total,
        "generations": buf.generation,
    }
    return out, checksum


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/crosscoder-bench-onthefly", help="where the pair is built")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--model-batch-size", type=int, default=16)
    p.add_argument("--buffer-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dict-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (each of the two threads)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, ft, corpus = make_pair(args)
    runs: dict[str, list[dict]] = {"sync": [], "overlap": []}
    sums: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so that both modes see the same machine load
        for mode in ("sync", "overlap"):
            r, sums[mode] = run(args, base, ft, corpus, mode == "overlap")
            runs[mode].append(r)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    result = {
        "config": vars(args),
        "torch": torch.__version__,
        **med,
        "overlap_saving": 1 - med["overlap"]["total_s"] / med["sync"]["total_s"],
        "hidden_frac": 1 - med["overlap"]["blocked_s"] / max(med["sync"]["blocked_s"], 1e-12),
        "same_rows": sums["sync"] == sums["overlap"],
        "runs": runs,
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return result


if __name__ == "__main__":
    main()
