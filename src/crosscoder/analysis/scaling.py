"""Latent Scaling (Minder et al. 2025): how much of a latent's decoder direction each model really uses.

For latent ``j`` with decoder direction ``d_j`` (by default the fine-tuned model's decoder vector
``W_dec[j, ft]``), activations ``f_j(x_n)`` and a per-model target ``y_n^m``, the least-squares scale

    beta_j^m = argmin_b sum_n || b f_j(x_n) d_j - y_n^m ||^2
             = d_j^T sum_n f_j(x_n) y_n^m / (||d_j||^2 sum_n f_j(x_n)^2)

is fitted for two targets and every model ``m``:

* ``error``:          ``y^m = x_m - (x_hat_m - f_j d_j^m)``  (what latent ``j`` must explain once the
  rest of the reconstruction is subtracted; ``d_j^m = W_dec[j, m]``);
* ``reconstruction``: ``y^m = x_hat_m``                        (the crosscoder's reconstruction, biases
  included).

The ratios ``nu_error = beta_error^base / beta_error^ft`` and ``nu_reconstruction`` likewise tell
whether a latent that looks fine-tuned-only by its decoder norms is in fact present in the base model:
a large ``nu_error`` means the base activations carry the direction but the crosscoder left it in the
base error (*Complete Shrinkage*); a large ``nu_reconstruction`` means other latents reconstruct it
in the base model (*Latent Decoupling*). A genuinely fine-tuned-only latent has both near 0.

With ``direction="base"`` the mirror image is fitted (``d_j = W_dec[j, base]``) and ``nu`` is
``beta^ft / beta^base``: the same test for latents that look base-only. In general ``nu`` is the
other model's beta over the direction's own model's beta.

Everything is computed in the crosscoder's normalised training space, in one streaming pass over
chunks of ``n`` rows, with sums accumulated in float64. Targets are never materialised per latent:

    sum_n f_nj y_n^m . d_j = d_j . (sum_n f_nj x_m,n - sum_n f_nj x_hat_m,n) + (d_j . d_j^m) sum_n f_nj^2   (error)
    sum_n f_nj y_n^m . d_j = d_j . sum_n f_nj x_hat_m,n                                                (reconstruction)

so one product ``f^T [x | x_hat]`` per chunk serves both targets, both models and both directions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..model import CrossCoder

TARGETS = ("error", "reconstruction")
DIRECTIONS = {"base": 0, "ft": 1}


@dataclass
class LatentScalingResult:
    """Betas of one direction. ``beta_* [n_models, d_latent]``, ``nu_* [d_latent]``, ``n_active [d_latent]``."""

    direction: str
    beta_error: torch.Tensor
    beta_reconstruction: torch.Tensor
    n_active: torch.Tensor

    @property
    def own(self) -> int:
        return DIRECTIONS[self.direction]

    @property
    def other(self) -> int:
        return 1 - self.own

    def nu(self, target: str) -> torch.Tensor:
        """``[d_latent]`` other model's beta / own model's beta (NaN where the latent never fired or
        the own beta is not positive)."""
        beta = self.beta_error if target == "error" else self.beta_reconstruction
        own, other = beta[self.own], beta[self.other]
        return torch.where(own > 1e-6, other / own.clamp_min(1e-6), torch.full_like(own, float("nan")))

    @property
    def nu_error(self) -> torch.Tensor:
        return self.nu("error")

    @property
    def nu_reconstruction(self) -> torch.Tensor:
        return self.nu("reconstruction")


class ScalingAccumulator:
    """Streaming sums for Latent Scaling along both decoders. Feed chunks with :meth:`update`, then read
    :meth:`result` (``"ft"``: Minder et al.'s fit along the fine-tuned decoder; ``"base"``: the mirror).

    ``model`` must be in the normalised space (see :func:`crosscoder.analysis.scan.normalised_model`)
    and the chunks ``x`` normalised too. Per chunk, ``G = f^T [x | x_hat]`` (``[d_latent, 2 n_models
    d_model]``, computed in blocks of latents to bound memory) is dotted with each direction.
    """

    def __init__(self, model: CrossCoder, block_floats: int = 1 << 24) -> None:
        if model.cfg.n_models != 2:
            raise ValueError("Latent Scaling needs a two-model crosscoder")
        w = model.W_dec.detach().float()  # [h, M, d]
        self.w = w
        h, m, d = w.shape
        dev = w.device
        self.block = max(1, block_floats // (2 * m * d))
        # sums[k, 0/1, m, j]: sum_n f_nj (x_m . d_j^k) / sum_n f_nj (x_hat_m . d_j^k), direction k = base, ft
        self.sums = torch.zeros(2, 2, m, h, dtype=torch.float64, device=dev)
        self.s_f2 = torch.zeros(h, dtype=torch.float64, device=dev)
        self.n_active = torch.zeros(h, dtype=torch.long, device=dev)

    @torch.no_grad()
    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: object = None) -> None:
        """``x, x_hat [n, n_models, d_model]`` (normalised), ``f [n, d_latent]`` (``rows`` unused)."""
        n, m, d = x.shape
        y = torch.cat([x, x_hat], dim=1).reshape(n, 2 * m * d)  # [n, 2*M*d]
        for lo in range(0, f.shape[1], self.block):
            hi = min(lo + self.block, f.shape[1])
            g = (f[:, lo:hi].T @ y).view(hi - lo, 2, m, d)  # [b, x|x_hat, M, d]
            for k in range(2):
                dirs = self.w[lo:hi, k]  # [b, d]
                self.sums[k, :, :, lo:hi] += torch.einsum("btmd,bd->tmb", g, dirs).double()
        self.s_f2 += (f * f).sum(0).double()
        self.n_active += torch.count_nonzero(f, dim=0)

    def result(self, direction: str = "ft") -> LatentScalingResult:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: 'base' or 'ft', got {direction!r}")
        k = DIRECTIONS[direction]
        dirs = self.w[:, k].double()  # [h, d]
        dir_sq = dirs.pow(2).sum(-1)  # [h]
        dir_dot_dec = (self.w.double() * dirs[:, None, :]).sum(-1).T  # [M, h]: d_j . d_j^m
        s_fx, s_fxh = self.sums[k, 0], self.sums[k, 1]  # [M, h]
        den = dir_sq * self.s_f2
        ok = den > 0
        nan = torch.full_like(s_fx, float("nan"))
        err = torch.where(ok, (s_fx - s_fxh + dir_dot_dec * self.s_f2) / den.clamp_min(1e-30), nan)
        rec = torch.where(ok, s_fxh / den.clamp_min(1e-30), nan)
        return LatentScalingResult(direction, err.float().cpu(), rec.float().cpu(), self.n_active.cpu())


@torch.no_grad()
def latent_scaling(model: CrossCoder, batches: Iterable[torch.Tensor], direction: str = "ft",
                   normalised: bool = False) -> LatentScalingResult:
    """Fit Latent Scaling betas in one pass over ``batches`` (each ``[n, n_models, d_model]``).

    ``model`` may be the saved (folded) model: it is copied and unfolded, and raw batches are
    multiplied by its ``norm_scale``, unless ``normalised=True`` says both already are in the
    normalised space. The model runs in eval mode (BatchTopK uses its threshold).

    Example (notebook)::

        cc = CrossCoder.from_pretrained("runs/my-run")
        cache = PairedCache("caches/my-cache")
        res = latent_scaling(cc, (cache.read(np.arange(i, i + 4096)) for i in range(0, 65536, 4096)))
        res.nu_error, res.nu_reconstruction   # [d_latent]
    """
    from .scan import normalised_model

    norm = (model if normalised else normalised_model(model)).eval()
    scale = model.norm_scale.detach().float().view(1, -1, 1)
    acc = ScalingAccumulator(norm)
    dev = norm.W_dec.device
    for x in batches:
        x = x.float().to(dev) if normalised else (x.float().to(scale.device) * scale).to(dev)
        f = norm.encode(x)
        acc.update(x, f, norm.decode(f))
    return acc.result(direction)
