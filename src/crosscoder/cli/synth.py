"""``crosscoder synth OUT``: write the synthetic pair as two aligned HF datasets plus the ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.synthetic import SyntheticConfig
from ..errors import CrossCoderError
from .args import add_dataclass_arguments, overrides

NAME = "synth"
HELP = ("Write the built-in synthetic pair (planted shared, base-only, fine-tuned-only and weakened-shared "
        "features) as OUT/base and OUT/ft (HF datasets, column 'activation') plus OUT/ground_truth.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--rows", type=int, default=1_000_000, help="tokens (rows) to generate (default: 1000000)")
    p.add_argument("--column", default="activation", help="vector column name (default: activation)")
    add_dataclass_arguments(p, SyntheticConfig, "synthetic features")


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import write_hf_pair

    out = Path(args.out)
    if out.exists():
        raise CrossCoderError(f"{out}: already exists")
    if args.rows <= 0:
        raise CrossCoderError(f"--rows: must be positive, got {args.rows}")
    cfg = SyntheticConfig(**overrides(args, SyntheticConfig))
    gt = write_hf_pair(cfg, args.rows, out, args.column)
    counts = {c: gt.classes.count(c) for c in dict.fromkeys(gt.classes)}
    print(f"wrote {args.rows} paired rows (d_model {cfg.d_model}) to {out}/base and {out}/ft; "
          f"planted features {counts}; ground truth in {out}/ground_truth")
    return 0
