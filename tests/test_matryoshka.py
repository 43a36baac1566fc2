"""Matryoshka BatchTopK crosscoder: hand-computed loss, fast == dense, resume, save/load, CLI, learning."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crosscoder import CrossCoder
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.data.paired import PairedCache
from crosscoder.errors import ConfigError
from crosscoder.model import compute_loss
from crosscoder.model.architectures.matryoshka import prefix_sizes, prefix_weights
from crosscoder.train import Interrupted, run_training

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
METHODS = ("threshold", "topk")


# ------------------------------------------------------------------------------------------ options
def test_prefix_defaults_and_parsing():
    assert prefix_sizes("", 256) == (16, 64, 256)
    assert prefix_sizes("", 8) == (2, 8)  # 8 // 16 = 0 dropped
    assert prefix_sizes("", 1) == (1,)
    assert prefix_sizes("32, 128", 256) == (32, 128, 256)  # d_latent appended
    assert prefix_sizes("32,128,256", 256) == (32, 128, 256)  # ... unless already last
    assert prefix_sizes([4, 8], 16) == (4, 8, 16)  # a list from a config file
    assert prefix_weights(None, 3) == (1.0, 1.0, 1.0)
    assert prefix_weights("2,0.5,3", 3) == (2.0, 0.5, 3.0)
    assert prefix_weights("2,0.5", 3) == (
        2.0,
        0.5,
        1.0,
    )  # one per listed prefix: the full dictionary weighs 1


@pytest.mark.parametrize(
    "fields,start",
    [
        ({"prefixes": "300,100"}, "prefixes: sizes must be strictly increasing"),
        ({"prefixes": "64,64"}, "prefixes: sizes must be strictly increasing"),
        ({"prefixes": "0,64"}, "prefixes: sizes must be positive"),
        ({"prefixes": "-4"}, "prefixes: sizes must be positive"),
        ({"prefixes": "300"}, "prefixes: 300 exceeds d_latent (256)"),
        ({"prefixes": "a,b"}, "prefixes: expected comma-separated integers"),
        ({"prefixes": "32,128", "prefix_weights": "1"}, "prefix_weights: expected 3 weights"),
        ({"prefixes": "32,128", "prefix_weights": "1,1,1,1"}, "prefix_weights: expected 3 weights"),
        (
            {"prefixes": "32,128", "prefix_weights": "1,-1,1"},
            "prefix_weights: weights must be finite and >= 0",
        ),
        (
            {"prefixes": "32,128", "prefix_weights": "1,nan,1"},
            "prefix_weights: weights must be finite and >= 0",
        ),
        (
            {"prefixes": "32,128", "prefix_weights": "0,0,0"},
            "prefix_weights: at least one weight must be positive",
        ),
        ({"prefix_weights": "x"}, "prefix_weights: expected comma-separated numbers"),
        ({"k_anneal_start": 2}, "k_anneal_start: must be at least k"),  # BatchTopK's checks apply too
    ],
)
def test_bad_options_refused(fields, start):
    cfg = CrossCoderConfig(arch="matryoshka", d_latent=256, k=4, n_models=2, d_model=8, **fields)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


def test_options_ignored_by_other_architectures():
    CrossCoderConfig(
        arch="batchtopk", d_latent=256, k=4, n_models=2, d_model=8, prefixes="300,100"
    ).validate()


# ------------------------------------------------------------------------------------------ (a) by hand
def tiny(prefix_weights: str | None = None) -> CrossCoder:
    """d_latent 4, 2 models of d_model 2: latent i reads and writes flat input dim i (identity encoder
    and decoder, every decoder norm 1). k = 4 = d_latent keeps every positive score: f = relu(x)."""
    cfg = CrossCoderConfig(
        arch="matryoshka",
        d_latent=4,
        k=4,
        n_models=2,
        d_model=2,
        prefixes="1,2",
        prefix_weights=prefix_weights,
    )
    m = CrossCoder(cfg)
    with torch.no_grad():
        m.W_enc.copy_(torch.eye(4).view(2, 2, 4))
        m.W_dec.copy_(torch.eye(4).view(4, 2, 2))
        m.b_enc.zero_()
        m.b_dec.zero_()
    return m.train()


# flat rows [x_A0, x_A1, x_B0, x_B1]; f = relu(x): [1, 2, 3, 0] and [2, 0, 1, 4]
X = torch.tensor([[1.0, 2.0, 3.0, -1.0], [2.0, -1.0, 1.0, 4.0]]).view(2, 2, 2)


@pytest.mark.parametrize("fast", [False, True])
def test_loss_by_hand(fast):
    m = tiny("2,0.5,3")
    out = compute_loss(m, X, fast=fast)
    # prefix 1 (latent 0): x_hat rows [1,0,0,0], [2,0,0,0]: SSE 4+9+1 = 14 and 1+1+16 = 18 -> l2 16
    # prefix 2 (latents 0-1): [1,2,0,0], [2,0,0,0]: 9+1 = 10 and 18 -> l2 14
    # full: [1,2,3,0], [2,0,1,4]: 1 and 1 -> l2 1
    # loss = 2 * 16 + 0.5 * 14 + 3 * 1 = 42; l2_loss = 1 (weight 1 in compute_loss), prefix_loss the rest
    assert out.metrics["l2_loss"].item() == pytest.approx(1.0)
    assert out.metrics["prefix_loss"].item() == pytest.approx(2 * 16 + 0.5 * 14 + (3 - 1) * 1)
    assert out.loss.item() == pytest.approx(42.0)
    assert out.metrics["l0_loss"].item() == pytest.approx(3.0)
    # SST around the batch mean [1.5, 0.5, 2, 1.5]: each row 0.25 + 2.25 + 1 + 6.25 = 9.75 -> 19.5
    assert out.metrics["ev_prefix_1"].item() == pytest.approx(1 - 32 / 19.5)
    assert out.metrics["ev_prefix_2"].item() == pytest.approx(1 - 28 / 19.5)
    assert out.metrics["ev_prefix_4"].item() == pytest.approx(1 - 2 / 19.5)
    assert out.metrics["ev_prefix_4"].item() == pytest.approx(out.metrics["explained_variance"].item())


def test_loss_by_hand_defaults_and_norm():
    m = tiny()  # all weights 1: loss = 16 + 14 + 1
    out = compute_loss(m, X)
    assert out.metrics["prefix_loss"].item() == pytest.approx(30.0)
    assert out.loss.item() == pytest.approx(31.0)
    m = tiny("2,0.5")  # the full dictionary weighs 1: 2 * 16 + 0.5 * 14 + 1
    assert compute_loss(m, X).loss.item() == pytest.approx(40.0)
    m = tiny("0,1,0")  # w_full = 0: prefix_loss = 14 - 1, loss = the prefix-2 term alone
    out = compute_loss(m, X)
    assert out.metrics["prefix_loss"].item() == pytest.approx(13.0) and out.loss.item() == pytest.approx(14.0)
    # l2 = "norm": mean over rows of the summed per-model error norms
    out = compute_loss(tiny("1,1,1"), X, l2="norm")
    p1 = (2 + math.sqrt(10) + 1 + math.sqrt(17)) / 2  # errors (0,2),(3,-1) and (0,-1),(1,4)
    p2 = (math.sqrt(10) + 1 + math.sqrt(17)) / 2  # (0,0),(3,-1) and (0,-1),(1,4)
    full = (1 + 1) / 2  # (0,0),(0,-1) and (0,-1),(0,0)
    assert out.metrics["prefix_loss"].item() == pytest.approx(p1 + p2)
    assert out.loss.item() == pytest.approx(p1 + p2 + full)


def test_single_prefix_is_batchtopk():
    """With the full dictionary as the only prefix the loss, latents and gradients are BatchTopK's."""
    torch.manual_seed(0)
    x = torch.randn(32, 2, 16)
    mats = CrossCoder(
        CrossCoderConfig(arch="matryoshka", d_latent=64, k=4, n_models=2, d_model=16, prefixes="64"),
        generator=torch.Generator().manual_seed(1),
    ).train()
    btk = CrossCoder(
        CrossCoderConfig(arch="batchtopk", d_latent=64, k=4, n_models=2, d_model=16),
        generator=torch.Generator().manual_seed(1),
    ).train()
    assert mats.arch.prefix_sizes == (64,)
    r_m, r_b = compute_loss(mats, x, fast=False), compute_loss(btk, x, fast=False)
    assert r_m.metrics["prefix_loss"].item() == 0.0
    assert torch.equal(r_m.f, r_b.f)
    torch.testing.assert_close(r_m.loss, r_b.loss)
    r_m.loss.backward()
    r_b.loss.backward()
    for n in PARAMS:
        torch.testing.assert_close(getattr(mats, n).grad, getattr(btk, n).grad)


