"""``crosscoder demo``: the whole pipeline offline, in a few minutes on a laptop CPU.

1. build (once, cached) a small GPT-2 pretrained on standard-library prose and a copy briefly
   fine-tuned on standard-library code (:mod:`crosscoder.data.demo_pair`; the same build also holds
   checkpoints of the pretraining, a second fine-tune on data records and a wider model);
2. collect paired activations at a middle block into a cache;
3. train a batchtopk crosscoder on the cache (``--arch vanilla``: the L1 crosscoder);
4. analyze it (``crosscoder analyze``: Latent Scaling, top contexts, spliced-in loss, ``<out>/report``;
   ``--no-analyze`` skips this);
5. print the summary: explained variance, L0, the numbers of base-only / shared / fine-tuned-only
   latents by relative decoder norm ``r = |d_ft| / (|d_base| + |d_ft|)``, and the story figures of the
   analysis (:mod:`crosscoder.analysis.story`): how many ft-only latents Latent Scaling confirms, what
   share of their top contexts is code, and the median decoder cosine of the shared latents.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..model.registry import architecture_names

NAME = "demo"
HELP = (
    "offline demo: build a tiny base/fine-tuned GPT-2 pair, collect activations, train a batchtopk crosscoder"
)

# Relative-norm bins (the usual model-diffing convention).
BASE_ONLY, FT_ONLY, SHARED = 0.1, 0.9, (0.3, 0.7)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default=None, help="folder for the cache and the crosscoder (default: under the cache folder)")
    a("--small", action="store_true", help="a much smaller pair and run (seconds; what the tests use)")
    a("--num-tokens", type=int, default=None, help="tokens to collect (default: 150000; --small 20000)")
    a(
        "--train-tokens",
        type=int,
        default=None,
        help="crosscoder training tokens (default: 1000000; --small 60000)",
    )
    a("--arch", default="batchtopk", choices=architecture_names(), help="crosscoder architecture")
    a("--d-latent", type=int, default=None, help="latents (default: 512; --small 128)")
    a("--k", type=int, default=None, help="batchtopk k (default: 16; --small 8)")
    a("--batch-size", type=int, default=None, help="training batch (default: 512; --small 256)")
    a("--site", default=None, help="module to read (default: the middle block, transformer.h.<n_layer // 2>)")
    a("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    a("--rebuild", action="store_true", help="rebuild the model pair and recollect")
    a(
        "--analyze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run `crosscoder analyze` on the result (report in OUT/report; default: on)",
    )
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")


def latent_groups(model: Any, x_raw: Any) -> dict[str, Any]:
    """Count latents by relative decoder norm (alive ones: firing on ``x_raw [n, 2, d]``), plus dead ones;
    ``histogram``: alive latents in 10 bins of r over [0, 1]."""
    import torch

    with torch.no_grad():
        fired = (model.encode(x_raw) > 0).any(0)
        norms = model.dec_norms()  # [h, 2], normalised space
        r = norms[:, 1] / norms.sum(-1).clamp_min(1e-12)
    alive = r[fired]
    return {
        "base_only": int((alive < BASE_ONLY).sum()),
        "ft_only": int((alive > FT_ONLY).sum()),
        "shared": int(((alive >= SHARED[0]) & (alive <= SHARED[1])).sum()),
        "intermediate": int(
            len(alive)
            - (alive < BASE_ONLY).sum()
            - (alive > FT_ONLY).sum()
            - ((alive >= SHARED[0]) & (alive <= SHARED[1])).sum()
        ),
        "dead": int((~fired).sum()),
        "total": int(len(r)),
        "histogram": torch.histc(alive, bins=10, min=0.0, max=1.0).int().tolist(),
    }


def run_demo(
    out: str | None = None,
    small: bool = False,
    num_tokens: int | None = None,
    train_tokens: int | None = None,
    arch: str = "batchtopk",
    d_latent: int | None = None,
    k: int | None = None,
    batch_size: int | None = None,
    site: str | None = None,
    threads: int = 1,
    rebuild: bool = False,
    progress: bool = True,
    analyze: bool = True,
    say: Any = print,
) -> dict[str, Any]:
    """Build the pair, collect, train, analyze (``analyze``); returns the summary dict (also printed through
    ``say``)."""
    import numpy as np
    import torch

    from ..config import CrossCoderConfig, DataConfig, RunConfig, TrainConfig
    from ..data.collect import CollectConfig, collect
    from ..data.demo_pair import SMALL, DemoPairConfig, build_demo_pair, cache_dir
    from ..data.paired import PairedCache
    from ..model import CrossCoder
    from ..train import run_training

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    pcfg = SMALL if small else DemoPairConfig()
    pair = build_demo_pair(pcfg, rebuild=rebuild, say=say)
    t_pair = time.perf_counter() - t0
    site = site or f"transformer.h.{pcfg.n_layer // 2}"
    num_tokens = num_tokens or (20_000 if small else 150_000)
    root = Path(out) if out else cache_dir() / "demo_runs" / f"{pcfg.key()}-{num_tokens}-{site}"
    cache = root / "cache"
    ccfg = CollectConfig(
        base_model=str(pair.base),
        ft_model=str(pair.ft),
        site=site,
        dataset=str(pair.corpus),
        out=str(cache),
        num_tokens=num_tokens,
        seq_len=pcfg.seq_len,
        batch_size=32,
        dtype="float32",
        threads=threads,
        progress=progress,
        resume=not rebuild,
        overwrite=rebuild,
    )
    collect(ccfg, say=say)
    t_collect = time.perf_counter() - t0 - t_pair
    rows = PairedCache(cache, verify="size").n_rows
    bs = batch_size or (256 if small else 512)
    train_tokens = train_tokens or (60_000 if small else 1_000_000)
    val = min(8192 if not small else 2048, rows // 10)
    cfg = RunConfig(
        model=CrossCoderConfig(
            arch=arch, d_latent=d_latent or (128 if small else 512), k=k or (8 if small else 16)
        ),
        train=TrainConfig(
            num_tokens=train_tokens,
            batch_size=bs,
            lr=3e-3,
            val_tokens=val,
            val_every=max(1, train_tokens // bs // 4),
            log_every=max(1, train_tokens // bs // 20),
            save_every=0,
            wandb="off",
            threads=threads,
            device="cpu",
            progress=progress,
            dead_tokens=min(1_000_000, max(bs, train_tokens // 50)),
            aux_coeff=1 / 8,  # revives dead latents: 1/32 (the default) left ~20% of them dead here
            l1_coeff=2.0,
        ),
        data=DataConfig(cache=str(cache), verify_cache="size"),
    )
    metrics = run_training(cfg, root / "crosscoder", overwrite=True)
    t_train = time.perf_counter() - t0 - t_pair - t_collect
    model = CrossCoder.from_pretrained(root / "crosscoder")
    c = PairedCache(cache, verify="size")
    sample = np.random.default_rng(0).choice(c.n_rows, size=min(c.n_rows, 16384), replace=False)
    groups = latent_groups(model, c.read(np.sort(sample)))
    report = None
    if analyze:
        from ..analysis.analyze_config import AnalyzeConfig
        from ..analysis.pipeline import analyze as run_analysis

        acfg = AnalyzeConfig(
            run_dir=str(root / "crosscoder"), out=str(root / "report"), overwrite=True, threads=threads
        )
        report = run_analysis(acfg, say=say)
    t_analyze = time.perf_counter() - t0 - t_pair - t_collect - t_train
    summary = {
        "pair": str(pair.root),
        "pair_eval_loss": pair.info.get("eval_loss"),
        "others": f"ft2 (base + data records), wide (n_embd {pcfg.wide_embd}, prose), checkpoints/step_{{"
        + ",".join(p.name.removeprefix("step_") for p in pair.checkpoints)
        + "}",
        "site": site,
        "cache": str(cache),
        "crosscoder": str(root / "crosscoder"),
        "rows": rows,
        "explained_variance": metrics.get("val/explained_variance", metrics.get("explained_variance")),
        "explained_variance_A": metrics.get("val/explained_variance_A", metrics.get("explained_variance_A")),
        "explained_variance_B": metrics.get("val/explained_variance_B", metrics.get("explained_variance_B")),
        "l0": metrics.get("val/l0_loss", metrics.get("l0_loss")),
        "latents": groups,
        "report": str(root / "report" / "report.html") if report is not None else None,
        "story": report.get("story") if report is not None else None,
        "seconds": {
            "pair": round(t_pair, 1),
            "collect": round(t_collect, 1),
            "train": round(t_train, 1),
            **({"analyze": round(t_analyze, 1)} if report is not None else {}),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    say(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    g, loss = s["latents"], s.get("pair_eval_loss") or {}
    lines = [
        "",
        "== crosscoder demo ==",
        f"model pair   {s['pair']}",
    ]
    if loss:
        lines.append(
            "  eval loss  "
            + "   ".join(
                f"{d}: base {loss.get(f'base_{d}')}, ft {loss.get(f'ft_{d}')}"
                for d in ("prose", "code", "data")
                if f"base_{d}" in loss
            )
        )
    if s.get("others"):
        lines.append(f"  also built {s['others']}")
    lines += [
        f"activations  {s['rows']:,} paired tokens at {s['site']} -> {s['cache']}",
        f"crosscoder   {s['crosscoder']}  (load with CrossCoder.from_pretrained)",
        f"  explained variance {s['explained_variance']:.3f} (base {s['explained_variance_A']:.3f}, "
        f"ft {s['explained_variance_B']:.3f}),  L0 {s['l0']:.1f}",
        f"  latents (relative decoder norm r = |d_ft| / (|d_base| + |d_ft|)), of {g['total']}:",
        f"    base-only (r < {BASE_ONLY})       {g['base_only']}",
        f"    shared ({SHARED[0]} <= r <= {SHARED[1]})   {g['shared']}",
        f"    ft-only (r > {FT_ONLY})         {g['ft_only']}",
        f"    in between                {g['intermediate']}",
        f"    dead (never fire)         {g['dead']}",
        "    r histogram (alive, 10 bins from 0 = base-only to 1 = ft-only): "
        + " ".join(str(v) for v in g["histogram"]),
    ]
    if s.get("report"):
        lines.append(f"report       {s['report']}")
    st = s.get("story")
    if st:
        frac, cos = st.get("ft_only_code_fraction"), st.get("shared_median_cos")
        lines += [
            f"story        {st['ft_only_confirmed']} ft-only latents confirmed by Latent Scaling"
            + (
                f", {frac:.0%} of their {st['ft_only_contexts']} top contexts from code"
                if frac is not None
                else ""
            ),
            f"             {st['shared']} shared latents, median decoder cosine "
            + (f"{cos:.3f}" if cos is not None else "n/a"),
        ]
    lines += [
        "time         " + ", ".join(f"{k} {v}s" for k, v in s["seconds"].items()),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    run_demo(
        out=args.out,
        small=args.small,
        num_tokens=args.num_tokens,
        train_tokens=args.train_tokens,
        arch=args.arch,
        d_latent=args.d_latent,
        k=args.k,
        batch_size=args.batch_size,
        site=args.site,
        threads=args.threads,
        rebuild=args.rebuild,
        progress=args.progress,
        analyze=args.analyze,
    )
    return 0
