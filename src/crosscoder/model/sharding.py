"""Latent sharding (tensor parallelism over the dictionary): each of ``S`` ranks holds ``H / S`` latents.

Shard ``s`` of a dictionary of ``H`` latents holds latents ``[s H/S, (s+1) H/S)``: its columns of
``W_enc [n_models, d_model, H/S]``, rows of ``W_dec [H/S, n_models, d_model]``, its part of
``b_enc [H/S]`` and of every per-latent tensor of the architecture (JumpReLU's thresholds), plus their
optimiser moments. ``b_dec`` (and BatchTopK's scalar threshold) are replicated. The maths of one step:

* encode locally: ``pre_s = x W_enc_s + b_enc_s`` ``[batch, H/S]``;
* activate: per-latent rules (ReLU, JumpReLU) locally; BatchTopK keeps the ``k * batch`` largest scores
  over *all* latents (each shard sends its local top candidates, the global cut-off decides);
* decode partial sums ``f_s W_dec_s`` ``[batch, n_models * d_model]``, summed over the shards
  (:meth:`LatentShard.reduce`), then ``+ b_dec``. Every shard then holds the same ``x_hat`` and computes
  the same reconstruction loss, so the sum's backward is the identity (each shard's partial receives
  ``dL/dx_hat``);
* sparsity terms are sums over latents: each shard adds its own latents' part to its loss (the gradient
  of the total with respect to a shard's parameters is that of its part), and the logged values are
  summed over shards;
* AuxK: each row's top ``aux_k`` dead latents over all shards (per-row cut-off from the shards' local
  candidates), decoded as partial sums like ``x_hat``.

The model layer knows only this context; the process groups are made by the training layer
(:func:`crosscoder.distributed.setup_mesh`). A sharded :class:`~crosscoder.model.CrossCoder` is an ordinary
one of ``d_latent = H / S`` with ``model.shard`` set; :func:`shard_state` and :func:`assemble_state` map
state dicts (weights, optimiser moments, counters) between the full dictionary and its shards, so any
checkpoint can be resumed on any mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

#: Latent dimension of each sharded tensor of a crosscoder's state dict (everything else is replicated).
MODEL_LATENT_DIMS = {"W_enc": 2, "W_dec": 0, "b_enc": 0}
#: Architectures whose maths is sharded (:func:`check_shardable` names why the others are not).
SHARDABLE = ("vanilla", "batchtopk", "jumprelu")


class _ReduceIdentity(torch.autograd.Function):
    """Forward: sum over the latent group; backward: identity (every shard computes the same loss from
    the summed value, so ``dL/d partial = dL/d sum``)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


