"""Architecture registry: how pre-activations become latents, and which sparsity penalty applies.

Every architecture shares the encoder/decoder of :class:`~crosscoder.model.crosscoder.CrossCoder` and
the loss/metrics path of :mod:`crosscoder.model.losses`; an architecture decides

* ``activate(pre, weight, training)``: latents ``f [batch, d_latent]`` from pre-activations
  ``pre [batch, d_latent]`` and the per-latent decoder-norm weight ``weight [d_latent]``;
* ``uses_l1``: whether the L1 penalty enters the loss;
* optionally ``forward_fast``: the same mathematics as :meth:`Architecture.forward_dense` (the plain
  dense path built from ``activate``) computed faster. Both return a :class:`ForwardOut` from which
  :func:`~crosscoder.model.losses.compute_loss` computes the loss and metrics.

Register a new one with ``@register("name")`` on a subclass of :class:`Architecture`; without a
``forward_fast`` it trains through the dense path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .fused import dense_relu
from .sparse import (
    DeadColumns,
    Selection,
    select_above,
    select_aux,
    select_batch_topk,
    sparse_decode,
    sparse_encode,
)
from .workspace import Workspace, big_kernels, compute_dtype

ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(name: str) -> Callable[[type[Architecture]], type[Architecture]]:
    def deco(cls: type[Architecture]) -> type[Architecture]:
        cls.name = name
        ARCHITECTURES[name] = cls
        return cls

    return deco


def get_architecture(name: str) -> type[Architecture]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}") from None


class Latents:
    """Latents ``f [B, H]`` of one forward pass (no graph): dense, or sparse ``(rows, cols, vals)``.

    ``fired [H]`` (bool) says which latents are positive in some row; ``l0`` is mean_b #{i: f_bi > 0}.
    ``aliased``: ``dense`` is a workspace buffer that the model's next forward pass overwrites;
    :meth:`to_dense` then returns a copy, and raises if the buffer was overwritten already.
    """

    def __init__(self, shape: tuple[int, int], *, dense: torch.Tensor | None = None, sel: Selection | None = None,
                 vals: torch.Tensor | None = None, fired: torch.Tensor | None = None, l0: torch.Tensor | None = None,
                 aliased: bool = False) -> None:
        self.shape, self._dense, self.sel, self.vals, self.aliased = shape, dense, sel, vals, aliased
        self._fired, self._l0 = fired, l0
        self._version = dense._version if dense is not None else 0

    def to_dense(self) -> torch.Tensor:
        """``[B, H]``; a fresh tensor (never a buffer that the next forward pass overwrites)."""
        if self._dense is not None:
            if not self.aliased:
                return self._dense
            if self._dense._version != self._version:
                raise RuntimeError("these latents were overwritten by a later forward pass of the same model; "
                                   "read LossOutput.f before the next compute_loss call")
            return self._dense.clone()
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=self.vals.dtype, device=self.vals.device)
        return out.index_copy_(0, self.sel.flat, self.vals).view(self.shape)

    def fired(self) -> torch.Tensor:
        if self._fired is None:
            if self._dense is not None:
                self._fired = (self._dense > 0).any(0)
            else:  # vals >= 0: a latent fired iff its values sum to > 0
                acc = torch.zeros(self.shape[1], dtype=self.vals.dtype, device=self.vals.device)
                self._fired = acc.index_add_(0, self.sel.cols, self.vals) > 0
        return self._fired

    def l0(self) -> torch.Tensor:
        if self._l0 is None:
            if self._dense is not None:
                self._l0 = (self._dense > 0).sum(-1).float().mean()
            else:
                self._l0 = (self.vals > 0).sum().float() / self.shape[0]
        return self._l0


@dataclass
class ForwardOut:
    """What the loss path needs from an architecture's forward pass (shapes for ``x [B, M, Dm]``).

    ``x_hat [B, M, Dm]`` with graph; ``l1`` = mean_b sum_i f_bi w_i (scalar, with graph);
    ``aux_e_hat [B, M * Dm]`` the AuxK latents' reconstruction of the residual (decoder without bias,
    with graph) or ``None`` when AuxK is off or (CPU) no latent is dead; ``aux_scale`` a scalar factor
    (``dead.any()``) applied to the AuxK loss.
    """

    x_hat: torch.Tensor
    l1: torch.Tensor
    latents: Latents
    aux_e_hat: torch.Tensor | None = None
    aux_scale: torch.Tensor | None = None


class Architecture:
    """Base class. Instances live inside a CrossCoder; large temporaries live in ``self.ws``.

    ``select_method`` picks the sparse selection kernels: ``"threshold"`` (host-assisted, CPU default)
    or ``"topk"`` (no host synchronisation, default elsewhere); see :mod:`crosscoder.model.sparse`.
    """

    name: str = ""
    uses_l1: bool = False
    has_fast_path: bool = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ws = Workspace()
        self.select_method: str | None = None

    def method(self, device: torch.device) -> str:
        return self.select_method or ("threshold" if device.type == "cpu" else "topk")

    def activate(self, pre: torch.Tensor, weight: torch.Tensor, training: bool) -> torch.Tensor:
        """``pre [batch, d_latent]``, ``weight [d_latent]`` -> ``f [batch, d_latent]`` (>= 0)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the plain dense path
    def forward_dense(self, x: torch.Tensor, weight: torch.Tensor, aux_k: int = 0,
                      dead: torch.Tensor | None = None) -> ForwardOut:
        """Reference maths: dense encode, ``activate``, dense decode, dense AuxK selection."""
        model = self.model
        pre = model.encode_pre(x)
        f = self.activate(pre, weight, model.training)
        x_hat = model.decode(f)
        l1 = (f * weight).sum(-1).mean()
        out = ForwardOut(x_hat, l1, Latents(tuple(f.shape), dense=f.detach()))
        if aux_k > 0 and dead is not None:
            k = min(aux_k, pre.shape[1])
            dead_acts = torch.relu(pre) * dead.to(pre.dtype)  # [b, h], zero outside dead latents
            vals, idx = dead_acts.topk(k, dim=-1, sorted=False)  # [b, k]
            w_flat = model.W_dec.reshape(model.cfg.d_latent, -1)  # [h, m*d]
            out.aux_e_hat = F.embedding_bag(idx, w_flat, per_sample_weights=vals.to(w_flat.dtype), mode="sum")
            out.aux_scale = dead.any()
        return out

    def forward_fast(self, x: torch.Tensor, weight: torch.Tensor, aux_k: int = 0,
                     dead: torch.Tensor | None = None) -> ForwardOut:
        """Same maths as :meth:`forward_dense`, faster (default: the dense path itself)."""
        return self.forward_dense(x, weight, aux_k, dead)

    # ------------------------------------------------------------------ shared pieces of the fast paths
    def _params2(self) -> tuple[torch.Tensor, ...]:
        m = self.model
        h = m.cfg.d_latent
        return m.W_enc.reshape(-1, h), m.b_enc, m.W_dec.reshape(h, -1), m.b_dec.reshape(1, -1)

    def _encode_with_aux(self, x2: torch.Tensor, acts: torch.Tensor, sels: tuple[Selection, ...], aux_k: int,
                         dead: torch.Tensor | None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None,
                                                             torch.Tensor | None]:
        """Encoder values at ``sels`` plus sparse AuxK from ``acts [B, H]`` (pre-activations or their relu).

        Returns ``(values per selection, aux_e_hat [B, D] or None, aux_scale or None)``; one sparse
        encoder backward covers every selection.
        """
        w_enc2, b_enc, w_dec2, _ = self._params2()
        sel = None
        if aux_k > 0 and dead is not None:
            sel = select_aux(acts, dead, aux_k, self.method(acts.device), self.ws)
        if sel is None:
            return (sparse_encode(x2, w_enc2, b_enc, acts, sels) if sels else ()), None, None
        raws = sparse_encode(x2, w_enc2, b_enc, acts, sels + (sel,))
        if isinstance(sel, DeadColumns):  # GEMMs over the dead columns [B, n_dead]
            vals = torch.relu(raws[-1])
            vals = vals * sel.mask if sel.mask is not None else vals
            e_hat = vals @ w_dec2.index_select(0, sel.idx)
        else:
            vals = torch.relu(raws[-1]) * dead[sel.cols].to(raws[-1].dtype)
            e_hat = sparse_decode(vals, w_dec2, sel)
        return raws[:-1], e_hat, dead.any()


