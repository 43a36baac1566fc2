"""Planted-feature recovery over the synthetic family (docs/synthetic.md), printed as one JSON document.

    python benchmarks/recovery.py                       # every preset x 5 seeds x vanilla,batchtopk
    python benchmarks/recovery.py --families default,offset --seeds 1 --archs batchtopk --num-tokens 200000

For each preset P, seed S and architecture A it does what a new user does, through the CLI in
subprocesses (``python -m crosscoder`` with this interpreter):

1. ``crosscoder synth PAIR --preset P --seed S --rows N+100000``;
2. ``crosscoder train --base-data PAIR/base --ft-data PAIR/ft --arch A --dict-size 2*n_features
   (--k K | --l1-coeff L) --num-tokens N --seed S --threads 1 --wandb off --no-progress``, with
   ``K = ceil(expected active features per token) + 1`` for architectures that take a k (the BatchTopK
   family: k just above the planted L0, as ``crosscoder synth`` suggests) unless ``--k`` is given, and
   ``L`` only when ``--l1-coeff`` is given (else the train default); ``--dedicated-frac`` /
   ``--shared-frac`` add a latent layout sized from the dictionary;
3. ``crosscoder analyze RUN --base-data PAIR/base --ft-data PAIR/ft --no-spliced --out REPORT``;

then scores the run with :func:`crosscoder.analysis.recovery.family_scores` (cosines of the concatenated
``[2 * d_model]`` decoder and planted vectors in the crosscoder's normalised space, the analysis'
``class`` column of ``REPORT/latents.parquet``) and :func:`crosscoder.analysis.recovery.pattern_recovery`
(each planted feature's best latent found with the planted presence pattern; the table's ``pattern``
column when it has one), adds explained variance / L0 / dead fraction from the run's ``config.json``
metrics (validation ones when present) and the analysis, and wall times. Per (preset, arch) it aggregates
mean, std and min over seeds. A failed subprocess is recorded with its exit code and stderr tail.
Progress goes to stderr; stdout carries only the JSON document.

Presets of more than two models (``multi``): ``crosscoder synth`` writes a paired cache ``PAIR/cache``,
training reads ``--cache PAIR/cache`` and the score is :func:`pattern_recovery` (and its MMCS) from the
decoder norms; ``crosscoder analyze RUN --cache PAIR/cache`` runs only with ``--analyze-multi`` (its
``pattern`` column is then used).

    python benchmarks/recovery.py --families multi --seeds 3 --jobs 2 --out benchmarks/recovery_multi.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

AGG_KEYS = (
    "pattern_recovery",
    "pattern_match",
    "found",
    "mmcs",
    "mmcs_shared",
    "mmcs_base_only",
    "mmcs_ft_only",
    "mmcs_shared_weak",
    "mmcs_exclusive",
    "mmcs_subset",
    "pattern_recovery_shared",
    "pattern_recovery_shared_weak",
    "pattern_recovery_exclusive",
    "pattern_recovery_subset",
    "recall_base_only",
    "recall_ft_only",
    "precision_base_only",
    "precision_ft_only",
    "called_base_only",
    "called_ft_only",
    "recall_base_only_checked",
    "recall_ft_only_checked",
    "precision_base_only_checked",
    "precision_ft_only_checked",
    "explained_variance",
    "l0",
    "dead_fraction",
    "train_dead_fraction",
    "wall_s",
)
ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "WANDB_MODE": "disabled",
}
_LOCK = threading.Lock()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from crosscoder.data.synthetic import ALL_PRESETS, PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--families",
        default=",".join(PRESETS),
        help=f"comma list of presets among {', '.join(ALL_PRESETS)} (default: the two-model ones, "
        f"{', '.join(PRESETS)})",
    )
    p.add_argument(
        "--seeds",
        default="5",
        help="a count N (seeds 0..N-1) or a comma list such as '3,7' or '7,' (default: 5)",
    )
    p.add_argument("--archs", default="vanilla,batchtopk", help="comma list (default: vanilla,batchtopk)")
    p.add_argument("--num-tokens", type=int, default=1_500_000, help="training tokens (default: 1500000)")
    p.add_argument("--rows", type=int, help="rows generated per pair (default: num-tokens + 100000)")
    p.add_argument("--k", type=int, help="batchtopk k (default: ceil(expected active per token) + 1)")
    p.add_argument("--l1-coeff", type=float, help="vanilla L1 coefficient (default: the train default)")
    p.add_argument(
        "--dedicated-frac",
        type=float,
        default=0.0,
        help="--dedicated-base/--dedicated-ft each this fraction of the dictionary (default: 0, none)",
    )
    p.add_argument(
        "--shared-frac",
        type=float,
        default=0.0,
        help="--shared-latents this fraction of the dictionary (default: 0, none)",
    )
    p.add_argument("--jobs", type=int, default=1, help="pairs processed in parallel (default: 1)")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument(
        "--keep", action="store_true", help="keep the generated pairs (default: deleted once scored)"
    )
    p.add_argument(
        "--extra-train-args",
        default="",
        help='passed through to crosscoder train: --extra-train-args="--lr 3e-4"',
    )
    p.add_argument(
        "--analyze-multi",
        action="store_true",
        help="also run crosscoder analyze on presets of more than two models (default: score from the "
        "decoder norms only)",
    )
    p.add_argument("--min-cos", type=float, default=0.7, help="pattern recovery: found at cosine >= this")
    p.add_argument("--timeout", type=float, help="seconds allowed per subprocess (default: none)")
    p.add_argument("--out", help="also write the JSON document here")
    a = p.parse_args(argv)
    a.families = [f for f in a.families.split(",") if f]
    bad = [f for f in a.families if f not in ALL_PRESETS]
    if bad:
        p.error(f"--families: unknown preset {bad[0]!r} (choices: {', '.join(ALL_PRESETS)})")
    a.seeds = (
        list(range(int(a.seeds)))
        if a.seeds.strip().isdigit()
        else [int(s) for s in a.seeds.split(",") if s.strip()]
    )
    a.archs = [x for x in a.archs.split(",") if x]
    if a.rows is None:
        a.rows = a.num_tokens + 100_000
    return a


def uses_k(arch: str) -> bool:
    """Whether ``arch`` selects ``k`` latents per token (takes ``--k``), from the registry."""
    from crosscoder.model import get_architecture

    return hasattr(get_architecture(arch), "current_k")


def log(msg: str) -> None:
    with _LOCK:
        print(msg, file=sys.stderr, flush=True)


def call(args: list[str], timeout: float | None) -> dict[str, Any]:
    """Run ``python -m crosscoder ARGS``: ``{"ok", "seconds"}`` plus ``returncode``/``stderr_tail``
    on failure."""
    cmd = [sys.executable, "-m", "crosscoder", *args]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV})
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = (
            "timeout",
            (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""),
        )
    out: dict[str, Any] = {"ok": rc == 0, "seconds": round(time.perf_counter() - t0, 1)}
    if rc != 0:
        out.update(returncode=rc, command=shlex.join(cmd), stderr_tail=(err or "")[-2000:])
    return out


def latent_columns(report: Path, names: list[str]) -> dict[str, list[Any]]:
    """Columns ``names`` of the analysis' latent table, in latent order (``latents.parquet``, else
    ``latents.csv``); a column the table lacks is left out."""
    if (report / "latents.parquet").is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(str(report / "latents.parquet"))
    else:
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(str(report / "latents.csv"))
    t = table.select([n for n in ["latent", *names] if n in table.column_names]).to_pydict()
    order = sorted(range(len(t["latent"])), key=t["latent"].__getitem__)
    return {n: [t[n][i] for i in order] for n in names if n in t}


def latent_classes(report: Path) -> list[str]:
    """The analysis' ``class`` per latent, in latent order."""
    return latent_columns(report, ["class"])["class"]


