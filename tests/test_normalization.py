"""Offset-robust normalisation, folding, BatchTopK's calibrated threshold, budget-aware defaults, pooled
validation metrics."""

import json

import numpy as np
import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.config import CrossCoderConfig, DataConfig, RunConfig, TrainConfig
from crosscoder.data.paired import PairedCache, PairedCacheWriter
from crosscoder.data.synthetic import SyntheticConfig, plant, sample
from crosscoder.normalization import Normalization, estimate
from crosscoder.train import run_training


def write_pair(path, x):
    w = PairedCacheWriter(path, x.shape[1], x.shape[2], "float32", shard_rows=1 << 20)
    w.add(x)
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def planted():
    """Rows of a planted pair ``[n, 2, 64]`` and a per-model mean offset 7x the RMS feature-part norm."""
    gt = plant(SyntheticConfig(seed=5))
    x = sample(gt, 40_000, torch.Generator().manual_seed(6))
    rms = x.pow(2).sum(-1).mean(0).sqrt()  # [2]
    d = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    offset = 7 * rms[:, None] * d / d.norm(dim=-1, keepdim=True)
    return x, offset


def cfg_for(cache, arch="vanilla", **train):
    t = dict(
        num_tokens=512 * 60,
        batch_size=512,
        val_tokens=4096,
        val_every=0,
        log_every=10,
        save_every=0,
        wandb="off",
        progress=False,
        seed=1,
        lr=3e-3,
        l1_coeff=2.0,
    )
    t.update(train)
    return RunConfig(
        model=CrossCoderConfig(arch=arch, d_latent=256, k=4),
        train=TrainConfig(**t),
        data=DataConfig(cache=cache),
    )


def test_estimate_centres_then_scales():
    x = torch.randn(5000, 2, 16, dtype=torch.float64) + torch.tensor([3.0, -40.0]).view(1, 2, 1)
    n = estimate(x, center=True, scaling=True)
    y = n.apply(x).double()
    assert y.mean(0).abs().max() < 1e-4
    assert y.norm(dim=-1).mean(0).tolist() == pytest.approx([4.0, 4.0], rel=1e-5)  # sqrt(16)
    plain = estimate(x, center=False, scaling=True)
    assert plain.mean is None
    assert plain.apply(x).double().norm(dim=-1).mean(0).tolist() == pytest.approx([4.0, 4.0], rel=1e-5)