@register("vanilla")
class Vanilla(Architecture):
    """ReLU latents with an L1 penalty weighted by decoder norms (Anthropic, Kissane).

    Fast path: :func:`~crosscoder.model.fused.dense_relu` (five GEMMs over reused buffers, the L1 term
    from column sums); AuxK, when enabled, over the dead latents only.
    """

    uses_l1 = True
    has_fast_path = True

    def activate(self, pre: torch.Tensor, weight: torch.Tensor, training: bool) -> torch.Tensor:
        return torch.relu(pre)

    def forward_fast(self, x: torch.Tensor, weight: torch.Tensor, aux_k: int = 0,
                     dead: torch.Tensor | None = None) -> ForwardOut:
        b = x.shape[0]
        x2 = x.reshape(b, -1)
        cdt = compute_dtype(x.device)
        x_hat, fsum, f = dense_relu(x2, *self._params2(), self.ws, cdt)
        with torch.no_grad(), big_kernels():  # l0 = mean_b #{f > 0}: float compare into a reused buffer
            tmp = self.ws.get("grad_pre", tuple(f.shape), f.dtype, f.device)
            l0 = torch.gt(f, 0, out=tmp).sum(-1, dtype=torch.float32).mean()
        latents = Latents(tuple(f.shape), dense=f, fired=fsum.detach() > 0, l0=l0, aliased=True)
        _, e_hat, scale = self._encode_with_aux(x2, f, (), aux_k, dead)
        return ForwardOut(x_hat.view_as(x), (fsum * weight).sum() / b, latents, e_hat, scale)


