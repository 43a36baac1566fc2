"""Architecture registry: how pre-activations become latents, and which sparsity penalty applies.

Every architecture shares the encoder/decoder of :class:`~crosscoder.model.crosscoder.CrossCoder` and
the loss/metrics path of :mod:`crosscoder.model.losses`; an architecture only decides

* ``activate(pre, weight, training)``: latents ``f [batch, d_latent]`` from pre-activations
  ``pre [batch, d_latent]`` and the per-latent decoder-norm weight ``weight [d_latent]``;
* ``uses_l1``: whether the L1 penalty enters the loss.

Register a new one with ``@register("name")`` on a subclass of :class:`Architecture`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(name: str) -> Callable[[type[Architecture]], type[Architecture]]:
    def deco(cls: type[Architecture]) -> type[Architecture]:
        cls.name = name
        ARCHITECTURES[name] = cls
        return cls

    return deco


def get_architecture(name: str) -> type[Architecture]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}") from None


class Architecture:
    """Base class. Instances live inside a CrossCoder and may own buffers through it."""

    name: str = ""
    uses_l1: bool = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def activate(self, pre: torch.Tensor, weight: torch.Tensor, training: bool) -> torch.Tensor:
        """``pre [batch, d_latent]``, ``weight [d_latent]`` -> ``f [batch, d_latent]`` (>= 0)."""
        raise NotImplementedError


@register("vanilla")
class Vanilla(Architecture):
    """ReLU latents with an L1 penalty weighted by decoder norms (Anthropic, Kissane)."""

    uses_l1 = True

    def activate(self, pre: torch.Tensor, weight: torch.Tensor, training: bool) -> torch.Tensor:
        return torch.relu(pre)


@register("batchtopk")
class BatchTopK(Architecture):
    """Keep the ``k * batch`` largest ``relu(pre) * weight`` over the whole batch (raw values kept).

    While training, the smallest kept score feeds an EMA (``threshold_beta``) stored in the model's
    ``threshold`` buffer; in eval mode a latent is active when its score exceeds that threshold, so
    inference does not depend on the batch. Before any training step (threshold < 0) eval mode falls
    back to the batch rule without touching the threshold.
    """

    def activate(self, pre: torch.Tensor, weight: torch.Tensor, training: bool) -> torch.Tensor:
        acts = torch.relu(pre)
        scores = acts * weight
        model = self.model
        if not training and bool(model.threshold >= 0):
            return acts * (scores > model.threshold)
        n_keep = min(model.cfg.k * pre.shape[0], scores.numel())
        vals, idx = scores.flatten().topk(n_keep, sorted=False)
        mask = torch.zeros_like(scores).flatten().scatter_(0, idx, 1.0).view_as(scores)
        if training:
            model.update_threshold(vals)
        return acts * mask
