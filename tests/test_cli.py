"""CLI surface: flags from the dataclasses, synth -> train round trip, wandb offline, b_dec init."""

import json
import subprocess
import sys

import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.cli import main
from crosscoder.data.loader import CacheBatches
from crosscoder.data.paired import PairedCache
from crosscoder.data.synthetic import GroundTruth
from crosscoder.normalization import Normalization
from crosscoder.train.trainer import geometric_median

COMMON = [
    "--wandb",
    "off",
    "--no-progress",
    "--num-tokens",
    "2048",
    "--batch-size",
    "256",
    "--val-tokens",
    "256",
    "--dict-size",
    "32",
]


def test_help_lists_flags_mirroring_the_config():
    r = subprocess.run(
        [sys.executable, "-m", "crosscoder", "train", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    for flag in (
        "--dict-size",
        "--k",
        "--l1-coeff",
        "--lr",
        "--batch-size",
        "--num-tokens",
        "--seed",
        "--arch",
        "--aux-k",
        "--out",
        "--config",
        "--resume",
        "--overwrite",
        "--base-data",
        "--ft-data",
        "--column",
        "--cache",
        "--skip-nonfinite",
        "--val-tokens",
        "--save-every",
        "--keep-checkpoints",
        "--wandb",
    ):
        assert flag in r.stdout, flag


def test_synth_writes_hf_pair_that_train_reads(tmp_path, capsys):
    out = tmp_path / "pair"
    assert (
        main(
            [
                "synth",
                str(out),
                "--rows",
                "3000",
                "--d-model",
                "16",
                "--n-shared",
                "8",
                "--n-base-only",
                "4",
                "--n-ft-only",
                "4",
                "--n-shared-weak",
                "2",
            ]
        )
        == 0
    )
    gt = GroundTruth.load(out / "ground_truth")
    assert gt.dirs.shape == (18, 2, 16) and gt.classes.count("base_only") == 4
    assert torch.all(gt.dirs[gt.classes.index("base_only"), 1] == 0)
    from datasets import load_from_disk

    base, ft = load_from_disk(str(out / "base")), load_from_disk(str(out / "ft"))
    assert len(base) == len(ft) == 3000 and len(base[0]["activation"]) == 16
    assert (
        main(
            [
                "train",
                *COMMON,
                "--base-data",
                str(out / "base"),
                "--ft-data",
                str(out / "ft"),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["d_model"] == 16 and cfg["data"]["base_data"] == str(out / "base")
    assert main(["synth", str(out)]) == 2  # refuses to overwrite


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *[a for a in COMMON if a not in ("--wandb", "off")],
                "--wandb",
                "offline",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert list((out / "wandb").glob("offline-run-*")), list((out / "wandb").iterdir())


def test_train_summary_classes_use_analyze_rules(tmp_path, capsys):
    from crosscoder import CrossCoder
    from crosscoder.analysis.table import CLASS_NAMES, latent_columns, thresholds_for

    out = tmp_path / "run"  # no data: the built-in synthetic pair
    assert main(["train", *COMMON, "--arch", "batchtopk", "--k", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    cls = latent_columns(CrossCoder.from_pretrained(out), thresholds_for("batchtopk"))["class"]
    assert "  ".join(f"{c} {int((cls == c).sum())}" for c in CLASS_NAMES) + "  (of 32)" in text
    assert "analyze's batchtopk defaults: base_only r < 0.25, ft_only r > 0.75" in text
    assert "Latent Scaling" in text and "r < 0.25 / r > 0.75" in text  # the recovery lines too
    assert json.loads((out / "recovery.json").read_text())["exclusive_band"] == 0.25


def test_geometric_median_and_option(tmp_path):
    pts = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[10.0, 0.0]]])  # [3, 1, 2]
    assert torch.allclose(geometric_median(pts, iters=200), torch.tensor([[1.0, 0.0]]), atol=1e-3)
    # With lr 0 the saved (folded) b_dec is the initial one mapped back to raw units: b / s + mu, where b is
    # the geometric median of the first training batch (normalised), or 0 (the centred mean) by default.
    for init, out in (("geometric_median", tmp_path / "gm"), ("mean", tmp_path / "mean")):
        assert main(["train", *COMMON, "--lr", "0", "--b-dec-init", init, "--out", str(out)]) == 0
    cfg = json.loads((tmp_path / "gm" / "config.json").read_text())
    norm = Normalization(cfg["norm_scale"], cfg["norm_mean"])
    src = CacheBatches(
        PairedCache(cfg["source"]["cache_path"]), 256, seed=0, norm=norm, val_tokens=256, prefetch=0
    )
    b0 = geometric_median(src.next_batch())  # [n_models, d_model], normalised
    mu, s = torch.tensor(cfg["norm_mean"]), torch.tensor(cfg["norm_scale"])[:, None]
    got = CrossCoder.from_pretrained(tmp_path / "gm").b_dec.detach()
    assert torch.allclose(got, b0 / s + mu, atol=1e-4)
    assert not torch.allclose(got, mu, atol=1e-2)  # the median is not the mean on this data
    assert torch.allclose(CrossCoder.from_pretrained(tmp_path / "mean").b_dec.detach(), mu, atol=1e-5)


def test_version_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "crosscoder" in capsys.readouterr().out
    assert main([]) == 2
