"""Latent Scaling into every model, and explained variance per model and block, for n models and sites.

**Which direction.** The two-model fit (:mod:`crosscoder.analysis.scaling`) takes the decoder direction of
the model a latent is claimed for (the fine-tuned decoder for an ``ft_only`` candidate, the base one for
a ``base_only`` candidate: in both cases the model where its norm is largest) and asks how much of that
direction the *other* model carries. The n-model fit does the same for every model at once: latent ``j``
gets a **reference model** ``ref_j = argmax_i n_ij`` (its largest model norm, :func:`reference_models`) and
the direction ``d_j`` = the reference model's decoder, concatenated over its sites. For every model ``i``
the targets are model ``i``'s blocks, concatenated over the same sites (site ``s`` of model ``i`` is
projected on site ``s`` of the reference), and

    beta_ij = fit of (error | reconstruction) target of model i on f_j d_j,
    nu_<target>_i = beta_ij / beta_{ref_j, j}                          (NaN if the own beta <= 1e-6)

with the same three fit modes (``intercept`` default, ``bias_free``, ``literal``) and formulas as the
two-model fit; ``nu_*_ref`` is 1. For two models and one site, ``nu`` of the non-reference model is
exactly the two-model ``nu`` of the matching direction (``beta_ratio_error`` for latents whose
fine-tuned norm is the larger, ``beta_ratio_error_mirror`` otherwise).

A model whose blocks have other widths than the reference's (a different architecture: its activations
live in another space) cannot carry the reference direction in any defined sense: its ``nu`` is NaN.

Sums are accumulated in float64 in one pass, as in :class:`crosscoder.analysis.scaling.ScalingAccumulator`
(one product ``f^T [x - r | x_hat - r]`` per chunk and block of latents; ``r`` the first chunk's mean).
"""

from __future__ import annotations

import numpy as np
import torch

from ..model import CrossCoder
from .blocks import BlockLayout
from .patterns import model_norms
from .scaling import DEFAULT_MODE, check_mode


def reference_models(model_norm: np.ndarray) -> np.ndarray:
    """``model_norm [d_latent, n_models]`` -> ``[d_latent]`` int64: the model with the largest norm (the
    first on ties)."""
    return np.argmax(np.asarray(model_norm), axis=1).astype(np.int64)


