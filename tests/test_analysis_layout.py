"""``crosscoder analyze`` of a crosscoder with a latent layout (dedicated partitions, designated shared
latents), and ``--compare-to`` against a free crosscoder trained on the same data.

Two small vanilla crosscoders (256 latents; one with 32 + 32 dedicated and 32 designated shared latents,
one free) are trained once per module on 600k tokens of the built-in synthetic pair (5-10 s each on one
thread; shorter runs leave the free crosscoder's exclusive latents half-learned).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.analysis.compare import compare_runs, match_latents
from crosscoder.analysis.table import class_counts, latent_columns, thresholds_for
from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.train import run_training

torch.set_num_threads(1)

LAYOUT = dict(
    dedicated_base=32, dedicated_ft=32, shared_latents=32, shared_sparsity_coeff=0.1
)  # as in docs/layout.md
# The columns of the latent table before the layout existed: still there, same names, same order.
OLD_COLUMNS = [
    "latent",
    "dec_norm_base",
    "dec_norm_ft",
    "relative_norm",
    "delta_norm",
    "cos_sim",
    "freq",
    "mean_act",
    "mean_act_all",
    "max_act",
    "n_active",
    "dead",
    "beta_ratio_error",
    "beta_ratio_reconstruction",
    "beta_error_base",
    "beta_error_ft",
    "beta_reconstruction_base",
    "beta_reconstruction_ft",
    "beta_ratio_error_mirror",
    "beta_ratio_reconstruction_mirror",
    "class",
    "norm_class",
    "flag",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSCODER_CACHE_DIR", str(root / "cache"))
        for name, layout in (("lay", LAYOUT), ("free", {})):
            cfg = RunConfig(
                model=CrossCoderConfig(arch="vanilla", d_latent=256, **layout),
                train=TrainConfig(
                    num_tokens=600_000,
                    batch_size=1024,
                    val_tokens=2048,
                    val_every=0,
                    log_every=50,
                    save_every=0,
                    wandb="off",
                    progress=False,
                    lr=2e-3,
                ),
            )
            run_training(cfg, root / name)
        rc = main(
            [
                "analyze",
                str(root / "lay"),
                "--out",
                str(root / "report"),
                "--max-tokens",
                "30000",
                "--compare-to",
                str(root / "free"),
            ]
        )
        assert rc == 0
        rc = main(
            ["analyze", str(root / "free"), "--out", str(root / "report-free"), "--max-tokens", "30000"]
        )
        assert rc == 0
    return root


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_table_kind_column_and_classes_by_construction(runs):
    rows = read_csv(runs / "report" / "latents.csv")
    names = list(rows[0])
    assert [c for c in names if c in OLD_COLUMNS] == OLD_COLUMNS  # nothing renamed, removed or reordered
    for c in (
        "kind",
        "layout_check",
        "layout_nu_error",
        "layout_nu_reconstruction",
        "match_latent",
        "match_cos",
        "match_class",
        "match_kind",
    ):
        assert c in names, c
    kinds = [r["kind"] for r in rows]
    assert kinds == ["base_only"] * 32 + ["ft_only"] * 32 + ["designated_shared"] * 32 + ["free"] * 160
    by_kind = {"base_only": "base_only", "ft_only": "ft_only", "designated_shared": "shared"}
    for r in rows:
        if r["kind"] in by_kind:
            assert r["class"] == by_kind[r["kind"]] and r["flag"] == ""
            assert r["norm_class"] == by_kind[r["kind"]]  # r = 0, 1, 0.5 exactly
        if r["kind"] == "base_only":  # the partition check: nu along the base decoder (the mirror fit)
            assert float(r["relative_norm"]) == 0.0
            assert r["layout_nu_error"] == r["beta_ratio_error_mirror"]
            assert r["layout_check"] in (
                "ok",
                "complete_shrinkage",
                "latent_decoupling",
                "scaling_undefined",
                "too_rare",
                "dead",
            )
        elif r["kind"] == "ft_only":
            assert float(r["relative_norm"]) == 1.0
            assert r["layout_nu_reconstruction"] == r["beta_ratio_reconstruction"]
        elif r["kind"] == "designated_shared":
            assert float(r["relative_norm"]) == 0.5 and float(r["cos_sim"]) == pytest.approx(1.0, abs=1e-12)
        else:
            assert r["layout_check"] == "" and r["layout_nu_error"] in ("", "nan")
    free_rows = read_csv(runs / "report-free" / "latents.csv")
    assert {r["kind"] for r in free_rows} == {"free"}
    assert list(free_rows[0]) == [c for c in names if not c.startswith("match_")]  # one schema, layout or not


def test_summary_layout_and_counts_on_free_latents(runs):
    s = json.loads((runs / "report" / "summary.json").read_text())
    lay = s["layout"]
    assert lay["constrained"] and lay["dedicated_base"] == 32 and lay["shared_sparsity_coeff"] == 0.1
    assert lay["violations"] == {"forbidden_enc": 0.0, "forbidden_dec": 0.0, "tied_dec": 0.0}
    p = lay["partitions"]
    assert [p[k]["n"] for k in ("base_only", "ft_only", "designated_shared", "free")] == [32, 32, 32, 160]
    for k in ("base_only", "ft_only"):
        checks = ("ok", "complete_shrinkage", "latent_decoupling", "scaling_undefined", "too_rare", "dead")
        assert sum(p[k][c] for c in checks) == 32
        assert p[k]["ok"] >= 16, p[k]  # most dedicated latents pass the partition check already
    assert p["designated_shared"]["max_abs_relative_norm_minus_half"] == 0.0
    assert 0.5 < p["designated_shared"]["nu_error_median"] < 2.0  # both models use the tied vectors
    # class counts: free latents only, and the summary says so
    assert sum(c["final"] for c in s["classes"].values()) == 160
    assert sum(c["norm"] for c in s["classes"].values()) == 160
    assert s["classes_scope"].startswith("free latents only (160 of 256)")
    free = json.loads((runs / "report-free" / "summary.json").read_text())
    assert not free["layout"]["constrained"] and free["layout"]["partitions"]["free"]["n"] == 256
    assert sum(c["final"] for c in free["classes"].values()) == 256 and "comparison" not in free


def test_comparison_with_a_free_crosscoder(runs):
    s = json.loads((runs / "report" / "summary.json").read_text())
    cmp = s["comparison"]
    assert cmp["same_data"] is True and cmp["threshold"] == 0.9 and cmp["other_arch"] == "vanilla"
    classes = ("base_only", "shared", "ft_only", "other")
    for part, n in (("base_only", 32), ("ft_only", 32), ("designated_shared", 32), ("free", 160)):
        row = cmp["table"][part]
        assert row["n"] == n and row["matched"] + row["unmatched"] == n
        assert sum(row[c] for c in classes) == row["matched"]
    # the dedicated partitions find their directions among the free crosscoder's exclusive latents
    t = cmp["table"]
    assert t["base_only"]["matched"] > 0 and t["base_only"]["base_only"] >= 0.8 * t["base_only"]["matched"]
    assert t["ft_only"]["matched"] > 0 and t["ft_only"]["ft_only"] >= 0.8 * t["ft_only"]["matched"]
    assert sum(r["n"] for r in cmp["reverse"].values()) == 256
    # per latent: the match columns agree with the summary
    rows = read_csv(runs / "report" / "latents.csv")
    got = {}
    for r in rows:
        if float(r["match_cos"]) >= 0.9:
            got[(r["kind"], r["match_class"])] = got.get((r["kind"], r["match_class"]), 0) + 1
        else:
            assert r["match_class"] == "unmatched"
    for (kind, c), n in got.items():
        assert cmp["table"][kind][c] == n
    html = (runs / "report" / "report.html").read_text()
    assert "id='layout-table'" in html and "id='comparison-table'" in html and "id='f-kind'" in html
    free_html = (runs / "report-free" / "report.html").read_text()
    assert "id='layout-table'" not in free_html and "id='f-kind'" not in free_html


def test_report_page_in_chromium(runs):
    from conftest import require_chromium

    from crosscoder.analysis.browser import check_page

    require_chromium()
    page = check_page(runs / "report" / "report.html")
    assert page.ok, (page.status, page.page_errors, page.console_errors)
    assert "layout-table" in page.dom and "comparison-table" in page.dom


def _orth(d: int = 8) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    return q.T  # rows: orthonormal vectors


def test_matching_is_per_model_on_the_partition_models():
    """Hand-built pair: RUN has 2 base-only, 2 ft-only, 1 designated shared and 1 free latent; OTHER (free)
    carries some of their directions with various relative norms."""
    e = _orth()
    z = torch.zeros(8)
    run = CrossCoder(
        CrossCoderConfig(
            arch="vanilla", d_latent=6, d_model=8, dedicated_base=2, dedicated_ft=2, shared_latents=1
        )
    )
    other = CrossCoder(CrossCoderConfig(arch="vanilla", d_latent=5, d_model=8))
    with torch.no_grad():
        run.W_dec.copy_(
            torch.stack(
                [
                    torch.stack(p)
                    for p in ((e[0], z), (e[1], z), (z, e[2]), (z, e[3]), (e[4], e[4]), (e[6], e[7]))
                ]
            )
        )
        other.W_dec.copy_(
            torch.stack(
                [
                    torch.stack(p)
                    for p in (
                        (e[0], e[0]),  # shared by norm, carries RUN 0's base direction
                        (0.01 * e[7], e[2]),  # ft_only by norm: RUN 2
                        (e[1], 0.02 * e[5]),  # base_only by norm: RUN 1
                        (e[5], e[6]),  # nothing of RUN's
                        (2 * e[4], 0.5 * e[4]),
                    )
                ]
            )
        )  # RUN 4's shared vector, r = 0.2: "other"
    res = match_latents(run, other)
    assert res["match_latent"][[0, 1, 2, 4]].tolist() == [0, 2, 1, 4]
    np.testing.assert_allclose(res["match_cos"][[0, 1, 2, 4]], 1.0, atol=1e-6)
    assert res["match_cos"][3] < 0.1 and res["match_cos"][5] < 0.1
    # the concatenated cosine would miss RUN 0 -> OTHER 0: 1/sqrt(2) < 0.9
    cat = torch.nn.functional.cosine_similarity(
        run.W_dec[0].detach().reshape(-1), other.W_dec[0].detach().reshape(-1), dim=0
    )
    assert float(cat) == pytest.approx(2**-0.5, abs=1e-6)
    s, cols = compare_runs(
        run, other, np.array(run.layout.kinds(), dtype=object), thresholds_for("vanilla"), 0.9
    )
    assert cols["match_class"].tolist() == [
        "shared",
        "base_only",
        "ft_only",
        "unmatched",
        "other",
        "unmatched",
    ]
    assert s["table"]["base_only"] == {
        "n": 2,
        "matched": 2,
        "unmatched": 0,
        "base_only": 1,
        "shared": 1,
        "ft_only": 0,
        "other": 0,
        "distinct_matches": 2,
        "median_best_cos": pytest.approx(1.0),
    }
    assert (s["table"]["ft_only"]["matched"], s["table"]["ft_only"]["ft_only"]) == (1, 1)
    assert (s["table"]["designated_shared"]["matched"], s["table"]["designated_shared"]["other"]) == (1, 1)
    assert s["table"]["free"]["unmatched"] == 1
    assert s["reverse"]["base_only"] == {
        "n": 1,
        "matched": 1,
        "base_only": 1,
        "ft_only": 0,
        "designated_shared": 0,
        "free": 0,
    }


def test_decoder_only_table_and_counts():
    cc = CrossCoder(
        CrossCoderConfig(
            arch="batchtopk", d_latent=40, d_model=8, dedicated_base=4, dedicated_ft=6, shared_latents=10
        )
    )
    cols = latent_columns(cc, thresholds_for("batchtopk"))
    assert (
        cols["kind"].tolist()
        == ["base_only"] * 4 + ["ft_only"] * 6 + ["designated_shared"] * 10 + ["free"] * 20
    )
    assert set(cols["layout_check"]) == {""}  # nothing scanned: nothing checked
    assert cols["class"][:20].tolist() == ["base_only"] * 4 + ["ft_only"] * 6 + ["shared"] * 10
    counts = class_counts(cols)
    assert sum(c["final"] for c in counts.values()) == 20


def test_compare_errors_are_one_line(runs, tmp_path, capsys):
    small = tmp_path / "small"
    CrossCoder(CrossCoderConfig(arch="vanilla", d_latent=16, d_model=32)).save_pretrained(small)
    rc = main(["analyze", str(runs / "lay"), "--out", str(tmp_path / "r"), "--compare-to", str(small)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "width 32" in err and "Traceback" not in err
    rc = main(
        ["analyze", str(runs / "lay"), "--out", str(tmp_path / "r"), "--compare-to", str(tmp_path / "nope")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    rc = main(
        [
            "analyze",
            str(runs / "lay"),
            "--out",
            str(tmp_path / "r"),
            "--compare-to",
            str(runs / "free"),
            "--compare-threshold",
            "1.5",
        ]
    )
    assert rc == 2 and "compare-threshold" in capsys.readouterr().err
