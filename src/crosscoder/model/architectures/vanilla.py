"""Vanilla crosscoder: ReLU latents, L1 penalty weighted by decoder norms (Anthropic, Oct 2024; Kissane).

For ``x [B, M, Dm]``::

    f    = relu(sum_m x_m W_enc[m] + b_enc)                 [B, H]
    x_hat_m = f W_dec[:, m] + b_dec[m]                      [B, M, Dm]
    loss = sum_m ||x_m - x_hat_m||^2 + l1_coeff * sum_i f_i w_i,   w_i = sum_m ||W_dec[i, m]||

(``w_i`` the norm of the concatenated decoder vectors with ``--l1-weighting concat``.)
"""

from __future__ import annotations

import torch

from ..fused import dense_relu
from ..registry import register
from ..selection import big_kernels
from ..workspace import compute_dtype
from .base import Architecture, ForwardOut, Latents, StepInput


@register("vanilla")
class Vanilla(Architecture):
    """ReLU latents with a decoder-norm-weighted L1 penalty.

    Fast path: :func:`~crosscoder.model.fused.dense_relu` (five GEMMs over reused buffers, the L1 term
    from column sums); AuxK, when enabled, over the dead latents only.
    """

    penalty_name = "l1_loss"
    has_fast_path = True
    # Designated shared latents at a tenth of the L1 (Anthropic's 3/30) turned dense and took the shared
    # variance in mixtures on the planted family (12.5% shared: MMCS 0.90 / 0.86 and exclusive recall
    # 0.66 / 0.27 on default / crowded, seed 0); at half it is 0.987 / 0.969 and 1.00 / 0.98.
    default_shared_factor = 0.5

    def activate(
        self, pre: torch.Tensor, weight: torch.Tensor, training: bool, inp: StepInput | None = None
    ) -> torch.Tensor:
        return torch.relu(pre)

    def forward_fast(self, x: torch.Tensor, inp: StepInput) -> ForwardOut:
        b = x.shape[0]
        x2 = x.reshape(b, -1)
        cdt = compute_dtype(x.device)
        w_enc2, b_enc, w_dec2, b_dec2 = self.params2()
        if self.model.shard is None:
            x_hat, fsum, f = dense_relu(x2, w_enc2, b_enc, w_dec2, b_dec2, self.ws, cdt)
        else:  # this shard's partial reconstruction, summed over the shards, then + b_dec
            partial, fsum, f = dense_relu(x2, w_enc2, b_enc, w_dec2, torch.zeros_like(b_dec2), self.ws, cdt)
            x_hat = self.model.add_partials(partial)
        with torch.no_grad(), big_kernels():  # l0 = mean_b #{f > 0}: float compare into a reused buffer
            tmp = self.ws.get("grad_pre", tuple(f.shape), f.dtype, f.device)
            l0 = torch.gt(f, 0, out=tmp).sum(-1, dtype=torch.float32).mean()
        latents = Latents(tuple(f.shape), dense=f, fired=fsum.detach() > 0, l0=l0, aliased=True)
        _, e_hat, scale = self.encode_with_aux(x2, f, (), inp)
        return ForwardOut(x_hat.view_as(x), (fsum * self.weight()).sum() / b, latents, e_hat, scale)
