"""Bias-free Latent Scaling (issue 10): the intercept fit against a direct least-squares solve, and on a
hand-built pair with a large per-model mean offset, where the literal (published) fit is contaminated
by the decoder bias and the intercept fit is not."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.analysis import latent_columns, thresholds_for
from crosscoder.analysis.scaling import MODES, ScalingAccumulator, check_mode, latent_scaling
from crosscoder.cli import main
from crosscoder.data.paired import PairedCacheWriter
from crosscoder.errors import CrossCoderError

torch.set_num_threads(1)

GAINS = (0.5, 1.0, 2.0, 0.5, 1.0, 2.0)  # shared features: fine-tuned strength / base strength
N_BASE, N_FT = 4, 4
BASE_ONLY, FT_ONLY, SHARED = slice(0, N_BASE), slice(N_BASE, N_BASE + N_FT), slice(N_BASE + N_FT, None)
TOL_SHARED = 0.05


def offset_pair(
    n: int = 4000, d: int = 48, offset: float = 10.0, gap: float = 0.0, noise: float = 0.02, seed: int = 0
) -> tuple[CrossCoder, torch.Tensor]:
    """A crosscoder that is the exact dictionary of its data ``x [n, 2, d]``.

    Orthonormal features ``e_i``: 4 base-only (strengths 1, 0), 4 fine-tuned-only (0, 1), 6 shared
    (1, g) with ``g`` in :data:`GAINS`; activations ``a ~ Bernoulli(0.2) * U(0.5, 1.5)``; every row gets
    the per-model mean ``mu_m`` (norm ``offset``, 5x the largest feature norm) plus isotropic noise.
    ``W_dec[i, m] = s_i^m e_i``; the encoder is the pseudo-inverse of the concatenated decoder with
    ``b_enc = -W_enc . mu``, so ``f = relu(a + noise . W_enc)``. ``b_dec = mu - delta``: ``gap = |delta|``
    is the part of the data mean the decoder bias misses (it then stays in ``x - x_hat``).
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor([(1.0, 0.0)] * N_BASE + [(0.0, 1.0)] * N_FT + [(1.0, gg) for gg in GAINS])  # [K, 2]
    k = len(s)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    e = q[:, :k].T.float()  # [K, d] orthonormal
    mu = torch.randn(2, d, generator=g)
    mu = offset * mu / mu.norm(dim=-1, keepdim=True)
    delta = torch.randn(2, d, generator=g)
    delta = gap * delta / delta.norm(dim=-1, keepdim=True)
    dec = s[:, :, None] * e[:, None, :]  # [K, 2, d]
    a = (torch.rand(n, k, generator=g) < 0.2) * (0.5 + torch.rand(n, k, generator=g))
    x = torch.einsum("nk,kmd->nmd", a, dec) + mu + noise * torch.randn(n, 2, d, generator=g)
    cc = CrossCoder(CrossCoderConfig(arch="vanilla", d_latent=k, d_model=d))
    w_enc = torch.linalg.pinv(dec.reshape(k, 2 * d).double())  # [2d, K]
    with torch.no_grad():
        cc.W_dec.copy_(dec)
        cc.b_dec.copy_(mu - delta)
        cc.W_enc.copy_(w_enc.float().reshape(2, d, k))
        cc.b_enc.copy_(-(mu.reshape(-1).double() @ w_enc).float())
    return cc.eval(), x


def accumulate(cc: CrossCoder, x: torch.Tensor, chunk: int = 512, **kw) -> ScalingAccumulator:
    acc = ScalingAccumulator(cc, **kw)
    with torch.no_grad():
        for xb in x.split(chunk):
            f = cc.encode(xb)
            acc.update(xb, f, cc.decode(f))
    return acc


def exclusive_nus(acc: ScalingAccumulator, mode: str) -> np.ndarray:
    """``[2 targets, 8]`` nu of the exclusive latents, each along its own decoder (mirror for base-only)."""
    ft, base = acc.result("ft", mode), acc.result("base", mode)
    return np.stack(
        [
            np.concatenate([base.nu(t).numpy()[BASE_ONLY], ft.nu(t).numpy()[FT_ONLY]])
            for t in ("error", "reconstruction")
        ]
    )


