"""Matryoshka BatchTopK crosscoder (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders", applied to a crosscoder).

Nested prefixes ``p_1 < p_2 < ... < p_L = d_latent`` of the dictionary (``--prefixes``) each have to
reconstruct both models on their own. For ``x [B, M, Dm]``::

    f        = BatchTopK(relu(pre))                          [B, H]   (the same active set as BatchTopK)
    x_hat_j  = b_dec + f[:, :p_j] W_dec[:p_j]                [B, M, Dm]  (latents [0, p_j) only)
    loss     = sum_j w_j * l2(x, x_hat_j)   (+ AuxK on dead latents, on by default)

so the first latents learn the coarse, general directions and later ones refine them. ``x_hat_L`` (the
full dictionary) is the model's reconstruction: the shared ``l2_loss`` is its term, with weight 1, and
``prefix_loss`` holds the rest, ``sum_{j<L} w_j l2_j + (w_L - 1) l2_L`` (see :class:`Matryoshka`).
Everything else (``k``, the threshold and its calibration, k annealing, the global selection under
``torchrun``) is BatchTopK's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from ...errors import ConfigError
from ...fields import option
from ..registry import register
from ..selection import Selection
from ..sparse import sparse_decode
from .base import ForwardOut, Latents, StepInput
from .batchtopk import BatchTopK


@dataclass
class MatryoshkaOptions:
    prefixes: str = option(
        "",
        "matryoshka: nested prefix sizes, comma-separated and ascending, e.g. 64,256; "
        "d_latent is always the last (appended if missing); empty = d_latent/16, "
        "d_latent/4, d_latent",
    )
    prefix_weights: str | None = option(
        None,
        "matryoshka: loss weight of each prefix, comma-separated: one per "
        "prefix including the full dictionary, or one per listed prefix (the full "
        "dictionary then weighs 1); default all 1",
    )


def _numbers(text: object, field: str, kind: type) -> list:
    """``"64, 256"`` (or a list from a config file) -> ``[64, 256]`` of ``kind``; ConfigError otherwise."""
    items = text if isinstance(text, (list, tuple)) else [s for s in str(text).split(",") if s.strip()]
    try:
        out = [kind(s) if kind is float else int(str(s).strip()) for s in items]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{field}: expected comma-separated {'numbers' if kind is float else 'integers'}, got {text!r}"
        ) from None
    return out


def prefix_sizes(prefixes: object, d_latent: int) -> tuple[int, ...]:
    """The nested prefix sizes ``(p_1, ..., p_L)`` with ``p_L = d_latent``.

    ``prefixes``: ``"64,256"`` (ascending, each in ``[1, d_latent]``; ``d_latent`` appended when missing),
    or empty for the default ``d_latent // 16, d_latent // 4, d_latent`` (sizes of 0 and repeats dropped).
    """
    sizes = _numbers(prefixes or "", "prefixes", int)
    if not sizes:
        return tuple(sorted({p for p in (d_latent // 16, d_latent // 4, d_latent) if p > 0}))
    if any(p <= 0 for p in sizes):
        raise ConfigError(f"prefixes: sizes must be positive, got {prefixes!r}")
    if any(b <= a for a, b in pairwise(sizes)):
        raise ConfigError(f"prefixes: sizes must be strictly increasing, got {prefixes!r}")
    if sizes[-1] > d_latent:
        raise ConfigError(f"prefixes: {sizes[-1]} exceeds d_latent ({d_latent})")
    return tuple(sizes) if sizes[-1] == d_latent else (*sizes, d_latent)


def prefix_weights(weights: object, n_prefixes: int) -> tuple[float, ...]:
    """One weight ``w_j >= 0`` per prefix (the last for the full dictionary). ``None``: all 1; a list one
    shorter than the prefixes gives the proper prefixes' weights, the full dictionary's is then 1."""
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        return (1.0,) * n_prefixes
    w = _numbers(weights, "prefix_weights", float)
    if len(w) == n_prefixes - 1:
        w.append(1.0)
    if len(w) != n_prefixes:
        raise ConfigError(
            f"prefix_weights: expected {n_prefixes} weights (one per prefix, the full dictionary "
            f"last) or {n_prefixes - 1}, got {len(w)}"
        )
    if not all(v >= 0 and v < float("inf") for v in w):  # also refuses NaN
        raise ConfigError(f"prefix_weights: weights must be finite and >= 0, got {weights!r}")
    if not any(v > 0 for v in w):
        raise ConfigError("prefix_weights: at least one weight must be positive")
    return tuple(w)


def segment_selection(sel: Selection, bounds: torch.Tensor) -> Selection:
    """The entries of ``sel`` (over ``[B, H]``) as entries of ``[B * L, H]``: entry ``(b, i)`` moves to row
    ``b * L + j``, ``j`` the segment ``[p_{j-1}, p_j)`` holding latent ``i`` (``bounds [L]`` = the prefix
    sizes). Within a row the latents ascend, so the entry order (and the column order) is unchanged and a
    sparse decode over it gives every segment's contribution ``[B * L, D]`` in one pass."""
    n_seg = bounds.numel()
    seg = torch.searchsorted(bounds, sel.cols, right=True)  # [N], in [0, L)
    rows = sel.rows * n_seg + seg
    n_rows = sel.n_rows * n_seg
    row_ptr = torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device))
    return Selection(
        rows * sel.n_cols + sel.cols,
        rows,
        sel.cols,
        row_ptr,
        sel.col_perm,
        sel.col_ptr,
        rows.index_select(0, sel.col_perm),
        n_rows,
        sel.n_cols,
    )


