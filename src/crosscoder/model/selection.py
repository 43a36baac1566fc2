"""Which entries of ``[batch, d_latent]`` are active: the selection machinery of the sparse paths.

Notation: ``B`` rows (tokens), ``H = d_latent``, ``N`` selected entries.

* :class:`Selection`: a set of ``(row, latent)`` entries of a ``[B, H]`` matrix, sorted by row then latent
  (CSR order), with the latent-major order precomputed for the backward passes.
* :func:`select_batch_topk`: the exact batch top-k of ``relu(pre) * weight``; on CPU without sorting
  ``B * H`` scores (a threshold sampled from a strided subset, then candidate 64-bit words of a compare
  mask), on CUDA one ``topk`` without host synchronisation.
* :func:`select_above`: entries whose score exceeds a threshold (BatchTopK at inference).
* :func:`select_aux`: the AuxK entries, among dead latents only (on CPU a dense sub-matrix over the dead
  columns when that is cheaper, :class:`DeadColumns`).
* The CPU thread policy these kernels run under (:func:`serial_small_ops`, :func:`big_kernels`).

Architectures call these; the maths next to each architecture stays the paper's (see
``docs/architectures.md``). The autograd kernels that consume a selection are in
:mod:`crosscoder.model.sparse`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .workspace import Workspace

# ---------------------------------------------------------------------------------------------- threads
_BIG_THREADS = [0]  # thread count of big_kernels() regions while serial_small_ops() is active (0: inactive)


@contextmanager
def serial_small_ops(threads: int) -> Iterator[None]:
    """Run enclosed CPU work on one thread, except :func:`big_kernels` regions, which use ``threads``.

    A parallel region costs a barrier; over the ~10^5-element tensors of the sparse paths that costs more
    than it saves, and on a shared machine each barrier waits for a scheduler time slice whenever another
    process holds a core (2 threads then ran the BatchTopK step ~4x slower than 1). GEMMs and passes over
    ``[batch, d_latent]`` amortise it and keep ``threads``. No-op for ``threads <= 1``.
    """
    if threads <= 1 or _BIG_THREADS[0]:
        yield
        return
    prev = torch.get_num_threads()
    _BIG_THREADS[0] = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _BIG_THREADS[0] = 0
        torch.set_num_threads(prev)


@contextmanager
def big_kernels() -> Iterator[None]:
    """Inside :func:`serial_small_ops`: run the enclosed (large) kernels with its thread count."""
    n = _BIG_THREADS[0]
    if n <= 1:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


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
        return F.embedding_bag(
            self.rows_by_col,
            table,
            self.col_ptr,
            mode="sum",
            per_sample_weights=values.index_select(0, self.col_perm).to(table.dtype),
            include_last_offset=True,
        )

    def by_row(self, table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``out [n_rows, D]``, ``out[r] = sum_{e: rows[e] = r} values[e] * table[cols[e]]`` for
        ``table [n_cols, D]`` (``CSR(values) @ table``, as ``embedding_bag``)."""
        return F.embedding_bag(
            self.cols,
            table,
            self.row_ptr,
            mode="sum",
            per_sample_weights=values.to(table.dtype),
            include_last_offset=True,
        )

    def sddmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(a @ b.T)`` at the entries: ``a [n_rows, D]``, ``b [n_cols, D]`` -> ``[N]`` (entry order)."""
        zeros = torch.zeros(self.flat.numel(), dtype=a.dtype, device=a.device)
        return torch.sparse.sampled_addmm(self.csr(zeros), a, b.t(), beta=0.0).values()


# ---------------------------------------------------------------------------------------------- selection
def _candidates(
    pre: torch.Tensor, weight: torch.Tensor, t: float, ws: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
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
def select_batch_topk(
    pre: torch.Tensor, weight: torch.Tensor, n_keep: int, method: str, ws: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
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
      :meth:`~crosscoder.model.architectures.batchtopk.BatchTopK.forward_fast` does with a
      ``scores > 0`` mask.

    Either way the active entries are the positive ones among the top ``n_keep`` scores, the rule of
    :meth:`~crosscoder.model.architectures.batchtopk.BatchTopK.activate`.
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
def select_above(
    pre: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, method: str, ws: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
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
def select_aux(
    pre: torch.Tensor, dead: torch.Tensor, aux_k: int, method: str, ws: Workspace
) -> Selection | DeadColumns | None:
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


@torch.compiler.disable
def select_aux_sharded(
    pre: torch.Tensor, dead: torch.Tensor, aux_k: int, gather: Callable[[torch.Tensor], torch.Tensor]
) -> Selection:
    """AuxK over latent shards: per row, the top ``aux_k`` of ``relu(pre)`` among the dead latents of every
    shard. ``pre [B, H_s]`` and ``dead [H_s]`` are this shard's; ``gather`` concatenates a ``[B, aux_k]``
    tensor from the shards along dim 0. Each shard sends its rows' local top ``aux_k`` values (padded with
    -1); a row's cut-off is the ``aux_k``-th largest over all shards, and this shard keeps its positive
    entries at or above it (ties at the cut-off aside, the single-process selection): at most ``aux_k``
    per row over all shards, returned as this shard's :class:`Selection` (every shard must call it, dead
    latents or not)."""
    b, h = pre.shape
    dead_idx = torch.nonzero(dead).squeeze(1)
    sub = pre.detach().index_select(1, dead_idx).float().clamp_min_(0)  # [B, n_dead]
    local = torch.full((b, aux_k), -1.0, device=pre.device)
    ka = min(aux_k, dead_idx.numel())
    if ka:
        local[:, :ka] = sub.topk(ka, dim=1, sorted=False).values
    every = gather(local).view(-1, b, aux_k).permute(1, 0, 2).reshape(b, -1)  # [B, shards * aux_k]
    cut = every.topk(aux_k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values  # [B, 1]
    rows, j = torch.nonzero((sub >= cut) & (sub > 0), as_tuple=True)  # row-major: flat indices ascending
    return Selection.from_flat(rows * h + dead_idx[j], b, h)
