"""Recovery of planted features on the built-in synthetic pair (issue 2's acceptance numbers)."""

import json

import pytest

from crosscoder import CrossCoder
from crosscoder.analysis.recovery import recovery
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.data.synthetic import GroundTruth
from crosscoder.train import run_training


def train_synthetic(tmp_path, arch, num_tokens):
    cfg = RunConfig(model=CrossCoderConfig(arch=arch, d_latent=512, k=4),
                    train=TrainConfig(num_tokens=num_tokens, batch_size=256, l1_coeff=3.0, dead_tokens=20_000,
                                      val_tokens=4096, val_every=0, log_every=100, wandb="off", progress=False))
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
