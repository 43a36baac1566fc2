"""Scaling of training tokens/s from 1 to N processes (torchrun + DDP), printed as one JSON object.

    python benchmarks/bench_ddp.py --arch batchtopk --dict-size 4096 --batch-size 2048 --num-tokens 2000000
    python benchmarks/bench_ddp.py --latent-shards 2 ...   # the N processes split the latents instead

Runs ``crosscoder train`` on the built-in synthetic pair (d_model 64) with one process and with
``torchrun --nproc_per_node=N`` (gloo on CPU, NCCL on GPU), one torch thread per process, and reports
the median ``tokens_per_s`` of the logged windows after the first (warm-up) one. With
``--latent-shards S`` the N processes run as ``N / S`` data-parallel replicas of ``S`` latent shards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(out: Path, nproc: int, args: argparse.Namespace) -> float:
    train = [
        "--out",
        str(out),
        "--arch",
        args.arch,
        "--dict-size",
        str(args.dict_size),
        "--k",
        str(args.k),
        "--batch-size",
        str(args.batch_size),
        "--num-tokens",
        str(args.num_tokens),
        "--val-tokens",
        "0",
        "--log-every",
        "20",
        "--wandb",
        "off",
        "--no-progress",
        "--save-every",
        "0",
        "--device",
        args.device,
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "crosscoder", "train", *train]
    else:
        if args.latent_shards > 1:
            train += ["--latent-shards", str(args.latent_shards)]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "crosscoder",
            "train",
            *train,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return statistics.median(tps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="batchtopk")
    p.add_argument("--dict-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--num-tokens", type=int, default=2_000_000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent-shards", type=int, default=1, help="latent shards among the --nproc processes")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(Path(tmp) / "one", 1, args)
        many = run(Path(tmp) / "many", args.nproc, args)
    print(
        json.dumps(
            {
                "arch": args.arch,
                "dict_size": args.dict_size,
                "batch_size": args.batch_size,
                "device": args.device,
                "latent_shards": args.latent_shards,
                "tokens_per_s_1": round(one),
                f"tokens_per_s_{args.nproc}": round(many),
                "speedup": round(many / one, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
