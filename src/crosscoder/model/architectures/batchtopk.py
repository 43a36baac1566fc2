"""BatchTopK crosscoder (Bussmann et al. 2024; the science-of-finetuning crosscoders, Minder et al. 2025).

For ``x [B, M, Dm]`` with scores ``s_bi = relu(pre_bi) * w_i`` (``w_i`` the decoder-norm weight)::

    f_bi = relu(pre_bi) * [s_bi among the k*B largest scores of the batch, and s_bi > 0]
    loss = sum_m ||x_m - x_hat_m||^2   (+ AuxK on dead latents, on by default)

At inference a latent is active when its score exceeds ``threshold``, calibrated at the end of training
so that eval mode keeps ``k`` latents per row on average. With ``--k-anneal-frac F`` the batch keeps
``k(t) * B`` entries, ``k(t)`` falling linearly from ``--k-anneal-start`` (default ``4 k``) to ``k`` over
the first fraction ``F`` of training (the dictionary_learning fork's k annealing).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...fields import option
from ..registry import register
from ..selection import Selection, big_kernels, select_above, select_batch_topk
from ..sparse import sparse_decode
from ..workspace import compute_dtype
from .base import Architecture, ForwardOut, Latents, StepInput


@dataclass
class BatchTopKOptions:
    k: int = option(32, "batchtopk/matryoshka: mean active latents per token (k * batch kept per batch)")
    threshold_beta: float = option(0.999, "batchtopk/matryoshka: EMA factor of the logged training threshold")
    k_anneal_frac: float = option(
        0.0,
        "batchtopk/matryoshka: fraction of training over which k falls linearly "
        "from --k-anneal-start to k (0 = off)",
    )
    k_anneal_start: int | None = option(
        None, "batchtopk/matryoshka: k at the start of annealing (default 4 k)"
    )


def annealed_k(k: int, start: int | None, frac: float, progress: float) -> int:
    """``k`` after the fraction ``progress`` of training: linear from ``start`` (default ``4 k``) to ``k``
    over the first ``frac`` of training, rounded to the nearest integer; ``k`` when ``frac == 0``."""
    if frac <= 0 or progress >= frac:
        return k
    k0 = start if start is not None else 4 * k
    return max(1, int(round(k0 + (k - k0) * progress / frac)))


@register("batchtopk")
class BatchTopK(Architecture):
    """Keep the ``k * batch`` largest ``relu(pre) * weight`` over the whole batch (raw values kept).

    Only positive scores are ever kept: an entry of score exactly 0 (``pre <= 0``, or a latent whose
    decoder norm is exactly 0) is inactive even when fewer than ``k * batch`` scores are positive. It
    would add nothing to the reconstruction, yet would count in ``l0`` and in ``fired`` (resetting the
    dead-latent counter of a latent that cannot contribute) and would feed its decoder row a gradient that
    a zero-norm latent never gets when enough scores are positive. The dense rule, both selection methods
    and the eval-mode threshold rule (``score > threshold >= 0``) all follow this.

    ``threshold`` (a buffer, saved in ``model.safetensors``): while training, the smallest kept score
    feeds an EMA (``threshold_beta``), logged; :meth:`calibrate` sets it from the final weights. In eval
    mode a latent is active when its score exceeds it, so inference does not depend on the batch. Before
    any training step (threshold < 0) eval mode falls back to the batch rule without touching it.

    Fast path: dense encoder GEMM into a reused buffer, exact batch top-k selection without sorting
    (:func:`~crosscoder.model.selection.select_batch_topk`), sparse decode and sparse backward, AuxK over
    the dead latents only. Under ``torchrun`` the selection is over the global batch (:meth:`select_batch`).
    """

    Options = BatchTopKOptions
    has_fast_path = True
    dense_latents = False
    aux_by_default = True
    calibrates = True
    # No L1 pressure shrinks the other model's decoder to zero, so exclusive latents keep a small residual
    # norm there (relative norm ~ 0.8-0.95): a wider band, with Latent Scaling as the filter.
    exclusive_band = 0.25
    # A factor below 1 divides the designated shared latents' scores, so they win the selection: measured on
    # the built-in pair (32 shared of 256 latents, k 4) factor 0.5 left 51% of latents dead and explained
    # variance 0.78, 0.1 left 87.5% dead (0.53); 1.0 (tying only) trains as without them (0.972 vs 0.973).
    default_shared_factor = 1.0

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.register_buffer("threshold", torch.tensor(-1.0))

    @classmethod
    def validate_config(cls, cfg: object) -> None:
        if not 0.0 <= cfg.k_anneal_frac <= 1.0:
            raise ConfigError(f"k_anneal_frac: must be in [0, 1], got {cfg.k_anneal_frac}")
        if cfg.k_anneal_start is not None and cfg.k_anneal_start < cfg.k:
            raise ConfigError(f"k_anneal_start: must be at least k ({cfg.k}), got {cfg.k_anneal_start}")

    def current_k(self, inp: StepInput | None) -> int:
        """``k`` at this step (k annealing; the target ``k`` outside training)."""
        c = self.model.cfg
        if c.k_anneal_frac <= 0 or inp is None:  # progress is not read (no recompiles under --compile)
            return c.k
        return annealed_k(c.k, c.k_anneal_start, c.k_anneal_frac, inp.progress)

    def weight(self) -> torch.Tensor:
        """Score weight ``[d_latent]``: decoder norms divided by the layout's sparsity factor (a designated
        shared latent with a 10x lower penalty scores 10x higher in the selection)."""
        return self.model.latent_weight() / self.model.sparsity_scale

    def activate(
        self, pre: torch.Tensor, weight: torch.Tensor, training: bool, inp: StepInput | None = None
    ) -> torch.Tensor:
        acts = torch.relu(pre)
        scores = acts * weight
        if not training and bool(self.threshold >= 0):
            return acts * (scores > self.threshold)
        n_keep = self.current_k(inp) * pre.shape[0]
        vals, idx = scores.flatten().topk(min(n_keep, scores.numel()), sorted=False)
        # zero scores fill the top-k when fewer than n_keep are positive: never active (class docstring)
        keep = (vals > 0).to(scores.dtype)
        if self.model.shard is not None:  # the top n_keep over every shard's latents
            vals = self._global_top(vals.detach(), n_keep, inp.dist if inp is not None else None)
            keep = keep * (scores.flatten()[idx] >= vals.min()).to(scores.dtype)
        mask = torch.zeros_like(scores).flatten().scatter_(0, idx, keep).view_as(scores)
        if training:
            self.update_threshold(vals)
        return acts * mask

    def activate_entries(self, pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        if bool(self.threshold < 0):
            return acts
        return acts * (acts * self.weight()[latents] > self.threshold)

    def penalty(self, f: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=f.device)

    @torch.no_grad()
    def update_threshold(self, kept_scores: torch.Tensor) -> None:
        """EMA of the smallest positive kept score (no host synchronisation); no-op on an empty set."""
        if kept_scores.numel() == 0:
            return
        pos = torch.where(kept_scores > 0, kept_scores, torch.full_like(kept_scores, float("inf")))
        smallest = pos.min().to(self.threshold.dtype)
        beta = self.model.cfg.threshold_beta
        ema = torch.where(self.threshold < 0, smallest, beta * self.threshold + (1 - beta) * smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), ema, self.threshold))

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> int:
        """Set the inference threshold so that eval mode keeps ``k`` latents per row on average.

        ``batches`` yield rows ``[n, n_models, d_model]`` in the model's input space. Over all ``N`` rows
        the threshold becomes the ``(k N + 1)``-th largest score ``relu(pre) * weight`` (0 when fewer
        are positive), so ``score > threshold`` keeps exactly ``k N`` entries on these rows (ties aside).
        The scores of the final weights are used, unlike the training EMA, which lags while the scores
        grow. Returns ``N``.
        """
        model = self.model
        k = model.cfg.k
        weight = self.weight().float()
        rows = list(batches)  # the count of rows fixes how many top scores are kept from each batch
        n = sum(x.shape[0] for x in rows)
        if n == 0:
            return 0
        top: torch.Tensor | None = None
        for x in rows:  # the k n + 1 largest of (the k n + 1 largest so far, this batch's)
            scores = model.encode_pre(x.to(model.W_enc.device).float()).relu_().mul_(weight).flatten()
            best = scores.topk(min(k * n + 1, scores.numel()), sorted=False).values
            del scores  # one [rows, d_latent] temporary at a time
            cand = best if top is None else torch.cat([top, best])
            top = cand.topk(min(k * n + 1, cand.numel()), sorted=False).values
        if model.shard is not None:  # every shard scored the same rows: the cut-off over all latents
            top = self._global_top(top, k * n + 1, None)
        t = float(top.min()) if top.numel() == k * n + 1 else 0.0
        self.threshold.fill_(max(t, 0.0))
        return n

    # ------------------------------------------------------------------ the fast path
    def select_batch(
        self, pre: torch.Tensor, w: torch.Tensor, n_keep: int, method: str, inp: StepInput
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's entries among the batch top-k of the global batch: ``(flat, scores, kept, mask)``.

        ``kept`` holds the scores of every globally kept entry (for the threshold EMA). With one process
        it is the local selection. With ``W`` ranks (``inp.dist``) each rank sends its local top
        ``n_keep * W`` candidate scores (padded with -1) to all others; the global ``n_keep * W``-th largest
        score ``t`` decides, and a rank keeps its candidates scoring at least ``t``: the union over ranks is
        exactly the single-process selection of the whole batch (ties at ``t`` aside). With the
        host-sync-free ``topk`` method (CUDA) the candidates are all returned with ``mask`` (1.0 = kept,
        0.0 = not), which zeroes the others' values and gradients, instead of a data-dependent
        (synchronising) index.
        """
        d = inp.dist
        replicas = d.world_size if d is not None else 1
        if replicas == 1 and self.model.shard is None:
            flat, scores = select_batch_topk(pre, w, n_keep, method, self.ws)
            return flat, scores, scores, None
        n_global = n_keep * replicas
        flat, scores = select_batch_topk(pre, w, min(n_global, pre.numel()), method, self.ws)
        top = self._global_top(scores, n_global, d)
        keep = scores >= top.min()
        if method == "topk":
            return flat, scores, top, keep.to(scores.dtype)
        return flat[keep], scores[keep], top, None

    def _global_top(self, scores: torch.Tensor, n: int, d: object) -> torch.Tensor:
        """The ``n`` largest of the candidate ``scores`` sent by every rank that shares this selection: the
        data-parallel ranks ``d`` (each with its own rows) and, for a latent shard, every shard of them
        (padded with -1 to ``n`` per rank)."""
        padded = torch.full((n,), -1.0, dtype=scores.dtype, device=scores.device)
        k = min(n, scores.numel())
        padded[:k] = scores.topk(k, sorted=False).values if scores.numel() > n else scores
        shard = self.model.shard
        replicas = d.world_size if d is not None else 1
        if shard is not None:
            every = shard.gather(padded, world=replicas > 1)
        else:
            every = d.all_gather_cat(padded)
        return every.topk(n, sorted=False).values

    def select(self, x2: torch.Tensor, inp: StepInput) -> tuple[Selection, torch.Tensor, torch.Tensor | None]:
        """Encoder GEMM into a reused buffer and the active entries: ``(sel, pre [B, H], mask or None)``."""
        b, h = x2.shape[0], self.model.cfg.d_latent
        w_enc2, b_enc, _, _ = self.params2()
        cdt = compute_dtype(x2.device)
        method = self.method(x2.device)
        pre = self.ws.get("pre", (b, h), cdt, x2.device)
        with torch.no_grad(), torch.autocast(x2.device.type, enabled=False):
            with big_kernels():
                torch.addmm(b_enc.to(cdt), x2.to(cdt), w_enc2.to(cdt), out=pre)
            w = self.weight().detach().float()
            mask = None
            if not self.training and bool(self.threshold >= 0):
                flat, scores = select_above(pre, w, self.threshold, method, self.ws)
            else:
                flat, scores, kept, mask = self.select_batch(pre, w, self.current_k(inp) * b, method, inp)
                if self.training:
                    self.update_threshold(kept)
        sel = Selection.from_flat(flat, b, h)
        if method == "topk":  # sync-free: zero-score entries (filling k * b) are masked, not removed
            positive = (scores > 0).to(scores.dtype)
            mask = positive if mask is None else mask * positive
        return sel, pre, mask

    def forward_fast(self, x: torch.Tensor, inp: StepInput) -> ForwardOut:
        b, h = x.shape[0], self.model.cfg.d_latent
        x2 = x.reshape(b, -1)
        sel, pre, mask = self.select(x2, inp)
        (raw,), e_hat, scale = self.encode_with_aux(x2, pre, (sel,), inp)
        acts = torch.relu(raw)  # [N]
        if mask is not None:  # "topk": zero scores and (distributed) candidates not kept globally give 0
            acts = acts * mask.to(acts.dtype)
        _, _, w_dec2, _ = self.params2()
        x_hat = self.model.add_partials(sparse_decode(acts, w_dec2, sel)).view_as(x)
        return ForwardOut(
            x_hat,
            torch.zeros((), device=x.device),
            Latents((b, h), sel=sel, vals=acts.detach()),
            e_hat,
            scale,
        )

    # ------------------------------------------------------------------ state
    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().cpu().reshape(())}

    def load_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if "threshold" in tensors:
            self.threshold.copy_(tensors["threshold"].reshape(()))

    def config_info(self) -> dict[str, float]:
        return {"threshold": float(self.threshold)}

    def log_metrics(self) -> dict[str, float]:
        return {"threshold": float(self.threshold)}