def checked_classes(report: Path) -> list[str] | None:
    """The ``class`` column with the dedicated latents that fail analyze's ``layout_check`` (dead, complete
    shrinkage, latent decoupling, too rare) turned into ``other``; ``None`` without a latent layout."""
    cols = latent_columns(report, ["class", "kind", "layout_check"])
    if "kind" not in cols or all(k == "free" for k in cols["kind"]):
        return None
    return [
        "other" if kind in ("base_only", "ft_only") and check != "ok" else c
        for c, kind, check in zip(cols["class"], cols["kind"], cols["layout_check"], strict=True)
    ]


def pattern_scores(model: Any, gt: Any, report: Path | None, min_cos: float) -> dict[str, Any]:
    """:func:`pattern_recovery` of a run (the analysis' ``pattern`` column when ``report`` has one)."""
    from crosscoder.analysis.recovery import pattern_recovery

    pats = latent_columns(report, ["pattern"]).get("pattern") if report is not None else None
    res = pattern_recovery(model, gt, patterns=pats, min_cos=min_cos)
    out = {k: res[k] for k in ("pattern_recovery", "pattern_match", "found", "mmcs")}
    out["pattern_source"] = "analysis" if pats is not None else "decoder_norms"
    out["per_pattern"] = {
        p: {k: r[k] for k in ("n", "recovered", "mmcs", "called")} for p, r in res["per_pattern"].items()
    }
    out.update({f"mmcs_{c}": r["mmcs"] for c, r in res["per_class"].items()})
    out.update({f"pattern_recovery_{c}": r["recovered"] for c, r in res["per_class"].items()})
    return out