# ------------------------------------------------------------------------------------------ (b) fast == dense
def make(h: int = 512, d: int = 32, k: int = 8, seed: int = 0, **kw) -> CrossCoder:
    kw.setdefault("prefixes", "32,128")
    cfg = CrossCoderConfig(arch="matryoshka", d_latent=h, k=k, n_models=2, d_model=d, **kw)
    m = CrossCoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.b_enc.copy_(0.1 * torch.randn(h, generator=g))
        m.b_dec.copy_(torch.randn(2, d, generator=g))
        m.W_dec.mul_(torch.rand(h, 2, 1, generator=g) + 0.5)  # unequal decoder norms
    return m.train()


def batch(b: int = 64, d: int = 32, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 2, d, generator=torch.Generator().manual_seed(seed))


def run_pair(model: CrossCoder, x: torch.Tensor, method: str, **kw):
    """(dense result, fast result, dense model, fast model) after one forward + backward each."""
    dense, fast = copy.deepcopy(model), copy.deepcopy(model)
    fast.arch.select_method = method
    r_d = compute_loss(dense, x, fast=False, **kw)
    r_f = compute_loss(fast, x, fast=True, **kw)
    r_d.loss.backward()
    r_f.loss.backward()
    return r_d, r_f, dense, fast


def assert_same(r_d, r_f, dense: CrossCoder, fast: CrossCoder, rtol: float = 1e-5) -> None:
    assert torch.equal(r_d.f > 0, r_f.f > 0), "selected latents differ"
    torch.testing.assert_close(r_f.f, r_d.f, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r_f.loss, r_d.loss, rtol=rtol, atol=1e-6)
    assert r_d.metrics.keys() == r_f.metrics.keys()
    for key in r_d.metrics:
        torch.testing.assert_close(
            r_f.metrics[key].float(),
            r_d.metrics[key].float(),
            rtol=rtol,
            atol=1e-6,
            msg=lambda m, key=key: f"metric {key}: {m}",
        )
    for n in PARAMS:
        g_d, g_f = getattr(dense, n).grad, getattr(fast, n).grad
        scale = g_d.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(
            g_f / scale, g_d / scale, rtol=0, atol=1e-5, msg=lambda m, n=n: f"grad {n}: {m}"
        )
    for name, v in dense.arch.state_dict().items():  # the threshold
        assert torch.equal(fast.arch.state_dict()[name], v), name
    assert torch.equal(r_d.latents.fired(), r_f.latents.fired())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "dead_frac,aux_k",
    [
        (None, 0),  # AuxK off
        (0.0, 16),  # nothing dead: AuxK loss exactly 0
        (0.3, 4),  # sparse AuxK entries
        (0.3, 64),  # dense sub-matrix over the dead columns
        (1.0, 16),  # everything dead
    ],
)
def test_fast_matches_dense(method, dead_frac, aux_k):
    m = make()
    kw = {}
    if dead_frac is not None:
        dead = torch.zeros(512, dtype=torch.bool)
        dead[torch.randperm(512, generator=torch.Generator().manual_seed(5))[: int(dead_frac * 512)]] = True
        kw = {"aux_k": aux_k, "aux_coeff": 0.25, "dead": dead}
    r_d, r_f, dn, fs = run_pair(m, batch(), method, **kw)
    assert_same(r_d, r_f, dn, fs)
    assert {f"ev_prefix_{p}" for p in (32, 128, 512)} <= set(r_f.metrics)
    assert r_f.metrics["prefix_loss"].item() > 0
    if dead_frac:
        assert float(r_f.metrics["aux_loss"]) > 0.0
    assert float(fs.arch.threshold) > 0  # the training selection fed the threshold EMA


