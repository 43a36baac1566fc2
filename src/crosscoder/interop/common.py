"""Helpers shared by the converters and the Hub export: safe tensor loading and folder replacement.

Nothing here ever unpickles arbitrary objects: ``.pt`` files go through ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers and refuses anything else.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CrossCoderError
from ..io import atomic_dir

# Key under which a converted model's config.json records where it came from.
CONVERTED_KEY = "converted_from"


@dataclass
class Conversion:
    """Result of reading a foreign crosscoder: our model plus what the user should know."""

    model: Any  # crosscoder.model.CrossCoder (typed loosely to keep this module import-light)
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (errors stay one line)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON config file that must hold an object (one-line errors naming the file)."""
    import json

    try:
        cfg = json.loads(Path(path).read_text())
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise CrossCoderError(f"{path}: cannot parse config ({first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise CrossCoderError(f"{path}: config must be a JSON object")
    return cfg


def safe_torch_load(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` -> a dict; one-line :class:`CrossCoderError` otherwise.

    A file holding anything other than tensors and plain containers (a pickled class, a callable)
    is refused without executing it.
    """
    path = Path(path)
    if not path.is_file():
        raise CrossCoderError(f"{path}: file not found")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (corrupt zip), ...
        raise CrossCoderError(_load_error(path, e)) from None
    if not isinstance(obj, dict):
        raise CrossCoderError(
            f"{path}: not a state dict (got a {type(obj).__name__}, expected a dict of tensors); "
            "re-save it with torch.save(model.state_dict(), path)"
        )
    return dict(obj)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"Unsupported (?:global|class):?\s*(?:GLOBAL\s+)?([\w.]+)")


def _load_error(path: Path, e: BaseException) -> str:
    """One plain line for a failed ``torch.load(weights_only=True)``: a refused pickle, or a damaged file.

    PyTorch's own message spans many lines, carries ANSI colour codes and suggests loading with
    ``weights_only=False``, which we never do; none of it is shown.
    """
    text = _ANSI.sub("", str(e))
    m = _GLOBAL.search(text)
    if m:  # a well-formed pickle naming a class or callable that weights_only refuses to rebuild
        what = f" (found {m.group(1)})"
        return (
            f"{path}: refused to load: the file holds pickled Python objects, not only tensors{what}; "
            "only tensor state dicts are read. Re-save it with torch.save(model.state_dict(), path)"
        )
    return (
        f"{path}: the file is damaged or not a PyTorch state dict saved with torch.save ({type(e).__name__})"
    )


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a dict of CPU tensors (one-line error when unreadable)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CrossCoderError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - corrupt file -> one line
        raise CrossCoderError(f"{path}: cannot read safetensors ({first_line(e)})") from None


def tensor(sd: dict[str, Any], key: str, where: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``sd[key]`` as a float32 tensor, checked against ``shape`` (one-line errors naming the key)."""
    if key not in sd:
        raise CrossCoderError(f"{where}: missing key {key!r}")
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise CrossCoderError(f"{where}: {key!r} is a {type(t).__name__}, expected a tensor")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CrossCoderError(f"{where}: {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t.detach().to(torch.float32)


def parse_norm_scale(norm_scale: Any, n_models: int) -> list[float] | None:
    """Validate ``--norm-scale`` factors: ``n_models`` positive finite numbers (or None)."""
    if norm_scale is None:
        return None
    vals = [float(v) for v in norm_scale]
    if len(vals) != n_models:
        raise CrossCoderError(f"--norm-scale: expected {n_models} factors (one per model), got {len(vals)}")
    if not all(v > 0 and v != float("inf") for v in vals):
        raise CrossCoderError(f"--norm-scale: factors must be positive and finite, got {vals}")
    return vals


def write_folder(out: str | os.PathLike, build: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create folder ``out`` by calling ``build(tmp_dir)`` on a temporary folder beside it, then renaming.

    An existing ``out`` is refused unless ``overwrite``; then it is replaced only once the new folder is
    complete (a failed build leaves the old one untouched).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CrossCoderError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CrossCoderError(f"{out}: exists and is not a folder")
    if not out.exists():
        with atomic_dir(out) as tmp:
            build(tmp)
        return out
    staged = out.with_name(f".{out.name}.new-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    for p in (staged, old):
        if p.exists():
            shutil.rmtree(p)
    with atomic_dir(staged) as tmp:
        build(tmp)
    os.replace(out, old)
    try:
        os.replace(staged, out)
    except BaseException:
        os.replace(old, out)
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def save_conversion(conv: Conversion, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a converted model as a crosscoder folder (``config.json`` + ``model.safetensors``)."""
    extra = {CONVERTED_KEY: conv.source} if conv.source else None
    return write_folder(out, lambda tmp: conv.model.save_pretrained(tmp, extra_config=extra), overwrite)
