"""``crosscoder bench``: time the full training step on synthetic data and print one JSON object."""

from __future__ import annotations

import argparse
import json

NAME = "bench"
HELP = (
    "Time the full training step (forward, losses, backward, clipping, Adam, schedules) on synthetic "
    "data after warm-up; print tokens/s, ms/step, GFLOP/s, the measured matmul peak, the fraction of it "
    "and peak memory as one JSON object."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench import add_shape_arguments

    add_shape_arguments(p, arch="vanilla")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype; bfloat16 = autocast with float32 master weights (default: float32)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the loss computation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument(
        "--aux-k", type=int, default=None, help="AuxK latents (default: 512 for batchtopk, 0 for vanilla)"
    )
    p.add_argument(
        "--dead-frac",
        type=float,
        default=0.0,
        help="fraction of latents held dead so that AuxK runs (default: 0.0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and batches (default: 0)")


def run(args: argparse.Namespace) -> int:
    from ..bench import run_bench

    res = run_bench(
        arch=args.arch,
        d_model=args.d_model,
        dict_size=args.dict_size,
        batch_size=args.batch_size,
        k=args.k,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        threads=args.threads,
        n_models=args.n_models,
        aux_k=args.aux_k,
        dead_frac=args.dead_frac,
        seed=args.seed,
    )
    print(json.dumps(res))
    return 0