@dataclass
class LatentShard:
    """This rank's place in the latent dimension: shard ``index`` of ``count``, of a dictionary of
    ``d_latent`` latents in all. ``group`` is the process group of the ``count`` ranks that hold the
    shards of one data-parallel replica; ``world`` the group of every rank (``None``: the default group)."""

    index: int
    count: int
    d_latent: int
    group: Any = None
    world: Any = None

    @property
    def local(self) -> int:
        """Latents per shard, ``d_latent / count``."""
        return self.d_latent // self.count

    @property
    def offset(self) -> int:
        """Index of this shard's first latent in the whole dictionary."""
        return self.index * self.local

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of ``partial`` over the shards, differentiable (identity backward)."""
        return _ReduceIdentity.apply(partial, self.group)

    @torch.no_grad()
    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the shards in place (no graph); returns ``t``."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    @torch.no_grad()
    def max_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    @torch.no_grad()
    def gather(self, t: torch.Tensor, world: bool = False) -> torch.Tensor:
        """Concatenate equal-shaped ``t`` from the shards (``world``: from every rank) along dim 0."""
        group = self.world if world else self.group
        n = dist.get_world_size(group)
        out = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(out, t.contiguous(), group=group)
        return torch.cat(out)


def check_shardable(arch: str, cfg: Any, count: int) -> None:
    """Raise :class:`ConfigError` when the dictionary of ``cfg`` cannot be split into ``count`` shards."""
    if count <= 1:
        return
    if arch not in SHARDABLE:
        why = {"matryoshka": "its nested prefix losses need each prefix's reconstruction on every shard"}.get(
            arch, "its maths is not split over latents"
        )
        raise ConfigError(
            f"latent_shards: architecture {arch!r} cannot be latent-sharded ({why}); "
            f"shardable: {', '.join(SHARDABLE)}"
        )
    if cfg.d_latent % count:
        raise ConfigError(f"latent_shards: {count} does not divide d_latent ({cfg.d_latent})")
    if cfg.dedicated_base or cfg.dedicated_ft or cfg.shared_latents:
        raise ConfigError(
            "latent_shards: dedicated partitions and designated shared latents are not supported with "
            "latent sharding"
        )


def latent_dims(model: Any) -> dict[str, int]:
    """``{state-dict name: latent dimension}`` of the sharded tensors of ``model`` (a CrossCoder)."""
    dims = dict(MODEL_LATENT_DIMS)
    dims.update({f"arch.{k}": v for k, v in model.arch.latent_dims.items()})
    return dims


def shard_tensor(t: torch.Tensor, dim: int, index: int, count: int) -> torch.Tensor:
    """Shard ``index`` of ``count`` equal slices of ``t`` along ``dim`` (a contiguous copy)."""
    n = t.shape[dim] // count
    return t.narrow(dim, index * n, n).contiguous()


def shard_state(
    state: dict[str, torch.Tensor], dims: dict[str, int], index: int, count: int
) -> dict[str, torch.Tensor]:
    """Slice every tensor named in ``dims`` (replicated ones are kept whole)."""
    return {k: shard_tensor(v, dims[k], index, count) if k in dims else v for k, v in state.items()}


def assemble_state(
    shards: Sequence[dict[str, torch.Tensor]], dims: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shard_state`: concatenate the sharded tensors in shard order (replicated ones from
    shard 0)."""
    first = shards[0]
    return {k: torch.cat([s[k] for s in shards], dim=dims[k]) if k in dims else v for k, v in first.items()}


def shard_optimizer_state(
    opt_state: dict[str, Any], names: Sequence[str], dims: dict[str, int], index: int, count: int
) -> dict[str, Any]:
    """An Adam ``state_dict()`` of the whole dictionary -> the one of shard ``index``. ``names[i]`` is the
    state-dict name of parameter ``i`` (the optimiser's order); moments are sliced like their parameter."""
    state = {}
    for i, s in opt_state["state"].items():
        dim = dims.get(names[int(i)])
        state[i] = {
            k: shard_tensor(v, dim, index, count) if dim is not None and v.dim() > 0 else v
            for k, v in s.items()
        }
    return {"state": state, "param_groups": opt_state["param_groups"]}


def assemble_optimizer_state(
    shards: Sequence[dict[str, Any]], names: Sequence[str], dims: dict[str, int]
) -> dict[str, Any]:
    """Inverse of :func:`shard_optimizer_state`."""
    state = {}
    for i, s in shards[0]["state"].items():
        dim = dims.get(names[int(i)])
        state[i] = {
            k: torch.cat([sh["state"][i][k] for sh in shards], dim=dim)
            if dim is not None and v.dim() > 0
            else v
            for k, v in s.items()
        }
    return {"state": state, "param_groups": shards[0]["param_groups"]}


