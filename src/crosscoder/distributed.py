"""Distributed training helpers (``torchrun`` + DistributedDataParallel; NCCL on GPU, gloo on CPU).

``torchrun --nproc_per_node=N -m crosscoder train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`setup`
initialises the default process group from them. Every collective used by the training step goes
through :class:`Dist`, which is a no-op when ``world_size == 1``, so the same code path serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: the process group of these ranks (``None``: every rank, the default group)
    group: Any = field(default=None, repr=False, compare=False)
    _flag_group: Any = field(default=None, repr=False, compare=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place (returns ``t``)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped ``t`` from every rank along dim 0 (rank order)."""
        if not self.enabled:
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.cat(out)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank: one all-reduce of one byte on the host, over a gloo group of
        its own (made at the first call, which every rank makes), so that it never waits on the GPU even
        under NCCL; the per-step stop agreement (:mod:`crosscoder.train.elastic`)."""
        if not self.enabled:
            return flag
        if self._flag_group is None:
            self._flag_group = dist.new_group(backend="gloo")
        t = torch.tensor([int(flag)], dtype=torch.uint8)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._flag_group)
        return bool(t[0])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: object) -> object:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


LOCAL = Dist()


def from_env() -> Dist:
    """The ranks torchrun describes in the environment (rank 0 of 1 when not launched by torchrun)."""
    return Dist(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Initialise the process group if launched by torchrun; pick this rank's device."""
    d = from_env()
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if d.enabled and not dist.is_initialized():
        _init_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def _init_group(backend: str) -> None:
    """The default process group from torchrun's environment. After an elastic restart (``--max-restarts``)
    torchrun hands the workers the same store as before, still holding the dead workers' addresses, which
    the new ones would connect to (gloo: ``connectFullMesh failed ... Connection refused``; pytorch#167288):
    under torchrun every attempt gets keys of its own."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend)
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"crosscoder/attempt_{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)


def setup_mesh(d: Dist, latent_shards: int) -> tuple[Dist, Any]:
    """The 2-D mesh ``data x latents`` over the ``W`` ranks of ``d``: ``(data, shard_group)``.

    Rank ``r`` holds latent shard ``r % S`` of data-parallel replica ``r // S`` (``S = latent_shards``, so
    the shards of one replica are neighbouring ranks: one node under NCCL). ``data`` is a :class:`Dist` over
    the ``W / S`` ranks holding the same shard (gradients are averaged, rows shared out, over them);
    ``shard_group`` the process group of the ``S`` ranks of this replica (for
    :class:`~crosscoder.model.sharding.LatentShard`), ``None`` when ``S == 1`` (``data`` is then ``d``).
    Every rank must call it (it creates the groups)."""
    from .errors import ConfigError

    s = latent_shards
    if s <= 1:
        return d, None
    if d.world_size % s:
        raise ConfigError(
            f"latent_shards: {s} does not divide the number of processes ({d.world_size}); launch with "
            f"torchrun --nproc_per_node=<a multiple of {s}> (or resume a sharded run with --latent-shards 1)"
        )
    replicas = d.world_size // s
    shard_group = data_group = None
    for rep in range(replicas):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(rep * s, (rep + 1) * s)))
        if d.rank // s == rep:
            shard_group = g
    for i in range(s):
        g = dist.new_group(list(range(i, d.world_size, s)))
        if d.rank % s == i:
            data_group = g
    data = Dist(d.rank // s, replicas, d.local_rank, group=data_group)
    return data, shard_group


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
