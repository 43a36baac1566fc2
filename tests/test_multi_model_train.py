"""Training on more than two models: three models of different widths, and (model, site) blocks.

The cache is written with :class:`PairedCacheWriter` the way ``crosscoder collect`` writes one (narrower
blocks zero-padded to the largest width, ``d_models`` in ``meta.json``); the trainer reads the block
description into the config, keeps the padding exactly zero, saves each block at its own width and
resumes bit for bit.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crosscoder import CrossCoder
from crosscoder.config import CrossCoderConfig, DataConfig, RunConfig, TrainConfig
from crosscoder.data.paired import PairedCacheWriter
from crosscoder.train import Interrupted, run_training
from crosscoder.train.checkpoint import list_checkpoints

WIDTHS = [12, 16, 12]


def planted_cache(path, widths=WIDTHS, rows=6000, seed=0, blocks=None, sites=None):
    """Rows ``[rows, len(widths), max(widths)]``: 24 features, each present in a subset of the blocks,
    zero-padded past each block's width."""
    g = torch.Generator().manual_seed(seed)
    n, d = len(widths), max(widths)
    n_feat = 24
    subsets = [set(range(n))] * 12 + [{i} for i in range(n)] * 2 + [{0, 1}] * 3 + [{1, 2}] * 3
    subsets = subsets[:n_feat]
    vecs = torch.zeros(n_feat, n, d)
    for j, s in enumerate(subsets):
        for m in s:
            v = torch.randn(widths[m], generator=g)
            vecs[j, m, : widths[m]] = v / v.norm()
    act = (torch.rand(rows, n_feat, generator=g) < 0.08).float() * (
        0.5 + torch.rand(rows, n_feat, generator=g)
    )
    x = torch.einsum("rf,fmd->rmd", act, vecs) + 0.01 * torch.randn(rows, n, d, generator=g)
    x = x * (torch.arange(d)[None, None, :] < torch.tensor(widths)[None, :, None])
    meta = {
        "models": [{"name": f"model_{i}", "revision": None} for i in range(n if blocks is None else 2)],
        "d_models": list(widths),
        "site": (sites or ["layer"])[0],
        "sites": sites or ["layer"],
    }
    if blocks is not None:
        meta["blocks"] = blocks
    w = PairedCacheWriter(path, n, d, "float32", shard_rows=2048, meta=meta)
    w.add(x)
    w.close()
    return subsets


def cfg_for(cache, arch="vanilla", **train):
    t = dict(
        num_tokens=256 * 30,
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
        model=CrossCoderConfig(arch=arch, d_latent=64, k=4),
        train=TrainConfig(**t),
        data=DataConfig(cache=str(cache)),
    )


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_three_models_mixed_widths_resume_bit_for_bit(tmp_path, arch):
    planted_cache(tmp_path / "cache")
    cfg = cfg_for(tmp_path / "cache", arch, save_every=7)
    full = run_training(cfg, tmp_path / "full")
    with pytest.raises(Interrupted):
        run_training(cfg_for(tmp_path / "cache", arch, save_every=7), tmp_path / "cut", stop_after_steps=17)
    resumed = run_training(cfg_for(tmp_path / "cache", arch, save_every=7), tmp_path / "cut", resume=True)
    a, b = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["loss"] == full["loss"]
    # per-block tensors at each block's own width, no padded W_enc/W_dec/b_dec
    for i, w in enumerate(WIDTHS):
        assert tuple(a[f"W_enc.{i}"].shape) == (w, 64)
        assert tuple(a[f"W_dec.{i}"].shape) == (64, w)
        assert tuple(a[f"b_dec.{i}"].shape) == (w,)
    assert "W_enc" not in a and "W_dec" not in a
    conf = json.loads((tmp_path / "full" / "config.json").read_text())
    assert conf["n_models"] == 3 and conf["d_model"] == 16 and conf["d_models"] == WIDTHS
    assert conf["model_names"] == ["model_0", "model_1", "model_2"]
    assert [len(r) for r in conf["norm_mean"]] == WIDTHS  # each block's own width
    assert {"explained_variance_A", "explained_variance_B", "explained_variance_C"} <= set(full)
    # the padding stays exactly zero through training (the checkpoints hold the padded training tensors)
    pad = torch.arange(16)[None, :] >= torch.tensor(WIDTHS)[:, None]
    for _, ck in list_checkpoints(tmp_path / "cut"):
        t = load_file(str(ck / "model.safetensors"))
        assert torch.all(t["W_dec"][:, pad] == 0) and torch.all(t["W_enc"][pad] == 0)
        assert torch.all(t["b_dec"][pad] == 0)
        assert torch.any(t["W_dec"][:, ~pad] != 0)


