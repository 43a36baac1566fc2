"""JumpReLU crosscoder (Rajamanoharan et al. 2024; Anthropic's crosscoder update, Jan 2025).

For ``x [B, M, Dm]``, pre-activations ``z [B, H]``, per-latent thresholds ``theta [H] > 0`` (stored as
``log_threshold``) and decoder-norm weights ``w [H]``::

    f_bi = z_bi * H(z_bi - theta_i)                                    JumpReLU
    loss = sum_m ||x_m - x_hat_m||^2 + l1_coeff * S + preact_coeff * P
    S    = mean_b sum_i tanh(c f_bi w_i)               (--jumprelu-sparsity tanh, default; c = tanh scale)
         = mean_b sum_i H(z_bi - theta_i)              (--jumprelu-sparsity step: L0)
    P    = mean_b sum_i relu(theta_i - z_bi) w_i       (pre-activation loss: pulls dead latents up)

Both sparsity terms are functions of the decoder-norm-weighted activation ``f w`` (``H(f w) = H(f)``) and
so, like ``P``, invariant to rescaling a latent (``W_dec[i] * a``, ``W_enc[..., i] / a``, ``theta_i / a``);
weighting the step by ``w`` would not be: training then shrinks decoder norms instead of raising
thresholds (measured: L0 stayed at 214 of 512 latents on the built-in pair while the term fell 8x).
Designated shared latents multiply either term by their factor (:mod:`crosscoder.model.layout`).

``H`` has no derivative, so ``theta`` learns through straight-through estimators with a rectangle
kernel ``K(u) = 1[|u| < 1/2]`` of bandwidth ``eps`` (``--jumprelu-bandwidth``)::

    d f_bi / d theta_i     = -(theta_i / eps) K((z_bi - theta_i) / eps)
    d H(z_bi - theta_i) / d theta_i = -(1 / eps) K((z_bi - theta_i) / eps)

and ``d f / d z = H(z - theta)``; the step has no gradient w.r.t. ``z``. The thresholds are saved with
the model (``threshold [d_latent]`` in ``model.safetensors``) and used as they are at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError, CrossCoderError
from ...fields import option
from ..registry import register
from .base import Architecture, StepInput


@dataclass
class JumpReLUOptions:
    jumprelu_sparsity: str = option(
        "tanh", "jumprelu: sparsity term: tanh(c f w) (Anthropic) or L0 (step)", choices=("tanh", "step")
    )
    jumprelu_bandwidth: float = option(0.1, "jumprelu: kernel bandwidth of the straight-through estimator")
    jumprelu_init_threshold: float = option(1.0, "jumprelu: initial threshold of every latent")
    jumprelu_tanh_scale: float = option(4.0, "jumprelu: c in tanh(c * f * w) (--jumprelu-sparsity tanh)")
    jumprelu_preact_coeff: float = option(0.01, "jumprelu: coefficient of the pre-activation loss (0 = off)")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``f = z * H(z - theta)``; ``z [B, H]``, ``theta [H]``; straight-through gradient for ``theta``."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return torch.where(z > theta, z, torch.zeros_like(z))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = g * (z > theta) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = (-(theta / eps) * _rectangle((z - theta) / eps) * g).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(z - theta)``; no gradient for ``z``, straight-through gradient for ``theta``."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, theta = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = (-(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g).sum(0)
        return None, grad_theta, None


@register("jumprelu")
class JumpReLU(Architecture):
    """Per-latent learned thresholds; L0 (or tanh) sparsity on decoder-norm-weighted activations."""

    Options = JumpReLUOptions
    penalty_name = "sparsity_loss"
    latent_dims = {"log_threshold": 0}

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        cfg = model.cfg
        self.log_threshold = torch.nn.Parameter(
            torch.full((cfg.d_latent,), math.log(cfg.jumprelu_init_threshold))
        )

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_tanh_scale"):
            if not getattr(cfg, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(cfg, name)}")
        if cfg.jumprelu_preact_coeff < 0:
            raise ConfigError(f"jumprelu_preact_coeff: must be >= 0, got {cfg.jumprelu_preact_coeff}")

    def theta(self) -> torch.Tensor:
        """``theta [d_latent]`` (positive)."""
        return self.log_threshold.exp()

    def activate(
        self, pre: torch.Tensor, weight: torch.Tensor, training: bool, inp: StepInput | None = None
    ) -> torch.Tensor:
        return _JumpReLU.apply(pre, self.theta(), self.model.cfg.jumprelu_bandwidth)

    def activate_entries(self, pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return torch.where(pre > self.theta()[latents], pre, torch.zeros_like(pre))

    def penalty(self, f: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        cfg = self.model.cfg
        if cfg.jumprelu_sparsity == "tanh":
            return torch.tanh(cfg.jumprelu_tanh_scale * f * weight).sum(-1).mean()
        active = _Step.apply(
            pre, self.theta(), cfg.jumprelu_bandwidth
        )  # H(f w) = H(f): decoder norms drop out
        return (active * self.model.sparsity_scale).sum(-1).mean()

    def extra_losses(
        self, f: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        coeff = self.model.cfg.jumprelu_preact_coeff
        if coeff <= 0:
            return {}
        gap = torch.relu(self.theta() - pre)  # [B, H]: how far below its threshold each latent is
        return {"preact_loss": coeff * (gap * weight).sum(-1).mean()}

    # ------------------------------------------------------------------ state
    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """``threshold [d_latent]`` (the SAE libraries' name) and ``log_threshold`` (the exact state)."""
        return {
            "threshold": self.theta().detach().cpu().contiguous(),
            "log_threshold": self.log_threshold.detach().cpu().contiguous(),
        }

    def load_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        shape = tuple(self.log_threshold.shape)
        log_t = tensors.get("log_threshold")
        if log_t is None and tensors.get("threshold") is not None:  # a file with thresholds only
            t = tensors["threshold"]
            log_t = t.log() if t.shape == shape and bool((t > 0).all()) else None
        if log_t is None or tuple(log_t.shape) != shape:
            raise CrossCoderError(f"{where}: jumprelu needs a positive 'threshold' of shape {shape}")
        with torch.no_grad():
            self.log_threshold.copy_(log_t)

    def log_metrics(self) -> dict[str, float]:
        theta = self.theta().detach()
        if self.model.shard is not None:  # the median over the whole dictionary
            theta = self.model.shard.gather(theta)
        return {"threshold_median": float(theta.median())}
