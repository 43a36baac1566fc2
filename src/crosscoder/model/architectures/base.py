"""What every architecture shares: the step input, the forward output, latents, and the base class.

An architecture decides how pre-activations become latents and which sparsity term enters the loss.
It is an ``nn.Module`` living inside a :class:`~crosscoder.model.crosscoder.CrossCoder` (as
``model.arch``), so its own parameters and buffers (BatchTopK's threshold, JumpReLU's thresholds) are
the model's: the optimiser, checkpoints and ``.to(device)`` see them without being told. The
encoder/decoder weights and the loss/metrics path (:func:`~crosscoder.model.losses.compute_loss`) are
shared. See ``docs/architectures.md`` for how to add one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..selection import DeadColumns, Selection, select_aux, select_aux_sharded
from ..sparse import sparse_decode, sparse_encode
from ..workspace import Workspace


class DistContext(Protocol):
    """The collectives an architecture may need under ``torchrun``
    (see :class:`crosscoder.distributed.Dist`)."""

    world_size: int

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StepInput:
    """Everything one forward pass of the loss needs besides the data ``x [batch, n_models, d_model]``.

    ``sparsity_coeff``: the coefficient of the architecture's sparsity term (``--l1-coeff`` after its
    warm-up); ``l2``: ``"squared"`` or ``"norm"``; ``aux_k``/``aux_coeff``/``dead [d_latent]`` (bool): AuxK
    (off unless ``aux_k > 0`` and ``dead`` is given); ``progress``: the fraction of training done, in
    [0, 1] (schedules owned by an architecture, e.g. k annealing; 1.0 outside training); ``dist``: the
    collectives under ``torchrun`` (``None`` on one process); ``fast``: the architecture's fast path
    (same maths) instead of the plain dense one.
    """

    sparsity_coeff: float | torch.Tensor = 0.0
    l2: str = "squared"
    aux_k: int = 0
    aux_coeff: float = 1 / 32
    dead: torch.Tensor | None = None
    progress: float = 1.0
    dist: DistContext | None = None
    fast: bool = True

    @property
    def use_aux(self) -> bool:
        return self.aux_k > 0 and self.dead is not None

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist is not None else 1

    @property
    def dist_sum(self) -> Any:
        """Sums a tensor over ranks (``None`` on one process)."""
        return self.dist.all_reduce_sum if self.dist is not None else None


class Latents:
    """Latents ``f [B, H]`` of one forward pass (no graph): dense, or sparse ``(rows, cols, vals)``.

    ``fired [H]`` (bool) says which latents are positive in some row; ``l0`` is mean_b #{i: f_bi > 0}.
    ``aliased``: ``dense`` is a workspace buffer that the model's next forward pass overwrites;
    :meth:`to_dense` then returns a copy, and raises if the buffer was overwritten already.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        dense: torch.Tensor | None = None,
        sel: Selection | None = None,
        vals: torch.Tensor | None = None,
        fired: torch.Tensor | None = None,
        l0: torch.Tensor | None = None,
        aliased: bool = False,
    ) -> None:
        self.shape, self._dense, self.sel, self.vals, self.aliased = shape, dense, sel, vals, aliased
        self._fired, self._l0 = fired, l0
        self._version = dense._version if dense is not None else 0

    def to_dense(self) -> torch.Tensor:
        """``[B, H]``; a fresh tensor (never a buffer that the next forward pass overwrites)."""
        if self._dense is not None:
            if not self.aliased:
                return self._dense
            if self._dense._version != self._version:
                raise RuntimeError(
                    "these latents were overwritten by a later forward pass of the same model; "
                    "read LossOutput.f before the next compute_loss call"
                )
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

    ``x_hat [B, M, Dm]`` with graph; ``sparsity``: the architecture's sparsity term before its
    coefficient (scalar, with graph; 0 for architectures without one); ``aux_e_hat [B, M * Dm]`` the AuxK
    latents' reconstruction of the residual (decoder without bias, with graph) or ``None`` when AuxK is
    off or (CPU) no latent is dead; ``aux_scale`` a scalar factor (``dead.any()``) applied to the AuxK
    loss; ``losses``: further loss terms, already weighted, added to the loss and logged under their names
    (Matryoshka's prefix losses, JumpReLU's pre-activation loss); ``metrics``: further detached metrics.
    """

    x_hat: torch.Tensor
    sparsity: torch.Tensor
    latents: Latents
    aux_e_hat: torch.Tensor | None = None
    aux_scale: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Architecture(nn.Module):
    """Base class of the registered architectures. Large temporaries live in ``self.ws``.

    Class attributes an architecture sets:

    * ``Options``: a dataclass of the config fields it adds (flat in ``CrossCoderConfig`` and ``config.json``,
      flags ``--field-name``); ``None`` for none.
    * ``penalty_name``: the metric name of its sparsity term (``None``: no sparsity term, the
      ``--l1-coeff`` flag does not apply).
    * ``has_fast_path``, ``dense_latents`` (its fast path holds ``[batch, d_latent]`` dense latents: memory
      in ``crosscoder plan``), ``aux_by_default`` (AuxK on unless ``--aux-k 0``), ``calibrates`` (it sets an
      inference rule from data at the end of training: :meth:`calibrate`), ``exclusive_band`` (the default
      relative-norm band of ``crosscoder analyze`` for its exclusive latents), ``default_shared_factor`` (the
      sparsity factor of designated shared latents when ``--shared-sparsity-coeff`` is not given),
      ``latent_dims`` (``{name: dim}`` of its per-latent tensors, for latent sharding).

    ``select_method`` picks the sparse selection kernels: ``"threshold"`` (host-assisted, CPU default) or
    ``"topk"`` (no host synchronisation, default elsewhere); see :mod:`crosscoder.model.selection`.
    """

    name: str = ""
    Options: type | None = None
    penalty_name: str | None = None
    has_fast_path: bool = False
    dense_latents: bool = True
    aux_by_default: bool = False
    calibrates: bool = False
    exclusive_band: float = 0.1
    default_shared_factor: float = 0.1
    #: latent dimension of each of its own per-latent parameters/buffers (sliced under latent sharding)
    latent_dims: dict[str, int] = {}

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # a back-reference, not a submodule
        self.ws = Workspace()
        self.select_method: str | None = None

    @property
    def model(self) -> Any:
        return self._model

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Check this architecture's fields of ``cfg`` (a ``CrossCoderConfig``); raise ``ConfigError``."""

    def method(self, device: torch.device) -> str:
        return self.select_method or ("threshold" if device.type == "cpu" else "topk")

    # ---------------------------------------------------------------- the maths
    def weight(self) -> torch.Tensor:
        """Per-latent weight of the sparsity term ``[d_latent]``: decoder norms (summed over models, or
        their concatenation's norm) times the layout's per-latent factor (designated shared latents)."""
        return self.model.latent_weight() * self.model.sparsity_scale

    def activate(
        self, pre: torch.Tensor, weight: torch.Tensor, training: bool, inp: StepInput | None = None
    ) -> torch.Tensor:
        """``pre [batch, d_latent]``, ``weight [d_latent]`` -> ``f [batch, d_latent]`` (>= 0)."""
        raise NotImplementedError

    def activate_entries(self, pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The inference rule entry by entry: ``pre [n]`` of latent ``latents[n]`` -> ``[n]`` (analysis)."""
        w = self.weight()[latents]
        return self.activate(pre[:, None], w[:, None], False)[:, 0]

    def penalty(self, f: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The sparsity term of the dense path (scalar): decoder-weighted L1, ``mean_b sum_i f_bi w_i``."""
        return (f * weight).sum(-1).mean()

    def extra_losses(
        self, f: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Further loss terms of the dense path, already weighted (``ForwardOut.losses``); none by default."""
        return {}

    def forward_dense(self, x: torch.Tensor, inp: StepInput) -> ForwardOut:
        """Reference maths: dense encode, :meth:`activate`, dense decode, :meth:`penalty`,
        :meth:`extra_losses`, dense AuxK."""
        model = self.model
        weight = self.weight()
        pre = model.encode_pre(x)
        f = self.activate(pre, weight, model.training, inp)
        x_hat = model.decode(f)
        out = ForwardOut(
            x_hat,
            self.penalty(f, pre, weight),
            Latents(tuple(f.shape), dense=f.detach()),
            losses=self.extra_losses(f, pre, weight),
        )
        if inp.use_aux:
            out.aux_e_hat, out.aux_scale = self.dense_aux(pre, inp)
        return out

    def forward_fast(self, x: torch.Tensor, inp: StepInput) -> ForwardOut:
        """Same maths as :meth:`forward_dense`, faster (default: the dense path itself)."""
        return self.forward_dense(x, inp)

    def forward(self, x: torch.Tensor, inp: StepInput) -> ForwardOut:
        return self.forward_fast(x, inp) if inp.fast else self.forward_dense(x, inp)

    def dense_aux(self, pre: torch.Tensor, inp: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
        """AuxK, dense: each row's top ``aux_k`` of ``relu(pre)`` among dead latents, decoded without bias.
        Returns ``(aux_e_hat [B, M * Dm], dead.any())``."""
        model, dead = self.model, inp.dead
        if model.shard is not None:  # each row's top aux_k over every shard's dead latents
            sel = select_aux_sharded(pre.detach(), dead, inp.aux_k, model.shard.gather)
            mask = torch.zeros(pre.numel(), dtype=pre.dtype, device=pre.device).index_fill_(0, sel.flat, 1)
            w_flat = model.W_dec.reshape(model.cfg.d_latent, -1)  # [h, m*d]
            e_hat = model.shard.reduce((torch.relu(pre) * mask.view_as(pre)) @ w_flat)
            return e_hat, model.shard.max_(dead.any().to(torch.uint8)).bool()
        k = min(inp.aux_k, pre.shape[1])
        dead_acts = torch.relu(pre) * dead.to(pre.dtype)  # [b, h], zero outside dead latents
        vals, idx = dead_acts.topk(k, dim=-1, sorted=False)  # [b, k]
        w_flat = model.W_dec.reshape(model.cfg.d_latent, -1)  # [h, m*d]
        e_hat = F.embedding_bag(idx, w_flat, per_sample_weights=vals.to(w_flat.dtype), mode="sum")
        return e_hat, dead.any()

    # ---------------------------------------------------------------- shared pieces of the fast paths
    def params2(self) -> tuple[torch.Tensor, ...]:
        """``(w_enc2 [M*Dm, H], b_enc [H], w_dec2 [H, M*Dm], b_dec2 [1, M*Dm])`` as views."""
        m = self.model
        h = m.cfg.d_latent
        return m.W_enc.reshape(-1, h), m.b_enc, m.W_dec.reshape(h, -1), m.b_dec.reshape(1, -1)

    def encode_with_aux(
        self, x2: torch.Tensor, acts: torch.Tensor, sels: tuple[Selection, ...], inp: StepInput
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None]:
        """Encoder values at ``sels`` plus sparse AuxK from ``acts [B, H]`` (pre-activations or their relu).

        Returns ``(values per selection, aux_e_hat [B, D] or None, aux_scale or None)``; one sparse
        encoder backward covers every selection.
        """
        w_enc2, b_enc, w_dec2, _ = self.params2()
        shard = self.model.shard
        if not inp.use_aux:
            sel = None
        elif shard is not None:  # every shard takes part (its dead latents may be none)
            sel = select_aux_sharded(acts, inp.dead, inp.aux_k, shard.gather)
        else:
            sel = select_aux(acts, inp.dead, inp.aux_k, self.method(acts.device), self.ws)
        if sel is None:
            return (sparse_encode(x2, w_enc2, b_enc, acts, sels) if sels else ()), None, None
        raws = sparse_encode(x2, w_enc2, b_enc, acts, sels + (sel,))
        dead = inp.dead
        if isinstance(sel, DeadColumns):  # GEMMs over the dead columns [B, n_dead]
            vals = torch.relu(raws[-1])
            vals = vals * sel.mask if sel.mask is not None else vals
            e_hat = vals @ w_dec2.index_select(0, sel.idx)
        else:
            vals = torch.relu(raws[-1]) * dead[sel.cols].to(raws[-1].dtype)
            e_hat = sparse_decode(vals, w_dec2, sel)
        if shard is not None:
            return raws[:-1], shard.reduce(e_hat), shard.max_(dead.any().to(torch.uint8)).bool()
        return raws[:-1], e_hat, dead.any()

    # ---------------------------------------------------------------- state beyond W_enc, b_enc, W_dec, b_dec
    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Extra tensors written to ``model.safetensors`` (names at the top level of the file)."""
        return {}

    def load_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Read back what :meth:`saved_tensors` wrote (``where`` names the file in errors)."""

    def config_info(self) -> dict[str, Any]:
        """Extra keys for ``config.json`` (information only, e.g. BatchTopK's threshold)."""
        return {}

    def log_metrics(self) -> dict[str, float]:
        """Extra values logged at each log step (one host read each)."""
        return {}

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> int:
        """Set the inference rule from rows ``[n, n_models, d_model]`` (architectures with ``calibrates``)."""
        return 0

    @torch.no_grad()
    def analysis_metrics(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Architecture-specific numbers for ``crosscoder analyze`` over rows ``[n, n_models, d_model]`` in
        the model's input space, in eval mode (e.g. Matryoshka's explained variance per prefix); ``{}``."""
        return {}
