"""Distributed training helpers (``torchrun`` + DistributedDataParallel; NCCL on GPU, gloo on CPU).

``torchrun --nproc_per_node=N -m crosscoder train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`setup`
initialises the default process group from them. Every collective used by the training step goes
through :class:`Dist`, which is a no-op when ``world_size == 1``, so the same code path serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place (returns ``t``)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped ``t`` from every rank along dim 0 (rank order)."""
        if not self.enabled:
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
