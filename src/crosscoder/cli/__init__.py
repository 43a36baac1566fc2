"""Command-line entry point: ``crosscoder <command>`` (also ``python -m crosscoder``).

Each command lives in its own module of this package exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. A :class:`~crosscoder.errors.CrossCoderError`
becomes one ``error: ...`` line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from ..errors import CrossCoderError

# Modules are imported lazily so that `crosscoder train` never pays for nnsight's import.
COMMANDS = [
    "train",
    "synth",
    "collect",
    "sites",
    "export",
    "demo",
    "analyze",
    "convert",
    "push",
    "bench",
    "plan",
]


def _available() -> dict[str, str]:
    out = {}
    for name in COMMANDS:
        spec = importlib.util.find_spec(f"{__name__}.{name}")
        if spec is not None:
            out[name] = f"{__name__}.{name}"
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="crosscoder", description="Train and analyse crosscoders for model diffing."
    )
    parser.add_argument("--version", action="version", version=f"crosscoder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = _available()
    for name, modname in mods.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    return parser, mods


def main(argv: list[str] | None = None) -> int:
    parser, mods = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    mod = importlib.import_module(mods[args.command])
    try:
        return int(mod.run(args) or 0)
    except CrossCoderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
