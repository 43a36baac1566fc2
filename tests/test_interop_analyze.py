"""Converted crosscoders (Kissane, dictionary_learning) work with `crosscoder analyze`."""

import json

import pandas as pd
import torch

from crosscoder.cli import main


def test_converted_crosscoders_work_with_analyze(tmp_path, capsys):
    d, h = 16, 48
    assert (
        main(
            [
                "synth",
                str(tmp_path / "pair"),
                "--rows",
                "4000",
                "--d-model",
                str(d),
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
    g = torch.Generator().manual_seed(0)
    kissane = {
        "W_enc": torch.randn(2, d, h, generator=g) * 0.3,
        "W_dec": torch.randn(h, 2, d, generator=g) * 0.1,
        "b_enc": torch.randn(h, generator=g) * 0.1,
        "b_dec": torch.zeros(2, d),
    }
    (tmp_path / "k").mkdir()
    torch.save(kissane, tmp_path / "k" / "0.pt")
    (tmp_path / "k" / "0_cfg.json").write_text(
        json.dumps(
            {
                "d_in": d,
                "dict_size": h,
                "dec_init_norm": 0.08,
                "hook_point": "blocks.3.hook_resid_pre",
                "model_name": "base",
            }
        )
    )
    dl = {
        "encoder.weight": torch.randn(2, d, h, generator=g) * 0.3,
        "encoder.bias": torch.randn(h, generator=g) * 0.1,
        "decoder.weight": torch.randn(2, h, d, generator=g) * 0.1,
        "decoder.bias": torch.zeros(2, d),
        "code_normalization_id": torch.tensor(1),
        "k": torch.tensor(4),
        "threshold": torch.tensor(0.01),
    }
    torch.save(dl, tmp_path / "dl.pt")
    runs = {
        "kissane": ["--from", "kissane", str(tmp_path / "k" / "0.pt"), "--norm-scale", "2.0", "3.0"],
        "dictionary_learning": ["--from", "dictionary_learning", str(tmp_path / "dl.pt")],
    }
    for name, conv in runs.items():
        out = tmp_path / f"cc-{name}"
        assert main(["convert", *conv[:2], conv[2], str(out), *conv[3:]]) == 0, capsys.readouterr().err
        rep = tmp_path / f"report-{name}"
        rc = main(
            [
                "analyze",
                str(out),
                "--base-data",
                str(tmp_path / "pair" / "base"),
                "--ft-data",
                str(tmp_path / "pair" / "ft"),
                "--out",
                str(rep),
                "--no-spliced",
            ]
        )
        assert rc == 0, capsys.readouterr().err
        table = pd.read_parquet(rep / "latents.parquet")
        assert len(table) == h
        for col in (
            "latent",
            "dec_norm_base",
            "dec_norm_ft",
            "relative_norm",
            "delta_norm",
            "cos_sim",
            "class",
            "freq",
            "beta_ratio_error",
            "beta_ratio_reconstruction",
        ):
            assert col in table.columns, col
        assert (rep / "report.html").exists()
        if name == "kissane":  # norms in the normalised space: the folded factors are unfolded again
            norms = kissane["W_dec"].norm(dim=-1)
            assert torch.allclose(
                torch.tensor(table["dec_norm_base"].values, dtype=torch.float32), norms[:, 0], atol=1e-5
            )
