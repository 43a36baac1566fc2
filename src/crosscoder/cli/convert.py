"""``crosscoder convert``: turn a crosscoder trained with another codebase into a crosscoder folder."""

from __future__ import annotations

import argparse
import sys

NAME = "convert"
HELP = "convert a crosscoder from Kissane's replication or dictionary_learning into this library's format"

SOURCES = ("kissane", "dictionary_learning")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="source", required=True, choices=SOURCES, help="source format (see docs/interop.md)"
    )
    parser.add_argument(
        "path", metavar="PATH", help="the source checkpoint: a .pt/.safetensors file or a folder holding it"
    )
    parser.add_argument(
        "out", metavar="OUT", help="crosscoder folder to create (config.json + model.safetensors)"
    )
    parser.add_argument(
        "--cfg",
        metavar="FILE",
        default=None,
        help="source config JSON when not found beside PATH (kissane: <N>_cfg.json; "
        "dictionary_learning: the model's config.json)",
    )
    parser.add_argument(
        "--norm-scale",
        metavar="F",
        type=float,
        nargs="+",
        default=None,
        help="per-model factors multiplying raw activations into the source's normalised "
        "space; folded into the weights so the result takes raw activations",
    )
    parser.add_argument(
        "--model-names",
        metavar="NAME",
        nargs="+",
        default=None,
        help="names of the models, base first (recorded in config.json and the model card)",
    )
    parser.add_argument("--site", default=None, help="module the activations were read at (recorded)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from ..interop.convert import convert

    out, conv = convert(
        args.source,
        args.path,
        args.out,
        cfg_path=args.cfg,
        norm_scale=args.norm_scale,
        model_names=args.model_names,
        site=args.site,
        overwrite=args.overwrite,
    )
    for note in conv.notes:
        print(f"note: {note}", file=sys.stderr)
    cfg = conv.model.cfg
    print(
        f"converted {args.source} -> {out} ({cfg.arch}, n_models={cfg.n_models}, d_model={cfg.d_model}, "
        f"d_latent={cfg.d_latent})"
    )
    return 0
