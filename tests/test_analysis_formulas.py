"""Analysis formulas against hand-computed values: decoder metrics, classes, Latent Scaling (brute force
and planted betas), activation statistics, top activations, contexts, the report page's data."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch

from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.analysis import (
    ScalingAccumulator,
    Thresholds,
    classify,
    decoder_metrics,
    latent_columns,
    latent_scaling,
    latent_table,
    thresholds_for,
)
from crosscoder.analysis.contexts import TopActivations, build_contexts, latent_acts
from crosscoder.analysis.scan import ActivationStats, normalised_model, scan, select_rows
from crosscoder.analysis.table import class_counts, norm_classes
from crosscoder.data.paired import PairedCache, PairedCacheWriter

torch.set_num_threads(1)


def make_model(d_model: int = 4, d_latent: int = 3, arch: str = "vanilla", seed: int = 0) -> CrossCoder:
    return CrossCoder(
        CrossCoderConfig(arch=arch, d_latent=d_latent, d_model=d_model),
        generator=torch.Generator().manual_seed(seed),
    )


def test_decoder_metrics_hand_values_and_folding():
    cc = make_model(d_model=2, d_latent=3)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0] = torch.tensor([3.0, 4.0])  # |d_base| = 5
        cc.W_dec[0, 1] = torch.tensor([0.0, 1.0])  # |d_ft| = 1, cos = 4/5
        cc.W_dec[1, 0] = torch.tensor([1.0, 0.0])
        cc.W_dec[1, 1] = torch.tensor([0.0, 3.0])  # |d_ft| = 3, cos = 0
        cc.W_dec[2, 1] = torch.tensor([-2.0, 0.0])  # ft only
    m = decoder_metrics(cc)
    np.testing.assert_allclose(m["dec_norm_base"], [5, 1, 0])
    np.testing.assert_allclose(m["dec_norm_ft"], [1, 3, 2])
    np.testing.assert_allclose(m["relative_norm"], [1 / 6, 3 / 4, 1.0])
    # delta = ((n_f - n_b) / max + 1) / 2
    np.testing.assert_allclose(m["delta_norm"], [((1 - 5) / 5 + 1) / 2, ((3 - 1) / 3 + 1) / 2, 1.0])
    np.testing.assert_allclose(m["delta_norm"], [0.1, 5 / 6, 1.0])
    np.testing.assert_allclose(m["cos_sim"], [0.8, 0.0, 0.0], atol=1e-12)
    # A folded (saved) model: norms are measured in the normalised space, i.e. unchanged by folding.
    folded = make_model(d_model=2, d_latent=3)
    folded.load_state_dict(cc.state_dict())
    folded.fold([2.0, 0.5])
    assert not np.allclose(folded.W_dec.norm(dim=-1).detach().numpy()[:, 0], [5, 1, 0])
    m2 = decoder_metrics(folded)
    m3 = decoder_metrics(normalised_model(folded))
    for k in m:
        np.testing.assert_allclose(m2[k], m[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m3[k], m[k], rtol=1e-6, atol=1e-7)


def test_classes_by_norm_and_latent_scaling():
    t = Thresholds(
        exclusive_band=0.1, shared_band=0.2, nu_error_max=0.2, nu_reconstruction_max=0.5, min_active=5
    )
    r = np.array([0.05, 0.95, 0.5, 0.72, 0.25, 0.97, 0.98, 0.99, 0.02, 0.96, 0.7])
    np.testing.assert_array_equal(
        norm_classes(r, t),
        [
            "base_only",
            "ft_only",
            "shared",
            "other",
            "other",
            "ft_only",
            "ft_only",
            "ft_only",
            "base_only",
            "ft_only",
            "shared",
        ],
    )
    n_active = np.array([100, 100, 100, 100, 100, 100, 100, 3, 100, 0, 100])
    nu_e = np.array([0, -0.1, 0, 0, 0, -0.5, 0.1, 0, 0, 0, 0])
    nu_r = np.array([0, 0.2, 0, 0, 0, 0.0, 0.9, 0, 0, 0, 0])
    mirror_e = np.array([0.6, 0, 0, 0, 0, 0, 0, 0, 0.01, 0, 0])
    mirror_r = np.array([0.0, 0, 0, 0, 0, 0, 0, 0, np.nan, 0, 0])
    cls, by_norm, flag = classify(r, t, n_active, (nu_e, nu_r), (mirror_e, mirror_r))
    assert list(cls) == [
        "other",
        "ft_only",
        "shared",
        "other",
        "other",
        "other",
        "other",
        "other",
        "other",
        "other",
        "shared",
    ]
    assert list(flag) == [
        "complete_shrinkage",
        "",
        "",
        "",
        "",
        "complete_shrinkage",
        "latent_decoupling",
        "too_rare",
        "scaling_undefined",
        "dead",
        "",
    ]
    cols = {"class": cls, "norm_class": by_norm, "flag": flag}
    counts = class_counts(cols)
    assert counts["ft_only"] == {
        "norm": 5,
        "final": 1,
        "surviving": 1,
        "complete_shrinkage": 1,
        "latent_decoupling": 1,
        "scaling_undefined": 0,
        "too_rare": 1,
        "dead": 1,
    }
    assert counts["base_only"]["norm"] == 2 and counts["base_only"]["surviving"] == 0
    # Norm alone when Latent Scaling is off.
    t_off = Thresholds(exclusive_band=0.1, latent_scaling=False, min_active=0)
    assert list(classify(r, t_off, None, (nu_e, nu_r))[0]) == list(by_norm)
    # Per-architecture defaults and overrides.
    assert thresholds_for("vanilla").exclusive_band == 0.1
    assert thresholds_for("batchtopk").exclusive_band > 0.1
    assert thresholds_for("batchtopk", exclusive_band=0.05, nu_error_max=None).exclusive_band == 0.05


def _brute_force_betas(model: CrossCoder, x: torch.Tensor, direction: int) -> tuple[np.ndarray, np.ndarray]:
    """beta[target][m, j] by explicit least squares on materialised targets (float64)."""
    m = model.double()
    x = x.double()
    f = m.encode(x)
    x_hat = m.decode(f)
    h = f.shape[1]
    err, rec = np.full((2, h), np.nan), np.full((2, h), np.nan)
    for j in range(h):
        fj = f[:, j]
        if not (fj > 0).any():
            continue
        d = m.W_dec[j, direction]
        pred = fj[:, None] * d[None, :]  # [n, d]
        for mm in range(2):
            y_err = x[:, mm] - (x_hat[:, mm] - fj[:, None] * m.W_dec[j, mm][None, :])
            y_rec = x_hat[:, mm]
            # argmin_b ||b * pred - y||^2
            err[mm, j] = float((pred * y_err).sum() / (pred * pred).sum())
            rec[mm, j] = float((pred * y_rec).sum() / (pred * pred).sum())
    return err, rec


@torch.no_grad()
def test_latent_scaling_matches_brute_force_least_squares():
    cc = make_model(d_model=6, d_latent=10, seed=3)
    with torch.no_grad():
        cc.b_enc.fill_(0.05)
        cc.b_dec.normal_(0, 0.1)
        cc.W_dec.mul_(10)
    x = torch.randn(700, 2, 6, generator=torch.Generator().manual_seed(1))
    acc = ScalingAccumulator(cc, block_floats=40, mode="literal")  # several latent blocks; the published fit
    for lo in range(0, 700, 128):  # streaming, uneven last chunk
        xb = x[lo : lo + 128]
        f = cc.encode(xb)
        acc.update(xb, f, cc.decode(f))
    for direction, k in (("base", 0), ("ft", 1)):
        res = acc.result(direction)
        err, rec = _brute_force_betas(copy.deepcopy(cc), x, k)
        np.testing.assert_allclose(res.beta_error.numpy(), err, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(res.beta_reconstruction.numpy(), rec, rtol=2e-4, atol=2e-5)
        other = 1 - k
        expect = err[other] / err[k]
        ok = err[k] > 1e-6
        np.testing.assert_allclose(res.nu_error.numpy()[ok], expect[ok], rtol=1e-3, atol=1e-5)
    assert (acc.result().n_active.numpy() == (cc.encode(x) > 0).sum(0).numpy()).all()


def planted_pair(
    betas: np.ndarray, n: int = 4000, noise: float = 0.01, decoupled: bool = False, seed: int = 0
) -> tuple[CrossCoder, torch.Tensor]:
    """A crosscoder with ``len(betas)`` fine-tuned-only latents on orthonormal directions e_j, and data
    where the base activation carries ``beta_j`` times the fine-tuned one along e_j.

    Complete shrinkage (``decoupled=False``): nothing reconstructs the base side, so it stays in the base
    error: nu_error = beta, nu_reconstruction = 0. Latent decoupling (``decoupled=True``): a second,
    base-only latent per direction reconstructs it: nu_error = 0, nu_reconstruction = beta.
    """
    g = torch.Generator().manual_seed(seed)
    k = len(betas)
    d = 2 * k + 2
    h = 2 * k if decoupled else k
    cc = CrossCoder(CrossCoderConfig(arch="vanilla", d_latent=h, d_model=d))
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    e = q[:, :k].T  # [k, d] orthonormal
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_enc.zero_()
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        for j in range(k):
            cc.W_dec[j, 1] = 2.0 * e[j]  # ft decoder, norm 2 (betas are scale-free)
            cc.W_enc[1, :, j] = e[j] / 2.0
            if decoupled:
                cc.W_dec[k + j, 0] = e[j]
                cc.W_enc[0, :, k + j] = e[j]
    a = (torch.rand(n, k, generator=g) < 0.3) * (0.5 + torch.rand(n, k, generator=g))
    x = torch.zeros(n, 2, d)
    x[:, 1] = a @ e
    x[:, 0] = (a * torch.as_tensor(betas, dtype=torch.float32)) @ e
    x += noise * torch.randn(x.shape, generator=g)
    return cc, x


@pytest.mark.parametrize("decoupled", [False, True])
def test_latent_scaling_recovers_planted_betas(decoupled):
    betas = np.array([0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    cc, x = planted_pair(betas, decoupled=decoupled)
    k = len(betas)
    # Fold the model with arbitrary factors and feed raw activations: the API unfolds and rescales.
    scale = torch.tensor([3.0, 0.25])
    folded = CrossCoder(cc.cfg)
    folded.load_state_dict(cc.state_dict())
    folded.fold(scale)
    raw = x / scale.view(1, 2, 1)
    res = latent_scaling(folded, raw.split(512))
    nu_e, nu_r = res.nu_error.numpy()[:k], res.nu_reconstruction.numpy()[:k]
    if decoupled:
        np.testing.assert_allclose(nu_r, betas, atol=0.02)
        np.testing.assert_allclose(nu_e, 0, atol=0.02)
    else:
        np.testing.assert_allclose(nu_e, betas, atol=0.02)
        np.testing.assert_allclose(nu_r, 0, atol=0.02)
        np.testing.assert_allclose(res.beta_error.numpy()[1, :k], 1.0, atol=0.02)  # ft explains itself
    # Classification: only latents with small betas stay fine-tuned-only.
    t = Thresholds(exclusive_band=0.1, nu_error_max=0.2, nu_reconstruction_max=0.2, min_active=1)
    cls, by_norm, flag = classify(np.ones(k), t, res.n_active.numpy()[:k], (nu_e, nu_r))
    assert list(by_norm) == ["ft_only"] * k
    assert list(cls) == ["ft_only", "ft_only", "other", "other", "other", "other"]
    assert set(flag[2:]) == {"latent_decoupling" if decoupled else "complete_shrinkage"}


def write_cache(path, x: torch.Tensor, index: np.ndarray | None = None) -> PairedCache:
    w = PairedCacheWriter(path, 2, x.shape[-1], "float32", shard_rows=300)
    w.add(x, index)
    w.close()
    return PairedCache(path)


def test_stats_top_activations_and_table(tmp_path):
    cc = make_model(d_model=5, d_latent=7, seed=2)
    with torch.no_grad():
        cc.b_enc.copy_(torch.tensor([0.0, -0.5, 0.1, -100.0, 0.0, 0.2, -0.2]))  # latent 3 never fires
    cc.fold([2.0, 0.5])
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1000, 2, 5, generator=g)
    cache = write_cache(tmp_path / "c", raw)
    norm = normalised_model(cc)
    rows = select_rows(cache.n_rows, None)
    stats, top = ActivationStats(7), TopActivations(7, k=5)
    scan(norm, cache, rows, [stats, top], [2.0, 0.5], chunk=128)
    st = stats.result()
    f = cc.encode(raw).detach()  # folded model on raw rows == normalised model on normalised rows
    np.testing.assert_allclose(st["freq"], (f > 0).float().mean(0).numpy(), atol=1e-7)
    on = (f > 0).sum(0).clamp_min(1)
    np.testing.assert_allclose(st["mean_act"], (f.sum(0) / on).numpy(), rtol=1e-5)
    np.testing.assert_allclose(st["max_act"], f.max(0).values.numpy(), rtol=1e-5)
    assert st["dead"].tolist() == [False, False, False, True, False, False, False]
    vals, top_rows = top.result()
    ref_v, ref_i = f.topk(5, dim=0)
    np.testing.assert_allclose(vals[:, [0, 1, 2, 4, 5, 6]], ref_v[:, [0, 1, 2, 4, 5, 6]].numpy(), rtol=1e-5)
    assert (top_rows[:, 0] == ref_i[:, 0].numpy()).all()
    assert (top_rows[:, 3] == -1).all()
    # Through the notebook API (same numbers, a DataFrame with the required columns).
    df = latent_table(cc, cache, max_tokens=None, chunk=300)
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
        "mean_act",
        "dead",
    ):
        assert col in df.columns
    np.testing.assert_allclose(df["freq"].to_numpy(), st["freq"])
    assert df["class"].iloc[3] == "other" and bool(df["dead"].iloc[3])
    decoder_only = latent_table(cc, as_dict=True)
    assert np.isnan(decoder_only["freq"]).all() and len(decoder_only["latent"]) == 7


class FakeTokenizer:
    def decode(self, ids):
        return f"<{ids[0]}>"


def test_contexts_mark_the_activating_token_and_stop_at_sequence_ends(tmp_path):
    cc = make_model(d_model=3, d_latent=2, seed=0)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.b_enc.zero_()
        cc.W_enc[1, 0, 0] = 1.0  # latent 0 reads ft dim 0
        cc.W_enc[0, 1, 1] = 1.0  # latent 1 reads base dim 1
        cc.W_dec.copy_(torch.tensor([[[0.1, 0.0, 0.0], [0.6, 0.8, 0.0]], [[0.0, 2.0, 0.0], [0.0, 0.0, 0.1]]]))
    n = 40
    x = torch.zeros(n, 2, 3)
    x[17, 1, 0] = 5.0  # sequence 1, position 7 (rows 10..19 are sequence 1)
    x[20, 0, 1] = 3.0  # first row of sequence 2
    index = np.stack([np.arange(n) + 100, np.arange(n) // 10, np.arange(n) % 10], axis=1)
    cache = write_cache(tmp_path / "c", x, index)
    norm = normalised_model(cc)
    top = TopActivations(2, k=2)
    scan(norm, cache, np.arange(n), [top], [1.0, 1.0])
    vals, rows = top.result()
    ctx = build_contexts(norm, cache, [1.0, 1.0], [0, 1], vals, rows, FakeTokenizer(), left=4, right=3)
    c0 = ctx[0][0]
    assert c0["row"] == 17 and c0["act"] == pytest.approx(5.0) and c0["seq"] == 1 and c0["pos"] == 7
    assert c0["tokens"] == [f"<{i}>" for i in range(113, 120)]  # right side stops at the end of sequence 1
    assert c0["tokens"][c0["mark"]] == "<117>" and c0["acts"][c0["mark"]] == pytest.approx(5.0)
    # projections on the unit decoder of the dominant model (ft for latent 0): ft 5 * 0.6, base 0
    assert c0["proj_ft"] == pytest.approx(3.0, rel=1e-5) and c0["proj_base"] == pytest.approx(0.0, abs=1e-6)
    c1 = ctx[1][0]
    assert c1["row"] == 20 and c1["mark"] == 0 and c1["tokens"][0] == "<120>"  # left side stops at its start
    assert len(ctx[1]) == 1  # only one positive activation
    # latent_acts agrees with the full encoder
    xs = cache.read(np.arange(n))
    np.testing.assert_allclose(
        latent_acts(norm, xs, torch.zeros(n, dtype=torch.long)).detach().numpy(),
        norm.encode(xs)[:, 0].detach().numpy(),
        rtol=1e-6,
    )


def test_batchtopk_eval_threshold_used_for_contexts():
    cc = make_model(d_model=4, d_latent=6, arch="batchtopk", seed=1)
    with torch.no_grad():
        cc.arch.threshold.fill_(0.3)
    cc.eval()
    x = torch.randn(50, 2, 4)
    lat = torch.arange(50) % 6
    got = latent_acts(cc, x, lat).detach()
    ref = cc.encode(x).detach()[torch.arange(50), lat]
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6)


def test_report_page_data_is_valid_json_without_network(tmp_path):
    from crosscoder.analysis.report import render_report

    cc = make_model(d_model=4, d_latent=5)
    cols = latent_columns(cc, thresholds_for("vanilla"))
    cols["beta_ratio_error"][0] = math.inf
    path = render_report(
        tmp_path / "r.html",
        title="t </script> & <b>",
        info={"a": 1.5},
        counts=class_counts(cols),
        cols=cols,
        figures={},
        contexts={
            0: [
                {
                    "row": 1,
                    "act": 1.0,
                    "seq": 0,
                    "pos": 2,
                    "tokens": ["</script>", "b"],
                    "acts": [1.0, 0.0],
                    "mark": 0,
                    "proj_base": 0.1,
                    "proj_ft": float("nan"),
                }
            ]
        },
    )
    text = path.read_text()
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", text)
    payload = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", text, re.S).group(
        1
    )
    data = json.loads(payload.replace("<\\/", "</"))
    assert data["table"]["rows"][0][data["table"]["columns"].index("beta_ratio_error")] is None
    assert data["contexts"]["0"][0]["tokens"][0] == "</script>"
    assert "t &lt;/script&gt; &amp; &lt;b&gt;" in text