@pytest.mark.parametrize("method", METHODS)
def test_fast_matches_dense_weights_norm_default_prefixes(method):
    """Non-default weights (w_full != 1 adds (w_full - 1) l2_full), l2 = "norm", default prefixes."""
    m = make(prefixes="", prefix_weights="3,0.5,0.25")
    assert m.arch.prefix_sizes == (32, 128, 512)
    assert_same(*run_pair(m, batch(), method, l2="norm", aux_k=8, dead=torch.arange(512) % 3 == 0))


@pytest.mark.parametrize("method", METHODS)
def test_fast_matches_dense_eval_threshold(method):
    """Eval mode with a threshold: the inference rule (select_above) in both paths."""
    m = make(prefixes="7,100,300")  # prefixes not multiples of anything
    x = batch()
    with torch.no_grad():
        m.arch.threshold.fill_(
            float((torch.relu(m.encode_pre(x)) * m.arch.weight()).flatten().quantile(0.98))
        )
    m.eval()
    r_d, r_f, dn, fs = run_pair(m, x, method)
    assert_same(r_d, r_f, dn, fs)
    assert 0 < float(r_f.metrics["l0_loss"]) < 512


class MirrorDist:
    """Two ranks holding the same batch: the global batch is this one twice, so every global quantity
    (selection, explained variances, AuxK) equals the single-process one."""

    world_size = 2

    def all_gather_cat(self, t):
        return torch.cat([t, t])

    def all_reduce_sum(self, t):
        return 2 * t


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_distributed_metrics_pool_the_global_batch(method, fast):
    m = make()
    m.arch.select_method = method
    kw = {"aux_k": 8, "dead": torch.arange(512) % 3 == 0, "fast": fast}
    one = compute_loss(copy.deepcopy(m), batch(), **kw)
    two = compute_loss(copy.deepcopy(m), batch(), dist=MirrorDist(), **kw)
    torch.testing.assert_close(two.f, one.f)
    for key in one.metrics:
        torch.testing.assert_close(
            two.metrics[key].float(),
            one.metrics[key].float(),
            rtol=1e-5,
            atol=1e-6,
            msg=lambda msg, key=key: f"metric {key}: {msg}",
        )


