"""Reused buffers, the compute dtype, and the CPU thread policy of the fast training paths."""

from __future__ import annotations

from typing import Any

import torch


class Workspace:
    """Named buffers reused across calls; never copied (``deepcopy``/pickle give an empty workspace)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
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


def compute_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype when autocast is on for ``device``, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32
