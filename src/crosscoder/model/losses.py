"""The one loss and metrics path shared by every architecture.

With ``x, x_hat [batch, n_models, d_model]``, ``f [batch, d_latent]`` and ``w [d_latent]`` the latent
weight (sum over models of decoder norms, or the concatenated norm):

* ``l2_loss``  = mean_b sum_{m,d} (x - x_hat)^2              (``l2="norm"``: mean_b sum_m ||x_m - x_hat_m||)
* ``l1_loss`` (vanilla; each architecture names its sparsity term, ``penalty_name``) = mean_b sum_i f_i * w_i
* ``l0_loss``  = mean_b #{i : f_i > 0}
* ``explained_variance``   = 1 - SSE / SST, SST around the batch mean, over all models
* ``explained_variance_A`` (``_B``, ``_C`` ...) the same restricted to model 0 (1, 2 ...)
* ``explained_variance_legacy`` = mean_b (1 - SSE_b / SST_b), the per-token variant (Kissane)
* ``aux_loss`` (AuxK): residual ``e = x - x_hat`` (detached) reconstructed by the top ``aux_k`` dead
  latents of each token (decoder without bias), ``sum (e - e_hat)^2 / max(sum (e - mean_b e)^2,
  sum e^2 / 10)`` (see :func:`aux_loss_from` for the floor); zero when no latent is dead.
* the architecture's further loss terms (e.g. Matryoshka's prefix losses), under their own names
* ``loss`` = l2_loss + l1_coeff * sparsity term (architectures with one) + further terms
  + aux_coeff * aux_loss (when aux_k > 0)
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .architectures import Latents, StepInput
from .crosscoder import CrossCoder

DistSum = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over ranks (identity on one process)


def model_letter(i: int) -> str:
    """Metric suffix for model ``i``: A (base), B (fine-tuned), C, ..."""
    return string.ascii_uppercase[i] if i < 26 else str(i)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, with graph
    metrics: dict[str, torch.Tensor]  # detached scalars on the model's device
    latents: Latents  # dense or sparse latents (no graph); .fired() [d_latent] bool
    x_hat: torch.Tensor | None = None  # [batch, n_models, d_model] reconstruction (no graph)

    @property
    def f(self) -> torch.Tensor:
        """``[batch, d_latent]`` dense latents (built on demand from a sparse selection)."""
        return self.latents.to_dense()


def reconstruction_metrics(
    x: torch.Tensor, x_hat: torch.Tensor, dist_sum: DistSum | None = None
) -> dict[str, torch.Tensor]:
    """Explained-variance metrics of ``x_hat`` against ``x`` (both ``[batch, n_models, d_model]``).

    With ``dist_sum`` (sums a tensor over ranks) SSE and SST are those of the global batch (SST around
    the global batch mean, from the summed first and second moments).
    """
    err = (x - x_hat).pow(2)  # [b, m, d]
    dev = (x - x.mean(0, keepdim=True)).pow(2)  # [b, m, d]
    if dist_sum is None:
        out = explained_variances(err.sum((0, 2)), dev.sum((0, 2)))
    else:
        out = {
            k: v.float()
            for k, v in explained_variance_from_moments(dist_sum(ev_moments(x, x_hat)), x.shape[1]).items()
        }
    out["explained_variance_legacy"] = (1 - err.sum((1, 2)) / dev.sum((1, 2))).mean()
    return out


def explained_variances(sse_m: torch.Tensor, sst_m: torch.Tensor) -> dict[str, torch.Tensor]:
    """``explained_variance`` (all models) and ``explained_variance_A``, ``_B`` ... from per-model
    ``sse_m, sst_m [n_models]``."""
    out = {"explained_variance": 1 - sse_m.sum() / sst_m.sum()}
    ev_m = 1 - sse_m / sst_m
    for i in range(sse_m.shape[0]):
        out[f"explained_variance_{model_letter(i)}"] = ev_m[i]
    return out


def ev_moments(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Sums that pool explained variance over batches or ranks, float64
    ``[SSE per model (m) | sum_b x (m * d) | sum_b ||x||^2 per model (m) | rows (1)]`` for
    ``x, x_hat [batch, n_models, d_model]``; add them up, then :func:`explained_variance_from_moments`."""
    xd = x.double()
    return torch.cat(
        [
            (xd - x_hat.double()).pow(2).sum((0, 2)),
            xd.sum(0).reshape(-1),
            xd.pow(2).sum((0, 2)),
            torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device),
        ]
    )


def explained_variance_from_moments(stats: torch.Tensor, n_models: int) -> dict[str, torch.Tensor]:
    """:func:`explained_variances` from summed :func:`ev_moments` (SST around the pooled mean)."""
    m = n_models
    sse_m, s1, s2, n = stats[:m], stats[m : -m - 1].view(m, -1), stats[-m - 1 : -1], stats[-1]
    return explained_variances(sse_m, s2 - s1.pow(2).sum(-1) / n)


def l2_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "squared") -> torch.Tensor:
    """``x, x_hat [batch, n_models, d_model]`` -> scalar reconstruction loss."""
    diff = x - x_hat
    if kind == "norm":
        return diff.norm(dim=-1).sum(-1).mean()
    return diff.pow(2).sum((1, 2)).mean()


#: AuxK's denominator is floored at this fraction of the residual's energy (see :func:`aux_loss_from`).
AUX_ENERGY_FLOOR = 0.1


