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
    p.add_argument(
        "--latent-shards", type=int, default=1, help="ranks the latents are split over (divides --world-size)"
    )
    p.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory of one device in GiB, to say whether the run fits or needs latent sharding "
        "(default: this machine's GPU, else 80)",
    )
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
    for name in ("d_model", "dict_size", "batch_size", "n_models", "world_size", "n_sites", "latent_shards"):
        if getattr(args, name) <= 0:
            raise CrossCoderError(f"--{name.replace('_', '-')}: must be positive")
    if args.world_size % args.latent_shards:
        raise CrossCoderError(
            f"--latent-shards: {args.latent_shards} does not divide --world-size {args.world_size}"
        )
    if args.dict_size % args.latent_shards:
        raise CrossCoderError(
            f"--latent-shards: {args.latent_shards} does not divide --dict-size {args.dict_size}"
        )
    shape = dict(
        d_model=args.d_model,
        dict_size=args.dict_size,
        batch_size=args.batch_size,
        n_models=args.n_models,
        arch=args.arch,
        k=args.k,
        aux_k=args.aux_k,
        dtype=args.dtype,
        cache_tokens=args.cache_tokens,
        cache_dtype=args.cache_dtype,
        d_models=widths,
        n_sites=args.n_sites,
    )
    pl = plan(world_size=args.world_size, latent_shards=args.latent_shards, **shape)
    device = device_memory(args.device_memory)
    verdict = sharding_verdict(pl, device, args, shape)
    if args.json:
        print(json.dumps({**pl.to_dict(), **verdict}))
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
    print(f"device              {human(device)} per device: {verdict['verdict']}")
    if verdict["launch"]:
        print(f"launch              {verdict['launch']}")
    return 0


def device_memory(gib: float | None) -> float:
    """Bytes of one device: ``--device-memory``, else this machine's first GPU, else 80 GiB."""
    if gib is not None:
        if gib <= 0:
            from ..errors import CrossCoderError

            raise CrossCoderError("--device-memory: must be positive")
        return gib * 2**30
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return 80.0 * 2**30


def sharding_verdict(pl: object, device: float, args: argparse.Namespace, shape: dict[str, object]) -> dict:
    """Whether the planned run fits ``device`` bytes per rank, the latent-shard count it needs (the smallest
    that fits on ``--world-size`` ranks, or the ranks needed when none does) and its launch line."""
    from ..train.plan import OVERHEAD, human, plan, shards_needed

    w, s = args.world_size, args.latent_shards
    need = shards_needed(device, w, **shape)
    out: dict[str, object] = {"device_bytes": int(device), "shards_needed": need, "launch": None}
    fits = pl.total_bytes_per_rank * OVERHEAD <= device
    if need is None:  # not even with every rank a shard: how many ranks would do
        more = next(
            (n for n in (2**i for i in range(1, 13)) if n > w and shards_needed(device, n, **shape) == n),
            None,
        )
        out["verdict"] = f"does not fit on {w} rank(s) even with --latent-shards {w}" + (
            f"; {more} ranks with --latent-shards {more} would" if more else ""
        )
        if more:
            w, s = more, more
        else:
            return out
    elif fits:
        out["verdict"] = "fits" + (" without latent sharding" if s == 1 else f" with --latent-shards {s}")
    else:
        need_pl = plan(world_size=w, latent_shards=need, **shape)
        out["verdict"] = (
            f"needs latent sharding: {human(pl.total_bytes_per_rank * OVERHEAD)} per rank with overhead; "
            f"--latent-shards {need} brings it to {human(need_pl.total_bytes_per_rank * OVERHEAD)}"
        )
        s = need
    flags = f"--arch {args.arch} --dict-size {args.dict_size} --k {args.k} --batch-size {args.batch_size}"
    if args.dtype != "float32":
        flags += f" --dtype {args.dtype}"
    if s > 1:
        flags += f" --latent-shards {s}"
    head = f"torchrun --nproc_per_node={w} -m crosscoder train" if w > 1 else "crosscoder train"
    out["launch"] = f"{head} --cache CACHE {flags}"
    return out
