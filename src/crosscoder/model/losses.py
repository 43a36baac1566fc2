"""The one loss and metrics path shared by every architecture.

With ``x, x_hat [batch, n_models, d_model]``, ``f [batch, d_latent]`` and ``w [d_latent]`` the latent
weight (sum over models of decoder norms, or the concatenated norm):

* ``l2_loss``  = mean_b sum_{m,d} (x - x_hat)^2              (``l2="norm"``: mean_b sum_m ||x_m - x_hat_m||)
* ``l1_loss``  = mean_b sum_i f_i * w_i
* ``l0_loss``  = mean_b #{i : f_i > 0}
* ``explained_variance``   = 1 - SSE / SST, SST around the batch mean, over all models
* ``explained_variance_A`` (``_B``, ``_C`` ...) the same restricted to model 0 (1, 2 ...)
* ``explained_variance_legacy`` = mean_b (1 - SSE_b / SST_b), the per-token variant (Kissane)
* ``aux_loss`` (AuxK): residual ``e = x - x_hat`` (detached) reconstructed by the top ``aux_k`` dead
  latents of each token (decoder without bias), ``sum (e - e_hat)^2 / sum (e - mean_b e)^2``; zero when no
  latent is dead.
* ``loss`` = l2_loss + l1_coeff * l1_loss (architectures with L1) + aux_coeff * aux_loss (when aux_k > 0)
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .crosscoder import CrossCoder
from .registry import Latents

DistSum = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over ranks (identity on one process)


def model_letter(i: int) -> str:
    """Metric suffix for model ``i``: A (base), B (fine-tuned), C, ..."""
    return string.ascii_uppercase[i] if i < 26 else str(i)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, with graph
    metrics: dict[str, torch.Tensor]  # detached scalars on the model's device
    latents: Latents  # dense or sparse latents (no graph); .fired() [d_latent] bool

    @property
    def f(self) -> torch.Tensor:
        """``[batch, d_latent]`` dense latents (built on demand from a sparse selection)."""
        return self.latents.to_dense()


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor,
                           dist_sum: DistSum | None = None) -> dict[str, torch.Tensor]:
    """Explained-variance metrics of ``x_hat`` against ``x`` (both ``[batch, n_models, d_model]``).

    With ``dist_sum`` (sums a tensor over ranks) SSE and SST are those of the global batch (SST around
    the global batch mean, from the summed first and second moments).
    """
    err = (x - x_hat).pow(2)  # [b, m, d]
    dev = (x - x.mean(0, keepdim=True)).pow(2)  # [b, m, d]
    if dist_sum is None:
        sse_m, sst_m = err.sum((0, 2)), dev.sum((0, 2))  # [m]
    else:
        m = x.shape[1]
        xd = x.double()
        stats = torch.cat([err.sum((0, 2)).double(), xd.sum(0).reshape(-1), xd.pow(2).sum((0, 2)),
                           torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)])
        stats = dist_sum(stats)
        sse_m, s1, s2, n = stats[:m], stats[m:-m - 1].view(m, -1), stats[-m - 1:-1], stats[-1]
        sst_m = s2 - s1.pow(2).sum(-1) / n
        sse_m, sst_m = sse_m.float(), sst_m.float()
    out = {"explained_variance": 1 - sse_m.sum() / sst_m.sum()}
    ev_m = 1 - sse_m / sst_m
    for i in range(x.shape[1]):
        out[f"explained_variance_{model_letter(i)}"] = ev_m[i]
    out["explained_variance_legacy"] = (1 - err.sum((1, 2)) / dev.sum((1, 2))).mean()
    return out


def l2_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "squared") -> torch.Tensor:
    """``x, x_hat [batch, n_models, d_model]`` -> scalar reconstruction loss."""
    diff = x - x_hat
    if kind == "norm":
        return diff.norm(dim=-1).sum(-1).mean()
    return diff.pow(2).sum((1, 2)).mean()


def aux_loss_from(e_hat: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None,
                  dist_sum: DistSum | None = None, world_size: int = 1) -> torch.Tensor:
    """AuxK loss from ``e_hat [batch, n_models * d_model]`` (the dead latents' reconstruction of the
    residual) and ``residual [batch, n_models, d_model]`` (detached); ``scale`` = ``dead.any()``.

    Under ``dist_sum`` the denominator is the global residual variance and the local numerator is scaled
    by ``world_size``, so that averaging gradients (and values) over ranks gives the global loss."""
    e = residual.reshape(residual.shape[0], -1)
    num = (e - e_hat).pow(2).sum()
    if dist_sum is None:
        den = (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    else:
        ed = e.detach().double()
        st = dist_sum(torch.cat([ed.sum(0), ed.pow(2).sum().reshape(1),
                                 torch.tensor([e.shape[0]], dtype=torch.float64, device=e.device)]))
        den = (st[-2] - st[:-2].pow(2).sum() / st[-1]).float().clamp_min(1e-12)
        num = num * world_size
    out = num / den
    return out * scale.to(num.dtype) if scale is not None else out


def aux_loss(model: CrossCoder, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
             aux_k: int) -> torch.Tensor:
    """Dense AuxK loss. ``pre [batch, d_latent]``, ``residual [batch, n_models, d_model]`` (detached),
    ``dead [d_latent]`` bool. Zero (value and gradient) when no latent is dead; no host sync."""
    b = pre.shape[0]
    k = min(aux_k, pre.shape[1])
    dead_acts = torch.relu(pre) * dead.to(pre.dtype)  # [b, h], zero outside dead latents
    vals, idx = dead_acts.topk(k, dim=-1, sorted=False)  # [b, k]
    w_flat = model.W_dec.reshape(model.cfg.d_latent, -1)  # [h, m*d]
    e_hat = F.embedding_bag(idx, w_flat, per_sample_weights=vals.to(w_flat.dtype), mode="sum")  # [b, m*d]
    return aux_loss_from(e_hat, residual.reshape(b, -1), dead.any())


def compute_loss(model: CrossCoder, x: torch.Tensor, *, l1_coeff: float | torch.Tensor = 0.0,
                 l2: str = "squared", aux_k: int = 0, aux_coeff: float = 1 / 32,
                 dead: torch.Tensor | None = None, fast: bool = True, dist_sum: DistSum | None = None,
                 world_size: int = 1) -> LossOutput:
    """Forward ``x [batch, n_models, d_model]`` through ``model`` and return the loss and metrics.

    Uses the model's mode: in training mode BatchTopK selects over the batch and updates its threshold.
    ``fast=True`` runs the architecture's fast path (same mathematics, see ``docs/performance.md``);
    ``fast=False`` the plain dense path (encode, ``activate``, decode).
    """
    arch = model.arch
    weight = model.latent_weight()
    use_aux = aux_k > 0 and dead is not None
    fw = (arch.forward_fast if fast else arch.forward_dense)(x, weight, aux_k if use_aux else 0,
                                                              dead if use_aux else None)
    x_hat = fw.x_hat
    l2_val = l2_loss(x, x_hat, l2)
    loss = l2_val
    if arch.uses_l1:
        loss = loss + l1_coeff * fw.l1
    metrics: dict[str, torch.Tensor] = {}
    if use_aux:
        if fw.aux_e_hat is None:  # no dead latent (known without a device read): the loss is exactly 0
            aux = torch.zeros((), device=x.device)
        else:
            aux = aux_loss_from(fw.aux_e_hat, (x - x_hat).detach(), fw.aux_scale, dist_sum, world_size)
            loss = loss + aux_coeff * aux
        metrics["aux_loss"] = aux.detach()
    with torch.no_grad():
        metrics.update(
            loss=loss.detach(),
            l2_loss=l2_val.detach(),
            l1_loss=fw.l1.detach(),
            l0_loss=fw.latents.l0(),
            **reconstruction_metrics(x, x_hat.detach(), dist_sum),
        )
    return LossOutput(loss=loss, metrics=metrics, latents=fw.latents)