def parameter_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of ``model.parameters()`` in order (the optimiser's parameter indices)."""
    return [n for n, _ in model.named_parameters()]


@torch.no_grad()
def clip_grad_norm_(
    params: Sequence[torch.nn.Parameter],
    replicated: Sequence[torch.nn.Parameter],
    max_norm: float,
    shard: LatentShard,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole dictionary: the norm of every shard's gradients
    (summed squares over the shards) and of the replicated parameters' (counted once), the same clipping
    factor ``min(1, max_norm / (norm + 1e-6))`` on every shard. Returns the total norm."""
    rep = {id(p) for p in replicated}
    grads = [p.grad for p in params if p.grad is not None and id(p) not in rep]
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for g in grads:
        sq += g.float().pow(2).sum()
    shard.sum_(sq)
    for p in replicated:
        if p.grad is not None:
            sq += p.grad.float().pow(2).sum()
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return total


def make_shard(cfg: Any, generator: torch.Generator | None, shard: LatentShard) -> Any:
    """Shard ``shard.index`` of the initial CrossCoder of ``cfg`` (``cfg.d_latent`` latents in all): a
    CrossCoder of ``d_latent / count`` latents holding exactly the initial values that
    ``CrossCoder(cfg, generator)`` gives those latents, built without the whole dictionary (only the
    initial decoder depends on the generator; :func:`~crosscoder.model.crosscoder.initial_decoder`).
    ``shard`` is attached and its ``d_latent`` set."""
    from .crosscoder import CrossCoder, initial_decoder

    local = cfg.d_latent // shard.count
    model = CrossCoder(dataclasses.replace(cfg, d_latent=local), generator=torch.Generator().manual_seed(0))
    start = shard.index * local
    with torch.no_grad():
        w_dec = initial_decoder(cfg, model.width_mask, generator, start, start + local)
        model.W_dec.copy_(w_dec)
        model.W_enc.copy_(w_dec.permute(1, 2, 0))
    shard.d_latent = cfg.d_latent
    model.shard = shard
    return model


@torch.no_grad()
def gather_state(model: Any) -> dict[str, torch.Tensor] | None:
    """The whole dictionary's state dict, gathered from the shards of ``model``'s group onto the group's
    first shard (``None`` on the others); every shard of the group must call it."""
    dims = latent_dims(model)
    shard = model.shard
    dst = dist.get_global_rank(shard.group, 0) if shard.group is not None else 0
    first = dist.get_rank() == dst
    out = {}
    for k, v in model.state_dict().items():
        if k not in dims:
            out[k] = v
            continue
        moved = v.movedim(dims[k], 0).contiguous()
        parts = [torch.empty_like(moved) for _ in range(shard.count)] if first else None
        dist.gather(moved, parts, dst=dst, group=shard.group)
        if first:
            out[k] = torch.cat(parts).movedim(0, dims[k]).contiguous()
            del parts
    return out if first else None


def slice_checkpoint(
    model: Any, tensors: dict[str, torch.Tensor], optimizer: dict[str, Any], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole dictionary's checkpoint (``tensors``: state dict and ``tokens_since_fired [d_latent]``;
    ``optimizer``: Adam state dict), whatever mesh wrote it -> the slices of the shard ``model``."""
    shard = model.shard
    if tensors["b_enc"].shape[0] != shard.d_latent:
        raise ConfigError(
            f"{where}: checkpoint has {tensors['b_enc'].shape[0]} latents, the run {shard.d_latent}"
        )
    dims = {**latent_dims(model), "tokens_since_fired": 0}
    return (
        shard_state(tensors, dims, shard.index, shard.count),
        shard_optimizer_state(optimizer, parameter_names(model), dims, shard.index, shard.count),
    )


def whole_model(model: Any, cfg: Any) -> Any:
    """The whole dictionary (config ``cfg``) on the CPU of the group's first shard, assembled from the shard
    ``model`` and the others of its group (one gather per tensor); ``None`` on the other shards. Only that
    rank ever holds the whole dictionary, once (the gathered tensors become the model's)."""
    from .crosscoder import CrossCoder

    state = gather_state(model)
    if state is None:
        return None
    whole = CrossCoder(cfg, empty=True)
    whole.load_state_dict({k: v.cpu() for k, v in state.items()}, assign=True)
    return whole.train(model.training)