# ------------------------------------------------------------------------------------------ (c) resume
def small_cfg(**train):
    t = dict(
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
    )
    t.update(train)
    return RunConfig(
        model=CrossCoderConfig(
            arch="matryoshka", d_latent=128, k=4, prefixes="16,48", prefix_weights="1,2,1"
        ),
        train=TrainConfig(**t),
    )


def test_resume_is_bit_for_bit(tmp_path):
    cfg = small_cfg(aux_k=16, save_every=7)
    full = run_training(cfg, tmp_path / "full")
    with pytest.raises(Interrupted):
        run_training(cfg, tmp_path / "cut", stop_after_steps=17)
    resumed = run_training(cfg, tmp_path / "cut", resume=True)
    a, b = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert set(a) == set(b) and "threshold" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["loss"] == full["loss"] and resumed["ev_prefix_16"] == full["ev_prefix_16"]
    rows = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert all("prefix_loss" in r and "ev_prefix_48" in r for r in rows if "loss" in r)


# ------------------------------------------------------------------------------------------ (d) save / load
def test_save_load_round_trip(tmp_path):
    m = make(h=64, d=8, prefixes="8,32", prefix_weights="2,1,0.5")
    x = batch(32, d=8)
    compute_loss(m, x).loss.backward()  # a training step's selection sets the threshold
    m.eval()
    m.save_pretrained(tmp_path / "cc")
    cfg = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert cfg["arch"] == "matryoshka" and cfg["prefixes"] == "8,32" and cfg["prefix_weights"] == "2,1,0.5"
    RunConfig.from_dict(cfg).validate()  # the saved config reloads (``--config``)
    m2 = CrossCoder.from_pretrained(tmp_path / "cc")
    assert m2.arch.prefix_sizes == (8, 32, 64) and m2.arch.prefix_weights == (2.0, 1.0, 0.5)
    assert torch.equal(m2.arch.threshold, m.arch.threshold) and float(m2.arch.threshold) > 0
    with torch.no_grad():
        for a, b in zip(m(x), m2(x), strict=True):
            assert torch.equal(a, b)
        r1, r2 = compute_loss(m, x), compute_loss(m2, x)
    for k in r1.metrics:
        assert torch.equal(r1.metrics[k], r2.metrics[k]), k
    am1, am2 = m.arch.analysis_metrics([x[:10], x[10:]]), m2.arch.analysis_metrics([x])
    assert am1.keys() == {"ev_prefix_8", "ev_prefix_32", "ev_prefix_64"}
    for k in am1:
        assert am1[k] == pytest.approx(am2[k], abs=1e-9)
    # pooled over the rows, ev_prefix_<d_latent> is the model's explained variance on them
    assert am1["ev_prefix_64"] == pytest.approx(float(r1.metrics["explained_variance"]), abs=1e-5)


