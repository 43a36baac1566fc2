"""Latent Scaling (Minder et al. 2025): how much of a latent's decoder direction each model really uses.

For latent ``j`` with decoder direction ``d_j`` (by default the fine-tuned model's decoder vector
``W_dec[j, ft]``), activations ``f_nj = f_j(x_n)`` over ``N`` tokens and a per-model target ``y_n^m``, a
scale ``beta_j^m`` is fitted by least squares for two targets and every model ``m``:

* ``error``:          ``y^m = x_m - (x_hat_m - f_j d_j^m)``  (what latent ``j`` must explain once the
  rest of the reconstruction is subtracted; ``d_j^m = W_dec[j, m]``);
* ``reconstruction``: ``y^m = x_hat_m``                        (the crosscoder's reconstruction).

The ratios ``nu_error = beta_error^base / beta_error^ft`` and ``nu_reconstruction`` likewise tell
whether a latent that looks fine-tuned-only by its decoder norms is in fact present in the base model:
a large ``nu_error`` means the base activations carry the direction but the crosscoder left it in the
base error (*Complete Shrinkage*); a large ``nu_reconstruction`` means other latents reconstruct it
in the base model (*Latent Decoupling*). A genuinely fine-tuned-only latent has both near 0.
With ``direction="base"`` the mirror image is fitted (``d_j = W_dec[j, base]``, ``nu = beta^ft /
beta^base``). In general ``nu`` is the other model's beta over the direction's own model's beta.

**Fit modes** (``mode``; ``crosscoder analyze --latent-scaling-target``):

* ``literal`` (the papers and their published toolkit): no intercept,

      beta = sum_n f_nj <d_j, y_n> / (||d_j||^2 sum_n f_nj^2).

  A constant ``c`` in the targets adds ``<d_j, c> sum_n f_nj / (||d_j||^2 sum_n f_nj^2)`` to beta. The
  reconstruction contains the decoder bias ``b_dec[m]`` on every token, so the other model's beta picks
  up ``<d_j, b_dec[other]>`` (times ``E f / E f^2``) whether or not that model uses ``d_j``; residual
  streams have per-model means of many times a feature's norm, so this term can dominate ``nu``. The
  error target leaks the same way whenever ``x - x_hat`` keeps a mean (``b_dec`` misses the data mean).
* ``bias_free``: the same formula with the reconstruction target ``x_hat_m - b_dec[m]`` (the error
  target, which already subtracts ``b_dec``, unchanged). Removes the decoder bias, not a data mean that
  ``b_dec`` misses, nor the mean of dense latents.
* ``intercept`` (default): least squares with a free constant vector per target and model,

      min_{b, c} sum_n || b f_nj d_j + c - y_n ||^2.

  For fixed ``b`` the best ``c`` is ``mean_n (y_n - b f_nj d_j)``; substituting it centres both sides,
  and the components of ``y`` orthogonal to ``d_j`` drop out, leaving the simple regression

      beta = sum_n (f_nj - mean f_j) <d_j, y_n - mean y> / (||d_j||^2 sum_n (f_nj - mean f_j)^2)
           = (sum_n f_nj <d_j, y_n> - sum_n f_nj <d_j, sum_n y_n> / N)
             / (||d_j||^2 (sum_n f_nj^2 - (sum_n f_nj)^2 / N)).

  Adding any constant to ``y`` (decoder bias, data mean, dense latents' mean) leaves it unchanged
  exactly. Centring only the targets (no intercept) gives the same numerator over ``||d_j||^2 sum_n
  f_nj^2``, i.e. the same ``nu`` but both betas shrunk by ``var f / E f^2``; the intercept fit keeps a
  well-fitted latent's own beta at 1. A latent that takes the same value on every token is
  indistinguishable from the intercept: its betas are NaN.

Everything is computed in the crosscoder's normalised training space, in one streaming pass over
chunks of ``n`` rows, with sums accumulated in float64. Targets are never materialised per latent:

    sum_n f_nj <d_j, y_n^m> = d_j . (sum_n f_nj x_m,n - sum_n f_nj x_hat_m,n)
                              + (d_j . d_j^m) sum_n f_nj^2                     (error)
    sum_n f_nj <d_j, y_n^m> = d_j . sum_n f_nj x_hat_m,n                       (reconstruction)

so one product ``f^T [x - r | x_hat - r]`` per chunk serves both targets, both models, both directions
and all modes, with ``sum_n f_nj``, ``sum_n f_nj^2`` and ``sum_n [x_n | x_hat_n]``. ``r [n_models,
d_model]`` is a fixed reference (the first chunk's mean of ``x``), added back exactly in float64
(``sum_n f_nj <d, r>`` = ``<d, r> sum_n f_nj``): it keeps the float32 chunk products from cancelling
when the activations have a large mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import CrossCoderError
from ..model import CrossCoder

TARGETS = ("error", "reconstruction")
DIRECTIONS = {"base": 0, "ft": 1}
MODES = ("intercept", "bias_free", "literal")
DEFAULT_MODE = "intercept"


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a one-line :class:`CrossCoderError`."""
    if mode not in MODES:
        raise CrossCoderError(f"latent scaling target: one of {', '.join(MODES)}, got {mode!r}")
    return mode


