"""``crosscoder train``: flags mirror the config dataclasses; ``--config`` loads a JSON/YAML file first."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..config import CrossCoderConfig, DataConfig, RunConfig, TrainConfig, load_config_file
from .args import add_dataclass_arguments, apply, overrides

NAME = "train"
HELP = (
    "Train a crosscoder on paired activations (a cache, two HF datasets, two models on the fly, "
    "or, with no data arguments, the built-in synthetic pair)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON/YAML config (a run's config.json reproduces it); flags override it")
    p.add_argument("--out", help="output folder (default: runs/crosscoder-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    add_dataclass_arguments(p, CrossCoderConfig, "model")
    add_dataclass_arguments(p, TrainConfig, "training")
    add_dataclass_arguments(p, DataConfig, "data")


def build_config(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig()
    if args.resume and args.out and (Path(args.out) / "config.json").is_file():
        cfg = RunConfig.from_dict(
            json.loads((Path(args.out) / "config.json").read_text()), f"{args.out}/config.json"
        )
    if args.config:
        cfg = RunConfig.from_dict(load_config_file(args.config), args.config)
    cfg = RunConfig(
        model=apply(cfg.model, overrides(args, CrossCoderConfig)),
        train=apply(cfg.train, overrides(args, TrainConfig)),
        data=apply(cfg.data, overrides(args, DataConfig)),
    )
    d = cfg.data
    if not (args.config or args.resume or d.cache or d.base_data or d.ft_data or d.base_model or d.dataset):
        # The built-in synthetic pair: a short documented preset for what the user did not set.
        preset = {k: v for k, v in SYNTHETIC_PRESET.items() if getattr(args, k, None) is None}
        cfg.model = apply(cfg.model, {k: v for k, v in preset.items() if hasattr(cfg.model, k)})
        cfg.train = apply(cfg.train, {k: v for k, v in preset.items() if hasattr(cfg.train, k)})
        print(f"no data given: training on the built-in synthetic pair (preset {preset})")
    return cfg


# Applied to `crosscoder train` with no data arguments (flags still override each value).
# ~2.75 planted features are active per token, so k=4; 512 latents for 176 planted features.
SYNTHETIC_PRESET = {
    "num_tokens": 1_000_000,
    "batch_size": 512,
    "d_latent": 512,
    "k": 4,
    "l1_coeff": 3.0,
    "val_every": 200,
    "log_every": 50,
}


def run(args: argparse.Namespace) -> int:
    from ..train import Interrupted, run_training
    from ..train.checkpoint import disk_full_errors

    cfg = build_config(args)
    out = Path(args.out or f"runs/crosscoder-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        metrics = run_training(cfg, out, overwrite=args.overwrite, resume=args.resume)
    except Interrupted as e:
        print(f"interrupted: {e}")
        return 130
    with disk_full_errors(out):  # recovery.json
        print(summary(out, metrics))
    return 0


def summary(out: Path, metrics: dict) -> str:
    """Closing lines of ``crosscoder train``: final metrics, latent classes by decoder norm with the rules and
    default thresholds of ``crosscoder analyze`` (``analysis/table.py``), and on a synthetic pair the
    planted-feature recovery (also written to ``OUT/recovery.json``)."""
    from ..analysis.table import CLASS_NAMES, latent_columns, thresholds_for
    from ..model import CrossCoder

    keys = (
        "loss l2_loss l0_loss explained_variance explained_variance_A explained_variance_B dead_fraction "
        "tokens_per_s val/explained_variance val/l0_loss"
    ).split()
    lines = [f"saved crosscoder to {out}/ (config.json, model.safetensors, metrics.jsonl)"]
    lines += [f"  {k:<24} {metrics[k]:.4g}" for k in keys if k in metrics]
    model = CrossCoder.from_pretrained(out)
    t = thresholds_for(model.cfg.arch)
    if model.cfg.n_models == 2:
        cls = latent_columns(model, t)["class"]  # no data: decoder norms only
        b = t.exclusive_band
        lines.append(
            f"latent classes by relative decoder norm r (crosscoder analyze's {model.cfg.arch} defaults: "
            f"base_only r < {b:g}, ft_only r > {1 - b:g}, shared |r - 0.5| <= {t.shared_band:g}):"
        )
        lines.append(
            "  " + "  ".join(f"{c} {int((cls == c).sum())}" for c in CLASS_NAMES) + f"  (of {len(cls)})"
        )
        lines.append(
            f"  by decoder norm only: `crosscoder analyze {out}` also applies Latent Scaling (needs data)"
        )
    cfg = json.loads((out / "config.json").read_text())
    gt = cfg.get("source", {}).get("ground_truth")
    if gt:
        from ..analysis.recovery import format_recovery, recovery
        from ..data.synthetic import GroundTruth
        from ..io import write_json

        rec = recovery(model, GroundTruth.load(gt), thresholds=t)
        write_json(out / "recovery.json", rec)
        lines.append(format_recovery(rec))
    return "\n".join(lines)
