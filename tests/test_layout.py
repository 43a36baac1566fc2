"""The latent layout (``--dedicated-base/--dedicated-ft``, ``--shared-latents/--shared-sparsity-coeff``):
exact constraints through training and folding, the shared sparsity factor in the loss and the selection,
resume, and the command line.

Exactness claims checked here (see docs/layout.md):

* forbidden encoder/decoder blocks are bitwise ``+0.0`` in the saved (folded) model;
* the copies of a designated shared decoder vector are bitwise equal in the normalised space when the
  folded weights are multiplied back by ``norm_scale`` in float32 (``LatentLayout.fold_decoder_``); in
  float64 the products differ by less than 1.2e-7 relative: each is within half a float32 ulp of the
  same float32 value ``c`` (so the difference is at most one ulp of ``c``, ``2^-23`` relative).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from crosscoder import CrossCoder
from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.model import architecture_names, compute_loss
from crosscoder.model.architectures.batchtopk import BatchTopK
from crosscoder.model.layout import LatentLayout, exact_fold
from crosscoder.train import Interrupted, run_training
from crosscoder.train.checkpoint import list_checkpoints

torch.set_num_threads(1)

NB, NF, NS = 8, 8, 16  # dedicated base, dedicated ft, designated shared (of 128 latents)
LAYOUT = dict(dedicated_base=NB, dedicated_ft=NF, shared_latents=NS, shared_sparsity_coeff=0.25)


def small_cfg(arch: str = "vanilla", **train) -> RunConfig:
    t = dict(
        num_tokens=256 * 30,
        batch_size=256,
        val_tokens=512,
        val_every=0,
        log_every=5,
        save_every=0,
        wandb="off",
        progress=False,
        dead_tokens=2000,
        seed=3,
    )
    t.update(train)
    return RunConfig(model=CrossCoderConfig(arch=arch, d_latent=128, k=4, **LAYOUT), train=TrainConfig(**t))


def bits_zero(t: torch.Tensor) -> bool:
    """Every entry is ``+0.0`` (bit pattern 0: no ``-0.0``)."""
    return bool((t.contiguous().view(torch.int32) == 0).all())


def check_saved_layout(w: dict[str, torch.Tensor], norm_scale: list[float]) -> None:
    w_enc, w_dec = w["W_enc"], w["W_dec"]
    lay = LatentLayout(128, 2, NB, NF, NS, 0.25)
    b, f, s = lay.base_only, lay.ft_only, lay.tied
    # forbidden blocks: exactly +0.0, decoder and encoder
    assert bits_zero(w_dec[b, 1]) and bits_zero(w_dec[f, 0])
    assert bits_zero(w_enc[1, :, b]) and bits_zero(w_enc[0, :, f])
    # ... while the allowed blocks were trained (not zero)
    assert w_dec[b, 0].norm(dim=-1).min() > 0 and w_dec[f, 1].norm(dim=-1).min() > 0
    assert w_enc[0, :, b].norm(dim=0).min() > 0 and w_enc[1, :, f].norm(dim=0).min() > 0
    # tied decoders: bitwise equal in the normalised space (float32 products) ...
    scale = torch.tensor(norm_scale, dtype=torch.float32)
    assert not torch.equal(scale[0], scale[1])  # the test means something: the two models scale differently
    tied = w_dec[s] * scale[None, :, None]
    assert torch.equal(tied[:, 0], tied[:, 1])
    # ... and within one float32 ulp in float64
    t64 = w_dec[s].double() * torch.tensor(norm_scale, dtype=torch.float64)[None, :, None]
    rel = (t64[:, 0] - t64[:, 1]).abs() / t64[:, 0].abs().clamp_min(1e-30)
    assert float(rel.max()) <= 2.0**-23
    # the folded copies differ (the folding really divided by different factors)
    assert not torch.equal(w_dec[s, 0], w_dec[s, 1])


# ---------------------------------------------------------------------------------------------- unit


def test_layout_ranges_kinds_masks_and_factor():
    lay = LatentLayout(d_latent=12, n_models=2, dedicated_base=2, dedicated_ft=3, shared=4, shared_factor=0.1)
    assert lay.kinds() == ["base_only"] * 2 + ["ft_only"] * 3 + ["designated_shared"] * 4 + ["free"] * 3
    mask = lay.model_mask()
    assert mask[:2].tolist() == [[1, 0]] * 2 and mask[2:5].tolist() == [[0, 1]] * 3 and (mask[5:] == 1).all()
    assert lay.sparsity_scale().tolist() == pytest.approx([1] * 5 + [0.1] * 4 + [1] * 3)
    d = lay.describe()
    assert d["ranges"] == {
        "base_only": [0, 2],
        "ft_only": [2, 5],
        "designated_shared": [5, 9],
        "free": [9, 12],
    }
    assert d["free"] == 3 and lay.constrained
    assert not LatentLayout(12, 2).constrained and LatentLayout(12, 2).model_mask() is None


def test_apply_and_adam_steps_keep_the_layout_exactly():
    torch.manual_seed(0)
    lay = LatentLayout(16, 2, 3, 2, 4, 0.1)
    w_enc = torch.nn.Parameter(torch.randn(2, 8, 16))
    w_dec = torch.nn.Parameter(torch.randn(16, 2, 8))
    lay.apply_(w_enc.data, w_dec.data)
    opt = torch.optim.Adam([w_enc, w_dec], lr=0.1)
    for _ in range(5):
        w_enc.grad, w_dec.grad = torch.randn_like(w_enc), torch.randn_like(w_dec)
        summed = w_dec.grad[5:9].sum(1)  # the gradient of the one shared vector
        lay.project_grads_(w_enc, w_dec)
        assert torch.equal(w_dec.grad[5:9, 0], summed) and torch.equal(w_dec.grad[5:9, 1], summed)
        assert bits_zero(w_dec.grad[:3, 1]) and bits_zero(w_enc.grad[0, :, 3:5])
        torch.nn.utils.clip_grad_norm_([w_enc, w_dec], 1.0)
        opt.step()
        assert bits_zero(w_dec[:3, 1]) and bits_zero(w_dec[3:5, 0])
        assert bits_zero(w_enc[1, :, :3]) and bits_zero(w_enc[0, :, 3:5])
        assert torch.equal(w_dec[5:9, 0], w_dec[5:9, 1])
    assert lay.violations(w_enc, w_dec) == {"forbidden_enc": 0.0, "forbidden_dec": 0.0, "tied_dec": 0.0}


def _hand_loss(model: CrossCoder, x: torch.Tensor, w_dec: torch.Tensor, coeff: float) -> torch.Tensor:
    """Vanilla's loss from its definition: ``sum_m ||x_m - x_hat_m||^2 + coeff * sum_i f_i w_i s_i`` with
    ``w_i = sum_m ||W_dec[i, m]||`` and ``s_i`` the layout factor (0.25 on designated shared latents)."""
    b, h = x.shape[0], model.cfg.d_latent
    f = torch.relu(x.reshape(b, -1) @ model.W_enc.reshape(-1, h) + model.b_enc)
    x_hat = (f @ w_dec.reshape(h, -1)).view_as(x) + model.b_dec
    factor = torch.ones(h)
    factor[NB + NF : NB + NF + NS] = 0.25
    weight = w_dec.norm(dim=-1).sum(-1) * factor
    return (x - x_hat).pow(2).sum((1, 2)).mean() + coeff * (f * weight).sum(-1).mean()


@pytest.mark.parametrize("fast", [True, False])
def test_vanilla_loss_by_hand_and_tied_gradient(fast):
    torch.manual_seed(1)
    cfg = CrossCoderConfig(arch="vanilla", d_latent=128, d_model=16, **LAYOUT)
    model = CrossCoder(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # an informative bias, scaled decoders (the factor must matter)
        model.b_enc.fill_(0.3)
        model.W_dec.mul_(0.7)
    x = torch.randn(32, 2, 16)
    out = compute_loss(model, x, sparsity_coeff=2.0, fast=fast)
    # the one shared vector as a leaf: W_dec's tied rows are that vector in both models
    v = model.W_dec.detach()[NB + NF : NB + NF + NS, 0].clone().requires_grad_(True)
    rest = model.W_dec.detach().clone()
    w_dec = torch.cat([rest[: NB + NF], v[:, None].expand(-1, 2, -1), rest[NB + NF + NS :]])
    ref = _hand_loss(model, x, w_dec, 2.0)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-4)
    assert out.metrics["l1_loss"] > 0
    model.zero_grad()
    out.loss.backward()
    model.constrain_grads()
    (g_v,) = torch.autograd.grad(ref, v)
    g = model.W_dec.grad[NB + NF : NB + NF + NS]
    torch.testing.assert_close(g[:, 0], g_v, rtol=1e-4, atol=1e-5)
    assert torch.equal(g[:, 0], g[:, 1])
    assert bits_zero(model.W_dec.grad[:NB, 1]) and bits_zero(model.W_enc.grad[0, :, NB : NB + NF])


def test_batchtopk_selection_scores_are_divided_by_the_factor():
    torch.manual_seed(2)
    cfg = CrossCoderConfig(arch="batchtopk", d_latent=128, d_model=16, k=4, **LAYOUT)
    model = CrossCoder(cfg, generator=torch.Generator().manual_seed(0)).train()
    x = torch.randn(64, 2, 16)
    pre = model.encode_pre(x).detach()
    w = model.dec_norms().detach().sum(-1)
    factor = torch.ones(128)
    factor[NB + NF : NB + NF + NS] = 0.25
    scores = torch.relu(pre) * w / factor
    keep = torch.zeros_like(scores).flatten()
    keep[scores.flatten().topk(4 * 64).indices] = 1.0
    expected = torch.relu(pre) * keep.view_as(scores)
    for fast in (True, False):
        got = compute_loss(model, x, fast=fast).f
        torch.testing.assert_close(got, expected)
    # the factor matters: without it another set of entries would be kept
    plain = torch.relu(pre) * w
    keep_plain = torch.zeros_like(plain).flatten()
    keep_plain[plain.flatten().topk(4 * 64).indices] = 1.0
    assert not torch.equal(keep, keep_plain)


@pytest.mark.parametrize("arch", architecture_names())
def test_every_architecture_weights_and_constrains(arch):
    """Penalty architectures multiply their per-latent weight by the factor, selection (BatchTopK family)
    divides it; one optimiser step keeps the layout exactly."""
    torch.manual_seed(3)
    cfg = CrossCoderConfig(arch=arch, d_latent=128, d_model=16, k=4, **LAYOUT)
    model = CrossCoder(cfg, generator=torch.Generator().manual_seed(0)).train()
    lw, scale = model.latent_weight(), model.sparsity_scale
    assert (
        scale[NB + NF : NB + NF + NS].eq(0.25).all()
        and scale[: NB + NF].eq(1).all()
        and scale[NB + NF + NS :].eq(1).all()
    )
    if isinstance(model.arch, BatchTopK):
        torch.testing.assert_close(model.arch.weight(), lw / scale)
    elif model.arch.penalty_name is not None:
        torch.testing.assert_close(model.arch.weight(), lw * scale)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):
        out = compute_loss(model, torch.randn(64, 2, 16), sparsity_coeff=1.0)
        opt.zero_grad()
        out.loss.backward()
        model.constrain_grads()
        opt.step()
    v = model.layout.violations(model.W_enc, model.W_dec)
    assert v == {"forbidden_enc": 0.0, "forbidden_dec": 0.0, "tied_dec": 0.0}, v


@pytest.mark.parametrize(
    "scales",
    [[5.788922309875488, 5.5888543128967285], [0.3, 7.1], [1.0, 3.0], [0.017, 123.4], [1.37, 2.91, 0.55]],
)
def test_exact_fold_property(scales):
    torch.manual_seed(4)
    s = torch.tensor(scales)
    v = torch.randn(300, 64) * 0.1
    v[0, :4] = 0.0
    b, missed = exact_fold(v, s)
    assert missed == 0
    c = b * s[None, :, None]
    for j in range(1, len(scales)):
        assert torch.equal(c[:, 0], c[:, j])
    # c is v or a float32 neighbour a few ulps away
    ulps = (c[:, 0].view(torch.int32).long() - v.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 4
    # a plain division is not exact (what the snapping is for)
    plain = v[:, None, :] / s[None, :, None] * s[None, :, None]
    assert any(not torch.equal(plain[:, 0], plain[:, j]) for j in range(1, len(scales)))


def test_fold_unfold_keep_layout_and_latents():
    torch.manual_seed(5)
    cfg = CrossCoderConfig(arch="vanilla", d_latent=128, d_model=16, **LAYOUT)
    model = CrossCoder(cfg, generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        model.b_enc.fill_(0.2)
    scale, mean = [0.37, 2.9], (torch.randn(2, 16) * 3).tolist()
    folded = CrossCoder(CrossCoderConfig(**{**cfg.__dict__}))
    folded.load_state_dict(model.state_dict())
    folded.eval().fold(scale, mean)
    w = {"W_enc": folded.W_enc.detach(), "W_dec": folded.W_dec.detach()}
    lay = folded.layout
    assert lay.kinds() == model.layout.kinds()  # the order of latents is untouched
    assert bits_zero(w["W_dec"][lay.base_only, 1]) and bits_zero(w["W_enc"][0, :, lay.ft_only])
    tied = w["W_dec"][lay.tied] * folded.norm_scale[None, :, None]
    assert torch.equal(tied[:, 0], tied[:, 1])
    assert lay.violations(folded.W_enc, folded.W_dec, folded.norm_scale)["tied_dec"] == 0.0
    # latents on raw activations equal the unfolded model's on normalised ones
    raw = torch.randn(50, 2, 16) * 4 + torch.tensor(mean)
    f_raw = folded.encode(raw)
    f_norm = model.encode(folded.normalize(raw))
    torch.testing.assert_close(f_raw, f_norm, rtol=1e-4, atol=1e-4)
    # unfolding restores exactly tied copies (bitwise) and the zero blocks
    folded.unfold()
    assert torch.equal(folded.W_dec[lay.tied, 0], folded.W_dec[lay.tied, 1])
    assert bits_zero(folded.W_dec[lay.ft_only, 0])
    torch.testing.assert_close(folded.W_dec, model.W_dec, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", architecture_names())
def test_training_saves_exact_layout(tmp_path, arch):
    out = tmp_path / arch
    run_training(small_cfg(arch), out)
    cfg = json.loads((out / "config.json").read_text())
    for k, v in LAYOUT.items():
        assert cfg[k] == v, k
    check_saved_layout(load_file(str(out / "model.safetensors")), cfg["norm_scale"])
    model = CrossCoder.from_pretrained(out)
    assert model.layout == LatentLayout(128, 2, NB, NF, NS, 0.25)
    v = model.layout.violations(model.W_enc, model.W_dec, model.norm_scale)
    assert v == {"forbidden_enc": 0.0, "forbidden_dec": 0.0, "tied_dec": 0.0}


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_resume_with_layout_is_bit_for_bit(tmp_path, arch):
    cfg = small_cfg(arch, num_tokens=256 * 20, save_every=6, aux_k=16)
    run_training(cfg, tmp_path / "full")
    with pytest.raises(Interrupted):
        run_training(cfg, tmp_path / "cut", stop_after_steps=9)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [6, 9]
    run_training(cfg, tmp_path / "cut", resume=True)
    a, b = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    check_saved_layout(b, json.loads((tmp_path / "cut" / "config.json").read_text())["norm_scale"])


# ---------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--dedicated-base", "100", "--dedicated-ft", "20", "--shared-latents", "20"],
            "exceeds d_latent (128)",
        ),
        (["--dedicated-ft", "-1"], "dedicated_ft: must be >= 0"),
        (["--shared-latents", "-4"], "shared_latents: must be >= 0"),
        (
            ["--shared-latents", "4", "--shared-sparsity-coeff", "0"],
            "shared_sparsity_coeff: must be positive",
        ),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, capsys, flags, message):
    rc = main(
        [
            "train",
            "--d-latent",
            "128",
            "--out",
            str(tmp_path / "run"),
            "--wandb",
            "off",
            "--no-progress",
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_plain_flags_train(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "crosscoder",
            "train",
            "--dedicated-base",
            "16",
            "--dedicated-ft",
            "16",
            "--shared-latents",
            "32",
            "--num-tokens",
            "20000",
            "--batch-size",
            "256",
            "--d-latent",
            "256",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["dedicated_base"],
        cfg["dedicated_ft"],
        cfg["shared_latents"],
        cfg["shared_sparsity_coeff"],
    ) == (16, 16, 32, 0.5)  # vanilla's default factor
    model = CrossCoder.from_pretrained(out)
    assert model.layout.violations(model.W_enc, model.W_dec, model.norm_scale) == {
        "forbidden_enc": 0.0,
        "forbidden_dec": 0.0,
        "tied_dec": 0.0,
    }