def aux_loss_from(
    e_hat: torch.Tensor,
    residual: torch.Tensor,
    scale: torch.Tensor | None,
    dist_sum: DistSum | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """AuxK loss from ``e_hat [batch, n_models * d_model]`` (the dead latents' reconstruction of the
    residual) and ``residual [batch, n_models, d_model]`` (detached); ``scale`` = ``dead.any()``.

    ``sum (e - e_hat)^2 / max(C, U / 10)`` with ``C = sum (e - mean_b e)^2`` the residual's variance about
    the batch mean and ``U = sum e^2`` its energy. ``C`` alone makes the loss scale-free (the fraction of
    the residual's variance left unexplained), but it is 0 for one row (or identical rows), and the loss
    then blew up to ``~1e12`` through a ``1e-12`` clamp. As ``C <= U``, the floor ``U / 10`` binds only
    when more than 90% of the residual's energy is an offset shared by the whole batch: not in ordinary
    training (``b_dec`` starts at the data mean by default and keeps the residual about centred; the loss
    is then exactly the usual one), always for a single row. The loss stays continuous in the data and at most
    ``10 sum (e - e_hat)^2 / sum e^2`` (ten times the residual's normalised MSE: 10 when the dead latents
    explain nothing, ``e_hat = 0``) whatever the batch size. ``1e-12`` only guards ``e == 0`` exactly.

    Under ``dist_sum`` ``C`` and ``U`` are those of the global batch (from the summed moments, in float64)
    and the local numerator is scaled by ``world_size``, so that averaging gradients (and values) over
    ranks gives the global loss."""
    e = residual.reshape(residual.shape[0], -1)
    num = (e - e_hat).pow(2).sum()
    if dist_sum is None:
        ed = e.detach()
        centred, energy = (ed - ed.mean(0, keepdim=True)).pow(2).sum(), ed.pow(2).sum()
    else:
        ed = e.detach().double()
        st = dist_sum(
            torch.cat(
                [
                    ed.sum(0),
                    ed.pow(2).sum().reshape(1),
                    torch.tensor([e.shape[0]], dtype=torch.float64, device=e.device),
                ]
            )
        )
        energy = st[-2]
        centred = energy - st[:-2].pow(2).sum() / st[-1]
        centred, energy = centred.float(), energy.float()
        num = num * world_size
    den = torch.maximum(centred, AUX_ENERGY_FLOOR * energy).clamp_min(1e-12)
    out = num / den
    return out * scale.to(num.dtype) if scale is not None else out


def compute_loss(
    model: CrossCoder, x: torch.Tensor, inp: StepInput | None = None, **fields: Any
) -> LossOutput:
    """Forward ``x [batch, n_models, d_model]`` through ``model`` and return the loss and metrics.

    ``inp`` (:class:`StepInput`; keyword ``fields`` override or replace it) carries the sparsity coefficient,
    AuxK settings, dead mask, training progress and distributed context. The model's mode applies: in
    training mode BatchTopK selects over the batch and updates its threshold. ``inp.fast`` runs the
    architecture's fast path (same mathematics, see ``docs/performance.md``), else the plain dense path.

    ``loss = l2 + sparsity_coeff * sparsity + sum(fw.losses) + aux_coeff * aux`` where ``sparsity`` is the
    architecture's term (``fw.sparsity``) and ``fw.losses`` its further terms (already weighted).
    """
    inp = dataclasses.replace(inp or StepInput(), **fields) if fields else (inp or StepInput())
    arch = model.arch
    fw = arch(x, inp)
    x_hat = fw.x_hat
    l2_val = l2_loss(x, x_hat, inp.l2)
    loss = l2_val
    if arch.penalty_name is not None:
        loss = loss + inp.sparsity_coeff * fw.sparsity
    for v in fw.losses.values():
        loss = loss + v
    metrics: dict[str, torch.Tensor] = {}
    if inp.use_aux:
        if fw.aux_e_hat is None:  # no dead latent (known without a device read): the loss is exactly 0
            aux = torch.zeros((), device=x.device)
        else:
            aux = aux_loss_from(
                fw.aux_e_hat, (x - x_hat).detach(), fw.aux_scale, inp.dist_sum, inp.world_size
            )
            loss = loss + inp.aux_coeff * aux
        metrics["aux_loss"] = aux.detach()
    with torch.no_grad():
        metrics.update(loss=loss.detach(), l2_loss=l2_val.detach())
        if arch.penalty_name is not None:
            metrics[arch.penalty_name] = fw.sparsity.detach()
        metrics.update({k: v.detach() for k, v in fw.losses.items()})
        metrics.update(fw.metrics)
        metrics["l0_loss"] = fw.latents.l0()
        if model.shard is not None:
            _sum_over_shards(model, metrics, inp, list(fw.losses), metrics.get("aux_loss"))
        metrics.update(reconstruction_metrics(x, x_hat.detach(), inp.dist_sum))
    return LossOutput(loss=loss, metrics=metrics, latents=fw.latents, x_hat=x_hat.detach())


def _sum_over_shards(
    model: CrossCoder, metrics: dict[str, torch.Tensor], inp: StepInput, extra: list[str], aux: Any
) -> None:
    """A latent shard's sums over its own latents (sparsity term, further terms, L0) -> sums over the whole
    dictionary, and ``loss`` rebuilt from them (each shard's loss holds only its latents' terms)."""
    keys = [k for k in (model.arch.penalty_name, *extra, "l0_loss") if k is not None]
    vec = model.shard.sum_(torch.stack([metrics[k].float() for k in keys]))
    metrics.update(zip(keys, vec, strict=True))
    loss = metrics["l2_loss"] + sum((metrics[k] for k in extra), torch.zeros((), device=vec.device))
    if model.arch.penalty_name is not None:
        loss = loss + inp.sparsity_coeff * metrics[model.arch.penalty_name]
    if aux is not None:
        loss = loss + inp.aux_coeff * aux
    metrics["loss"] = loss
