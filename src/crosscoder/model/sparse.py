"""Sparse autograd kernels of the fast training paths (see ``docs/performance.md``).

Notation: ``B`` rows (tokens), ``H = d_latent``, ``D = n_models * d_model``, ``N`` selected entries
(a :class:`~crosscoder.model.selection.Selection`, or :class:`~crosscoder.model.selection.DeadColumns`).

:func:`sparse_encode` / :func:`sparse_decode`: the encoder values at selected entries and the decoder over
selected entries, with backward passes that touch only those entries (``embedding_bag`` and a sampled
dense-dense matmul) instead of dense ``[B, H]`` gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from .selection import DeadColumns, Selection, big_kernels


# ---------------------------------------------------------------------------------------------- autograd
class _SparseEncode(torch.autograd.Function):
    """Values of ``pre = x2 @ w_enc2 + b_enc`` (computed already, ``[B, H]``) at each group's entries:
    ``[N]`` for a :class:`Selection`, ``[B, n_dead]`` for :class:`DeadColumns`.

    Backward: for a selection with gradient ``g [N]``, ``grad w_enc2 += (CSR_t(g) @ x2).T`` (a sparse
    ``[H, B] x [B, D]`` product, as ``embedding_bag`` over the rows of ``x2``) and ``grad b_enc +=
    index_add(cols, g)``; for dead columns with ``g [B, n_dead]``, ``grad w_enc2[:, idx] += x2.T @ g``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x2: torch.Tensor,
        w_enc2: torch.Tensor,
        b_enc: torch.Tensor,
        pre: torch.Tensor,
        groups: tuple[Selection | DeadColumns, ...],
    ) -> tuple[torch.Tensor, ...]:
        ctx.groups = groups
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2, w_enc2)
        flat = pre.view(-1)
        return tuple(
            flat.index_select(0, g.flat).float()
            if isinstance(g, Selection)
            else pre.index_select(1, g.idx).float()
            for g in groups
        )

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x2, w_enc2 = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xf, h = x2.float(), w_enc2.shape[1]
        gx = gw_t = gw = gb = None
        for grp, g in zip(ctx.groups, grads, strict=True):
            if g is None or not isinstance(grp, Selection):
                continue
            g = g.float()
            if need_w:
                part = grp.by_col(xf, g)  # [H, D]
                gw_t = part if gw_t is None else gw_t.add_(part)
            if need_b:
                gb = torch.zeros(h, dtype=torch.float32, device=g.device) if gb is None else gb
                gb.index_add_(0, grp.cols, g)
            if need_x:
                part = grp.by_row(w_enc2.float().t(), g)  # [B, D]
                gx = part if gx is None else gx.add_(part)
        if gw_t is not None:
            with big_kernels():
                gw = gw_t.t().contiguous()
        for grp, g in zip(ctx.groups, grads, strict=True):
            if g is None or not isinstance(grp, DeadColumns):
                continue
            g = g.float()
            if need_w:
                gw = torch.zeros(w_enc2.shape, dtype=torch.float32, device=g.device) if gw is None else gw
                gw.index_add_(1, grp.idx, torch.mm(xf.t(), g))
            if need_b:
                gb = torch.zeros(h, dtype=torch.float32, device=g.device) if gb is None else gb
                gb.index_add_(0, grp.idx, g.sum(0))
            if need_x:
                part = torch.mm(g, w_enc2.float().index_select(1, grp.idx).t())
                gx = part if gx is None else gx.add_(part)
        return (
            gx.to(x2.dtype) if gx is not None else None,
            gw.to(w_enc2.dtype) if gw is not None else None,
            gb.to(w_enc2.dtype) if gb is not None else None,
            None,
            None,
        )


class _SparseDecode(torch.autograd.Function):
    """``out [B, D] = sum_e vals[e] * w2[cols[e]]`` into row ``rows[e]`` (``embedding_bag``, mode sum).

    Backward: ``grad vals = (g @ w2.T)`` sampled at the entries (SDDMM), ``grad w2 = CSR_t(vals) @ g``
    (``embedding_bag`` over the rows of ``g``).
    """

    @staticmethod
    def forward(ctx: Any, vals: torch.Tensor, w2: torch.Tensor, sel: Selection) -> torch.Tensor:
        ctx.sel = sel
        ctx.save_for_backward(vals, w2)
        return sel.by_row(w2, vals)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        vals, w2 = ctx.saved_tensors
        sel = ctx.sel
        g = g.contiguous().to(w2.dtype)
        gv = sel.sddmm(g, w2).to(vals.dtype) if ctx.needs_input_grad[0] else None
        gw = sel.by_col(g, vals) if ctx.needs_input_grad[1] else None
        return gv, gw, None


def sparse_encode(
    x2: torch.Tensor,
    w_enc2: torch.Tensor,
    b_enc: torch.Tensor,
    pre: torch.Tensor,
    groups: tuple[Selection | DeadColumns, ...],
) -> tuple[torch.Tensor, ...]:
    """``pre [B, H]`` (already ``x2 [B, D] @ w_enc2 [D, H] + b_enc [H]``, no graph) at each group's
    entries (float32 ``[N]`` or ``[B, n_dead]``), differentiable w.r.t. ``x2``, ``w_enc2`` and ``b_enc``."""
    with torch.autocast(pre.device.type, enabled=False):
        return _SparseEncode.apply(x2, w_enc2, b_enc, pre, groups)


def sparse_decode(vals: torch.Tensor, w2: torch.Tensor, sel: Selection) -> torch.Tensor:
    """``vals [N]``, ``w2 [H, D]`` -> ``[B, D]``: the decoder (no bias) over the selected entries."""
    with torch.autocast(w2.device.type, enabled=False):
        return _SparseDecode.apply(vals, w2, sel)