@pytest.mark.parametrize("gap", [0.0, 3.0])
def test_intercept_fit_ignores_the_mean_offset(gap):
    cc, x = offset_pair(gap=gap)
    acc = accumulate(cc, x)
    nus = exclusive_nus(acc, "intercept")
    assert np.all(np.abs(nus) < 0.1), nus  # measured: |nu| <= 0.001
    ft, base = acc.result("ft"), acc.result("base")
    assert ft.mode == "intercept"
    gains = np.array(GAINS)
    # Shared latents: nu = the planted strength ratio (other / own). The betas' sampling error is
    # ~ noise / sqrt(sum (f - mean f)^2) ~ 0.001 and the encoder noise that leaks through the ReLU shifts
    # them by < 0.01 (measured: within 0.006), so 0.05 is a wide margin that the literal fit misses by far.
    for t in ("error", "reconstruction"):
        np.testing.assert_allclose(ft.nu(t).numpy()[SHARED], 1 / gains, atol=TOL_SHARED)
        np.testing.assert_allclose(base.nu(t).numpy()[SHARED], gains, atol=TOL_SHARED)
    np.testing.assert_allclose(ft.beta_error.numpy()[1, N_BASE:], 1.0, atol=TOL_SHARED)  # own beta ~ 1


def test_literal_fit_is_contaminated_and_bias_free_fixes_the_reconstruction():
    cc, x = offset_pair()
    acc = accumulate(cc, x)
    lit = exclusive_nus(acc, "literal")
    # nu_reconstruction picks up <d_j, b_dec[other]> E f / E f^2: |nu| ~ 0.1-1.3 or an own beta <= 0 (NaN).
    bad = np.isnan(lit[1]) | (np.abs(lit[1]) > 0.2)
    assert bad.sum() >= 6, lit
    assert np.all(np.abs(lit[0]) < 0.1), lit  # b_dec == data mean: the error target is clean here
    bf = exclusive_nus(acc, "bias_free")
    assert np.all(np.abs(bf) < 0.1), bf
    # Classes with analyze's defaults: intercept keeps all 8 exclusive calls, literal demotes most
    # (measured: 7 of 8, as latent_decoupling or scaling_undefined).
    t = thresholds_for("vanilla")
    n_active = acc.result().n_active.numpy()
    stats = {"n_active": n_active, "dead": n_active == 0}
    for mode, (lo, hi) in (("intercept", (8, 8)), ("bias_free", (8, 8)), ("literal", (0, 2))):
        cols = latent_columns(cc, t, stats, acc.result("ft", mode), acc.result("base", mode))
        kept = int(np.isin(cols["class"][: N_BASE + N_FT], ("base_only", "ft_only")).sum())
        assert lo <= kept <= hi, (mode, kept, list(cols["flag"]))
        assert list(cols["class"][SHARED]) == ["shared"] * len(GAINS)


def test_data_mean_missed_by_the_decoder_bias_leaks_into_the_error_target():
    cc, x = offset_pair(gap=3.0)  # x - x_hat keeps a mean of norm 3
    acc = accumulate(cc, x)
    for mode in ("bias_free", "literal"):
        nu_e = exclusive_nus(acc, mode)[0]
        assert (np.isnan(nu_e) | (np.abs(nu_e) > 0.2)).sum() >= 4, (mode, nu_e)
    assert np.all(np.abs(exclusive_nus(acc, "intercept")) < 0.1)


def _materialised_betas(cc: CrossCoder, x: torch.Tensor, latents: list[int]) -> dict:
    """beta[(mode, target, direction)] [2, len(latents)]: literal and bias_free by their closed forms on
    materialised targets, intercept by ``torch.linalg.lstsq`` with a free constant vector (float64)."""
    m = cc.double()
    x = x.double()
    f = m.encode(x)
    x_hat = m.decode(f)
    n, _, d = x.shape
    ones = torch.eye(d, dtype=torch.float64).repeat(n, 1)  # [n d, d]: the intercept columns
    out: dict = {}
    for k, direction in enumerate(("base", "ft")):
        for mode in MODES:
            for target in ("error", "reconstruction"):
                out[mode, target, direction] = np.zeros((2, len(latents)))
        for i, j in enumerate(latents):
            fj, dvec = f[:, j], m.W_dec[j, k]
            pred = fj[:, None] * dvec[None, :]  # [n, d]
            for mm in range(2):
                ys = {
                    "error": x[:, mm] - (x_hat[:, mm] - fj[:, None] * m.W_dec[j, mm][None, :]),
                    "reconstruction": x_hat[:, mm],
                }
                for target, y in ys.items():
                    lit = float((pred * y).sum() / (pred * pred).sum())
                    out["literal", target, direction][mm, i] = lit
                    y_bf = y - m.b_dec[mm] if target == "reconstruction" else y
                    out["bias_free", target, direction][mm, i] = float(
                        (pred * y_bf).sum() / (pred * pred).sum()
                    )
                    a = torch.cat([pred.reshape(-1, 1), ones], dim=1)  # [n d, 1 + d]
                    sol = torch.linalg.lstsq(a, y.reshape(-1, 1)).solution
                    out["intercept", target, direction][mm, i] = float(sol[0, 0])
    return out


