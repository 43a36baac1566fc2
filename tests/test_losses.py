"""Loss and metric formulas against values computed by hand on tiny examples."""

import math

import pytest
import torch

from crosscoder import CrossCoder, CrossCoderConfig
from crosscoder.model import compute_loss, reconstruction_metrics
from crosscoder.model.losses import aux_loss_from, l2_loss


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


X = torch.tensor(
    [
        [[1.0, 1.0], [0.0, 1.0]],  # f = [1, 2]
        [[2.0, -3.0], [0.0, 0.0]],
    ]
)  # f = [2, 0]


def test_forward_by_hand():
    m = tiny()
    x_hat, f = m(X)
    assert torch.equal(f, torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
    assert torch.equal(x_hat, torch.tensor([[[1.0, 4.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, 0.0]]]))


def test_l2_l1_l0_by_hand():
    m = tiny()
    out = compute_loss(m, X, sparsity_coeff=0.5)
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
    out = compute_loss(m, X, sparsity_coeff=1.0)
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
    assert m["explained_variance_C"].item() == pytest.approx(
        1 - ((x[:, 2] * 0.5) ** 2).sum().item() / ((x[:, 2] - x[:, 2].mean(0)) ** 2).sum().item(), rel=1e-5
    )


# token 0 as in X; token 1 gives f = [2, 0]: residuals e = x - x_hat (flattened) of opposite signs in
# model 1 so the centred variance is well above the floor (AuxK's ordinary regime)
X_AUX = torch.tensor(
    [
        [[1.0, 1.0], [0.0, 1.0]],  # f = [1, 2], x_hat (1, 4 | 0, 2), e (0, -3 | 0, -1)
        [[2.0, -1.0], [0.0, 1.0]],
    ]
)  # f = [2, 0], x_hat (2, 0 | 0, 0), e (0, -1 | 0, 1)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "dead,aux_k,expected",
    [
        # only latent 0 dead: e_hat = relu(pre_0) W_dec[0]: token0 (1, 0 | 0, 0), token1 (2, 0 | 0, 0)
        # SSE = token0 |(-1, -3 | 0, -1)|^2 + token1 |(-2, -1 | 0, 1)|^2 = 11 + 6
        ([True, False], 1, 17 / 4),
        # both dead, aux_k 1: each token's larger pre among the dead: token0 latent 1 (pre 2) -> e_hat
        # 2 (0, 2 | 0, 1) = (0, 4 | 0, 2), |(0, -7 | 0, -3)|^2 = 58; token1 latent 0 (pre 2 > 0) -> 6
        ([True, True], 1, 64 / 4),
        # both dead, aux_k 2: token0 e_hat (1, 4 | 0, 2): |(-1, -7 | 0, -3)|^2 = 59; token1 (latent 1 has
        # pre 0) as before: 6
        ([True, True], 2, 65 / 4),
    ],
)
def test_aux_loss_by_hand(fast, dead, aux_k, expected):
    """AuxK through the trainer's path (compute_loss with aux_k and dead), fast and dense alike.

    e = x - x_hat: token0 (0, -3 | 0, -1), token1 (0, -1 | 0, 1); batch mean (0, -2 | 0, 0), so the
    centred variance is C = (1 + 1) + (1 + 1) = 4 > U / 10 = (10 + 2) / 10: the loss is SSE / 4.
    """
    m = tiny()
    out = compute_loss(m, X_AUX, aux_k=aux_k, aux_coeff=0.25, dead=torch.tensor(dead), fast=fast)
    assert out.metrics["aux_loss"].item() == pytest.approx(expected)
    # l2: token0 9 + 1 = 10, token1 1 + 1 = 2 -> 6
    assert out.metrics["l2_loss"].item() == pytest.approx(6.0)
    assert out.loss.item() == pytest.approx(6.0 + 0.25 * expected)


@pytest.mark.parametrize("fast", [True, False])
def test_aux_loss_zero_without_dead_latents(fast):
    m = tiny()
    out = compute_loss(m, X_AUX, aux_k=1, aux_coeff=0.25, dead=torch.zeros(2, dtype=torch.bool), fast=fast)
    assert out.metrics["aux_loss"].item() == 0.0
    assert out.loss.item() == pytest.approx(out.metrics["l2_loss"].item())


@pytest.mark.parametrize("fast", [True, False])
def test_aux_loss_one_row(fast):
    """One row: the centred variance is 0, so the denominator is the floor U / 10 (was ~1e-12)."""
    m = tiny()
    # token 0: e (0, -3 | 0, -1), U = 10 -> den 1; latent 0 dead: e_hat (1, 0 | 0, 0) -> SSE 1 + 9 + 1 = 11
    out = compute_loss(m, X_AUX[:1], aux_k=1, dead=torch.tensor([True, False]), fast=fast)
    assert out.metrics["aux_loss"].item() == pytest.approx(11.0)
    # the same through the distributed branch (one rank: dist_sum is the identity)
    e = torch.tensor([[0.0, -3.0, 0.0, -1.0]])
    e_hat = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert aux_loss_from(e_hat, e, None).item() == pytest.approx(11.0)
    assert aux_loss_from(e_hat, e, None, dist_sum=lambda t: t, world_size=1).item() == pytest.approx(11.0)


def test_aux_loss_distributed_equals_global():
    """Two ranks of one row each: the mean over ranks is the single-process loss of both rows (C = 4 >
    U / 10, see test_aux_loss_by_hand), and one rank of one row alone uses the floor."""
    e = torch.tensor([[0.0, -3.0, 0.0, -1.0], [0.0, -1.0, 0.0, 1.0]])
    e_hat = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    assert aux_loss_from(e_hat, e, None).item() == pytest.approx(17 / 4)
    sent = []
    for r in range(2):  # what each rank sends to the all-reduce
        aux_loss_from(e_hat[r : r + 1], e[r : r + 1], None, dist_sum=lambda t: sent.append(t) or t)
    total = sent[0] + sent[1]
    per_rank = [
        aux_loss_from(e_hat[r : r + 1], e[r : r + 1], None, dist_sum=lambda t: total, world_size=2)
        for r in range(2)
    ]
    assert (sum(per_rank) / 2).item() == pytest.approx(17 / 4)
    # identical rows on both ranks: global centred variance 0, floor U / 10 = 2 * 10 / 10 = 2
    same = [aux_loss_from(e_hat[:1], e[:1], None, dist_sum=lambda t: 2 * t, world_size=2) for _ in range(2)]
    assert (sum(same) / 2).item() == pytest.approx(2 * 11 / 2)


def test_batchtopk_has_no_l1_term():
    m = tiny("batchtopk")
    m.train()
    out = compute_loss(m, X, sparsity_coeff=10.0)
    assert out.loss.item() == pytest.approx(out.metrics["l2_loss"].item())
