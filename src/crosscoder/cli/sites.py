"""``crosscoder sites MODEL``: the module paths of a model usable as ``--site``, with their output shapes."""

from __future__ import annotations

import argparse

NAME = "sites"
HELP = "list the module paths of a model usable as --site, with their output shapes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="hub id or local folder")
    parser.add_argument("--filter", default=None, help="only paths containing this text")
    parser.add_argument(
        "--all", action="store_true", help="also list modules whose output is not [batch, seq, d]"
    )
    parser.add_argument("--revision", default=None, help="hub revision")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="pass trust_remote_code to transformers"
    )


def list_sites(
    model: str, revision: str | None = None, trust_remote_code: bool = False
) -> list[tuple[str, str, str]]:
    """``(path, module class, output shape)`` for every module, from a forward on the meta device
    (no weights are loaded; shapes of a 1 x 4 token input, ``B`` and ``T`` standing for batch and
    sequence)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..data.collect import quiet_transformers
    from ..errors import DataError

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"{model}: cannot load model config "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    shapes: dict[str, str] = {}

    def describe(o: object) -> str:
        if isinstance(o, torch.Tensor):
            dims = list(o.shape)
            if len(dims) >= 2 and dims[:2] == [1, 4]:
                return "[B, T" + "".join(f", {d}" for d in dims[2:]) + "]"
            return str(dims)
        if isinstance(o, (tuple, list)) and o and isinstance(o[0], torch.Tensor):
            return f"tuple({describe(o[0])}, ...)"
        return type(o).__name__

    def hook(name: str):
        def record(mod: object, inp: object, out: object) -> None:  # returns None: the output is not replaced
            shapes.setdefault(name, describe(out))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in hf.named_modules() if n]
    try:
        with torch.no_grad():
            hf(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    except Exception as e:  # noqa: BLE001 - shapes are best effort on the meta device
        import sys

        print(
            f"note: the shape-only forward stopped early ({type(e).__name__}); later modules show "
            "'(not run)'",
            file=sys.stderr,
        )
    for h in handles:
        h.remove()
    return [(n, type(m).__name__, shapes.get(n, "(not run)")) for n, m in hf.named_modules() if n]


def run(args: argparse.Namespace) -> int:
    rows = list_sites(args.model, args.revision, args.trust_remote_code)
    if args.filter:
        rows = [r for r in rows if args.filter in r[0]]
    if not args.all:
        rows = [r for r in rows if r[2].startswith("[B, T, ") or r[2].startswith("tuple([B, T, ")]
    width = max((len(r[0]) for r in rows), default=4)
    cls_w = max((len(r[1]) for r in rows), default=5)
    print(f"{'site':<{width}}  {'module':<{cls_w}}  output")
    for path, cls, shape in rows:
        print(f"{path:<{width}}  {cls:<{cls_w}}  {shape}")
    return 0
