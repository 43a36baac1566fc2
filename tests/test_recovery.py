"""Recovery of planted features on the built-in synthetic pair (issue 2's acceptance numbers)."""

import json

import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.analysis.recovery import format_recovery, recovery
from crosscoder.analysis.table import thresholds_for
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.data.synthetic import GroundTruth, SyntheticConfig
from crosscoder.train import run_training


def train_synthetic(tmp_path, arch, num_tokens):
    cfg = RunConfig(
        model=CrossCoderConfig(arch=arch, d_latent=512, k=4),
        train=TrainConfig(
            num_tokens=num_tokens,
            batch_size=256,
            l1_coeff=3.0,
            dead_tokens=20_000,
            val_tokens=4096,
            val_every=0,
            log_every=100,
            wandb="off",
            progress=False,
        ),
    )
    out = tmp_path / arch
    metrics = run_training(cfg, out)
    src = json.loads((out / "config.json").read_text())["source"]
    return metrics, recovery(CrossCoder.from_pretrained(out), GroundTruth.load(src["ground_truth"]))


def test_vanilla_recovers_and_classifies_planted_features(tmp_path):
    metrics, rec = train_synthetic(tmp_path, "vanilla", 300_000)
    assert rec["mean_max_cos_frequent"] >= 0.9
    for c in ("shared", "base_only", "ft_only"):
        assert rec[c]["mean_max_cos_frequent"] >= 0.9, (c, rec[c])
    assert rec["exclusive_classified"] >= 0.9, rec  # relative decoder norm in the normalised space
    assert metrics["explained_variance"] > 0.8


@pytest.mark.slow
def test_batchtopk_recovers_planted_features(tmp_path):
    metrics, rec = train_synthetic(tmp_path, "batchtopk", 600_000)
    assert rec["mean_max_cos_frequent"] >= 0.9, rec
    for c in ("shared", "base_only", "ft_only"):
        assert rec[c]["mean_max_cos_frequent"] >= 0.85, (c, rec[c])
    assert metrics["l0_loss"] == pytest.approx(4.0)


@torch.no_grad()
def test_recovery_classifies_with_analyze_thresholds():
    d = 8
    e = torch.eye(d)
    dirs = torch.zeros(3, 2, d)
    dirs[0, 0], dirs[1, 1], dirs[2, 0], dirs[2, 1] = e[0], e[1], e[2], e[2]
    strength = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gt = GroundTruth(
        dirs, strength, torch.full((3,), 0.02), ["base_only", "ft_only", "shared"], SyntheticConfig(d_model=d)
    )
    cc = CrossCoder(CrossCoderConfig(arch="batchtopk", d_latent=3, d_model=d, k=1))
    cc.W_dec.zero_()
    cc.W_dec[0, 0], cc.W_dec[0, 1] = e[0], 0.2 * e[0]  # r = 1/6: base_only with the 0.25 band, not with 0.1
    cc.W_dec[1, 0], cc.W_dec[1, 1] = 0.05 * e[1], e[1]  # r = 0.95: ft_only with both
    cc.W_dec[2, 0], cc.W_dec[2, 1] = e[2], e[2]
    rec = recovery(cc, gt)  # analyze's batchtopk default: 0.25
    assert rec["exclusive_band"] == 0.25 and rec["exclusive_classified"] == 1.0
    assert rec["base_only"]["classified"] == 1.0 and rec["ft_only"]["classified"] == 1.0
    vanilla = recovery(cc, gt, thresholds=thresholds_for("vanilla"))
    assert vanilla["exclusive_band"] == 0.1 and vanilla["exclusive_classified"] == 0.5
    assert vanilla["base_only"]["classified"] == 0.0 and vanilla["ft_only"]["classified"] == 1.0
    assert recovery(cc, gt, band=0.1) == vanilla  # the old argument still works
    for key in ("shared", "base_only", "ft_only", "exclusive_classified", "mean_max_cos_frequent"):
        assert key in rec
    assert "r < 0.25 / r > 0.75" in format_recovery(rec)