def score_multi(run: Path, report: Path | None, gt_dir: Path, min_cos: float) -> dict[str, Any]:
    """Scores of a run on more than two models: pattern recovery, MMCS, run metrics."""
    import torch

    from crosscoder import CrossCoder
    from crosscoder.data.synthetic import GroundTruth

    torch.set_num_threads(1)
    res = pattern_scores(CrossCoder.from_pretrained(run), GroundTruth.load(gt_dir), report, min_cos)
    m = json.loads((run / "config.json").read_text()).get("metrics", {})
    res["explained_variance"] = m.get("val/explained_variance", m.get("explained_variance"))
    res["l0"] = m.get("val/l0_loss", m.get("l0_loss"))
    res["train_dead_fraction"] = m.get("dead_fraction")
    if report is not None:
        summ = json.loads((report / "summary.json").read_text())
        res["dead_fraction"] = summ["dead"] / summ["d_latent"]
    return res


def score(run: Path, report: Path, gt_dir: Path, min_cos: float = 0.7) -> dict[str, Any]:
    import torch

    from crosscoder import CrossCoder
    from crosscoder.analysis.recovery import family_scores, planted_cosines
    from crosscoder.data.synthetic import GroundTruth

    torch.set_num_threads(1)
    gt = GroundTruth.load(gt_dir)
    model = CrossCoder.from_pretrained(run)
    cls = latent_classes(report)
    cos = planted_cosines(model, gt)
    res = family_scores(cos, gt.classes, cls)
    pat = pattern_scores(model, gt, report, min_cos)
    res.update({k: pat[k] for k in ("pattern_recovery", "pattern_match", "found", "pattern_source")})
    checked = checked_classes(report)
    if checked is not None:  # dedicated partitions: the calls that survive analyze's layout check
        res.update(
            {
                f"{k}_checked": v
                for k, v in family_scores(cos, gt.classes, checked).items()
                if k.split("_")[0] in ("recall", "precision", "called")
            }
        )
    m = json.loads((run / "config.json").read_text()).get("metrics", {})
    res["explained_variance"] = m.get("val/explained_variance", m.get("explained_variance"))
    res["l0"] = m.get("val/l0_loss", m.get("l0_loss"))
    res["train_dead_fraction"] = m.get("dead_fraction")
    summ = json.loads((report / "summary.json").read_text())
    res["dead_fraction"] = summ["dead"] / summ["d_latent"]
    res["analysis_explained_variance"] = summ.get("reconstruction", {}).get("explained_variance")
    res["classes"] = summ.get("classes")
    return res