# ------------------------------------------------------------------------------------------ (e) CLI
def test_cli_trains_and_refuses_bad_prefixes(tmp_path):
    base = [
        sys.executable,
        "-m",
        "crosscoder",
        "train",
        "--arch",
        "matryoshka",
        "--d-latent",
        "256",
        "--k",
        "4",
        "--num-tokens",
        "20000",
        "--batch-size",
        "256",
        "--wandb",
        "off",
        "--no-progress",
    ]
    r = subprocess.run(
        [*base, "--prefixes", "32,128", "--out", str(tmp_path / "ok")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert cfg["prefixes"] == "32,128"
    last = [json.loads(ln) for ln in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"val/ev_prefix_32", "val/ev_prefix_128", "val/ev_prefix_256", "val/prefix_loss"} <= set(last)
    for bad, field in (("300,100", "prefixes:"), ("32,128 --prefix-weights 1,1,1,1", "prefix_weights:")):
        r = subprocess.run(
            [*base, "--prefixes", *bad.split(), "--out", str(tmp_path / "bad")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {field}"), r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------ (f) learning
def test_first_prefix_learns(tmp_path):
    """On the synthetic pair the first 16 latents reconstruct on their own (much better than the first 16
    of a BatchTopK crosscoder trained identically), and less than the full dictionary."""

    def train(arch):
        cfg = RunConfig(
            model=CrossCoderConfig(arch=arch, d_latent=256, k=4, prefixes="16,64"),
            train=TrainConfig(
                num_tokens=256 * 120,
                batch_size=256,
                lr=3e-3,
                val_tokens=2048,
                val_every=0,
                log_every=20,
                wandb="off",
                progress=False,
                seed=1,
            ),
        )
        metrics = run_training(cfg, tmp_path / arch)
        return metrics, CrossCoder.from_pretrained(tmp_path / arch)

    metrics, model = train("matryoshka")
    cfg = json.loads((tmp_path / "matryoshka" / "config.json").read_text())
    x = PairedCache(cfg["source"]["cache_path"], verify="size").read(
        np.arange(4096)
    )  # raw rows (folded model)
    ev = model.arch.analysis_metrics([x[:2048], x[2048:]])
    assert 0.08 < ev["ev_prefix_16"] < ev["ev_prefix_64"] < ev["ev_prefix_256"], ev
    with torch.no_grad():  # ev_prefix_<d_latent> is the explained variance of the model's reconstruction
        x_hat, _ = model(x)
        full = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert ev["ev_prefix_256"] == pytest.approx(full, abs=1e-4)
    assert 0.08 < metrics["ev_prefix_16"] < metrics["explained_variance"]  # the training log agrees
    # The same prefix of a BatchTopK dictionary trained identically explains far less.
    _, btk = train("batchtopk")
    with torch.no_grad():
        f = btk.encode(x)
        x16 = (btk.b_dec.reshape(1, -1) + f[:, :16] @ btk.W_dec[:16].reshape(16, -1)).view_as(x)
        ev_btk16 = 1 - float((x - x16).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert ev["ev_prefix_16"] > 3 * max(ev_btk16, 0.01), (ev, ev_btk16)


def test_analyze_reports_explained_variance_per_prefix(tmp_path) -> None:
    """`crosscoder analyze` asks the architecture for its own numbers: Matryoshka's explained variance per
    prefix, pooled over the scanned rows; nested prefixes explain nested amounts, the last one all of it."""
    from crosscoder.cli import main

    cfg = RunConfig(
        model=CrossCoderConfig(arch="matryoshka", d_latent=128, k=4, prefixes="16,64"),
        train=TrainConfig(
            num_tokens=150_000,
            batch_size=512,
            val_tokens=2048,
            val_every=0,
            log_every=50,
            save_every=0,
            wandb="off",
            progress=False,
            lr=3e-3,
        ),
    )
    run_training(cfg, tmp_path / "run")
    assert (
        main(
            [
                "analyze",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "rep"),
                "--max-tokens",
                "20000",
                "--no-spliced",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    ev = summary["architecture_metrics"]
    assert list(ev) == ["ev_prefix_16", "ev_prefix_64", "ev_prefix_128"]
    assert 0.0 < ev["ev_prefix_16"] < ev["ev_prefix_64"] < ev["ev_prefix_128"]
    # the full prefix is the model's reconstruction: the scan's pooled explained variance on the same data
    assert ev["ev_prefix_128"] == pytest.approx(summary["reconstruction"]["explained_variance"], abs=0.01)
    assert "ev_prefix_16" in (tmp_path / "rep" / "report.html").read_text()


def test_validation_pools_the_prefix_explained_variance(tmp_path) -> None:
    """``val/ev_prefix_<p>`` is pooled over the whole held-out set like ``val/explained_variance`` (not a
    mean of per-batch values), so the full prefix equals it; 257 rows in batches of 256 would differ."""
    cfg = RunConfig(
        model=CrossCoderConfig(arch="matryoshka", d_latent=128, k=4, prefixes="16,64"),
        train=TrainConfig(
            num_tokens=256 * 40,
            batch_size=256,
            val_tokens=257,
            val_every=10**6,
            log_every=20,
            save_every=0,
            wandb="off",
            progress=False,
        ),
    )
    m = run_training(cfg, tmp_path / "run")
    assert m["val/ev_prefix_128"] == pytest.approx(m["val/explained_variance"], abs=1e-5)
    assert m["val/ev_prefix_16"] < m["val/ev_prefix_64"] < m["val/ev_prefix_128"]
