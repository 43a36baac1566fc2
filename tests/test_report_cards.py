"""The report's latent cards: activation histograms (streamed, checked against histograms of the model's
activations on the same rows), the reason for each class (hand-set numbers, two and n models), and the
page itself (self-contained, search and class filter, cards with histogram, norms and nu; in headless
Chromium when present)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_analysis_formulas import make_model, write_cache
from test_analysis_multi import THREE, planted_cache

from crosscoder import CrossCoder
from crosscoder.analysis.cards import (
    ActivationHistogram,
    class_reasons,
    histogram_payload,
    multi_class_reasons,
)
from crosscoder.analysis.multi import multi_classify
from crosscoder.analysis.scan import ActivationStats, iter_chunks, normalised_model, scan, select_rows
from crosscoder.analysis.table import Thresholds, classify
from crosscoder.cli import main
from crosscoder.data.paired import PairedCache

torch.set_num_threads(1)

MAX_TOKENS = 6000


def reference_histograms(f: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """``f [n, d_latent]`` -> ``[d_latent, bins]``: numpy's histogram of each latent's nonzero activations
    over ``[0, hi]``."""
    return np.stack(
        [np.histogram(f[:, j][f[:, j] > 0], bins=bins, range=(0, hi[j] or 1))[0] for j in range(f.shape[1])]
    )


def test_streamed_histogram_equals_numpy_on_the_same_rows(tmp_path):
    cc = make_model(d_model=6, d_latent=9, seed=3)
    with torch.no_grad():
        cc.b_enc[4] = -100.0  # latent 4 never fires
    g = torch.Generator().manual_seed(1)
    # Growing scale: later chunks exceed earlier maxima, so ranges double (and bins merge) mid-stream.
    raw = torch.randn(1500, 2, 6, generator=g) * torch.linspace(0.05, 4.0, 1500)[:, None, None]
    cache = write_cache(tmp_path / "c", raw)
    norm = normalised_model(cc)
    rows = select_rows(cache.n_rows, 1200, seed=0)
    results = []
    for chunk in (37, 1200):
        hist, stats = ActivationHistogram(9, n_bins=16), ActivationStats(9)
        scan(norm, cache, rows, [hist, stats], [1.0, 1.0], chunk=chunk)
        results.append((hist.result(), stats.result()))
    (res, st), (res_one, _) = results
    np.testing.assert_array_equal(res["counts"], res_one["counts"])  # independent of the chunking
    f = cc.encode(cache.read(rows)).detach().numpy()
    mx = f.max(0)
    fired = mx > 0
    assert not fired[4] and res["hi"][4] == 0 and res["counts"][4].sum() == 0
    # hi is the smallest power of two >= the largest activation
    assert np.all(res["hi"][fired] >= mx[fired]) and np.all(res["hi"][fired] / 2 < mx[fired])
    np.testing.assert_array_equal(np.log2(res["hi"][fired]), np.round(np.log2(res["hi"][fired])))
    np.testing.assert_array_equal(res["counts"], reference_histograms(f, res["hi"], 16))
    np.testing.assert_array_equal(res["counts"].sum(1), st["n_active"])
    payload = histogram_payload(res, [0, 4, 5])
    assert payload["bins"] == 16 and "4" not in payload["latents"]
    c0 = payload["latents"]["0"]["c"]
    assert c0[-1] > 0 and c0 == res["counts"][0, : len(c0)].tolist() and sum(c0) == st["n_active"][0]
    with pytest.raises(ValueError, match="power of two"):
        ActivationHistogram(3, n_bins=12)


def test_two_model_reasons_state_the_class_and_the_numbers():
    t = Thresholds(
        exclusive_band=0.1, shared_band=0.2, nu_error_max=0.2, nu_reconstruction_max=0.2, min_active=20
    )
    r = np.array([0.97, 0.03, 0.54, 0.25, 0.96, 0.95, 0.98, 0.5, 0.900004])
    n_active = np.array([500, 300, 100, 100, 5, 400, 400, 0, 50])
    nu_ft = (
        np.array([0.01, 9, 9, 9, 0.0, 0.45, 0.1, 9, 0.0]),
        np.array([0.03, 9, 9, 9, 0.0, 0.0, 0.6, 9, 0.0]),
    )
    nu_base = (np.array([9, -0.02, 9, 9, 9, 9, 9, 9, 9]), np.array([9, 0.05, 9, 9, 9, 9, 9, 9, 9]))
    cls, by_norm, flag = classify(r, t, n_active, nu_ft, nu_base)
    cols = {
        "latent": np.arange(9),
        "relative_norm": r,
        "cos_sim": np.array([0.1, 0.2, 0.93, 0.5, 0.1, 0.1, 0.1, 0.8, 0.0]),
        "n_active": n_active,
        "class": cls,
        "norm_class": by_norm,
        "flag": flag,
        "beta_ratio_error": nu_ft[0],
        "beta_ratio_reconstruction": nu_ft[1],
        "beta_ratio_error_mirror": nu_base[0],
        "beta_ratio_reconstruction_mirror": nu_base[1],
    }
    why = class_reasons(cols, t)
    assert list(cls) == [
        "ft_only",
        "base_only",
        "shared",
        "other",
        "other",
        "other",
        "other",
        "other",
        "ft_only",
    ]
    assert all(w.startswith(f"{c}: ") for w, c in zip(why, cls, strict=True))
    assert why[0] == (
        "ft_only: relative norm r 0.97 > 0.9, fired on 500 scanned tokens (>= 20), and Latent Scaling "
        "along the fine-tuned decoder confirms it: |nu_e| 0.01 <= 0.2, |nu_r| 0.03 <= 0.2, the base model "
        "neither carries nor reconstructs it"
    )
    assert why[1].startswith("base_only: relative norm r 0.03 < 0.1, fired on 300")
    assert (
        "along the base decoder (mirror fit)" in why[1] and "|nu_e| 0.02 <= 0.2, |nu_r| 0.05 <= 0.2" in why[1]
    )
    assert why[2] == "shared: |r - 0.5| 0.04 <= 0.2 (r 0.54); decoder cosine 0.93"
    assert "neither exclusive (0.1 <= r <= 0.9) nor shared (|r - 0.5| 0.25 > 0.2)" in why[3]
    assert flag[4] == "too_rare" and "fired on only 5 scanned tokens (< 20)" in why[4]
    assert (
        flag[5] == "complete_shrinkage" and "|nu_e| 0.45 > 0.2" in why[5] and "complete shrinkage" in why[5]
    )
    assert flag[6] == "latent_decoupling" and "|nu_r| 0.6 > 0.2" in why[6] and "|nu_e| 0.1 <= 0.2" in why[6]
    assert flag[7] == "dead" and why[7].startswith("other: never fired")
    assert "r 0.900004 > 0.9" in why[8]  # enough digits for the comparison to read true


def test_n_model_reasons_name_the_models_and_the_numbers():
    t = Thresholds(exclusive_band=0.1, nu_error_max=0.2, nu_reconstruction_max=0.2, min_active=20)
    norms = np.array(
        [[1.0, 0.9, 0.8], [0.02, 1.2, 0.05], [1.0, 0.05, 0.7], [0.01, 1.0, 0.02], [1.0, 0.0, 0.0]]
    )
    ratio = 0.1 / 0.9
    present = norms >= ratio * norms.max(1, keepdims=True)
    ref = norms.argmax(1)
    nu_e = np.array([[1, 0.01, 1, 0.5, 1], [0.9, 1, 0.15, 1, 0.0], [0.8, 0.03, 1, 0.1, 0.0]])
    nu_r = np.array([[1, 0.04, 1, 0.0, 1], [0.9, 1, 0.02, 1, 0.0], [0.8, 0.01, 1, 0.0, np.nan]])
    n_active = np.array([100, 100, 100, 100, 100])
    cls, by_norm, flag = multi_classify(present, t, n_active, ref, nu_e, nu_r)
    cols = {"latent": np.arange(5), "class": cls, "norm_class": by_norm, "flag": flag, "n_active": n_active}
    cols["ls_model"] = ref
    for i in range(3):
        cols[f"dec_norm_{i}"], cols[f"nu_error_{i}"], cols[f"nu_reconstruction_{i}"] = (
            norms[:, i],
            nu_e[i],
            nu_r[i],
        )
    why = multi_class_reasons(cols, present, t)
    assert list(cls) == ["shared", "exclusive", "partial", "other", "exclusive"]
    assert all(w.startswith(f"{c}: ") for w, c in zip(why, cls, strict=True))
    assert why[0] == "shared: present in all 3 models (smallest norm 0.8 >= 0.1111 x the largest)"
    assert why[1].startswith("exclusive: present only in model 1 (largest absent norm 0.0417 < 0.1111")
    assert "along model 1's decoder" in why[1] and "|nu_e| 0.03 <= 0.2 (model 2)" in why[1]
    assert "|nu_r| 0.04 <= 0.2 (model 0)" in why[1]
    assert why[2].startswith(
        "partial: present in models 0, 2, absent from model 1 (largest absent norm 0.05 < "
    )
    assert flag[3] == "complete_shrinkage" and "absent model 0 with |nu_e| 0.5 > 0.2" in why[3]
    assert "(model 2 of another width: not checked)" in why[4]  # NaN nu: not in the same space


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    out = {}
    for name, pats, n, names in (
        ("two", [(0, 1)] * 8 + [(0,)] * 4 + [(1,)] * 4, 2, ["base", "ft"]),
        ("three", THREE, 3, ["m0", "m1", "m2"]),
    ):
        cache, run, rep = root / f"cache-{name}", root / f"run-{name}", root / f"report-{name}"
        planted_cache(cache, pats, n, [16] * n, 20_000, names)
        args = ["--d-latent", "32", "--num-tokens", "80000", "--batch-size", "512", "--lr", "1e-2"]
        assert (
            main(
                ["train", "--cache", str(cache), "--out", str(run), "--no-progress", "--wandb", "off", *args]
            )
            == 0
        )
        argv = ["analyze", str(run), "--out", str(rep), "--max-tokens", str(MAX_TOKENS), "--top-k", "3"]
        assert main([*argv, "--no-spliced"]) == 0
        out[name] = (cache, run, rep)
    return out


def page_data(rep):
    text = (rep / "report.html").read_text()
    payload = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", text, re.S).group(
        1
    )
    return text, json.loads(payload.replace("<\\/", "</"))


@pytest.mark.parametrize("name", ["two", "three"])
def test_report_histograms_reasons_and_controls(reports, name):
    cache_dir, run, rep = reports[name]
    text, data = page_data(rep)
    # Histograms in the page == numpy's histograms of the model's activations on the rows analyze scanned.
    model = CrossCoder.from_pretrained(run)
    norm = normalised_model(model)
    cache = PairedCache(cache_dir)
    rows = select_rows(cache.n_rows, MAX_TOKENS, seed=0)
    with torch.no_grad():
        f = torch.cat([norm.encode(x) for _, x in iter_chunks(cache, rows, model.normalization())]).numpy()
    hist = data["hist"]
    assert hist["bins"] == 32 and hist["latents"]
    d_latent = f.shape[1]
    hi = np.zeros(d_latent)
    for k, v in hist["latents"].items():
        hi[int(k)] = v["hi"]
    ref = reference_histograms(f, hi, 32)
    for k, v in hist["latents"].items():
        assert v["c"] == ref[int(k), : len(v["c"])].tolist() and ref[int(k), len(v["c"]) :].sum() == 0, k
    fired = set(np.flatnonzero(f.max(0) > 0).tolist())
    assert {int(k) for k in hist["latents"]} == fired  # every latent that fired has a card (32 <= max_cards)
    # class_reason: in the table files and in the page, always starting with the class
    df = pq.read_table(rep / "latents.parquet").to_pandas()
    assert all(r.startswith(f"{c}: ") for r, c in zip(df["class_reason"], df["class"], strict=True))
    cols = data["table"]["columns"]
    hidden = set(data["table"]["hidden"])  # in each row for the cards, not shown in the table
    assert {"class_reason", "n_active", "max_act"} <= hidden
    i_reason, i_latent = cols.index("class_reason"), cols.index("latent")
    assert {r[i_latent]: r[i_reason] for r in data["table"]["rows"]} == dict(
        zip(df["latent"], df["class_reason"], strict=True)
    )
    if name == "three":
        assert {"nu_reconstruction_0", "nu_reconstruction_2"} <= hidden and "dec_norm_2" in cols
        assert data["models"] == ["m0", "m1", "m2"]
    else:
        assert {"dec_norm_0", "dec_norm_1"} <= hidden and "beta_ratio_error_mirror" in cols
        assert data["models"][1].startswith("fine-tuned")
    assert data["thresholds"]["nu_error_max"] == 0.2
    # Self-contained, with the search box and the class filter.
    assert not re.search(r"https?://|(src|href)\s*=\s*['\"]?//", text)
    assert "id='f-search'" in text and "id='f-class'" in text
    classes = ("base_only", "shared", "ft_only") if name == "two" else ("shared", "exclusive", "partial")
    assert all(f"<option>{c}</option>" in text for c in classes)


@pytest.mark.parametrize("name", ["two", "three"])
def test_cards_in_chromium(reports, name):
    from conftest import require_chromium

    from crosscoder.analysis.browser import check_page

    require_chromium()
    rep = reports[name][2]
    _, data = page_data(rep)
    page = check_page(rep / "report.html", anchor="table")  # the table view opens the first row's card
    assert page.ok, (page.status, page.page_errors, page.console_errors)
    card = page.dom.split('<div id="card">', 1)[1].split('<div style="max-height', 1)[0]
    latent = int(re.search(r'data-latent="(\d+)"', card).group(1))
    assert 'class="reason"' in card and 'class="bars"' in card and 'class="nu"' in card
    total = int(re.search(r'<svg class="hist" data-total="(\d+)"', card).group(1))
    assert total == sum(data["hist"]["latents"][str(latent)]["c"])
    assert card.count("<rect ") == len(data["hist"]["latents"][str(latent)]["c"])
    # #q=TEXT searches: only the matching latents are listed (live ones, the default filter)
    cols, rows = data["table"]["columns"], data["table"]["rows"]
    cls = "ft_only" if name == "two" else "exclusive"
    want = sum(
        1
        for r in rows
        if not r[cols.index("dead")]
        and any(
            cls in str(r[cols.index(c)]) for c in ("class", "norm_class", "flag", "pattern", "class_reason")
        )
    )
    searched = check_page(rep / "report.html", anchor=f"q={cls}")
    assert searched.ok and searched.table_rows == want > 0
    assert check_page(rep / "report.html", anchor="q=no such text anywhere").table_rows == 0
