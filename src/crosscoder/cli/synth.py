"""``crosscoder synth OUT``: write a synthetic pair as two aligned HF datasets plus the ground truth."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..data.synthetic import PRESETS, SyntheticConfig
from ..errors import CrossCoderError
from .args import add_dataclass_arguments, overrides

NAME = "synth"
HELP = (
    "Write a synthetic pair (planted shared, base-only, fine-tuned-only and weakened-shared "
    "features; by default the built-in one) as OUT/base and OUT/ft (HF datasets, column 'activation') "
    "plus OUT/ground_truth. --preset picks a member of the family (docs/synthetic.md); the flags below "
    "override its fields."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument(
        "--preset",
        default="default",
        metavar="NAME",
        help=f"named pair: {', '.join(PRESETS)} (default: default)",
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="tokens (rows) to generate (default: 1000000)")
    p.add_argument("--column", default="activation", help="vector column name (default: activation)")
    add_dataclass_arguments(p, SyntheticConfig, "synthetic features (default: the preset's values)")


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import preset_config, write_hf_pair

    out = Path(args.out)
    if out.exists():
        raise CrossCoderError(f"{out}: already exists")
    if args.rows <= 0:
        raise CrossCoderError(f"--rows: must be positive, got {args.rows}")
    cfg = preset_config(args.preset, **overrides(args, SyntheticConfig))
    gt = write_hf_pair(cfg, args.rows, out, args.column)
    counts = {c: gt.classes.count(c) for c in dict.fromkeys(gt.classes)}
    rms = [round(v, 3) for v in gt.feature_rms().tolist()]
    offs = [round(v, 3) for v in gt.offset.norm(dim=-1).tolist()]
    print(
        f"wrote {args.rows} paired rows (d_model {cfg.d_model}, preset {args.preset}) to {out}/base and "
        f"{out}/ft; planted features {counts}; ground truth in {out}/ground_truth"
    )
    print(
        f"expected active planted features per token: {gt.expected_active():.2f} (BatchTopK: --k "
        f"{math.ceil(gt.expected_active()) + 1} or so, just above it); "
        f"feature-part RMS norm base/ft {rms}, offset norm base/ft {offs}"
    )
    return 0
