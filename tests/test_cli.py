"""CLI surface: flags from the dataclasses, synth -> train round trip, wandb offline, b_dec init."""

import json
import subprocess
import sys

import pytest
import torch

from crosscoder.cli import main
from crosscoder.data.synthetic import GroundTruth
from crosscoder.train.trainer import geometric_median

COMMON = ["--wandb", "off", "--no-progress", "--num-tokens", "2048", "--batch-size", "256", "--val-tokens", "256",
          "--dict-size", "32"]


def test_help_lists_flags_mirroring_the_config():
    r = subprocess.run([sys.executable, "-m", "crosscoder", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--dict-size", "--k", "--l1-coeff", "--lr", "--batch-size", "--num-tokens", "--seed", "--arch",
                 "--aux-k", "--out", "--config", "--resume", "--overwrite", "--base-data", "--ft-data", "--column",
                 "--cache", "--skip-nonfinite", "--val-tokens", "--save-every", "--keep-checkpoints", "--wandb"):
        assert flag in r.stdout, flag


def test_synth_writes_hf_pair_that_train_reads(tmp_path, capsys):
    out = tmp_path / "pair"
    assert main(["synth", str(out), "--rows", "3000", "--d-model", "16", "--n-shared", "8", "--n-base-only", "4",
                 "--n-ft-only", "4", "--n-shared-weak", "2"]) == 0
    gt = GroundTruth.load(out / "ground_truth")
    assert gt.dirs.shape == (18, 2, 16) and gt.classes.count("base_only") == 4
    assert torch.all(gt.dirs[gt.classes.index("base_only"), 1] == 0)
    from datasets import load_from_disk

    base, ft = load_from_disk(str(out / "base")), load_from_disk(str(out / "ft"))
    assert len(base) == len(ft) == 3000 and len(base[0]["activation"]) == 16
    assert main(["train", *COMMON, "--base-data", str(out / "base"), "--ft-data", str(out / "ft"),
                 "--out", str(tmp_path / "run")]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["d_model"] == 16 and cfg["data"]["base_data"] == str(out / "base")
    assert main(["synth", str(out)]) == 2  # refuses to overwrite


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    out = tmp_path / "run"
    assert main(["train", *[a for a in COMMON if a not in ("--wandb", "off")], "--wandb", "offline",
                 "--out", str(out)]) == 0
    assert list((out / "wandb").glob("offline-run-*")), list((out / "wandb").iterdir())


def test_geometric_median_and_option(tmp_path):
    pts = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[10.0, 0.0]]])  # [3, 1, 2]
    assert torch.allclose(geometric_median(pts, iters=200), torch.tensor([[1.0, 0.0]]), atol=1e-3)
    assert main(["train", *COMMON, "--b-dec-init", "geometric_median", "--out", str(tmp_path / "r")]) == 0


def test_version_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "crosscoder" in capsys.readouterr().out
    assert main([]) == 2
