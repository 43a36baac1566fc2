"""collect -> train -> analyze on real (tiny, offline) transformers: three models, mixed widths, two sites,
and a pretraining run's checkpoints (issue 12). The models are the SMALL demo build: ``base`` (prose),
``ft`` (base + code), ``ft2`` (base + data), ``wide`` (48 wide, prose, from scratch) and the base's
``checkpoints/step_<N>``. Exact row alignment is tested in tests/test_collect_multi.py; here the whole
pipeline runs through the CLI as a user types it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from conftest_collect import corpus, tiny_pair

from crosscoder.cli import main
from crosscoder.data.paired import PairedCache

torch.set_num_threads(1)


def pipeline(tmp_path, models, sites=("transformer.h.1",), tokens=3000, steps=60):
    cache, run, out = tmp_path / "cache", tmp_path / "run", tmp_path / "analysis"
    args = ["collect", *sum((["--model", str(m)] for m in models), [])]
    args += sum((["--site", s] for s in sites), [])
    args += ["--dataset", str(corpus()), "--out", str(cache), "--num-tokens", str(tokens)]
    args += ["--seq-len", "32", "--batch-size", "8", "--dtype", "float32", "--no-progress"]
    assert main(args) == 0
    assert (
        main(
            ["train", "--cache", str(cache), "--out", str(run), "--d-latent", "96", "--batch-size", "256"]
            + ["--num-tokens", str(256 * steps), "--val-tokens", "256", "--no-progress", "--wandb", "off"]
        )
        == 0
    )
    assert main(["analyze", str(run), "--out", str(out), "--eval-sequences", "4", "--max-cards", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_parquet(out / "latents.parquet") if (out / "latents.parquet").exists() else None
    if table is None:
        table = pd.read_csv(out / "latents.csv")
    return PairedCache(cache), json.loads((run / "config.json").read_text()), summary, table, out


def test_three_models(tmp_path):
    pair = tiny_pair()
    cache, conf, summary, table, out = pipeline(tmp_path, [pair.base, pair.ft, pair.ft2])
    assert cache.n_models == 3 and conf["n_models"] == 3
    assert conf["model_names"] == [str(pair.base), str(pair.ft), str(pair.ft2)]
    assert {"dec_norm_0", "dec_norm_1", "dec_norm_2", "pattern", "nu_error_2"} <= set(table.columns)
    live = table[~table["dead"]]
    assert len(live) > 0 and set(live["pattern"]) <= {"0", "1", "2", "0+1", "0+2", "1+2", "0+1+2"}
    assert sum(summary["pattern_counts"].values()) == len(live)
    # spliced-in CE/KL for every model, each from its own forward
    spliced = summary["spliced"]["models"]
    assert len(spliced) == 3
    for r in spliced:
        assert np.isfinite(r["ce_spliced"]) and r["ce_zero"] > r["ce_clean"]
    assert (out / "norm_heatmap.png").is_file() and (out / "report.html").is_file()


def test_mixed_widths(tmp_path):
    pair = tiny_pair()
    cache, conf, summary, table, _ = pipeline(tmp_path, [pair.base, pair.wide])
    assert cache.meta["d_models"] == [32, 48] and conf["d_models"] == [32, 48]
    rows = cache.read(np.arange(200))
    assert torch.all(rows[:, 0, 32:] == 0) and torch.any(rows[:, 1, 32:] != 0)
    assert summary["d_models"] == [32, 48]
    assert {"dec_norm_0", "dec_norm_1", "pattern"} <= set(table.columns)
    assert len(summary["spliced"]["models"]) == 2


def test_two_sites(tmp_path):
    pair = tiny_pair()
    _, conf, summary, table, out = pipeline(
        tmp_path, [pair.base, pair.ft], sites=("transformer.h.0", "transformer.h.1")
    )
    assert conf["n_models"] == 4 and conf["block_models"] == [0, 0, 1, 1]
    assert conf["sites"] == ["transformer.h.0", "transformer.h.1"]
    assert {"dec_norm_0_0", "dec_norm_0_1", "dec_norm_1_0", "dec_norm_1_1", "dec_norm_site_0"} <= set(
        table.columns
    )
    n0 = np.hypot(table["dec_norm_0_0"], table["dec_norm_0_1"])
    np.testing.assert_allclose(table["dec_norm_0"], n0, rtol=1e-5)
    assert (out / "site_norms.png").is_file()


def test_checkpoint_series(tmp_path):
    pair = tiny_pair()
    ckpts = pair.checkpoints  # ordered by step, the last is the base
    assert len(ckpts) >= 3
    given = [ckpts[-1], ckpts[0], ckpts[1]]  # out of order on purpose
    _, _, summary, _, out = pipeline(tmp_path, given)
    steps = [int(p.name.split("_")[-1]) for p in given]
    assert [steps[i] for i in summary["model_order"]] == sorted(steps)
    assert summary["checkpoints"]["series"]
    assert (out / "checkpoints.png").is_file()