@register("batchtopk")
class BatchTopK(Architecture):
    """Keep the ``k * batch`` largest ``relu(pre) * weight`` over the whole batch (raw values kept).

    Only positive scores are ever kept: an entry of score exactly 0 (``pre <= 0``, or a latent whose
    decoder norm is exactly 0) is inactive even when fewer than ``k * batch`` scores are positive. It
    would add nothing to the reconstruction, yet would count in ``l0`` and in ``fired`` (resetting the
    dead-latent counter of a latent that cannot contribute) and would feed its decoder row a gradient that
    a zero-norm latent never gets when enough scores are positive. The dense rule, both selection methods
    and the eval-mode threshold rule (``score > threshold >= 0``) all follow this.

    While training, the smallest kept score feeds an EMA (``threshold_beta``) stored in the model's
    ``threshold`` buffer; in eval mode a latent is active when its score exceeds that threshold, so
    inference does not depend on the batch. Before any training step (threshold < 0) eval mode falls
    back to the batch rule without touching the threshold.

    Fast path: dense encoder GEMM into a reused buffer, exact batch top-k selection without sorting
    (:func:`~crosscoder.model.sparse.select_batch_topk`), sparse decode and sparse backward, AuxK over
    the dead latents only.
    """

    has_fast_path = True

    def activate(self, pre: torch.Tensor, weight: torch.Tensor, training: bool) -> torch.Tensor:
        acts = torch.relu(pre)
        scores = acts * weight
        model = self.model
        if not training and bool(model.threshold >= 0):
            return acts * (scores > model.threshold)
        n_keep = min(model.cfg.k * pre.shape[0], scores.numel())
        vals, idx = scores.flatten().topk(n_keep, sorted=False)
        # zero scores fill the top-k when fewer than n_keep are positive: never active (class docstring)
        keep = (vals > 0).to(scores.dtype)
        mask = torch.zeros_like(scores).flatten().scatter_(0, idx, keep).view_as(scores)
        if training:
            model.update_threshold(vals)
        return acts * mask

    #: set by the trainer under torchrun: an object with ``world_size`` and ``all_gather_cat`` (see
    #: :class:`crosscoder.distributed.Dist`) so that the selection is over the GLOBAL batch.
    dist: Any = None

    def select_batch(self, pre: torch.Tensor, w: torch.Tensor, n_keep: int,
                     method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's entries among the batch top-k of the global batch: ``(flat, scores, kept, mask)``.

        ``kept`` holds the scores of every globally kept entry (for the threshold EMA). With one process
        it is the local selection. With ``W`` ranks each rank sends its local top ``n_keep * W``
        candidate scores (padded with -1) to all others; the global ``n_keep * W``-th largest score ``t``
        decides, and a rank keeps its candidates scoring at least ``t``: the union over ranks is exactly
        the single-process selection of the whole batch (ties at ``t`` aside). With the host-sync-free
        ``topk`` method (CUDA) the candidates are all returned with ``mask`` (1.0 = kept, 0.0 = not), which
        zeroes the others' values and gradients, instead of a data-dependent (synchronising) index.
        """
        d = self.dist
        if d is None or d.world_size == 1:
            flat, scores = select_batch_topk(pre, w, n_keep, method, self.ws)
            return flat, scores, scores, None
        n_global = n_keep * d.world_size
        flat, scores = select_batch_topk(pre, w, min(n_global, pre.numel()), method, self.ws)
        padded = torch.full((n_global,), -1.0, dtype=scores.dtype, device=scores.device)
        padded[:scores.numel()] = scores
        top = d.all_gather_cat(padded).topk(n_global, sorted=False).values
        keep = scores >= top.min()
        if method == "topk":
            return flat, scores, top, keep.to(scores.dtype)
        return flat[keep], scores[keep], top, None

    def forward_fast(self, x: torch.Tensor, weight: torch.Tensor, aux_k: int = 0,
                     dead: torch.Tensor | None = None) -> ForwardOut:
        model = self.model
        b, h = x.shape[0], model.cfg.d_latent
        x2 = x.reshape(b, -1)
        w_enc2, b_enc, w_dec2, b_dec2 = self._params2()
        cdt = compute_dtype(x.device)
        method = self.method(x.device)
        pre = self.ws.get("pre", (b, h), cdt, x.device)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            with big_kernels():
                torch.addmm(b_enc.to(cdt), x2.to(cdt), w_enc2.to(cdt), out=pre)
            w = weight.detach().float()
            mask = None
            if not model.training and bool(model.threshold >= 0):
                flat, scores = select_above(pre, w, model.threshold, method, self.ws)
            else:
                flat, scores, kept, mask = self.select_batch(pre, w, model.cfg.k * b, method)
                if model.training:
                    model.update_threshold(kept)
        sel = Selection.from_flat(flat, b, h)
        if method == "topk":  # sync-free: zero-score entries (filling k * b) are masked, not removed
            positive = (scores > 0).to(scores.dtype)
            mask = positive if mask is None else mask * positive
        (raw,), e_hat, scale = self._encode_with_aux(x2, pre, (sel,), aux_k, dead)
        acts = torch.relu(raw)  # [N]
        if mask is not None:  # "topk": zero scores and (distributed) candidates not kept globally give 0
            acts = acts * mask.to(acts.dtype)
        x_hat = (sparse_decode(acts, w_dec2, sel) + b_dec2).view_as(x)
        l1 = (acts * weight[sel.cols].to(acts.dtype)).sum() / b
        return ForwardOut(x_hat, l1, Latents((b, h), sel=sel, vals=acts.detach()), e_hat, scale)