@dataclass
class LatentScalingResult:
    """Betas of one direction. ``beta_* [n_models, d_latent]``, ``nu_* [d_latent]``, ``n_active [d_latent]``;
    ``mode``: the fit (:data:`MODES`)."""

    direction: str
    beta_error: torch.Tensor
    beta_reconstruction: torch.Tensor
    n_active: torch.Tensor
    mode: str = DEFAULT_MODE

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
    :meth:`result` (``"ft"``: Minder et al.'s fit along the fine-tuned decoder; ``"base"``: the mirror),
    for ``mode`` (default: the one given here; every mode comes from the same sums).

    ``model`` must be in the normalised space (see :func:`crosscoder.analysis.scan.normalised_model`)
    and the chunks ``x`` normalised too. Per chunk, ``G = f^T [x - r | x_hat - r]`` (``[d_latent,
    2 n_models d_model]``, computed in blocks of latents to bound memory) is dotted with each direction.
    """

    def __init__(self, model: CrossCoder, block_floats: int = 1 << 24, mode: str = DEFAULT_MODE) -> None:
        if model.cfg.n_models != 2:
            raise ValueError("Latent Scaling needs a two-model crosscoder")
        self.mode = check_mode(mode)
        w = model.W_dec.detach().float()  # [h, M, d]
        self.w = w
        self.b_dec = model.b_dec.detach().float().to(w.device)  # [M, d]
        h, m, d = w.shape
        dev = w.device
        self.block = max(1, block_floats // (2 * m * d))
        # sums[k, 0/1, m, j]: sum_n f_nj ((x_m - r_m) . d_j^k) / sum_n f_nj ((x_hat_m - r_m) . d_j^k),
        # direction k = base, ft
        self.sums = torch.zeros(2, 2, m, h, dtype=torch.float64, device=dev)
        self.s_f = torch.zeros(h, dtype=torch.float64, device=dev)
        self.s_f2 = torch.zeros(h, dtype=torch.float64, device=dev)
        self.s_y = torch.zeros(2, m, d, dtype=torch.float64, device=dev)  # sum_n [x - r | x_hat - r]
        self.ref: torch.Tensor | None = None  # r [M, d]
        self.n = 0
        self.n_active = torch.zeros(h, dtype=torch.long, device=dev)

    @torch.no_grad()
    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: object = None) -> None:
        """``x, x_hat [n, n_models, d_model]`` (normalised), ``f [n, d_latent]`` (``rows`` unused)."""
        n, m, d = x.shape
        if n == 0:
            return
        if self.ref is None:
            self.ref = x.float().mean(0)
        y3 = torch.stack([x.float() - self.ref, x_hat.float() - self.ref], dim=1)  # [n, 2, M, d]
        y = y3.reshape(n, 2 * m * d)
        for lo in range(0, f.shape[1], self.block):
            hi = min(lo + self.block, f.shape[1])
            g = (f[:, lo:hi].T @ y).view(hi - lo, 2, m, d)  # [b, x|x_hat, M, d]
            for k in range(2):
                dirs = self.w[lo:hi, k]  # [b, d]
                self.sums[k, :, :, lo:hi] += torch.einsum("btmd,bd->tmb", g, dirs).double()
        self.s_f += f.sum(0).double()
        self.s_f2 += (f * f).sum(0).double()
        self.s_y += y3.sum(0).double()  # centred on r: a float32 chunk sum is exact enough
        self.n += n
        self.n_active += torch.count_nonzero(f, dim=0)

    def result(self, direction: str = "ft", mode: str | None = None) -> LatentScalingResult:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: 'base' or 'ft', got {direction!r}")
        mode = check_mode(mode or self.mode)
        k = DIRECTIONS[direction]
        w = self.w.double()
        dirs = w[:, k]  # [h, d]
        dir_sq = dirs.pow(2).sum(-1)  # [h]
        dir_dot_dec = (w * dirs[:, None, :]).sum(-1).T  # [M, h]: d_j . d_j^m
        s_fx, s_fxh = self.sums[k, 0], self.sums[k, 1]  # [M, h], around r
        s_f, s_f2 = self.s_f, self.s_f2  # [h]
        if mode == "intercept":
            n = max(self.n, 1)
            # centred sums: sum_n f_nj <d_j, y_n> - sum_n f_nj <d_j, sum_n y_n> / N (r shifts y: no effect)
            y_err = (self.s_y[0] - self.s_y[1]) @ dirs.T + dir_dot_dec * s_f  # [M, h] <d_j, sum_n y_n^m>
            y_rec = self.s_y[1] @ dirs.T
            num_err = s_fx - s_fxh + dir_dot_dec * s_f2 - s_f * y_err / n
            num_rec = s_fxh - s_f * y_rec / n
            var = s_f2 - s_f * s_f / n  # N var f_j
            ok = (var > 1e-9 * s_f2) & (dir_sq > 0)
            den = dir_sq * var
        else:
            # sum_n f_nj <d_j, y_n^m>; r cancels in the error target and is added back to x_hat
            num_err = s_fx - s_fxh + dir_dot_dec * s_f2
            ref = torch.zeros_like(self.b_dec) if self.ref is None else self.ref  # [M, d]
            shift = (ref - self.b_dec if mode == "bias_free" else ref).double()  # x_hat - b_dec: bias-free
            num_rec = s_fxh + s_f * (shift @ dirs.T)
            den = dir_sq * s_f2
            ok = den > 0
        nan = torch.full_like(num_err, float("nan"))
        err = torch.where(ok, num_err / den.clamp_min(1e-30), nan)
        rec = torch.where(ok, num_rec / den.clamp_min(1e-30), nan)
        return LatentScalingResult(direction, err.float().cpu(), rec.float().cpu(), self.n_active.cpu(), mode)


@torch.no_grad()
def latent_scaling(
    model: CrossCoder,
    batches: Iterable[torch.Tensor],
    direction: str = "ft",
    normalised: bool = False,
    mode: str = DEFAULT_MODE,
) -> LatentScalingResult:
    """Fit Latent Scaling betas in one pass over ``batches`` (each ``[n, n_models, d_model]``).

    ``model`` may be the saved (folded) model: it is copied and unfolded, and raw batches are mapped to
    the normalised space with its ``norm_scale`` / ``norm_mean`` (:meth:`CrossCoder.normalize`), unless
    ``normalised=True`` says both already are in the normalised space. The model runs in eval mode
    (BatchTopK uses its threshold). ``mode``: ``"intercept"`` (default), ``"bias_free"`` or
    ``"literal"`` (see the module docstring).

    Example (notebook)::

        cc = CrossCoder.from_pretrained("runs/my-run")
        cache = PairedCache("caches/my-cache")
        res = latent_scaling(cc, (cache.read(np.arange(i, i + 4096)) for i in range(0, 65536, 4096)))
        res.nu_error, res.nu_reconstruction   # [d_latent]
    """
    from .scan import normalised_model

    norm = (model if normalised else normalised_model(model)).eval()
    acc = ScalingAccumulator(norm, mode=mode)
    dev = norm.W_dec.device
    for x in batches:
        x = x.float().to(dev) if normalised else model.normalize(x.to(model.norm_scale.device)).to(dev)
        f = norm.encode(x)
        acc.update(x, f, norm.decode(f))
    return acc.result(direction)