class MultiScalingAccumulator:
    """Streaming sums for the n-model Latent Scaling (module docstring). ``model`` in the normalised
    space, chunks normalised too; ``ref [d_latent]`` the reference model of each latent (default:
    :func:`reference_models` of the model's decoder norms)."""

    def __init__(
        self,
        model: CrossCoder,
        layout: BlockLayout,
        ref: np.ndarray | None = None,
        block_floats: int = 1 << 24,
        mode: str = DEFAULT_MODE,
    ) -> None:
        self.mode = check_mode(mode)
        self.layout = layout
        w = model.W_dec.detach().float()  # [h, B, d]
        h, nb, d = w.shape
        dev = w.device
        bn = (w.norm(dim=-1) * model.norm_scale.to(dev)).double().cpu().numpy()  # [h, B]
        norms = model_norms(bn, layout.block_models)
        self.ref = reference_models(norms) if ref is None else np.asarray(ref, np.int64)
        # dirs[j, b]: the reference model's decoder at block b's site (0 where it has no block there)
        src = np.zeros((h, nb), np.int64)
        has = np.zeros((h, nb), bool)
        for r in range(layout.n_models):
            rows = self.ref == r
            for b in range(nb):
                rb = layout.block(r, layout.block_sites[b])
                if rb is not None:
                    src[rows, b], has[rows, b] = rb, True
        same_width = np.asarray(layout.widths)[src] == np.asarray(layout.widths)[None, :]
        #: ``[d_latent, n_blocks]``: the block whose decoder gives block ``b``'s direction (-1: none)
        self.src_blocks = np.where(has & same_width, src, -1)
        idx = torch.as_tensor(src, device=dev)
        self.dirs = (
            torch.gather(w, 1, idx[:, :, None].expand(h, nb, d))
            * torch.as_tensor(has, device=dev)[:, :, None]
        )  # [h, B, d]
        self.w = w
        self.b_dec = model.b_dec.detach().float().to(dev)  # [B, d]
        self.block = max(1, block_floats // (2 * nb * d))
        self.sums = torch.zeros(2, nb, h, dtype=torch.float64, device=dev)  # [x|x_hat, B, h] around r
        self.s_f = torch.zeros(h, dtype=torch.float64, device=dev)
        self.s_f2 = torch.zeros(h, dtype=torch.float64, device=dev)
        self.s_y = torch.zeros(2, nb, d, dtype=torch.float64, device=dev)
        self.r: torch.Tensor | None = None  # [B, d]
        self.n = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: object = None) -> None:
        """``x, x_hat [n, n_blocks, d_model]`` (normalised), ``f [n, d_latent]``."""
        n, nb, d = x.shape
        if n == 0:
            return
        if self.r is None:
            self.r = x.float().mean(0)
        y3 = torch.stack([x.float() - self.r, x_hat.float() - self.r], dim=1)  # [n, 2, B, d]
        y = y3.reshape(n, 2 * nb * d)
        for lo in range(0, f.shape[1], self.block):
            hi = min(lo + self.block, f.shape[1])
            g = (f[:, lo:hi].T @ y).view(hi - lo, 2, nb, d)
            self.sums[:, :, lo:hi] += torch.einsum("jtbd,jbd->tbj", g, self.dirs[lo:hi]).double()
        self.s_f += f.sum(0).double()
        self.s_f2 += (f * f).sum(0).double()
        self.s_y += y3.sum(0).double()
        self.n += n

    def betas(self, mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(beta_error, beta_reconstruction)``, each ``[n_models, d_latent]`` float64 (NaN where the fit is
        undefined or the model is not in the reference's space)."""
        mode = check_mode(mode or self.mode)
        lay = self.layout
        dirs = self.dirs.double()  # [h, B, d]
        w = self.w.double()
        bm = torch.as_tensor(lay.block_models, device=dirs.device)
        ref_t = torch.as_tensor(self.ref, device=dirs.device)
        own_block = bm[None, :] == ref_t[:, None]  # [h, B]
        dir_sq = (dirs.pow(2).sum(-1) * own_block).sum(1)  # [h]: ||d_j||^2 over the reference's blocks
        dot_dec = (w * dirs).sum(-1).T  # [B, h]: d_j(site of b) . W_dec[j, b]
        s_fx, s_fxh = self.sums[0], self.sums[1]  # [B, h]
        s_f, s_f2 = self.s_f, self.s_f2
        if mode == "intercept":
            n = max(self.n, 1)
            y_err = torch.einsum("bd,jbd->bj", self.s_y[0] - self.s_y[1], dirs) + dot_dec * s_f
            y_rec = torch.einsum("bd,jbd->bj", self.s_y[1], dirs)
            num_err = s_fx - s_fxh + dot_dec * s_f2 - s_f * y_err / n
            num_rec = s_fxh - s_f * y_rec / n
            var = s_f2 - s_f * s_f / n
            ok = (var > 1e-9 * s_f2) & (dir_sq > 0)
            den = dir_sq * var
        else:
            num_err = s_fx - s_fxh + dot_dec * s_f2
            r = torch.zeros_like(self.b_dec) if self.r is None else self.r
            shift = (r - self.b_dec if mode == "bias_free" else r).double()
            num_rec = s_fxh + s_f * torch.einsum("bd,jbd->bj", shift, dirs)
            den = dir_sq * s_f2
            ok = den > 0
        # per model: sum over its blocks
        m = lay.n_models
        to_model = torch.zeros(m, lay.n_blocks, dtype=torch.float64, device=dirs.device)
        to_model[bm, torch.arange(lay.n_blocks, device=dirs.device)] = 1.0
        out = []
        for num in (num_err, num_rec):
            beta = torch.where(
                ok, (to_model @ num) / den.clamp_min(1e-30), torch.full_like(den, float("nan"))
            )
            out.append(beta.cpu().numpy())
        comparable = np.array([[lay.same_space(i, r) for r in range(m)] for i in range(m)])  # [m, m]
        mask = comparable[:, self.ref]  # [m, h]
        return tuple(np.where(mask, b, np.nan) for b in out)  # type: ignore[return-value]

    def result(self, mode: str | None = None) -> dict[str, np.ndarray]:
        """``{"ref": [d_latent], "beta_error"/"beta_reconstruction": [n_models, d_latent],
        "nu_error"/"nu_reconstruction": [n_models, d_latent]}`` (nu: beta over the reference model's
        beta)."""
        be, br = self.betas(mode)
        out: dict[str, np.ndarray] = {"ref": self.ref, "beta_error": be, "beta_reconstruction": br}
        cols = np.arange(len(self.ref))
        for name, beta in (("error", be), ("reconstruction", br)):
            own = beta[self.ref, cols]
            with np.errstate(invalid="ignore", divide="ignore"):
                nu = np.where(own > 1e-6, beta / np.maximum(own, 1e-6), np.nan)
            out[f"nu_{name}"] = nu
        return out


class BlockReconstructionStats:
    """Explained variance of the scanned rows (normalised space, around the rows' mean) per block, per
    model (its blocks together) and overall, over each block's **real** entries only (``widths``)."""

    def __init__(self, layout: BlockLayout, d_model: int) -> None:
        self.layout = layout
        self.mask = torch.as_tensor(layout.width_mask(d_model), dtype=torch.float64)  # [B, d]
        nb = layout.n_blocks
        self.n = 0
        self.sse = torch.zeros(nb, dtype=torch.float64)
        self.sx = torch.zeros(nb, d_model, dtype=torch.float64)
        self.sxx = torch.zeros(nb, dtype=torch.float64)

    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: object = None) -> None:
        xd = x.double().cpu() * self.mask
        err = (xd - x_hat.double().cpu()) * self.mask
        self.sse += err.pow(2).sum((0, 2))
        self.sx += xd.sum(0)
        self.sxx += xd.pow(2).sum((0, 2))
        self.n += x.shape[0]

    def result(self) -> dict[str, float]:
        """``explained_variance`` (all blocks), ``explained_variance_<i>`` per model ``i`` and, with several
        sites, ``explained_variance_<i>_<j>`` per block (model ``i``, site ``j``)."""
        if self.n == 0:
            return {}
        lay = self.layout
        sst = (self.sxx - self.sx.pow(2).sum(-1) / self.n).numpy()  # [B]
        sse = self.sse.numpy()

        def ev(blocks: list[int]) -> float:
            t = float(sst[blocks].sum())
            return float(1 - sse[blocks].sum() / t) if t > 0 else float("nan")

        out = {"explained_variance": ev(list(range(lay.n_blocks)))}
        for i in range(lay.n_models):
            out[f"explained_variance_{i}"] = ev(lay.blocks_of(i))
        if lay.n_sites > 1:
            for b in range(lay.n_blocks):
                out[f"explained_variance_{lay.block_models[b]}_{lay.block_sites[b]}"] = ev([b])
        return out
