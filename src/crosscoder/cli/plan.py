"""``crosscoder plan``: per-rank parameter, optimizer and activation memory, and cache disk size."""

from __future__ import annotations

import argparse
import json

from ..model.registry import architecture_names

NAME = "plan"
HELP = "Estimate per-rank memory of a training run and the disk of an activation cache, before running it."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-model", type=int, default=None, help="activation width of every model")
    p.add_argument(
        "--d-models",
        default=None,
        metavar="W1,W2,...",
        help="widths of models that differ (e.g. 128,192): sets the model count; narrower ones are padded",
    )
    p.add_argument("--n-sites", type=int, default=1, help="sites per model (acausal crosscoder; default 1)")
    p.add_argument("--dict-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4096, help="global batch in tokens (default 4096)")
    p.add_argument("--n-models", type=int, default=2)
    p.add_argument("--arch", choices=architecture_names(), default="batchtopk")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--aux-k", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs)")
    p.add_argument("--cache-tokens", type=int, default=0, help="tokens of a paired cache to size on disk")
    p.add_argument("--cache-dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..errors import CrossCoderError
    from ..train.plan import human, plan

    widths = None
    if args.d_models:
        try:
            widths = [int(v) for v in args.d_models.split(",")]
        except ValueError:
            raise CrossCoderError(
                f"--d-models: expected comma-separated widths, got {args.d_models!r}"
            ) from None
        if len(widths) < 2 or min(widths) <= 0:
            raise CrossCoderError(f"--d-models: expected at least two positive widths, got {args.d_models!r}")
        args.d_model, args.n_models = max(widths), len(widths)
    elif args.d_model is None:
        raise CrossCoderError("--d-model: required (or --d-models for models of different widths)")
    for name in ("d_model", "dict_size", "batch_size", "n_models", "world_size", "n_sites"):
        if getattr(args, name) <= 0:
            raise CrossCoderError(f"--{name.replace('_', '-')}: must be positive")
    pl = plan(
        args.d_model,
        args.dict_size,
        args.batch_size,
        args.n_models,
        args.arch,
        args.k,
        args.aux_k,
        args.dtype,
        args.world_size,
        args.cache_tokens,
        args.cache_dtype,
        widths,
        args.n_sites,
    )
    if args.json:
        print(json.dumps(pl.to_dict()))
        return 0
    if pl.n_blocks != 2 or pl.padding_fraction:
        print(
            f"model axis          {pl.n_blocks} blocks ({args.n_models} models x {args.n_sites} sites) "
            f"of width {pl.d_model}"
            + (f", {100 * pl.padding_fraction:.1f}% zero padding" if pl.padding_fraction else "")
        )
    print(f"parameters          {pl.params:,} ({human(pl.param_bytes)} float32)")
    print(f"gradients           {human(pl.grad_bytes)}")
    print(f"Adam state          {human(pl.optimizer_bytes)}")
    if pl.ddp_bytes:
        print(f"DDP buckets         {human(pl.ddp_bytes)}")
    print(f"activations         {human(pl.activation_bytes)} (local batch {pl.local_batch}, {args.dtype})")
    print(f"total per rank      {human(pl.total_bytes_per_rank)} (+10-20% allocator/framework overhead)")
    if args.cache_tokens:
        print(
            f"cache on disk       {human(pl.cache_bytes)} for {args.cache_tokens:,} tokens "
            f"({args.cache_dtype})"
        )
    return 0
