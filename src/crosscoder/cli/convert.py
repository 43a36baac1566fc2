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
        "out",
        metavar="OUT",
        nargs="?",
        default=None,
        help="crosscoder folder to create (config.json + model.safetensors); may also follow --norm-scale",
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
    parser.add_argument(
        "--code-normalization",
        metavar="NAME",
        default=None,
        type=str.lower,
        choices=("crosscoder", "sae", "mixed", "none", "decoupled"),
        help="dictionary_learning: the code normalisation the model was trained with, for files that do "
        "not record it (older BatchTopK files); checked against the file when it does",
    )
    parser.add_argument("--site", default=None, help="module the activations were read at (recorded)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def split_out_and_scale(out: str | None, scale: list[str] | None) -> tuple[str, list[float] | None]:
    """``OUT`` and the ``--norm-scale`` factors, whichever order they came in.

    ``PATH --norm-scale A B OUT`` makes argparse read OUT as a third factor (the option takes one or more
    values): a trailing non-number is taken back as OUT when OUT was not given before the option.
    """
    from ..errors import CrossCoderError

    vals = list(scale) if scale is not None else None
    if out is None and vals and len(vals) > 1 and not _is_number(vals[-1]):
        out = vals.pop()
    if out is None:
        raise CrossCoderError("OUT: the crosscoder folder to create is missing (convert --from SRC PATH OUT)")
    if vals is not None:
        bad = [v for v in vals if not _is_number(v)]
        if bad:
            raise CrossCoderError(f"--norm-scale: {bad[0]!r} is not a number")
        return out, [float(v) for v in vals]
    return out, None


def run(args: argparse.Namespace) -> int:
    from ..interop.convert import convert

    out_arg, norm_scale = split_out_and_scale(args.out, args.norm_scale)
    out, conv = convert(
        args.source,
        args.path,
        out_arg,
        cfg_path=args.cfg,
        norm_scale=norm_scale,
        model_names=args.model_names,
        site=args.site,
        overwrite=args.overwrite,
        code_normalization=args.code_normalization,
    )
    for note in conv.notes:
        print(f"note: {note}", file=sys.stderr)
    cfg = conv.model.cfg
    print(
        f"converted {args.source} -> {out} ({cfg.arch}, n_models={cfg.n_models}, d_model={cfg.d_model}, "
        f"d_latent={cfg.d_latent})"
    )
    return 0
