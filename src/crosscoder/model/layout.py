"""Which latents may use which model: dedicated partitions and designated shared latents.

The dictionary is laid out as ``[dedicated base | dedicated ft | designated shared | free]``:

* **dedicated** (Jiralerspong & Bricken 2026, "dedicated feature crosscoders"): the first
  ``dedicated_base`` latents read from and write to model 0 only, the next ``dedicated_ft`` model 1 only.
  Their encoder columns and decoder rows of the other model are exactly zero, at initialisation and after
  every step (their gradients are masked, so Adam's moments stay zero): exclusivity by construction.
* **designated shared** (Anthropic, "Insights on crosscoder model diffing", Feb 2025): ``shared_latents``
  latents whose decoder vector is one vector tied across models (identical in the normalised space: the
  copies start equal and receive the summed gradient, so every update is the same), with their own
  sparsity factor ``shared_sparsity_coeff`` (relative to the others'; Anthropic's example 3/30 = 0.1).
* **free**: the rest, an ordinary crosscoder.

Works with every architecture: penalties are multiplied by :meth:`LatentLayout.sparsity_scale`, selection
scores divided by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentLayout:
    d_latent: int
    n_models: int
    dedicated_base: int = 0
    dedicated_ft: int = 0
    shared: int = 0
    shared_factor: float = 0.1

    @classmethod
    def of(cls, cfg: object) -> LatentLayout:
        return cls(cfg.d_latent, cfg.n_models, cfg.dedicated_base, cfg.dedicated_ft, cfg.shared_latents,
                   cfg.shared_sparsity_coeff)

    @property
    def constrained(self) -> bool:
        return self.dedicated_base + self.dedicated_ft + self.shared > 0

    @property
    def base_only(self) -> slice:
        return slice(0, self.dedicated_base)

    @property
    def ft_only(self) -> slice:
        return slice(self.dedicated_base, self.dedicated_base + self.dedicated_ft)

    @property
    def tied(self) -> slice:
        start = self.dedicated_base + self.dedicated_ft
        return slice(start, start + self.shared)

    @property
    def free(self) -> slice:
        return slice(self.dedicated_base + self.dedicated_ft + self.shared, self.d_latent)

    def kinds(self) -> list[str]:
        """Per latent: ``base_only``, ``ft_only``, ``designated_shared`` or ``free``."""
        out = ["free"] * self.d_latent
        for name, s in (("base_only", self.base_only), ("ft_only", self.ft_only),
                        ("designated_shared", self.tied)):
            out[s] = [name] * (s.stop - s.start)
        return out

    def model_mask(self) -> torch.Tensor | None:
        """``[d_latent, n_models]`` float: 1 where latent ``i`` may read/write model ``m`` (None: all)."""
        if self.dedicated_base + self.dedicated_ft == 0:
            return None
        mask = torch.ones(self.d_latent, self.n_models)
        mask[self.base_only, 1:] = 0.0
        mask[self.ft_only, 0] = 0.0
        if self.n_models > 2:
            mask[self.ft_only, 2:] = 0.0
        return mask

    def sparsity_scale(self) -> torch.Tensor:
        """``[d_latent]``: ``shared_factor`` on designated shared latents, 1 elsewhere."""
        scale = torch.ones(self.d_latent)
        scale[self.tied] = self.shared_factor
        return scale

    @torch.no_grad()
    def apply_(self, w_enc: torch.Tensor, w_dec: torch.Tensor) -> None:
        """Impose the layout on ``w_enc [M, Dm, H]`` and ``w_dec [H, M, Dm]`` (in place): zero the forbidden
        blocks, copy model 0's decoder vector of each designated shared latent to every model."""
        mask = self.model_mask()
        if mask is not None:
            mask = mask.to(w_dec.device, w_dec.dtype)
            w_dec.mul_(mask[:, :, None])
            w_enc.mul_(mask.t()[:, None, :])
        if self.shared:
            w_dec[self.tied] = w_dec[self.tied, :1].expand(-1, self.n_models, -1)

    @torch.no_grad()
    def project_grads_(self, w_enc: torch.Tensor, w_dec: torch.Tensor) -> None:
        """Keep the layout through an optimiser step: mask the gradients of forbidden blocks, and give every
        copy of a tied decoder vector the summed gradient (the gradient of the one shared vector)."""
        mask = self.model_mask()
        if mask is not None:
            mask = mask.to(w_dec.device)
            if w_dec.grad is not None:
                w_dec.grad.mul_(mask[:, :, None].to(w_dec.grad.dtype))
            if w_enc.grad is not None:
                w_enc.grad.mul_(mask.t()[:, None, :].to(w_enc.grad.dtype))
        if self.shared and w_dec.grad is not None:
            g = w_dec.grad[self.tied].sum(1, keepdim=True)
            w_dec.grad[self.tied] = g.expand(-1, self.n_models, -1)
