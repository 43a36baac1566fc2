"""DistributedDataParallel wiring of the training step (``torchrun``; NCCL on GPU, gloo on CPU).

Each rank holds ``batch_size / world_size`` rows of every global batch (see
:class:`~crosscoder.data.loader.CacheBatches`). Everything that depends on the whole batch is made
global, so a run does not depend on the number of processes:

* gradients: DDP averages the ranks' gradients of their local batch means = the gradient of the
  global batch mean (equal shares);
* BatchTopK: the selection and the threshold come from the global batch
  (:meth:`~crosscoder.model.architectures.batchtopk.BatchTopK.select_batch`, given the distributed
  context in :class:`~crosscoder.model.StepInput`);
* AuxK: normalised by the global residual variance; explained variance from global SSE/SST;
* dead-latent counters: a latent fired if it fired on any rank (all-reduce MAX);
* logged metrics: averaged over ranks at each log step; only rank 0 writes logs and checkpoints.

With latent shards (``--latent-shards S``, :mod:`crosscoder.model.sharding`) all of this runs over the
data-parallel group of the ranks holding the same shard (``d.group``), and the selection over every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..distributed import Dist
from ..model import CrossCoder, LossOutput, StepInput, compute_loss


class LossModule(nn.Module):
    """Wraps a crosscoder so that DDP sees one forward: ``(x, inp) -> LossOutput`` of ``loss_fn``."""

    def __init__(self, model: CrossCoder, loss_fn: Any = compute_loss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, inp: StepInput) -> LossOutput:
        return self.loss_fn(self.model, x, inp)


def wrap(model: CrossCoder, d: Dist, device: torch.device, loss_fn: Any = compute_loss) -> nn.Module | None:
    """``None`` on one process (the step calls ``loss_fn`` itself); under torchrun a DDP-wrapped
    :class:`LossModule`."""
    if not d.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(LossModule(model, loss_fn), device_ids=ids, broadcast_buffers=False, process_group=d.group)


def global_fired(fired: torch.Tensor, d: Dist) -> torch.Tensor:
    """``fired [d_latent]`` bool on this rank -> fired on any rank."""
    if not d.enabled:
        return fired
    return d.all_reduce_max(fired.to(torch.uint8)).bool()


def mean_over_ranks(vec: torch.Tensor, d: Dist) -> torch.Tensor:
    """Average a metrics vector over ranks (identity on one process)."""
    if not d.enabled:
        return vec
    return d.all_reduce_sum(vec.clone()) / d.world_size
