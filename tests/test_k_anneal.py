"""k annealing of the BatchTopK family (``--k-anneal-frac``, ``--k-anneal-start``): the schedule by hand,
the logged L0 of a training run, fast == dense mid-anneal, resume mid-anneal, refused configurations."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from crosscoder import CrossCoder
from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.errors import ConfigError
from crosscoder.model import StepInput, compute_loss
from crosscoder.model.architectures.batchtopk import annealed_k
from crosscoder.train import Interrupted, run_training

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def test_annealed_k_by_hand():
    # k = 8, default start 4 k = 32, over the first half of training: 32 - 24 * progress / 0.5
    assert annealed_k(8, None, 0.5, 0.0) == 32
    assert annealed_k(8, None, 0.5, 0.125) == 26  # 32 - 6
    assert annealed_k(8, None, 0.5, 0.25) == 20  # halfway through the annealing
    assert annealed_k(8, None, 0.5, 0.49) == 8  # 32 - 23.52 = 8.48 -> 8
    assert annealed_k(8, None, 0.5, 0.5) == 8  # at and after frac: k
    assert annealed_k(8, None, 0.5, 0.75) == 8
    assert annealed_k(8, None, 0.5, 1.0) == 8
    # explicit start; rounding to the nearest integer
    assert annealed_k(8, 10, 0.5, 0.25) == 9
    assert annealed_k(3, None, 1.0, 0.1) == 11  # 12 - 0.9 = 11.1
    assert annealed_k(3, None, 1.0, 0.15) == 11  # 12 - 1.35 = 10.65
    assert annealed_k(3, None, 1.0, 0.2) == 10  # 12 - 1.8 = 10.2
    assert annealed_k(3, 3, 1.0, 0.0) == 3  # start == k: constant
    # frac 0: off, whatever the progress
    assert annealed_k(8, None, 0.0, 0.0) == 8
    assert annealed_k(8, 100, 0.0, 0.3) == 8
    # frac 1: the whole run; the last step (progress (T - 1) / T) is within one rounding of k
    assert annealed_k(8, None, 1.0, 99 / 100) == 8  # 32 - 23.76 = 8.24


def test_current_k():
    cfg = CrossCoderConfig(arch="batchtopk", d_latent=64, k=4, n_models=2, d_model=4, k_anneal_frac=0.5)
    arch = CrossCoder(cfg).arch
    assert arch.current_k(StepInput(progress=0.0)) == 16
    assert arch.current_k(StepInput(progress=0.25)) == 10
    assert arch.current_k(StepInput()) == 4  # progress 1.0 outside training
    assert arch.current_k(None) == 4
    off = CrossCoder(CrossCoderConfig(arch="batchtopk", d_latent=64, k=4, n_models=2, d_model=4)).arch
    assert off.current_k(StepInput(progress=0.0)) == 4  # annealing off: progress is not read


@pytest.mark.parametrize(
    "fields,start",
    [
        (
            {"k": 8, "k_anneal_frac": 0.5, "k_anneal_start": 4},
            "k_anneal_start: must be at least k (8), got 4",
        ),
        ({"k": 8, "k_anneal_start": 7}, "k_anneal_start: must be at least k (8), got 7"),
        ({"k_anneal_frac": 1.5}, "k_anneal_frac: must be in [0, 1], got 1.5"),
        ({"k_anneal_frac": -0.1}, "k_anneal_frac: must be in [0, 1], got -0.1"),
    ],
)
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_bad_anneal_config_refused(arch, fields, start):
    cfg = CrossCoderConfig(arch=arch, d_latent=64, n_models=2, d_model=4, **fields)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert str(e.value) == start


def test_cli_refuses_start_below_k(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--k",
            "8",
            "--k-anneal-frac",
            "0.5",
            "--k-anneal-start",
            "4",
            "--arch",
            "batchtopk",
            "--out",
            str(tmp_path / "bad"),
            "--wandb",
            "off",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: k_anneal_start: must be at least k (8), got 4"]
    assert not (tmp_path / "bad").exists()


def test_training_log_follows_the_schedule(tmp_path):
    """``--k-anneal-frac 0.5`` on the synthetic pair: the logged L0 of each step is k(t) * batch kept
    entries per batch, i.e. ``annealed_k(k, None, 0.5, (step - 1) / total)``: 4 k at the first step, k
    from the middle on."""
    out = tmp_path / "run"
    total = 40
    rc = main(
        [
            "train",
            "--arch",
            "batchtopk",
            "--k",
            "4",
            "--k-anneal-frac",
            "0.5",
            "--d-latent",
            "128",
            "--num-tokens",
            str(256 * total),
            "--batch-size",
            "256",
            "--log-every",
            "1",
            "--val-tokens",
            "512",
            "--out",
            str(out),
            "--wandb",
            "off",
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    l0 = {r["step"]: r["l0_loss"] for r in rows if "l0_loss" in r}
    assert sorted(l0) == list(range(1, total + 1))
    assert l0[1] == pytest.approx(16.0, abs=0.05)  # 4 k
    assert l0[total] == pytest.approx(4.0, abs=0.05)
    for step, v in l0.items():  # one missing positive score would be 1/256 below
        assert v == pytest.approx(annealed_k(4, None, 0.5, (step - 1) / total), abs=0.05), step
    assert [l0[s] for s in range(1, total + 1)] == sorted(l0.values(), reverse=True)  # non-increasing
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["k_anneal_frac"] == 0.5 and cfg["k_anneal_start"] is None
    # the saved model is calibrated for the target k: eval mode keeps about k latents per row
    assert 2.0 < [r for r in rows if "val/l0_loss" in r][-1]["val/l0_loss"] < 8.0


def make(arch: str, h: int = 512, d: int = 32, k: int = 8, **kw) -> CrossCoder:
    cfg = CrossCoderConfig(arch=arch, d_latent=h, k=k, n_models=2, d_model=d, k_anneal_frac=0.5, **kw)
    m = CrossCoder(cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.b_enc.copy_(0.1 * torch.randn(h, generator=g))
        m.b_dec.copy_(torch.randn(2, d, generator=g))
        m.W_dec.mul_(torch.rand(h, 2, 1, generator=g) + 0.5)
    return m.train()


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("method", ["threshold", "topk"])
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_fast_matches_dense_mid_anneal(arch, method, aux):
    m = make(arch, prefixes="32,128") if arch == "matryoshka" else make(arch)
    x = torch.randn(64, 2, 32, generator=torch.Generator().manual_seed(2))
    inp = StepInput(
        progress=0.25,
        aux_k=16 if aux else 0,
        aux_coeff=0.25,
        dead=torch.arange(512) % 4 == 0 if aux else None,
    )
    dense, fast = copy.deepcopy(m), copy.deepcopy(m)
    fast.arch.select_method = method
    r_d, r_f = compute_loss(dense, x, inp, fast=False), compute_loss(fast, x, inp, fast=True)
    r_d.loss.backward()
    r_f.loss.backward()
    assert float(r_d.metrics["l0_loss"]) == float(r_f.metrics["l0_loss"]) == 20.0  # k(0.25) = 32 - 12
    assert torch.equal(r_d.f > 0, r_f.f > 0)
    torch.testing.assert_close(r_f.f, r_d.f, rtol=1e-6, atol=1e-7)
    assert r_d.metrics.keys() == r_f.metrics.keys()
    for key in r_d.metrics:
        torch.testing.assert_close(
            r_f.metrics[key].float(),
            r_d.metrics[key].float(),
            rtol=1e-5,
            atol=1e-6,
            msg=lambda msg, key=key: f"metric {key}: {msg}",
        )
    for n in PARAMS:
        g_d, g_f = getattr(dense, n).grad, getattr(fast, n).grad
        scale = g_d.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(
            g_f / scale, g_d / scale, rtol=0, atol=1e-5, msg=lambda msg, n=n: f"grad {n}: {msg}"
        )
    assert torch.equal(dense.arch.threshold, fast.arch.threshold)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_resume_mid_anneal_is_bit_for_bit(tmp_path, arch):
    t = TrainConfig(
        num_tokens=256 * 40,
        batch_size=256,
        val_tokens=512,
        val_every=0,
        log_every=5,
        save_every=0,
        wandb="off",
        progress=False,
        dead_tokens=2000,
        seed=3,
        aux_k=16,
    )
    cfg = RunConfig(
        model=CrossCoderConfig(
            arch=arch, d_latent=128, k=4, k_anneal_frac=0.5, k_anneal_start=12, prefixes="16,64"
        ),
        train=t,
    )
    full = run_training(cfg, tmp_path / "full")
    with pytest.raises(Interrupted):
        run_training(cfg, tmp_path / "cut", stop_after_steps=13)  # progress 13/40 < 0.5: mid-anneal
    resumed = run_training(cfg, tmp_path / "cut", resume=True)
    a, b = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["loss"] == full["loss"]
    l0 = {
        r["step"]: r["l0_loss"]
        for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())
        if "l0_loss" in r
    }
    # logged means over 5 steps: steps 1-5 keep 12, 12, 11, 11, 10 (k from 12 to 4 over the first 20 steps)
    assert l0[5] == pytest.approx(sum(annealed_k(4, 12, 0.5, s / 40) for s in range(5)) / 5, abs=0.05)
    assert l0[40] == pytest.approx(4.0, abs=0.05)
