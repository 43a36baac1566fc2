"""Classes on the built-in synthetic pair, for both architectures, against the planted ground truth.

Both crosscoders are trained once per module (about 10-40 s each on one CPU thread) on a 600k-token
synthetic pair in a private CROSSCODER_CACHE_DIR, then analysed: the vanilla one through the
``crosscoder analyze`` command line, the BatchTopK one through the Python API.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from crosscoder.analysis.pipeline import AnalyzeConfig, analyze
from crosscoder.analysis.table import FLAGS
from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.train import run_training

torch.set_num_threads(1)

TOKENS = 600_000
CONFIGS = {
    # The L1 crosscoder: default L1 coefficient, a faster learning rate for the short run.
    "vanilla": (CrossCoderConfig(arch="vanilla", d_latent=512), {"lr": 2e-3}),
    # BatchTopK with k near the planted L0 (~2.9 features per token) and a threshold EMA short enough
    # for a 586-step run.
    "batchtopk": (CrossCoderConfig(arch="batchtopk", d_latent=512, k=4, threshold_beta=0.99), {"lr": 1e-2}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSCODER_CACHE_DIR", str(root / "cache"))
        out = {}
        for arch, (model_cfg, train_kw) in CONFIGS.items():
            cfg = RunConfig(
                model=model_cfg,
                train=TrainConfig(
                    num_tokens=TOKENS,
                    batch_size=1024,
                    val_tokens=16384,
                    val_every=0,
                    log_every=50,
                    save_every=0,
                    wandb="off",
                    progress=False,
                    device="cpu",
                    **train_kw,
                ),
            )
            run_training(cfg, root / arch)
            out[arch] = root / arch
        # vanilla through the CLI (recorded cache, ground truth found beside it), batchtopk through the API
        rc = main(
            ["analyze", str(out["vanilla"]), "--out", str(root / "report-vanilla"), "--max-tokens", "200000"]
        )
        assert rc == 0
        analyze(
            AnalyzeConfig(
                run_dir=str(out["batchtopk"]), out=str(root / "report-batchtopk"), max_tokens=200_000
            ),
            say=lambda s: None,
        )
    return root


def summary(root, arch):
    return json.loads((root / f"report-{arch}" / "summary.json").read_text())


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_classes_agree_with_planted_features(runs, arch):
    s = summary(runs, arch)
    gt = s["ground_truth"]["final"]
    # recall: >= 90% of planted exclusive features' best latents in the right class
    assert gt["exclusive_recall"] >= 0.9, gt
    assert gt["base_only"]["recall"] >= 0.9 and gt["ft_only"]["recall"] >= 0.9, gt
    # precision: >= 90% of the latents called exclusive match a planted exclusive feature of that class
    assert gt["exclusive_precision"] >= 0.9, gt
    assert gt["base_only"]["called"] > 0 and gt["ft_only"]["called"] > 0
    # weakened shared features are not called fine-tuned-only ...
    assert gt["shared_weak_not_ft_only"] == 1.0, gt


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_latent_scaling_demotes_what_norm_alone_over_calls(runs, arch):
    s = summary(runs, arch)
    norm_only, final = s["ground_truth"]["norm_only"], s["ground_truth"]["final"]
    # ... because Latent Scaling flags them: norm alone calls latents of them fine-tuned-only, and at least
    # 90% of those are demoted (a survivor is a mixture, e.g. cosine 0.79 with a weakened feature)
    weak_latents = s["ground_truth"]["shared_weak_latents"]
    assert weak_latents["ft_only_by_norm"] > 0
    assert weak_latents["ft_only_final"] <= 0.1 * weak_latents["ft_only_by_norm"]
    assert norm_only["exclusive_precision"] < 0.95 <= final["exclusive_precision"]
    ft = s["classes"]["ft_only"]
    assert ft["norm"] > ft["surviving"] == ft["final"]
    assert ft["norm"] - ft["surviving"] == sum(ft[k] for k in FLAGS)
    # the demoted weakened-shared latents carry a base-model share near the planted 0.3
    rows = list(csv.DictReader(open(runs / f"report-{arch}" / "latents.csv")))
    weak = [
        r
        for r in rows
        if r["planted_class"] == "shared_weak"
        and float(r["planted_cos"]) > 0.95
        and r["norm_class"] == "ft_only"
    ]
    assert weak and all(r["flag"] in ("complete_shrinkage", "latent_decoupling") for r in weak)
    nu = np.array([float(r["beta_ratio_error"]) for r in weak])
    assert 0.2 < np.median(nu) < 0.9


def test_report_outputs(runs):
    import pyarrow.parquet as pq

    rep = runs / "report-vanilla"
    for name in (
        "latents.parquet",
        "latents.csv",
        "summary.json",
        "report.html",
        "relative_norms.png",
        "cosine_shared.png",
        "delta_vs_nu.png",
        "density.png",
        "training.png",
    ):
        assert (rep / name).is_file(), name
    table = pq.read_table(rep / "latents.parquet")
    assert table.num_rows == 512
    for col in (
        "latent",
        "dec_norm_base",
        "dec_norm_ft",
        "relative_norm",
        "delta_norm",
        "cos_sim",
        "class",
        "freq",
        "mean_act",
        "dead",
        "beta_ratio_error",
        "beta_ratio_reconstruction",
        "norm_class",
        "flag",
    ):
        assert col in table.column_names, col
    s = summary(runs, "vanilla")
    assert "normalised training space" in s["space"]
    assert (
        s["thresholds"]["exclusive_band"] == 0.1
        and summary(runs, "batchtopk")["thresholds"]["exclusive_band"] == 0.25
    )
    assert s["reconstruction"]["explained_variance"] > 0.9
    assert s["spliced"] is None  # no models behind a synthetic pair
    assert "normalised training space" in (rep / "report.html").read_text()


def test_analyze_two_hf_datasets_from_crosscoder_synth(tmp_path, monkeypatch):
    """``--base-data A --ft-data B``: the `crosscoder synth` layout, ground truth found beside the data."""
    from crosscoder.config import DataConfig
    from crosscoder.data.synthetic import SyntheticConfig, write_hf_pair

    monkeypatch.setenv("CROSSCODER_CACHE_DIR", str(tmp_path / "cache"))
    write_hf_pair(
        SyntheticConfig(d_model=16, n_shared=8, n_base_only=4, n_ft_only=4, n_shared_weak=2),
        30_000,
        tmp_path / "pair",
    )
    data = {"base_data": str(tmp_path / "pair" / "base"), "ft_data": str(tmp_path / "pair" / "ft")}
    cfg = RunConfig(
        model=CrossCoderConfig(arch="vanilla", d_latent=64),
        train=TrainConfig(
            num_tokens=20_000,
            batch_size=500,
            val_tokens=2000,
            val_every=0,
            log_every=10,
            save_every=0,
            wandb="off",
            progress=False,
            device="cpu",
        ),
        data=DataConfig(**data),
    )
    run_training(cfg, tmp_path / "run")
    rc = main(
        [
            "analyze",
            str(tmp_path / "run"),
            "--base-data",
            data["base_data"],
            "--ft-data",
            data["ft_data"],
            "--column",
            "activation",
            "--out",
            str(tmp_path / "rep"),
            "--no-spliced",
            "--max-cards",
            "10",
        ]
    )
    assert rc == 0
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert s["tokens_scanned"] == 30_000 and "ground_truth" in s
    assert oct((tmp_path / "rep" / "report.html").stat().st_mode & 0o777) != oct(0o600)
    assert (
        main(
            ["analyze", str(tmp_path / "run"), "--base-data", data["base_data"], "--out", str(tmp_path / "x")]
        )
        == 2
    )