@register("matryoshka")
class Matryoshka(BatchTopK):
    """BatchTopK latents; every nested prefix ``p_j`` reconstructs ``x`` on its own, with weight ``w_j``.

    ``prefix_sizes`` ``(p_1, ..., p_L = d_latent)`` and ``prefix_weights`` ``(w_1, ..., w_L)`` come from
    ``--prefixes`` / ``--prefix-weights`` (default ``d_latent/16, d_latent/4, d_latent``, all weights 1). The
    total is ``l2_loss + prefix_loss = sum_j w_j l2(x, x_hat_j)``: ``l2_loss`` (weight 1) is the full
    dictionary's term, so ``prefix_loss = sum_{j<L} w_j l2_j + (w_L - 1) l2_L`` (just the proper prefixes'
    weighted terms with the default ``w_L = 1``; ``w_L = 0`` trains the prefixes only). Metrics
    ``ev_prefix_<p>``: explained variance ``1 - SSE/SST`` of ``x_hat_j`` over the batch (SST around the
    batch mean, all models pooled); ``ev_prefix_<d_latent>`` equals ``explained_variance``.

    Fast path: BatchTopK's selection and sparse encoder; one sparse decode over the selection split by
    segment (:func:`segment_selection`) gives each segment's contribution, and a running sum over
    segments gives every prefix's reconstruction (the cost of one decode plus ``L`` passes over
    ``[B, M * Dm]``).
    """

    Options = MatryoshkaOptions

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        c = model.cfg
        self.prefix_sizes = prefix_sizes(c.prefixes, c.d_latent)
        self.prefix_weights = prefix_weights(c.prefix_weights, len(self.prefix_sizes))
        self.register_buffer("bounds", torch.tensor(self.prefix_sizes, dtype=torch.long), persistent=False)

    @classmethod
    def validate_config(cls, cfg: object) -> None:
        super().validate_config(cfg)
        prefix_weights(cfg.prefix_weights, len(prefix_sizes(cfg.prefixes, cfg.d_latent)))

    # ------------------------------------------------------------------ the maths
    def decode_prefix(self, f: torch.Tensor, p: int) -> torch.Tensor:
        """``x_hat = b_dec + f[:, :p] W_dec[:p]``: ``f [B, H]`` -> ``[B, M, Dm]`` from latents ``[0, p)``."""
        m = self.model
        out = torch.addmm(m.b_dec.reshape(1, -1), f[:, :p], m.W_dec[:p].reshape(p, -1))
        return out.view(f.shape[0], m.cfg.n_models, m.cfg.d_model)

    def prefix_terms(
        self, out: ForwardOut, x: torch.Tensor, x_hats: Sequence[torch.Tensor], inp: StepInput
    ) -> None:
        """``prefix_loss`` and the ``ev_prefix_<p>`` metrics into ``out`` from ``x_hats`` (one ``[B, M, Dm]``
        per prefix, the full dictionary last)."""
        from ..losses import l2_loss  # here: the losses module imports this package

        w = self.prefix_weights
        loss = torch.zeros((), device=x.device)
        for wj, xh in zip(w[:-1], x_hats[:-1], strict=True):
            loss = loss + wj * l2_loss(x, xh, inp.l2)
        if w[-1] != 1.0:
            loss = loss + (w[-1] - 1.0) * l2_loss(x, x_hats[-1], inp.l2)
        out.losses["prefix_loss"] = loss
        with torch.no_grad():  # pooled over the (global) batch, as explained_variance itself
            stats = self.ev_stats(x, x_hats)
            if inp.dist is not None:
                stats = inp.dist.all_reduce_sum(stats)
            out.metrics.update({k: v.float() for k, v in self.ev_from_stats(stats).items()})

    def forward_dense(self, x: torch.Tensor, inp: StepInput) -> ForwardOut:
        """Reference maths: BatchTopK's dense rule, then one dense decode per prefix."""
        model = self.model
        pre = model.encode_pre(x)
        f = self.activate(pre, self.weight(), model.training, inp)  # [B, H]
        x_hats = [self.decode_prefix(f, p) for p in self.prefix_sizes]
        out = ForwardOut(
            x_hats[-1], torch.zeros((), device=x.device), Latents(tuple(f.shape), dense=f.detach())
        )
        if inp.use_aux:
            out.aux_e_hat, out.aux_scale = self.dense_aux(pre, inp)
        self.prefix_terms(out, x, x_hats, inp)
        return out

    def forward_fast(self, x: torch.Tensor, inp: StepInput) -> ForwardOut:
        b, h = x.shape[0], self.model.cfg.d_latent
        x2 = x.reshape(b, -1)
        sel, pre, mask = self.select(x2, inp)
        (raw,), e_hat, scale = self.encode_with_aux(x2, pre, (sel,), inp)
        acts = torch.relu(raw)  # [N]
        if mask is not None:  # "topk": zero scores and (distributed) candidates not kept globally give 0
            acts = acts * mask.to(acts.dtype)
        _, _, w_dec2, b_dec2 = self.params2()
        n_seg = len(self.prefix_sizes)
        segs = sparse_decode(acts, w_dec2, segment_selection(sel, self.bounds)).view(
            b, n_seg, -1
        )  # [B, L, D]
        x_hats, acc = [], b_dec2
        for seg in segs.unbind(1):  # x_hat_j = b_dec + segments 1..j (a running sum; cheaper than cumsum)
            acc = acc + seg
            x_hats.append(acc.view_as(x))
        out = ForwardOut(
            x_hats[-1],
            torch.zeros((), device=x.device),
            Latents((b, h), sel=sel, vals=acts.detach()),
            e_hat,
            scale,
        )
        self.prefix_terms(out, x, x_hats, inp)
        return out

    # ------------------------------------------------------------------ analysis
    @torch.no_grad()
    def analysis_metrics(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """``{"ev_prefix_<p>": 1 - SSE_p / SST}`` pooled over every row of ``batches`` (``[n, M, Dm]``, the
        model's input space), eval mode (the inference threshold rule); SST around the pooled mean."""
        model = self.model
        was_training = model.training
        model.eval()
        dev = model.W_enc.device
        stats = None
        try:
            for x in batches:
                x = x.to(dev).float()
                f = model.encode(x)
                st = self.ev_stats(x, [self.decode_prefix(f, p) for p in self.prefix_sizes])
                stats = st if stats is None else stats + st
        finally:
            model.train(was_training)
        if stats is None:
            return {}
        return {k: float(v) for k, v in self.ev_from_stats(stats).items()}

    def ev_stats(self, x: torch.Tensor, x_hats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[L, S]``: :func:`~crosscoder.model.losses.ev_moments` of each prefix's reconstruction (sums that
        pool over batches and ranks)."""
        from ..losses import ev_moments

        return torch.stack([ev_moments(x, xh.detach()) for xh in x_hats])

    def ev_from_stats(self, stats: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"ev_prefix_<p>": 1 - SSE_p / SST}`` (all models pooled) from summed :meth:`ev_stats`."""
        from ..losses import explained_variance_from_moments

        m = self.model.cfg.n_models
        return {
            f"ev_prefix_{p}": explained_variance_from_moments(st, m)["explained_variance"]
            for p, st in zip(self.prefix_sizes, stats, strict=True)
        }
