"""CrossCoder parameters, init, BatchTopK selection and threshold, folding, save/load."""

import pytest
import torch

from crosscoder import CrossCoder, CrossCoderConfig


def make(arch="vanilla", m=2, d=8, h=32, k=4, seed=0):
    return CrossCoder(
        CrossCoderConfig(arch=arch, n_models=m, d_model=d, d_latent=h, k=k),
        generator=torch.Generator().manual_seed(seed),
    )


def test_shapes_and_init():
    cc = make(m=3, d=5, h=7)
    assert cc.W_enc.shape == (3, 5, 7) and cc.W_dec.shape == (7, 3, 5)
    assert cc.b_enc.shape == (7,) and cc.b_dec.shape == (3, 5)
    assert torch.allclose(cc.W_dec.norm(dim=-1), torch.full((7, 3), cc.cfg.dec_init_norm))
    assert cc.cfg.dec_init_norm == 1.0  # the default (docs/training.md, "Defaults and why")
    assert torch.equal(cc.W_enc, cc.W_dec.permute(1, 2, 0))
    x = torch.randn(4, 3, 5)
    x_hat, f = cc(x)
    assert x_hat.shape == (4, 3, 5) and f.shape == (4, 7)
    # encode sums over models inside one affine map
    pre = torch.einsum("bmd,mdh->bh", x, cc.W_enc) + cc.b_enc
    assert torch.allclose(cc.encode_pre(x), pre, atol=1e-6)


def test_batchtopk_keeps_exactly_k_times_batch():
    cc = make("batchtopk", h=64, k=3)
    cc.train()
    torch.manual_seed(1)
    for b in (5, 16, 33):
        f = cc.encode(torch.randn(b, 2, 8))
        assert int((f > 0).sum()) == 3 * b
        # the kept ones are the largest decoder-weighted scores over the whole batch
        scores = torch.relu(cc.encode_pre(torch.randn(1, 2, 8))) * 0  # shape check only
        assert scores.shape == (1, 64)


def test_batchtopk_selects_largest_weighted_scores():
    cc = make("batchtopk", h=16, k=2)
    cc.train()
    x = torch.randn(6, 2, 8)
    f = cc.encode(x)
    scores = torch.relu(cc.encode_pre(x)) * cc.latent_weight()
    kth = scores.flatten().topk(12).values[-1]
    assert torch.equal(f > 0, scores >= kth)
    assert torch.allclose(f[f > 0], torch.relu(cc.encode_pre(x))[f > 0])  # raw values kept


def test_threshold_ema_and_inference_independent_of_batch():
    cc = make("batchtopk", h=32, k=4)
    cc.cfg.threshold_beta = 0.5
    cc.train()
    x1 = torch.randn(8, 2, 8)
    f = cc.encode(x1)
    s = (torch.relu(cc.encode_pre(x1)) * cc.latent_weight()).detach()[f > 0]
    t1 = float(cc.arch.threshold)
    assert t1 == pytest.approx(float(s.min()))  # first value initialises the EMA
    x2 = torch.randn(8, 2, 8)
    f2 = cc.encode(x2)
    s2 = (torch.relu(cc.encode_pre(x2)) * cc.latent_weight()).detach()[f2 > 0]
    assert float(cc.arch.threshold) == pytest.approx(0.5 * t1 + 0.5 * float(s2.min()), rel=1e-6)
    cc.eval()
    t = float(cc.arch.threshold)
    x = torch.randn(10, 2, 8)
    full = cc.encode(x)
    scores = torch.relu(cc.encode_pre(x)) * cc.latent_weight()
    assert torch.equal(full > 0, scores > t)
    for i in range(10):  # one token alone gives the same latents as inside the batch
        assert torch.allclose(cc.encode(x[i : i + 1]), full[i : i + 1], atol=1e-6)
    assert float(cc.arch.threshold) == t  # eval never moves the threshold


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_fold_equivalence(arch):
    cc = make(arch, h=24)
    with torch.no_grad():
        cc.b_dec.normal_()
        cc.b_enc.normal_(0, 0.1)
        if arch == "batchtopk":
            cc.arch.threshold.fill_(0.05)
    cc.eval()
    s = torch.tensor([0.5, 3.0])
    x_raw = torch.randn(20, 2, 8) * 4
    x_scaled = x_raw * s[None, :, None]
    x_hat_scaled, f_unfolded = cc(x_scaled)
    folded = CrossCoder(cc.cfg)
    folded.load_state_dict(cc.state_dict())
    folded.eval().fold(s)
    x_hat_raw, f_folded = folded(x_raw)
    assert torch.allclose(f_folded, f_unfolded, atol=1e-5)
    assert torch.allclose(x_hat_raw * s[None, :, None], x_hat_scaled, atol=1e-5)
    assert torch.allclose(folded.dec_norms(), cc.dec_norms(), atol=1e-6)
    folded.unfold()
    assert torch.allclose(folded.W_enc, cc.W_enc, atol=1e-6)


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_save_load_roundtrip(tmp_path, arch):
    cc = make(arch)
    if arch == "batchtopk":
        with torch.no_grad():
            cc.arch.threshold.fill_(0.01)
    cc.fold([2.0, 0.5])
    cc.save_pretrained(tmp_path / "m")
    back = CrossCoder.from_pretrained(tmp_path / "m")
    assert back.cfg.norm_scale == [2.0, 0.5]
    x = torch.randn(5, 2, 8)
    cc.eval()
    assert torch.equal(back(x)[0], cc(x)[0])
    if arch == "batchtopk":
        assert float(back.arch.threshold) == float(cc.arch.threshold)
