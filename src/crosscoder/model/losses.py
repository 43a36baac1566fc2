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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .crosscoder import CrossCoder


def model_letter(i: int) -> str:
    """Metric suffix for model ``i``: A (base), B (fine-tuned), C, ..."""
    return string.ascii_uppercase[i] if i < 26 else str(i)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, with graph
    metrics: dict[str, torch.Tensor]  # detached scalars on the model's device
    f: torch.Tensor  # [batch, d_latent] latents (detached)


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Explained-variance metrics of ``x_hat`` against ``x`` (both ``[batch, n_models, d_model]``)."""
    err = (x - x_hat).pow(2)  # [b, m, d]
    dev = (x - x.mean(0, keepdim=True)).pow(2)  # [b, m, d]
    sse_m, sst_m = err.sum((0, 2)), dev.sum((0, 2))  # [m]
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


def aux_loss(model: CrossCoder, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
             aux_k: int) -> torch.Tensor:
    """AuxK loss. ``pre [batch, d_latent]``, ``residual [batch, n_models, d_model]`` (detached),
    ``dead [d_latent]`` bool. Zero (value and gradient) when no latent is dead; no host sync."""
    b = pre.shape[0]
    k = min(aux_k, pre.shape[1])
    dead_acts = torch.relu(pre) * dead.to(pre.dtype)  # [b, h], zero outside dead latents
    vals, idx = dead_acts.topk(k, dim=-1, sorted=False)  # [b, k]
    w_flat = model.W_dec.reshape(model.cfg.d_latent, -1)  # [h, m*d]
    e_hat = F.embedding_bag(idx, w_flat, per_sample_weights=vals, mode="sum")  # [b, m*d]
    e = residual.reshape(b, -1)
    num = (e - e_hat).pow(2).sum()
    den = (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return (num / den) * dead.any().to(num.dtype)


def compute_loss(model: CrossCoder, x: torch.Tensor, *, l1_coeff: float | torch.Tensor = 0.0,
                 l2: str = "squared", aux_k: int = 0, aux_coeff: float = 1 / 32,
                 dead: torch.Tensor | None = None) -> LossOutput:
    """Forward ``x [batch, n_models, d_model]`` through ``model`` and return the loss and metrics.

    Uses the model's mode: in training mode BatchTopK selects over the batch and updates its threshold.
    """
    pre = model.encode_pre(x)
    weight = model.latent_weight()
    f = model.arch.activate(pre, weight, model.training)
    x_hat = model.decode(f)
    l2_val = l2_loss(x, x_hat, l2)
    l1_val = (f * weight).sum(-1).mean()
    loss = l2_val
    if model.arch.uses_l1:
        loss = loss + l1_coeff * l1_val
    metrics: dict[str, torch.Tensor] = {}
    if aux_k > 0 and dead is not None:
        aux = aux_loss(model, pre, (x - x_hat).detach(), dead, aux_k)
        loss = loss + aux_coeff * aux
        metrics["aux_loss"] = aux.detach()
    with torch.no_grad():
        metrics.update(
            loss=loss.detach(),
            l2_loss=l2_val.detach(),
            l1_loss=l1_val.detach(),
            l0_loss=(f > 0).sum(-1).float().mean(),
            **reconstruction_metrics(x, x_hat.detach()),
        )
    return LossOutput(loss=loss, metrics=metrics, f=f.detach())
