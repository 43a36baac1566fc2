"""Sparse kernels of the fast training paths (see ``docs/performance.md``).

Notation: ``B`` rows (tokens), ``H = d_latent``, ``D = n_models * d_model``, ``N`` selected entries.

* :class:`Selection`: a set of ``(row, latent)`` entries of a ``[B, H]`` matrix, sorted by row then latent
  (CSR order), with the latent-major order precomputed for the backward passes.
* :func:`select_batch_topk`: the exact batch top-k of ``relu(pre) * weight`` without sorting ``B * H``
  scores; :func:`select_above`: entries whose score exceeds a threshold; :func:`select_aux`: the AuxK
  entries, among dead latents only.
* :func:`sparse_encode` / :func:`sparse_decode`: the encoder values at selected entries and the decoder
  over selected entries, with backward passes that touch only those entries (``embedding_bag`` and a
  sampled dense-dense matmul) instead of dense ``[B, H]`` gradients.

Large temporaries live in a :class:`~crosscoder.model.workspace.Workspace`; big kernels run inside
:func:`~crosscoder.model.workspace.big_kernels` (see there for the CPU thread policy).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .workspace import Workspace, big_kernels

# Candidate thresholds are lowered by this relative margin so that rounding in ``pre > t / w`` can never
# exclude an entry whose exact score ``relu(pre) * w`` exceeds ``t`` (see :func:`_candidates`).
_MARGIN = 2.0**-20
_SAMPLE = 1 << 16


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


@dataclass
class Selection:
    """Entries ``(rows[e], cols[e])`` of a ``[n_rows, n_cols]`` matrix, sorted by row then column.

    ``flat [N]`` = ``rows * n_cols + cols`` (ascending); ``row_ptr [n_rows + 1]`` CSR row pointers;
    ``col_perm [N]`` orders the entries by column (stable, so rows stay ascending), ``col_ptr [n_cols + 1]``
    and ``rows_by_col [N]`` are the matching CSC pointers and row indices.
    """

    flat: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    row_ptr: torch.Tensor
    col_perm: torch.Tensor
    col_ptr: torch.Tensor
    rows_by_col: torch.Tensor
    n_rows: int
    n_cols: int

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_rows: int, n_cols: int) -> Selection:
        """``flat [N]`` ascending flat indices into ``[n_rows, n_cols]`` (no host synchronisation)."""
        flat = flat.reshape(-1)
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        cols = flat - rows * n_cols
        dev = flat.device
        row_ptr = torch.searchsorted(rows, torch.arange(n_rows + 1, device=dev))
        cols_sorted, col_perm = torch.sort(cols, stable=True)
        col_ptr = torch.searchsorted(cols_sorted, torch.arange(n_cols + 1, device=dev))
        return cls(flat, rows, cols, row_ptr, col_perm, col_ptr, rows[col_perm], n_rows, n_cols)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """``values [N]`` (entry order) -> sparse CSR ``[n_rows, n_cols]``."""
        return _csr(self.row_ptr, self.cols, values, (self.n_rows, self.n_cols))

    def by_col(self, table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``out [n_cols, D]``, ``out[c] = sum_{e: cols[e] = c} values[e] * table[rows[e]]`` for
        ``table [n_rows, D]`` (the transpose-side product ``CSR_t(values) @ table``, as ``embedding_bag``)."""
        return F.embedding_bag(self.rows_by_col, table, self.col_ptr, mode="sum",
                               per_sample_weights=values.index_select(0, self.col_perm).to(table.dtype),
                               include_last_offset=True)

    def by_row(self, table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``out [n_rows, D]``, ``out[r] = sum_{e: rows[e] = r} values[e] * table[cols[e]]`` for
        ``table [n_cols, D]`` (``CSR(values) @ table``, as ``embedding_bag``)."""
        return F.embedding_bag(self.cols, table, self.row_ptr, mode="sum", per_sample_weights=values.to(table.dtype),
                               include_last_offset=True)

    def sddmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(a @ b.T)`` at the entries: ``a [n_rows, D]``, ``b [n_cols, D]`` -> ``[N]`` (entry order)."""
        zeros = torch.zeros(self.flat.numel(), dtype=a.dtype, device=a.device)
        return torch.sparse.sampled_addmm(self.csr(zeros), a, b.t(), beta=0.0).values()


# ---------------------------------------------------------------------------------------------- selection
def _candidates(pre: torch.Tensor, weight: torch.Tensor, t: float, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (ascending) and exact scores of a superset of ``{relu(pre) * weight > t}``.

    The test is ``pre > t (1 - 2^-20) / weight`` per latent (no ``[B, H]`` score matrix is written); an
    entry left out has score ``<= t (1 - 2^-20)(1 + 2^-23)^2 < t``, so nothing above ``t`` is missed.
    Scores of the candidates are recomputed exactly as ``relu(pre) * weight``.
    """
    b, h = pre.shape
    w = weight.float()  # scores are float32 whatever the dtype of pre (as relu(pre) * weight promotes)
    if t > 0:
        thr = torch.where(w > 0, (t * (1 - _MARGIN)) / w, torch.full_like(w, math.inf))
    else:  # t == 0: every positive score (pre > 0 and w > 0)
        thr = torch.where(w > 0, torch.zeros_like(w), torch.full_like(w, math.inf))
    total = b * h
    padded = -(-total // 8) * 8
    mask = ws.get("mask", (padded,), torch.bool, pre.device)
    if padded > total:
        mask[total:] = False
    with big_kernels():
        torch.gt(pre, thr, out=mask[:total].view(b, h))
        # nonzero over 64-bit words first: ~8x fewer elements to scan, then the bits of the hit words.
        words = torch.nonzero(mask.view(torch.int64)).squeeze(1)
    bits = torch.nonzero(mask.view(-1, 8).index_select(0, words))
    flat = words.index_select(0, bits[:, 0]) * 8 + bits[:, 1]
    scores = pre.view(-1).index_select(0, flat).float().clamp_min(0) * w.index_select(0, flat % h)
    return flat, scores


def _dense_scores(pre: torch.Tensor, weight: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """``relu(pre) * weight`` in float32 ``[B, H]``, in a reused buffer (the sync-free methods)."""
    scores = ws.get("scores", tuple(pre.shape), torch.float32, pre.device)
    with big_kernels():
        scores.copy_(pre)
        return scores.clamp_min_(0).mul_(weight.to(torch.float32))


@torch.compiler.disable
def select_batch_topk(pre: torch.Tensor, weight: torch.Tensor, n_keep: int, method: str,
                      ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n_keep`` largest ``relu(pre) * weight`` over the whole ``pre [B, H]`` (``weight [H] >= 0``).

    Returns ``(flat [N], scores [N])``, flat indices ascending. Ties at the boundary are broken
    arbitrarily, as ``torch.topk`` does.

    * ``method="threshold"`` (CPU): a threshold ``t0`` is guessed from a strided sample of 65536 scores so
      that about 1.3 ``n_keep`` entries exceed it; the candidates above it are collected with one compare
      and one ``nonzero`` and the exact top ``n_keep`` taken among them. It is exact when at least ``n_keep``
      candidates score above ``t0`` (checked with one host read; otherwise ``t0`` is lowered and retried;
      ``t0 = 0`` takes every positive score). Entries with score 0 are never returned, so fewer than
      ``n_keep`` come back when fewer scores are positive.
    * ``method="topk"`` (CUDA): one ``topk`` over the flattened scores (a radix select on GPU), no host
      synchronisation; zero-score entries may be returned when fewer than ``n_keep`` are positive (removing
      them would read their count on the host): the caller must treat them as inactive, as
      :meth:`~crosscoder.model.registry.BatchTopK.forward_fast` does with a ``scores > 0`` mask.

    Either way the active entries are the positive ones among the top ``n_keep`` scores, the rule of
    :meth:`~crosscoder.model.registry.BatchTopK.activate`.
    """
    b, h = pre.shape
    total = b * h
    n_keep = min(n_keep, total)
    if method == "topk":
        scores = _dense_scores(pre, weight, ws)
        with big_kernels():
            vals, flat = scores.view(-1).topk(n_keep, sorted=False)
        flat, order = flat.sort()
        return flat, vals[order]
    if method != "threshold":
        raise ValueError(f"unknown selection method {method!r}")
    stride = max(1, total // _SAMPLE)
    while math.gcd(stride, h) != 1 and stride > 1:  # a stride sharing factors with H samples few latents
        stride += 1
    pos = torch.arange(0, total, stride, device=pre.device)
    sample = pre.view(-1).index_select(0, pos).float().clamp_min(0) * weight.float()[pos % h]
    m = sample.numel()
    expected = n_keep * m / total
    j = int(1.3 * expected + 4 * math.sqrt(expected) + 8)
    while True:
        t0 = 0.0 if j >= m else max(float(sample.topk(j, sorted=False).values.min()), 0.0)
        flat, scores = _candidates(pre, weight, t0, ws)
        if t0 == 0.0:
            keep = scores > 0
            flat, scores = flat[keep], scores[keep]
            break
        if int((scores > t0).sum()) >= n_keep:
            break
        j *= 4
    if flat.numel() > n_keep:
        top = scores.topk(n_keep, sorted=False).indices.sort().values
        flat, scores = flat[top], scores[top]
    return flat, scores


@torch.compiler.disable
def select_above(pre: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, method: str,
                 ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries with ``relu(pre) * weight > threshold`` (the BatchTopK inference rule): ``(flat, scores)``."""
    if method == "threshold":
        t = float(threshold)
        flat, scores = _candidates(pre, weight, max(t, 0.0), ws)
        keep = scores > t
        return flat[keep], scores[keep]
    scores = _dense_scores(pre, weight, ws)
    flat = torch.nonzero(scores.view(-1) > threshold).squeeze(1)
    return flat, scores.view(-1)[flat]


@dataclass
class DeadColumns:
    """AuxK entries as a dense sub-matrix over the dead latents: ``idx [n_dead]`` (ascending) and
    ``mask [B, n_dead]`` (1.0 on each row's top ``aux_k``; ``None`` when every entry is kept)."""

    idx: torch.Tensor
    mask: torch.Tensor | None


# Below this fraction of kept entries among the dead columns AuxK runs on sparse entries; above it, GEMMs
# over the dead columns are cheaper (sparse kernels run ~10-20x below GEMM speed on CPU).
AUX_SPARSE_DENSITY = 1 / 16


@torch.compiler.disable
def select_aux(pre: torch.Tensor, dead: torch.Tensor, aux_k: int, method: str,
               ws: Workspace) -> Selection | DeadColumns | None:
    """AuxK entries: per row, the top ``aux_k`` of ``relu(pre)`` among dead latents (``dead [H]`` bool).

    * ``method="threshold"`` (CPU): reads the dead latents' indices on the host (``None`` when none is
      dead) and works on their columns only: a :class:`DeadColumns` sub-matrix when each row keeps more
      than 1/16 of them, else the positive entries of each row's top ``min(aux_k, n_dead)`` as a
      :class:`Selection`.
    * ``method="topk"`` (CUDA, no host synchronisation): per-row ``topk`` of ``relu(pre) * dead`` over all
      latents, exactly as the dense rule, as a :class:`Selection`; entries of value 0 carry no value and
      no gradient.
    """
    b, h = pre.shape
    if method == "threshold":
        dead_idx = torch.nonzero(dead).squeeze(1)
        n_dead = dead_idx.numel()
        if n_dead == 0:
            return None
        ka = min(aux_k, n_dead)
        sub = pre.index_select(1, dead_idx).clamp_min_(0)  # [B, n_dead]
        if ka >= AUX_SPARSE_DENSITY * n_dead:
            if ka == n_dead:
                return DeadColumns(dead_idx, None)
            j = sub.topk(ka, dim=1, sorted=False).indices
            return DeadColumns(dead_idx, torch.zeros_like(sub).scatter_(1, j, 1.0))
        j = sub.topk(ka, dim=1, sorted=False).indices.sort(dim=1).values
        keep = sub.gather(1, j) > 0
        rows = torch.arange(b, device=pre.device)[:, None].expand_as(j)[keep]
        return Selection.from_flat(rows * h + dead_idx[j[keep]], b, h)
    masked = _dense_scores(pre, dead, ws)
    with big_kernels():
        j = masked.topk(min(aux_k, h), dim=1, sorted=False).indices.sort(dim=1).values
    flat = (torch.arange(b, device=pre.device)[:, None] * h + j).reshape(-1)
    return Selection.from_flat(flat, b, h)


# ---------------------------------------------------------------------------------------------- autograd
class _SparseEncode(torch.autograd.Function):
    """Values of ``pre = x2 @ w_enc2 + b_enc`` (computed already, ``[B, H]``) at each group's entries:
    ``[N]`` for a :class:`Selection`, ``[B, n_dead]`` for :class:`DeadColumns`.

    Backward: for a selection with gradient ``g [N]``, ``grad w_enc2 += (CSR_t(g) @ x2).T`` (a sparse
    ``[H, B] x [B, D]`` product, as ``embedding_bag`` over the rows of ``x2``) and ``grad b_enc +=
    index_add(cols, g)``; for dead columns with ``g [B, n_dead]``, ``grad w_enc2[:, idx] += x2.T @ g``.
    """

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, w_enc2: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor,
                groups: tuple[Selection | DeadColumns, ...]) -> tuple[torch.Tensor, ...]:
        ctx.groups = groups
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2, w_enc2)
        flat = pre.view(-1)
        return tuple(flat.index_select(0, g.flat).float() if isinstance(g, Selection)
                     else pre.index_select(1, g.idx).float() for g in groups)

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
        return (gx.to(x2.dtype) if gx is not None else None, gw.to(w_enc2.dtype) if gw is not None else None,
                gb.to(w_enc2.dtype) if gb is not None else None, None, None)


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


def sparse_encode(x2: torch.Tensor, w_enc2: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor,
                  groups: tuple[Selection | DeadColumns, ...]) -> tuple[torch.Tensor, ...]:
    """``pre [B, H]`` (already ``x2 [B, D] @ w_enc2 [D, H] + b_enc [H]``, no graph) at each group's
    entries (float32 ``[N]`` or ``[B, n_dead]``), differentiable w.r.t. ``x2``, ``w_enc2`` and ``b_enc``."""
    with torch.autocast(pre.device.type, enabled=False):
        return _SparseEncode.apply(x2, w_enc2, b_enc, pre, groups)


def sparse_decode(vals: torch.Tensor, w2: torch.Tensor, sel: Selection) -> torch.Tensor:
    """``vals [N]``, ``w2 [H, D]`` -> ``[B, D]``: the decoder (no bias) over the selected entries."""
    with torch.autocast(w2.device.type, enabled=False):
        return _SparseDecode.apply(vals, w2, sel)