def test_fold_with_mean_gives_identical_latents_on_raw_inputs():
    cfg = CrossCoderConfig(arch="vanilla", d_latent=48, n_models=2, d_model=12)
    m = CrossCoder(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.b_enc.normal_(0, 0.1)
        m.b_dec.normal_(0, 0.1)
    raw = torch.randn(300, 2, 12) * 3 + 20
    norm = Normalization([0.3, 0.7], (torch.randn(2, 12) + 20).tolist())
    f_ref, x_hat_ref = m.encode(norm.apply(raw)), m.decode(m.encode(norm.apply(raw)))
    weights = {k: v.detach().clone() for k, v in m.named_parameters()}
    m.fold(norm.scale, norm.mean)
    assert torch.allclose(m.encode(raw), f_ref, atol=1e-4)
    # reconstructions come out in raw units: x_hat_raw = x_hat' / s + mu
    expect = x_hat_ref / torch.tensor(norm.scale).view(1, 2, 1) + torch.tensor(norm.mean)
    assert torch.allclose(m.decode(m.encode(raw)), expect, atol=1e-4)
    assert torch.allclose(m.normalize(raw), norm.apply(raw), atol=1e-5)
    m.unfold()
    for k, v in m.named_parameters():
        assert torch.allclose(v, weights[k], atol=1e-4), k
    assert torch.all(m.norm_mean == 0) and torch.all(m.norm_scale == 1)


def test_saved_model_takes_raw_activations(tmp_path, planted):
    x, offset = planted
    cache = write_pair(tmp_path / "c", x + offset)
    run_training(cfg_for(cache, "batchtopk"), tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert np.asarray(cfg["norm_mean"]).shape == (2, 64) and len(cfg["norm_scale"]) == 2
    model = CrossCoder.from_pretrained(tmp_path / "run").eval()
    raw = PairedCache(cache).read(np.arange(2048))
    from crosscoder.analysis.scan import normalised_model

    inner = normalised_model(model)
    assert torch.allclose(model.encode(raw), inner.encode(model.normalize(raw)), atol=1e-4)
    assert torch.allclose(model.normalize(raw), Normalization(cfg["norm_scale"], cfg["norm_mean"]).apply(raw))


def test_same_hyperparameters_transfer_to_a_pair_with_an_offset(tmp_path, planted):
    """Centring makes the training space of a pair and of its offset copy the same: same flags, same result.
    Without centring (the plan's mean-inclusive scaling) the offset copy trains far worse."""
    x, offset = planted
    plain, shifted = write_pair(tmp_path / "plain", x), write_pair(tmp_path / "shifted", x + offset)
    ev = {}
    for name, cache, center in (
        ("plain", plain, True),
        ("shifted", shifted, True),
        ("uncentred", shifted, False),
    ):
        cfg = cfg_for(cache)
        cfg.data.norm_center = center
        ev[name] = run_training(cfg, tmp_path / f"run_{name}")["explained_variance"]
    assert ev["plain"] > 0.6
    assert abs(ev["shifted"] - ev["plain"]) < 0.01, ev
    assert ev["uncentred"] < ev["plain"] - 0.2, ev


def test_batchtopk_eval_l0_matches_k_after_a_short_run(tmp_path, planted):
    """100 steps: the saved threshold gives eval-mode L0 within 10% of k on held-out rows, and eval-mode
    explained variance within 0.02 of the training (batch-rule) explained variance on the same rows."""
    x, _ = planted
    cache = write_pair(tmp_path / "c", x)
    k = 4
    run_training(cfg_for(cache, "batchtopk", num_tokens=512 * 100, val_every=50), tmp_path / "run")
    model = CrossCoder.from_pretrained(tmp_path / "run").requires_grad_(False)
    from crosscoder.data.loader import split_rows

    _, val_rows = split_rows(len(x), 4096, 1)
    held = x[torch.from_numpy(val_rows)]
    model.eval()
    f = model.encode(held)
    l0_eval = float((f > 0).sum(-1).float().mean())
    assert abs(l0_eval - k) <= 0.1 * k, l0_eval

    def ev(x_hat):
        return float(1 - (held - x_hat).pow(2).sum() / (held - held.mean(0)).pow(2).sum())

    ev_eval = ev(model.decode(f))
    model.train()
    ev_train = ev(model.decode(model.encode(held)))
    assert abs(ev_eval - ev_train) < 0.02, (ev_eval, ev_train)
    metrics = json.loads((tmp_path / "run" / "config.json").read_text())["metrics"]
    assert abs(metrics["val/l0_loss"] - k) <= 0.1 * k


def test_validation_metrics_pool_over_the_held_out_set(tmp_path, planted):
    """val_tokens 257 with batch 256 leaves a last batch of one row: metrics stay finite and equal the
    pooled 1 - SSE/SST over all 257 rows."""
    x, _ = planted
    cache = write_pair(tmp_path / "c", x[:3000])
    m = run_training(
        cfg_for(cache, num_tokens=2048, batch_size=256, val_tokens=257, val_every=8), tmp_path / "run"
    )
    assert np.isfinite(m["val/explained_variance"])
    from crosscoder.data.loader import split_rows

    _, val_rows = split_rows(3000, 257, 1)
    model = CrossCoder.from_pretrained(tmp_path / "run").requires_grad_(False)
    held = x[torch.from_numpy(val_rows)][:3000]
    raw = PairedCache(cache).read(val_rows)
    xn = model.normalize(raw)
    from crosscoder.analysis.scan import normalised_model

    inner = normalised_model(model)
    x_hat = inner.decode(inner.encode(xn))
    sse, sst = (xn - x_hat).pow(2).sum((0, 2)), (xn - xn.mean(0)).pow(2).sum((0, 2))
    assert held.shape[0] == 257
    assert m["val/explained_variance"] == pytest.approx(float(1 - sse.sum() / sst.sum()), abs=1e-4)
    assert m["val/explained_variance_B"] == pytest.approx(float(1 - sse[1] / sst[1]), abs=1e-4)


def test_budget_aware_defaults(tmp_path, planted, capsys):
    t = TrainConfig(num_tokens=1_500_000, batch_size=1024)
    assert t.resolved_dead_tokens == 75_000
    assert TrainConfig(num_tokens=10**9).resolved_dead_tokens == 10_000_000
    assert TrainConfig(num_tokens=4096, batch_size=1024).resolved_dead_tokens == 1024
    assert t.resolved_aux_k("batchtopk", 512) == 256 and t.resolved_aux_k("batchtopk", 65536) == 512
    assert t.resolved_aux_k("vanilla", 512) == 0
    # 30,000 rows: no refusal, 10% held out with a printed note
    x, _ = planted
    cache = write_pair(tmp_path / "c", x[:30_000])
    cfg = cfg_for(cache, num_tokens=4096, val_tokens=None)
    run_training(cfg, tmp_path / "run")
    assert "holding out 3000 (10%)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["val_tokens"] == 3000
