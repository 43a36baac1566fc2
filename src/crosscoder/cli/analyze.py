"""``crosscoder analyze RUN_DIR (--cache CACHE | --base-data A --ft-data B) --out REPORT_DIR``.

Two models at one site get the base/fine-tuned diffing report; n models, several sites or mixed widths
get the presence-pattern report (docs/analysis.md, "Several models, sites and checkpoints")."""

from __future__ import annotations

import argparse

NAME = "analyze"
HELP = (
    "Model-diffing report of a trained crosscoder: latent table (relative norm, delta norm, cosine, "
    "classes, frequencies, Latent Scaling; for n models presence patterns), top contexts, spliced-in "
    "CE/KL, plots and report.html."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a(
        "run_dir",
        help="a crosscoder folder (config.json + model.safetensors, e.g. a `crosscoder train` output)",
    )
    a("--out", required=True, help="report folder (created; must be empty unless --overwrite)")
    a("--overwrite", action="store_true", help="replace an existing report folder")
    d = p.add_argument_group("data (default: the cache recorded by the run)")
    d.add_argument("--cache", help="paired activation cache folder")
    d.add_argument("--base-data", help="base-model activations (HF dataset), row-aligned with --ft-data")
    d.add_argument("--ft-data", help="fine-tuned-model activations (HF dataset)")
    d.add_argument(
        "--column", default="activation", help="vector column of --base-data/--ft-data (default: activation)"
    )
    d.add_argument(
        "--max-tokens",
        type=int,
        default=500_000,
        help="tokens scanned for frequencies, Latent Scaling and contexts "
        "(a seeded sample; default 500000; 0 = all)",
    )
    d.add_argument(
        "--ground-truth", help="planted features of a synthetic pair (default: found beside the data)"
    )
    m = p.add_argument_group(
        "models (spliced-in evaluation and token text; default: those the cache was collected from)"
    )
    m.add_argument("--base-model", help="base model (hub id or folder); its tokenizer decodes the contexts")
    m.add_argument("--ft-model", help="fine-tuned model")
    m.add_argument(
        "--models",
        nargs="+",
        metavar="SPEC",
        help="three or more models, or models read at several sites: one spec per model in the "
        "crosscoder's order (hub id, folder or repo@revision; default: the cache's models)",
    )
    m.add_argument("--site", help="module whose output the crosscoder reconstructs (default: the run's site)")
    m.add_argument(
        "--eval-data",
        help="held-out text dataset for the spliced-in evaluation (default: the cache's "
        "dataset after the sequences it was collected from)",
    )
    m.add_argument("--eval-sequences", type=int, default=64, help="held-out sequences (default: 64)")
    m.add_argument("--eval-batch-size", type=int, default=16, help="sequences per forward (default: 16)")
    m.add_argument(
        "--spliced", action=argparse.BooleanOptionalAction, default=True, help="run the spliced-in evaluation"
    )
    c = p.add_argument_group("classification (defaults per architecture, see docs/analysis.md)")
    c.add_argument(
        "--exclusive-band",
        type=float,
        help="r < band: base_only, r > 1 - band: ft_only (vanilla 0.1, batchtopk 0.25)",
    )
    c.add_argument("--shared-band", type=float, help="|r - 0.5| <= band: shared (default 0.2)")
    c.add_argument(
        "--nu-error-max", type=float, help="keep an exclusive call only if |nu_error| <= this (default 0.2)"
    )
    c.add_argument(
        "--nu-reconstruction-max", type=float, help="... and |nu_reconstruction| <= this (default 0.2)"
    )
    c.add_argument(
        "--min-active", type=int, help="... and it fired on at least this many scanned tokens (default 20)"
    )
    c.add_argument(
        "--latent-scaling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use Latent Scaling to confirm exclusive calls (--no-latent-scaling: norm alone)",
    )
    c.add_argument(
        "--latent-scaling-target",
        choices=("intercept", "bias_free", "literal"),
        default="intercept",
        help="Latent Scaling fit: intercept (default; least squares with a constant, blind to the "
        "decoder bias and data means), bias_free (reconstruction without b_dec), literal "
        "(as published: the decoder bias leaks into the betas)",
    )
    k = p.add_argument_group("comparison with another crosscoder (see docs/layout.md)")
    k.add_argument(
        "--compare-to",
        metavar="OTHER_RUN",
        help="another crosscoder folder trained on the same data (e.g. a free crosscoder): match each "
        "latent to its best latent there by per-model decoder cosine and report, per partition of this "
        "run, how many match and the relative-norm class of the matches (summary.json 'comparison', "
        "report.html, match_* columns)",
    )
    k.add_argument(
        "--compare-threshold",
        type=float,
        default=0.9,
        help="a latent matches when its best per-model decoder cosine is at least this (default: 0.9)",
    )
    r = p.add_argument_group("report")
    r.add_argument("--top-k", type=int, default=8, help="top activating contexts per latent (default: 8)")
    r.add_argument(
        "--context",
        type=int,
        nargs=2,
        default=(10, 3),
        metavar=("LEFT", "RIGHT"),
        help="tokens shown before and after the activating token (default: 10 3)",
    )
    r.add_argument("--max-cards", type=int, default=1000, help="latents with stored contexts (default: 1000)")
    r.add_argument(
        "--export",
        action="append",
        metavar="FORMAT",
        help="also write the latents with contexts as neuronpedia and/or saedashboard files into "
        "OUT/<format>/ (repeatable or a comma list; docs/analysis.md)",
    )
    r.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    r.add_argument("--chunk", type=int, default=1024, help="tokens per streaming chunk (default: 1024)")


def run(args: argparse.Namespace) -> int:
    from ..analysis.export_formats import parse_exports
    from ..analysis.pipeline import AnalyzeConfig, analyze

    export = parse_exports(args.export)  # an unknown format fails before the scan
    cfg = AnalyzeConfig(
        run_dir=args.run_dir,
        out=args.out,
        overwrite=args.overwrite,
        cache=args.cache,
        base_data=args.base_data,
        ft_data=args.ft_data,
        column=args.column,
        max_tokens=args.max_tokens or None,
        ground_truth=args.ground_truth,
        base_model=args.base_model,
        ft_model=args.ft_model,
        models=args.models,
        site=args.site,
        eval_data=args.eval_data,
        eval_sequences=args.eval_sequences,
        eval_batch_size=args.eval_batch_size,
        spliced=args.spliced,
        exclusive_band=args.exclusive_band,
        shared_band=args.shared_band,
        nu_error_max=args.nu_error_max,
        nu_reconstruction_max=args.nu_reconstruction_max,
        min_active=args.min_active,
        latent_scaling=args.latent_scaling,
        latent_scaling_target=args.latent_scaling_target,
        top_k=args.top_k,
        context_left=args.context[0],
        context_right=args.context[1],
        max_cards=args.max_cards,
        device=args.device,
        threads=args.threads,
        chunk=args.chunk,
        compare_to=args.compare_to,
        compare_threshold=args.compare_threshold,
        export=export or None,
    )
    analyze(cfg)
    return 0
