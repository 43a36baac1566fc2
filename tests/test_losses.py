"""Loss and metric formulas against values computed by hand on tiny examples."""

import math

import pytest
import torch

from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.model import compute_loss, reconstruction_metrics
from crosscoder.model.losses import aux_loss, l2_loss


def tiny(arch="vanilla", **kw):
    """2 models, d_model 2, 2 latents with hand-set weights."""
    m = CrossCoder(CrossCoderConfig(arch=arch, d_model=2, d_latent=2, k=1, **kw))
    with torch.no_grad():
        # latent 0 reads/writes model 0 dim 0 (decoder norms 1 and 0); latent 1 both models dim 1 (norms 2, 1)
        m.W_enc.zero_()
        m.W_enc[0, 0, 0] = 1.0
        m.W_enc[0, 1, 1] = 1.0
        m.W_enc[1, 1, 1] = 1.0
        m.W_dec.zero_()
        m.W_dec[0, 0, 0] = 1.0
        m.W_dec[1, 0, 1] = 2.0
        m.W_dec[1, 1, 1] = 1.0
        m.b_enc.zero_()
        m.b_dec.zero_()
    return m


X = torch.tensor([[[1.0, 1.0], [0.0, 1.0]],   # f = [1, 2]
                  [[2.0, -3.0], [0.0, 0.0]]])  # f = [2, 0]


def test_forward_by_hand():
    m = tiny()
    x_hat, f = m(X)
    assert torch.equal(f, torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
    assert torch.equal(x_hat, torch.tensor([[[1.0, 4.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, 0.0]]]))


def test_l2_l1_l0_by_hand():
    m = tiny()
    out = compute_loss(m, X, l1_coeff=0.5)
    # squared errors: token 0: (1-4)^2 + (1-2)^2 = 10 ; token 1: (-3)^2 = 9 -> mean 9.5
    assert out.metrics["l2_loss"].item() == pytest.approx(9.5)
    # L1 with sum of decoder norms: w = [1, 3]; token 0: 1*1 + 2*3 = 7; token 1: 2*1 = 2 -> 4.5
    assert out.metrics["l1_loss"].item() == pytest.approx(4.5)
    assert out.metrics["l0_loss"].item() == pytest.approx(1.5)
    assert out.loss.item() == pytest.approx(9.5 + 0.5 * 4.5)
    # per-model un-squared norm: token 0: ||(0,-3)|| + ||(0,-1)|| = 4; token 1: 3 + 0 -> 3.5
    x_hat, _ = m(X)
    assert l2_loss(X, x_hat, "norm").item() == pytest.approx(3.5)


def test_l1_concat_weighting():
    m = tiny(l1_weighting="concat")
    out = compute_loss(m, X, l1_coeff=1.0)
    w1 = math.sqrt(4 + 1)  # concatenated norm of latent 1's decoder
    assert out.metrics["l1_loss"].item() == pytest.approx((1 * 1 + 2 * w1 + 2 * 1) / 2)


def test_explained_variance_by_hand():
    x_hat = tiny()(X)[0]
    m = reconstruction_metrics(X, x_hat)
    # batch mean: model0 (1.5, -1), model1 (0, 0.5); SST model0 = 0.25*2 + 4*2 = 8.5, model1 = 0.25*2 = 0.5
    # SSE model0: token0 (0,9) + token1 (0,9) = 18 ; model1: token0 1 -> 1
    assert m["explained_variance_A"].item() == pytest.approx(1 - 18 / 8.5)
    assert m["explained_variance_B"].item() == pytest.approx(1 - 1 / 0.5)
    assert m["explained_variance"].item() == pytest.approx(1 - 19 / 9.0)
    # per-token: token0 SSE 10, SST 0.25+4+0+0.25 = 4.5 ; token1 SSE 9, SST 0.25+4+0+0.25 = 4.5
    assert m["explained_variance_legacy"].item() == pytest.approx(((1 - 10 / 4.5) + (1 - 9 / 4.5)) / 2)


def test_explained_variance_names_beyond_two_models():
    x = torch.randn(8, 3, 4)
    m = reconstruction_metrics(x, x * 0.5)
    assert {"explained_variance_A", "explained_variance_B", "explained_variance_C"} <= set(m)
    assert m["explained_variance_C"].item() == pytest.approx(1 - ((x[:, 2] * 0.5) ** 2).sum().item()
                                                              / ((x[:, 2] - x[:, 2].mean(0)) ** 2).sum().item(), rel=1e-5)


def test_aux_loss_by_hand_and_only_with_dead_latents():
    m = tiny()
    pre = torch.tensor([[1.0, 2.0], [2.0, 0.5]])
    residual = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    dead = torch.tensor([True, False])
    # only latent 0 is dead: e_hat = f_0 * W_dec[0] -> token0 (1,0 | 0,0), token1 (2,0 | 0,0)
    # num = 0 + 4 = 4 ; residual mean (0.5, 0, 0, 0) -> den = 0.25 + 0.25 = 0.5
    assert aux_loss(m, pre, residual, dead, aux_k=1).item() == pytest.approx(4 / 0.5)
    none_dead = torch.zeros(2, dtype=torch.bool)
    assert aux_loss(m, pre, residual, none_dead, aux_k=1).item() == 0.0
    out = compute_loss(m, X, aux_k=1, dead=none_dead)
    assert out.metrics["aux_loss"].item() == 0.0
    out = compute_loss(m, X, aux_k=1, aux_coeff=0.25, dead=dead)
    assert out.metrics["aux_loss"].item() > 0
    assert out.loss.item() == pytest.approx(out.metrics["l2_loss"].item() + 0.25 * out.metrics["aux_loss"].item())


def test_batchtopk_has_no_l1_term():
    m = tiny("batchtopk")
    m.train()
    out = compute_loss(m, X, l1_coeff=10.0)
    assert out.loss.item() == pytest.approx(out.metrics["l2_loss"].item())