@pytest.mark.parametrize("widths", [[12, 12, 12], WIDTHS])
def test_three_models_learn_as_well_with_mixed_widths(tmp_path, widths):
    """The padding costs nothing: measured at 300 steps, explained variance 0.987 (same widths) vs 0.986
    (12/16/12) for BatchTopK k 4."""
    planted_cache(tmp_path / "cache", widths=widths, rows=20000)
    r = run_training(
        cfg_for(tmp_path / "cache", "batchtopk", num_tokens=256 * 300, lr=3e-3), tmp_path / "run"
    )
    assert r["explained_variance"] > 0.9
    assert min(r[f"explained_variance_{c}"] for c in "ABC") > 0.9


def test_mixed_width_model_round_trip_and_shape_errors(tmp_path):
    cfg = CrossCoderConfig(arch="vanilla", n_models=2, d_model=10, d_latent=16, d_models=[6, 10])
    m = CrossCoder(cfg, generator=torch.Generator().manual_seed(0))
    assert torch.all(m.W_dec.detach()[:, 0, 6:] == 0)
    assert torch.allclose(m.W_dec.detach().norm(dim=-1), torch.full((16, 2), cfg.dec_init_norm))
    x = torch.randn(5, 2, 10)
    x[:, 0, 6:] = 0
    m.fold(torch.tensor([2.0, 0.5]), torch.cat([torch.randn(1, 10), torch.randn(1, 10)]) * m.width_mask)
    m.save_pretrained(tmp_path / "m")
    back = CrossCoder.from_pretrained(tmp_path / "m")
    for n in ("W_enc", "W_dec", "b_enc", "b_dec", "norm_mean", "norm_scale"):
        assert torch.equal(getattr(back, n), getattr(m, n)), n
    torch.testing.assert_close(back(x)[0], m(x)[0])
    t = load_file(str(tmp_path / "m" / "model.safetensors"))
    t["W_dec.0"] = t["W_dec.0"][:, :5].contiguous()
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "m" / "model.safetensors"))
    from crosscoder.errors import CrossCoderError

    with pytest.raises(CrossCoderError, match=r"W_dec.0 has shape \(16, 5\), config says \(16, 6\)"):
        CrossCoder.from_pretrained(tmp_path / "m")


def test_same_width_file_format_unchanged(tmp_path):
    planted_cache(tmp_path / "cache", widths=[12, 12, 12])
    run_training(cfg_for(tmp_path / "cache", num_tokens=256 * 4), tmp_path / "run")
    t = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(t) and not any("." in k for k in t)
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["d_models"] is None and conf["block_models"] is None


def test_site_blocks_reach_the_config(tmp_path):
    blocks = [{"model": m, "site": s} for m in range(2) for s in range(2)]
    planted_cache(tmp_path / "cache", widths=[12] * 4, blocks=blocks, sites=["h.0", "h.1"])
    run_training(cfg_for(tmp_path / "cache", num_tokens=256 * 4), tmp_path / "run")
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["n_models"] == 4
    assert conf["block_models"] == [0, 0, 1, 1] and conf["block_sites"] == [0, 1, 0, 1]
    assert conf["sites"] == ["h.0", "h.1"] and conf["model_names"] == ["model_0", "model_1"]
    model = CrossCoder.from_pretrained(tmp_path / "run")
    assert model.cfg.block_model_index() == [0, 0, 1, 1]
    assert np.isfinite(model.W_dec.detach().numpy()).all()


def test_model_card_names_blocks_and_widths():
    from crosscoder.interop.hub import render_model_card

    conf = dict(
        arch="vanilla",
        n_models=4,
        d_model=48,
        d_latent=64,
        model_names=["gpt-a", "gpt-b@step100"],
        sites=["h.0", "h.1"],
        site="h.0",
        block_models=[0, 0, 1, 1],
        block_sites=[0, 1, 0, 1],
        d_models=[32, 32, 48, 48],
    )
    card = render_model_card(conf)
    assert "| 3 | gpt-b@step100 | h.1 | 48 |" in card
    assert "`W_enc.<i> [d_i, d_latent]`" in card and "`h.0`, `h.1`" in card
    assert "| A (base) | gpt-a |" in card


def test_export_keeps_each_block_at_its_width(tmp_path):
    import datasets

    from crosscoder.cli.export import export_cache
    from crosscoder.data.paired import PairedCache

    planted_cache(tmp_path / "cache", rows=300)
    dirs = export_cache(str(tmp_path / "cache"), str(tmp_path / "out"))
    assert [p.rsplit("/", 1)[1] for p in dirs] == ["model_0", "model_1", "model_2"]
    rows = PairedCache(tmp_path / "cache").read(np.arange(300))
    for i, (p, w) in enumerate(zip(dirs, WIDTHS, strict=True)):
        acts = np.asarray(datasets.load_from_disk(p).with_format("numpy")[:]["activation"])
        assert acts.shape == (300, w)
        assert np.array_equal(acts, rows[:, i, :w].numpy())
    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert meta["d_models"] == {"model_0": 12, "model_1": 16, "model_2": 12}
