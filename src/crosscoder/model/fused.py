"""The dense ReLU crosscoder step as one autograd function over reused buffers (the vanilla fast path).

``x2 [B, D]`` (``D = n_models * d_model``), ``w_enc2 [D, H]``, ``b_enc [H]``, ``w_dec2 [H, D]``,
``b_dec2 [1, D]``::

    f     = relu(x2 @ w_enc2 + b_enc)            [B, H]   written into a workspace buffer
    x_hat = f @ w_dec2 + b_dec2                  [B, D]
    fsum  = f.sum(0)                             [H]      (the L1 term is fsum . weight / B)

Backward with ``g = dL/dx_hat [B, D]`` and ``s = dL/dfsum [H]``::

    grad_pre = (g @ w_dec2.T + s) * (f > 0)      [B, H]   one addmm + threshold_backward, in place
    dw_dec2  = f.T @ g,   db_dec2 = g.sum(0)
    dw_enc2  = x2.T @ grad_pre,   db_enc = grad_pre.sum(0)

Five GEMMs, as autograd would do, but the two ``[B, H]`` temporaries live in a workspace (no page faults
from re-allocating them every step) and the elementwise work is fused into the GEMMs' ``beta`` terms and
one ``threshold_backward``. Under autocast the GEMMs run in the autocast dtype (float32 master weights).
"""

from __future__ import annotations

from typing import Any

import torch

from .selection import big_kernels
from .workspace import Workspace


class _DenseReLU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x2: torch.Tensor,
        w_enc2: torch.Tensor,
        b_enc: torch.Tensor,
        w_dec2: torch.Tensor,
        b_dec2: torch.Tensor,
        ws: Workspace,
        cdt: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, h = x2.shape[0], w_enc2.shape[1]
        xc, wec, wdc = x2.to(cdt), w_enc2.to(cdt), w_dec2.to(cdt)
        f = ws.get("f", (b, h), cdt, x2.device)
        torch.addmm(b_enc.to(cdt), xc, wec, out=f)
        f.relu_()
        x_hat = torch.addmm(b_dec2.to(cdt), f, wdc)
        fsum = f.sum(0, dtype=torch.float32)
        ctx.ws, ctx.cdt = ws, cdt
        ctx.dtypes = (x2.dtype, w_enc2.dtype, b_enc.dtype, w_dec2.dtype, b_dec2.dtype)
        ctx.save_for_backward(xc, wec, wdc, f)
        return x_hat, fsum

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None, s: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        with big_kernels():
            return _DenseReLU._backward(ctx, g, s)

    @staticmethod
    def _backward(
        ctx: Any, g: torch.Tensor | None, s: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        xc, wec, wdc, f = ctx.saved_tensors
        cdt = ctx.cdt
        b, h = f.shape
        need = ctx.needs_input_grad
        gp = ctx.ws.get("grad_pre", (b, h), cdt, f.device)
        if g is None:
            g = torch.zeros(b, wdc.shape[1], dtype=cdt, device=f.device)
        g = g.to(cdt).contiguous()
        if s is not None:
            torch.addmm(s.to(cdt).expand(b, h), g, wdc.t(), out=gp)
        else:
            torch.mm(g, wdc.t(), out=gp)
        torch.ops.aten.threshold_backward.grad_input(gp, f, 0, grad_input=gp)
        dt = ctx.dtypes
        gx = torch.mm(gp, wec.t()).to(dt[0]) if need[0] else None
        gw_enc = torch.mm(xc.t(), gp).to(dt[1]) if need[1] else None
        gb_enc = gp.sum(0, dtype=torch.float32).to(dt[2]) if need[2] else None
        gw_dec = torch.mm(f.t(), g).to(dt[3]) if need[3] else None
        gb_dec = g.sum(0, keepdim=True, dtype=torch.float32).to(dt[4]) if need[4] else None
        return gx, gw_enc, gb_enc, gw_dec, gb_dec, None, None


def dense_relu(
    x2: torch.Tensor,
    w_enc2: torch.Tensor,
    b_enc: torch.Tensor,
    w_dec2: torch.Tensor,
    b_dec2: torch.Tensor,
    ws: Workspace,
    cdt: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(x_hat [B, D], fsum [H], f [B, H])``; ``x_hat`` and ``fsum`` carry the graph, ``f`` is the
    workspace buffer (no graph; overwritten by the next call)."""
    with torch.autocast(x2.device.type, enabled=False), big_kernels():
        x_hat, fsum = _DenseReLU.apply(x2, w_enc2, b_enc, w_dec2, b_dec2, ws, cdt)
    return x_hat, fsum, ws.get("f", (x2.shape[0], w_enc2.shape[1]), cdt, x2.device)
