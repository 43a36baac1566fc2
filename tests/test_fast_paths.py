"""The fast training paths against the plain dense maths (``compute_loss(..., fast=False)``).

Same inputs and weights through both: selected latents, loss, every metric, every parameter gradient,
the threshold update and AuxK must agree, for both architectures, both selection methods (the CPU
"threshold" kernels and the sync-free "topk" kernels used on CUDA) and every AuxK regime.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from crosscoder.config import CrossCoderConfig
from crosscoder.model import CrossCoder, compute_loss
from crosscoder.model.selection import Selection, select_batch_topk
from crosscoder.model.workspace import Workspace

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def make(arch: str, h: int = 512, d: int = 32, k: int = 8, seed: int = 0, **kw) -> CrossCoder:
    cfg = CrossCoderConfig(arch=arch, d_latent=h, k=k, n_models=2, d_model=d, **kw)
    m = CrossCoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.b_enc.copy_(0.1 * torch.randn(h, generator=g))
        m.b_dec.copy_(torch.randn(2, d, generator=g))
        m.W_dec.mul_(torch.rand(h, 2, 1, generator=g) + 0.5)  # unequal decoder norms
    return m.train()


def batch(b: int = 64, d: int = 32, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 2, d, generator=torch.Generator().manual_seed(seed))


def run_pair(model: CrossCoder, x: torch.Tensor, method: str, **kw):
    """(dense result, fast result, dense model, fast model) after one forward + backward each."""
    dense, fast = copy.deepcopy(model), copy.deepcopy(model)
    fast.arch.select_method = method
    r_d = compute_loss(dense, x, fast=False, **kw)
    r_f = compute_loss(fast, x, fast=True, **kw)
    r_d.loss.backward()
    r_f.loss.backward()
    return r_d, r_f, dense, fast


def assert_same(r_d, r_f, dense: CrossCoder, fast: CrossCoder, rtol: float = 1e-5) -> None:
    f_d, f_f = r_d.f, r_f.f
    assert torch.equal(f_d > 0, f_f > 0), "selected latents differ"
    torch.testing.assert_close(f_f, f_d, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r_f.loss, r_d.loss, rtol=rtol, atol=1e-6)
    assert r_d.metrics.keys() == r_f.metrics.keys()
    for key in r_d.metrics:
        torch.testing.assert_close(
            r_f.metrics[key].float(),
            r_d.metrics[key].float(),
            rtol=rtol,
            atol=1e-6,
            msg=lambda m, key=key: f"metric {key}: {m}",
        )
    for n in PARAMS:
        g_d, g_f = getattr(dense, n).grad, getattr(fast, n).grad
        scale = g_d.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(
            g_f / scale, g_d / scale, rtol=0, atol=1e-5, msg=lambda m, n=n: f"grad {n}: {m}"
        )
    for name, v in dense.arch.state_dict().items():  # the architecture's own state (BatchTopK's threshold)
        assert torch.equal(fast.arch.state_dict()[name], v), name
    assert torch.equal(r_d.latents.fired(), r_f.latents.fired())


METHODS = ("threshold", "topk")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
@pytest.mark.parametrize("l2", ["squared", "norm"])
def test_no_aux(arch: str, method: str, l2: str) -> None:
    m = make(arch)
    assert_same(*run_pair(m, batch(), method, sparsity_coeff=0.7, l2=l2))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
@pytest.mark.parametrize(
    "dead_frac,aux_k",
    [
        (0.0, 16),  # nothing dead: AuxK loss exactly 0
        (0.3, 4),  # few kept per row among many dead: sparse entries
        (0.3, 64),  # dense sub-matrix over the dead columns with a per-row top-k mask
        (0.02, 64),  # aux_k >= n_dead: every dead column kept
        (1.0, 16),  # everything dead
    ],
)
def test_aux(arch: str, method: str, dead_frac: float, aux_k: int) -> None:
    m = make(arch)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[torch.randperm(512, generator=torch.Generator().manual_seed(5))[: int(dead_frac * 512)]] = True
    r_d, r_f, dn, fs = run_pair(
        m, batch(), method, sparsity_coeff=0.5, aux_k=aux_k, aux_coeff=0.25, dead=dead
    )
    assert_same(r_d, r_f, dn, fs)
    if dead_frac == 0.0:
        assert float(r_f.metrics["aux_loss"]) == 0.0
    else:
        assert float(r_f.metrics["aux_loss"]) > 0.0


@pytest.mark.parametrize("method", METHODS)
def test_concat_weighting(method: str) -> None:
    m = make("vanilla", l1_weighting="concat")
    assert_same(*run_pair(m, batch(), method, sparsity_coeff=2.0))


@pytest.mark.parametrize("method", METHODS)
def test_folded_norm_scale(method: str) -> None:
    m = make("batchtopk")
    m.fold([0.5, 2.0])  # decoder norms measured in the normalised space: selection uses norm_scale
    assert_same(*run_pair(m.train(), batch(), method, aux_k=8, dead=torch.arange(512) % 3 == 0))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_fewer_positive_scores_than_kept(arch: str, method: str) -> None:
    """Most pre-activations negative: fewer than k * batch positive scores (zeros tie)."""
    m = make(arch, k=64)
    x = batch()
    with torch.no_grad():  # a bias that leaves ~3% of the pre-activations positive (k * batch is 12.5%)
        m.b_enc.fill_(-float(m.encode_pre(x).flatten().quantile(0.97)))
    pos = int((torch.relu(m.encode_pre(x)) > 0).sum())
    assert 0 < pos < 64 * x.shape[0]
    assert_same(*run_pair(m, x, method, aux_k=8, dead=torch.arange(512) % 2 == 0))


def zero_norm_latent(h: int, k: int, b: int = 16, z: int = 5) -> tuple[CrossCoder, torch.Tensor]:
    """A BatchTopK model whose latent ``z`` has decoder row exactly 0 (score 0) and pre-activation > 0 in
    every row, while only latents 0-3 have positive scores: fewer than ``k * b`` scores are positive."""
    m = make("batchtopk", h=h, d=8, k=k)
    with torch.no_grad():
        m.b_enc.fill_(-50.0)
        m.b_enc[:4] = 50.0
        m.b_enc[z] = 50.0
        m.W_dec[z] = 0.0
    x = batch(b, d=8)
    pre, w = m.encode_pre(x).detach(), m.latent_weight().detach()
    assert float(w[z]) == 0.0 and bool((pre[:, z] > 0).all())
    assert int((torch.relu(pre) * w > 0).sum()) == 4 * b < k * b
    return m, x


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval_no_threshold"])
@pytest.mark.parametrize("h,k", [(16, 16), (64, 8)])
def test_zero_norm_latent_never_active(h: int, k: int, mode: str, aux: bool) -> None:
    """Score exactly 0 (here: zero decoder row, positive pre-activation) is never active, in the dense rule
    and both selection methods alike: same latents, L0, fired mask, threshold and gradients.

    With ``k == h`` every entry is among the top ``k * b`` scores, so a rule keeping zero scores to fill
    ``k * b`` would make latent ``z`` active in every row (as the dense rule and the "topk" method did
    while the "threshold" method dropped it)."""
    z = 5
    m, x = zero_norm_latent(h, k, z=z)
    if mode == "eval_no_threshold":  # eval before any training step: the batch rule, threshold untouched
        m.eval()
    kw = {"aux_k": 4, "aux_coeff": 0.25, "dead": torch.arange(h) >= 4} if aux else {}
    results = {}
    for method in METHODS:
        r_d, r_f, dn, fs = run_pair(m, x, method, **kw)
        assert_same(r_d, r_f, dn, fs)
        results[method] = (r_f, fs)
        for r, mm in ((r_d, dn), (r_f, fs)):
            assert not bool((r.f[:, z] > 0).any()) and not bool(r.latents.fired()[z])
            assert float(r.metrics["l0_loss"]) == 4.0
            if not aux:  # nothing reaches the zero-norm latent (AuxK may pick it: it is dead)
                assert not bool(mm.W_dec.grad[z].any()) and float(mm.b_enc.grad[z]) == 0.0
                assert not bool(mm.W_enc.grad[..., z].any())
    (r_t, m_t), (r_k, m_k) = results["threshold"], results["topk"]
    assert torch.equal(r_t.f, r_k.f) and torch.equal(r_t.latents.fired(), r_k.latents.fired())
    for n in PARAMS:
        torch.testing.assert_close(getattr(m_t, n).grad, getattr(m_k, n).grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_all_zero(method: str) -> None:
    m = make("batchtopk")
    with torch.no_grad():
        m.b_enc.fill_(-1e3)
    r_d, r_f, dn, fs = run_pair(m, batch(), method, aux_k=8, dead=torch.ones(512, dtype=torch.bool))
    assert_same(r_d, r_f, dn, fs)
    assert float(r_f.metrics["l0_loss"]) == 0.0 and float(fs.arch.threshold) == -1.0


@pytest.mark.parametrize("method", METHODS)
def test_ties_duplicate_latents(method: str) -> None:
    """Duplicated latents give exactly tied scores; any valid top-k has the same values and loss."""
    m = make("batchtopk", h=256)
    with torch.no_grad():
        m.W_enc[..., 128:] = m.W_enc[..., :128]
        m.b_enc[128:] = m.b_enc[:128]
        m.W_dec[128:] = m.W_dec[:128]
    x = batch(32)
    r_d, r_f, dn, fs = run_pair(m, x, method)
    w = m.latent_weight().detach()
    s_d, s_f = (r_d.f * w).flatten(), (r_f.f * w).flatten()
    torch.testing.assert_close(s_f[s_f > 0].sort().values, s_d[s_d > 0].sort().values)
    torch.testing.assert_close(r_f.loss, r_d.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(fs.arch.threshold, dn.arch.threshold)


@pytest.mark.parametrize("method", METHODS)
def test_eval_mode(method: str) -> None:
    m = make("batchtopk").eval()
    x = batch()
    # threshold not set yet: the batch rule without touching the threshold
    assert_same(*run_pair(m, x, method))
    m.arch.threshold.fill_(0.01)
    r_d, r_f, dn, fs = run_pair(m, x, method)
    assert_same(r_d, r_f, dn, fs)
    assert 0 < float(r_f.metrics["l0_loss"]) < 512
    assert torch.equal(fs.arch.threshold, torch.tensor(0.01))


def test_threshold_ema_over_steps() -> None:
    dense, fast = make("batchtopk"), make("batchtopk")
    for i in range(5):
        x = batch(seed=10 + i)
        compute_loss(dense, x, fast=False)
        compute_loss(fast, x, fast=True)
        assert torch.equal(dense.arch.threshold, fast.arch.threshold)


def test_select_batch_topk_matches_topk() -> None:
    g = torch.Generator().manual_seed(0)
    ws = Workspace()
    for b, h, n_keep in ((64, 2048, 512), (200, 1000, 3000), (7, 33, 5), (64, 2048, 64 * 2048)):
        pre = torch.randn(b, h, generator=g) * torch.rand(b, 1, generator=g) * 3  # rows of different scale
        w = torch.rand(h, generator=g) + 0.1
        scores = pre.clamp_min(0) * w
        ref = scores.flatten().topk(min(n_keep, int((scores > 0).sum())))
        for method in METHODS:
            flat, vals = select_batch_topk(pre, w, n_keep, method, ws)
            keep = vals > 0
            assert torch.equal(flat[keep], ref.indices.sort().values), (b, h, n_keep, method)
            assert torch.equal(vals[keep], scores.flatten()[flat[keep]])
            assert bool((flat[1:] > flat[:-1]).all())


def test_select_threshold_retry() -> None:
    """Large values exactly on the sampled positions make the first threshold guess too high."""
    b, h, n_keep = 64, 2048, 4096
    total = b * h
    stride = max(1, total // 65536)
    while math.gcd(stride, h) != 1:
        stride += 1
    g = torch.Generator().manual_seed(0)  # seeded: the result must not depend on which tests ran before
    pre = torch.rand(b, h, generator=g) * 0.01
    pre.view(-1)[::stride] += 10 + torch.rand(pre.view(-1)[::stride].shape, generator=g)
    w = torch.ones(h)
    flat, _ = select_batch_topk(pre, w, n_keep, "threshold", Workspace())
    assert torch.equal(flat, pre.flatten().topk(n_keep).indices.sort().values)


def test_selection_structure() -> None:
    flat = torch.tensor([1, 4, 5, 9, 11])
    s = Selection.from_flat(flat, 3, 4)
    assert s.rows.tolist() == [0, 1, 1, 2, 2] and s.cols.tolist() == [1, 0, 1, 1, 3]
    assert s.row_ptr.tolist() == [0, 1, 3, 5]
    assert s.col_ptr.tolist() == [0, 1, 4, 4, 5]
    assert s.rows_by_col.tolist() == [1, 0, 1, 2, 2]
    table = torch.arange(12.0).view(3, 4)
    assert torch.equal(s.by_col(table, torch.ones(5)), s.csr(torch.ones(5)).to_dense().t() @ table)


def test_latents_f_is_not_a_reused_buffer() -> None:
    m = make("vanilla")
    r1 = compute_loss(m, batch(seed=1))
    f1 = r1.f
    torch.testing.assert_close(f1, compute_loss(m, batch(seed=1), fast=False).f)
    compute_loss(m, batch(seed=2))
    assert not torch.equal(f1, compute_loss(m, batch(seed=2), fast=False).f)  # f1 is a copy
    with pytest.raises(RuntimeError, match="overwritten"):
        r1.f  # noqa: B018 - the buffer behind r1 was reused


def test_stale_graph_backward_raises() -> None:
    """The vanilla fast path reuses its buffers: a graph from an earlier call cannot run backward."""
    m = make("vanilla")
    r1 = compute_loss(m, batch(seed=1), sparsity_coeff=1.0)
    compute_loss(m, batch(seed=2), sparsity_coeff=1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        r1.loss.backward()


def test_workspace_not_copied() -> None:
    m = make("batchtopk")
    compute_loss(m, batch())
    assert m.arch.ws._bufs
    assert not copy.deepcopy(m).arch.ws._bufs


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_bfloat16_autocast_close(arch: str) -> None:
    m = make(arch)
    x = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_f = compute_loss(copy.deepcopy(m), x, sparsity_coeff=0.5)
        r_d = compute_loss(copy.deepcopy(m), x, sparsity_coeff=0.5, fast=False)
    assert torch.isfinite(r_f.loss)
    torch.testing.assert_close(r_f.loss.float(), r_d.loss.float(), rtol=5e-2, atol=1e-2)


def test_training_defaults_use_fast_path(tmp_path, monkeypatch) -> None:
    """`crosscoder train` defaults run the fast path, and its trajectory matches the dense path."""
    from crosscoder.config import RunConfig
    from crosscoder.train import step, trainer

    calls = []
    real = step.compute_loss

    def spy(*a, **kw):
        calls.append(kw.get("fast", True))
        return real(*a, **kw)

    def run(out, fast: bool):
        cfg = RunConfig()
        cfg.model.arch, cfg.model.d_latent, cfg.model.k = "batchtopk", 256, 8
        cfg.train.num_tokens, cfg.train.batch_size, cfg.train.val_tokens = 8 * 256, 256, 0
        cfg.train.log_every, cfg.train.wandb, cfg.train.progress, cfg.train.dead_tokens = 4, "off", False, 512
        if not fast:  # TrainStep binds step.compute_loss when it is built
            monkeypatch.setattr(step, "compute_loss", lambda *a, **kw: real(*a, **{**kw, "fast": False}))
        else:
            monkeypatch.setattr(step, "compute_loss", spy)
        return trainer.run_training(cfg, out)

    m_fast = run(tmp_path / "fast", True)
    assert calls and all(calls)
    m_dense = run(tmp_path / "dense", False)
    for key in ("loss", "l2_loss", "l0_loss", "explained_variance", "aux_loss", "threshold"):
        assert math.isclose(m_fast[key], m_dense[key], rel_tol=1e-3, abs_tol=1e-5), key
    a = CrossCoder.from_pretrained(tmp_path / "fast")
    b = CrossCoder.from_pretrained(tmp_path / "dense")
    for n in PARAMS:
        torch.testing.assert_close(getattr(a, n), getattr(b, n), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_input_gradient(arch: str, method: str) -> None:
    """Gradients w.r.t. the activations (not used in training) agree too, AuxK included."""
    m, x = make(arch), batch()
    grads = []
    for fast in (False, True):
        mm = copy.deepcopy(m)
        mm.arch.select_method = method
        xx = x.clone().requires_grad_()
        compute_loss(
            mm, xx, sparsity_coeff=0.5, aux_k=8, dead=torch.arange(512) % 3 == 0, fast=fast
        ).loss.backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_sync_free_step(arch: str, monkeypatch) -> None:
    """The kernels used on CUDA ("topk") read nothing back to the host during a training step: no
    .item()/bool()/float()/tolist(), no nonzero, no boolean-mask indexing (all synchronise on CUDA)."""
    from crosscoder.bench import build_step, dead_set, synthetic_batches

    st = build_step(arch, 16, 256, 64, 4, 10, torch.device("cpu"), aux_k=8)
    st.model.arch.select_method = "topk"
    st.since_fired[dead_set(256, 0.3)] = st.dead_tokens
    xs = synthetic_batches(2, 64, 2, 16, torch.device("cpu"))

    def boom(*a, **kw):
        raise AssertionError("host synchronisation in the step")

    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, idx):
        for i in idx if isinstance(idx, tuple) else (idx,):
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                boom()
        return getitem(self, idx)

    for name in ("item", "__bool__", "tolist", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)
    monkeypatch.setattr(torch, "nonzero", boom)
    for i in range(3):
        st(xs[i % 2], i)
    monkeypatch.undo()
    assert st.read_metrics()["aux_loss"] > 0