def run_pair(family: str, seed: int, a: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Synthesise one pair, then train, analyse and score every architecture on it."""
    from crosscoder.data.synthetic import GroundTruth

    pair = work / f"{family}-s{seed}"
    if pair.exists():
        shutil.rmtree(pair)
    base = {"family": family, "seed": seed}
    syn = call(
        ["synth", str(pair), "--preset", family, "--seed", str(seed), "--rows", str(a.rows)], a.timeout
    )
    if not syn["ok"]:
        log(f"{family} seed {seed}: synth failed ({syn.get('returncode')})")
        return [{**base, "arch": arch, "ok": False, "failed_stage": "synth", **syn} for arch in a.archs]
    gt = GroundTruth.load(pair / "ground_truth")
    n_feat, active = len(gt.classes), gt.expected_active()
    multi = gt.n_models > 2
    data = (
        ["--cache", str(pair / "cache")]
        if multi
        else ["--base-data", str(pair / "base"), "--ft-data", str(pair / "ft")]
    )
    k = a.k if a.k is not None else math.ceil(active) + 1
    records = []
    for arch in a.archs:
        rec: dict[str, Any] = {
            **base,
            "arch": arch,
            "n_models": gt.n_models,
            "n_features": n_feat,
            "expected_active": round(active, 3),
            "dict_size": 2 * n_feat,
            "synth_s": syn["seconds"],
        }
        run, report = work / f"{family}-s{seed}-{arch}", work / f"{family}-s{seed}-{arch}-report"
        train = [
            "train",
            *data,
            "--arch",
            arch,
            "--dict-size",
            str(2 * n_feat),
            "--num-tokens",
            str(a.num_tokens),
            "--seed",
            str(seed),
            "--out",
            str(run),
            "--overwrite",
            "--threads",
            "1",
            "--wandb",
            "off",
            "--no-progress",
        ]
        if uses_k(arch):  # the BatchTopK family (batchtopk, matryoshka)
            train += ["--k", str(k)]
            rec["k"] = k
        elif a.l1_coeff is not None:
            train += ["--l1-coeff", str(a.l1_coeff)]
            rec["l1_coeff"] = a.l1_coeff
        if a.dedicated_frac:  # dedicated partitions, sized from the dictionary (users do not know the truth)
            n_ded = max(1, round(a.dedicated_frac * 2 * n_feat))
            train += ["--dedicated-base", str(n_ded), "--dedicated-ft", str(n_ded)]
            rec["dedicated"] = n_ded
        if a.shared_frac:  # designated shared latents
            n_sh = max(1, round(a.shared_frac * 2 * n_feat))
            train += ["--shared-latents", str(n_sh)]
            rec["shared_latents"] = n_sh
        train += shlex.split(a.extra_train_args)
        stages = [
            ("train", train),
            (
                "analyze",
                [
                    "analyze",
                    str(run),
                    *data,
                    "--no-spliced",
                    "--out",
                    str(report),
                    "--overwrite",
                    "--threads",
                    "1",
                ],
            ),
        ]
        analyzed = not multi or a.analyze_multi
        if not analyzed:
            stages = stages[:1]
        for stage, cmd in stages:
            r = call(cmd, a.timeout)
            rec[f"{stage}_s"] = r["seconds"]
            if not r["ok"]:
                rec.update(
                    ok=False,
                    failed_stage=stage,
                    **{key: v for key, v in r.items() if key not in ("ok", "seconds")},
                )
                break
        else:
            try:
                if multi:
                    rec.update(
                        score_multi(run, report if analyzed else None, pair / "ground_truth", a.min_cos)
                    )
                else:
                    rec.update(score(run, report, pair / "ground_truth", a.min_cos))
                rec["ok"] = True
            except Exception as e:  # a broken output is a result too
                rec.update(ok=False, failed_stage="score", stderr_tail=f"{type(e).__name__}: {e}"[-2000:])
        rec["wall_s"] = round(rec.get("train_s", 0) + rec.get("analyze_s", 0), 1)
        if rec["ok"] and multi:
            log(
                f"{family} seed {seed} {arch}: pattern recovery {rec['pattern_recovery']:.3f}, found "
                f"{rec['found']:.3f}, mmcs {rec['mmcs']:.3f} ({rec['wall_s']}s)"
            )
        elif rec["ok"]:
            log(
                f"{family} seed {seed} {arch}: mmcs {rec['mmcs']:.3f}, recall base/ft "
                f"{rec['recall_base_only']:.2f}/{rec['recall_ft_only']:.2f}, precision base/ft "
                f"{rec['precision_base_only']:.2f}/{rec['precision_ft_only']:.2f} ({rec['wall_s']}s)"
            )
        else:
            log(f"{family} seed {seed} {arch}: {rec['failed_stage']} failed")
        records.append(rec)
    if not a.keep:
        shutil.rmtree(pair, ignore_errors=True)
    return records


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{family: {arch: {"n_ok", "n_failed", metric: {"mean", "std", "min", "n"}}}}`` over seeds (NaNs
    such as the precision of a class nobody was called are left out of that metric's ``n``)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        cell = out.setdefault(r["family"], {}).setdefault(r["arch"], {"n_ok": 0, "n_failed": 0, "_rows": []})
        cell["n_ok" if r.get("ok") else "n_failed"] += 1
        if r.get("ok"):
            cell["_rows"].append(r)
    for fam in out.values():
        for cell in fam.values():
            rows = cell.pop("_rows")
            for key in AGG_KEYS:
                vals = [r[key] for r in rows if _finite(r.get(key))]
                if vals:
                    cell[key] = {
                        "mean": statistics.fmean(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "min": min(vals),
                        "n": len(vals),
                    }
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="crosscoder-recovery-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    pairs = [(f, s) for f in a.families for s in a.seeds]
    log(f"{len(pairs)} pairs x {len(a.archs)} archs, {a.num_tokens} tokens each, scratch {work}")
    try:
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            results = list(pool.map(lambda fs: run_pair(fs[0], fs[1], a, work), pairs))
    finally:
        if tmp is not None:
            tmp.cleanup()
    records = [r for rs in results for r in rs]
    doc = {
        "settings": {k: v for k, v in vars(a).items() if k != "work"}
        | {"work": str(work) if a.work else None},
        "python": sys.executable,
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": aggregate(records),
        "runs": records,
    }
    text = json.dumps(_json_safe(doc), indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0 if all(r.get("ok") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