@torch.no_grad()
def test_all_modes_match_materialised_least_squares():
    g = torch.Generator().manual_seed(3)
    cc = CrossCoder(CrossCoderConfig(arch="vanilla", d_latent=10, d_model=6), generator=g)
    cc.b_enc.fill_(0.05)
    cc.b_dec.normal_(0, 1.0, generator=g)
    cc.W_dec.mul_(10)
    x = torch.randn(400, 2, 6, generator=g) + 4.0 * torch.randn(1, 2, 6, generator=g)  # a data mean too
    acc = accumulate(cc, x, chunk=128, block_floats=40)  # uneven last chunk, several latent blocks
    f = cc.encode(x)
    latents = [int(j) for j in torch.nonzero((f > 0).sum(0) > 5).flatten()[:5]]
    assert len(latents) == 5
    want = _materialised_betas(copy.deepcopy(cc), x, latents)
    for (mode, target, direction), beta in want.items():
        got = getattr(acc.result(direction, mode), f"beta_{target}").numpy()[:, latents]
        np.testing.assert_allclose(got, beta, rtol=2e-4, atol=2e-4, err_msg=f"{mode} {target} {direction}")
    # A constant added to the data (compensated in b_enc so the latents stay the same, and in b_dec):
    # the intercept betas do not move, the literal ones do.
    shifted = copy.deepcopy(cc)
    shifted.b_enc.sub_(7.0 * shifted.W_enc.sum((0, 1)))
    shifted.b_dec.add_(7.0)
    acc2 = accumulate(shifted, x + 7.0, chunk=128)
    for direction in ("base", "ft"):
        for target in ("error", "reconstruction"):
            a, b = (getattr(r.result(direction), f"beta_{target}").numpy() for r in (acc, acc2))
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
        a, b = (r.result(direction, "literal").beta_reconstruction.numpy()[:, latents] for r in (acc, acc2))
        assert np.abs(b - a).max() > 0.1


def test_latent_scaling_api_unfolds_scale_and_mean():
    cc, x = offset_pair()
    acc = accumulate(cc, x)
    scale, mean = (
        torch.tensor([3.0, 0.25]),
        torch.randn(2, cc.cfg.d_model, generator=torch.Generator().manual_seed(1)),
    )
    folded = CrossCoder(cc.cfg)
    folded.load_state_dict(cc.state_dict())
    folded.fold(scale, mean)
    raw = x / scale.view(1, 2, 1) + mean
    for mode in MODES:
        res = latent_scaling(folded, raw.split(700), direction="base", mode=mode)
        ref = acc.result("base", mode)
        assert res.mode == mode
        np.testing.assert_allclose(res.beta_error.numpy(), ref.beta_error.numpy(), atol=2e-3)
        np.testing.assert_allclose(
            res.beta_reconstruction.numpy(), ref.beta_reconstruction.numpy(), atol=2e-3
        )


def test_mode_errors_are_one_line():
    assert check_mode("literal") == "literal"
    with pytest.raises(CrossCoderError, match="intercept, bias_free, literal"):
        check_mode("centred")
    cc, _ = offset_pair(n=10)
    with pytest.raises(CrossCoderError):
        ScalingAccumulator(cc, mode="nope")
    with pytest.raises(SystemExit) as e:
        main(["analyze", "run", "--out", "o", "--latent-scaling-target", "nope"])
    assert e.value.code == 2


def test_analyze_flag_records_the_mode_and_changes_the_classes(tmp_path, capsys):
    cc, x = offset_pair()
    cc.save_pretrained(tmp_path / "run")
    w = PairedCacheWriter(tmp_path / "cache", 2, x.shape[-1], "float32", shard_rows=1000)
    w.add(x, None)
    w.close()
    counts = {}
    for mode in (None, "literal"):
        rep = tmp_path / f"rep-{mode}"
        argv = [
            "analyze",
            str(tmp_path / "run"),
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(rep),
            "--no-spliced",
        ]
        assert main(argv + (["--latent-scaling-target", mode] if mode else [])) == 0, capsys.readouterr().err
        s = json.loads((rep / "summary.json").read_text())
        assert s["latent_scaling_target"] == (mode or "intercept")
        counts[mode] = {c: s["classes"][c]["final"] for c in ("base_only", "ft_only", "shared")}
    assert counts[None] == {"base_only": N_BASE, "ft_only": N_FT, "shared": len(GAINS)}
    assert counts["literal"]["base_only"] + counts["literal"]["ft_only"] <= 2
