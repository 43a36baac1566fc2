"""``crosscoder synth OUT``: write a synthetic pair as two aligned HF datasets plus the ground truth, or
``n_models > 2`` models (preset ``multi``) as a paired cache plus the ground truth."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..data.synthetic import ALL_PRESETS, SyntheticConfig
from ..errors import CrossCoderError
from .args import add_dataclass_arguments, overrides

NAME = "synth"
HELP = (
    "Write a synthetic pair (planted shared, base-only, fine-tuned-only and weakened-shared "
    "features; by default the built-in one) as OUT/base and OUT/ft (HF datasets, column 'activation') "
    "plus OUT/ground_truth. --preset picks a member of the family (docs/synthetic.md); the flags below "
    "override its fields. With more than two models (--preset multi, or --n-models N) features are planted "
    "in presence subsets of the models and OUT/cache is a paired cache (train with --cache OUT/cache)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument(
        "--preset",
        default="default",
        metavar="NAME",
        help=f"named member: {', '.join(ALL_PRESETS)} (default: default; multi: 4 models)",
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
    if cfg.n_models > 2:
        return _run_multi(args, cfg, out)
    gt = write_hf_pair(cfg, args.rows, out, args.column)
    counts = {c: gt.classes.count(c) for c in dict.fromkeys(gt.classes)}
    rms = [round(v, 3) for v in gt.feature_rms().tolist()]
    offs = [round(v, 3) for v in gt.offset.norm(dim=-1).tolist()]
    print(
        f"wrote {args.rows} paired rows (d_model {cfg.d_model}, preset {args.preset}) to {out}/base and "
        f"{out}/ft; planted features {counts}; ground truth in {out}/ground_truth"
    )
    print(_active_line(gt) + f"; feature-part RMS norm base/ft {rms}, offset norm base/ft {offs}")
    return 0


def _active_line(gt) -> str:
    k = math.ceil(gt.expected_active()) + 1
    return (
        f"expected active planted features per token: {gt.expected_active():.2f} (BatchTopK: --k "
        f"{k} or so, just above it)"
    )


def _run_multi(args: argparse.Namespace, cfg: SyntheticConfig, out: Path) -> int:
    from ..data.synthetic import write_multi

    gt = write_multi(cfg, args.rows, out)
    counts = {c: gt.classes.count(c) for c in dict.fromkeys(gt.classes)}
    per_model = (gt.strength > 0).sum(0).tolist()
    rms = [round(v, 3) for v in gt.feature_rms().tolist()]
    offs = [round(v, 3) for v in gt.offset.norm(dim=-1).tolist()]
    print(
        f"wrote {args.rows} rows of {cfg.n_models} models (d_model {cfg.d_model}, preset {args.preset}) to "
        f"the paired cache {out}/cache; planted features {counts} in {len(set(gt.patterns))} presence "
        f"patterns, per model {per_model}; ground truth in {out}/ground_truth; train with "
        f"crosscoder train --cache {out}/cache"
    )
    print(_active_line(gt) + f"; feature-part RMS norm per model {rms}, offset norm per model {offs}")
    return 0
