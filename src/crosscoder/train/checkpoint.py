"""Checkpoints: ``OUT/checkpoints/step_<N>/``, each written to a temp folder and renamed into place.

A checkpoint holds ``model.safetensors`` (the model's state dict in the normalised training space,
with the architecture's parameters and buffers such as BatchTopK's threshold, and the dead-latent
counters), ``optimizer.pt`` and ``scheduler.pt`` (tensors and plain
values only, read back with ``weights_only=True``), ``rng.pt`` (torch CPU/CUDA generator states) and
``state.json`` (step, tokens seen, data position). Only the newest ``keep`` complete checkpoints are kept;
a failed write leaves the earlier ones untouched.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CrossCoderError
from ..io import atomic_dir, fsync_dir

_STEP = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out/checkpoints``, oldest first."""
    root = Path(out) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP.match(p.name)
            if m and p.is_dir() and all((p / f).is_file() for f in FILES):
                found.append((int(m.group(1)), p))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the newest ``keep``."""
    root = Path(out) / "checkpoints"
    target = root / f"step_{step}"
    if target.exists():  # same step saved again (e.g. a signal right after a periodic save)
        return target
    with atomic_dir(target) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors")
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    fsync_dir(root)
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint folder; raises :class:`CrossCoderError` naming the file if it is unreadable."""
    path = Path(path)
    try:
        return {
            "tensors": load_file(str(path / "model.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
            "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
            "rng": torch.load(path / "rng.pt", weights_only=True),
            "state": json.loads((path / "state.json").read_text()),
        }
    except Exception as e:  # noqa: BLE001
        raise CrossCoderError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
