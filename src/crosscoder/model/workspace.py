"""Reused buffers, the compute dtype, and the CPU thread policy of the fast training paths."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Workspace:
    """Named buffers reused across calls; never copied (``deepcopy``/pickle give an empty workspace)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer ``shape`` (the same storage as last time when nothing changed)."""
        t = self._bufs.get(name)
        if t is None or t.shape != torch.Size(shape) or t.dtype != dtype or t.device != device:
            self._bufs.pop(name, None)
            t = torch.empty(shape, dtype=dtype, device=device)
            self._bufs[name] = t
        return t

    def clear(self) -> None:
        self._bufs.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> Workspace:
        return Workspace()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._bufs = {}


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


def compute_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype when autocast is on for ``device``, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32
