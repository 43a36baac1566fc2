"""Checkpoints: ``OUT/checkpoints/step_<N>/``, each written to a temp folder and renamed into place.

A checkpoint holds ``model.safetensors`` (the model's state dict in the normalised training space,
with the architecture's parameters and buffers such as BatchTopK's threshold, and the dead-latent
counters), ``optimizer.pt`` and ``scheduler.pt`` (tensors and plain
values only, read back with ``weights_only=True``), ``rng.pt`` (torch CPU/CUDA generator states) and
``state.json`` (step, tokens seen, data position, the byte size of every other file and, in the final
checkpoint, the final metrics). Only the newest ``keep`` complete checkpoints are kept. Latent-sharded runs
add one file per shard (:mod:`crosscoder.train.checkpoint_shards`); reading one gives the same structure.

What a failure leaves (docs/training.md, "When things fail"):

* every file is flushed to disk (``fsync``) before the temp folder is renamed, so a ``step_<N>`` folder is
  always complete; a write that fails (disk full, I/O error) removes its temp folder, leaves the earlier
  checkpoints untouched and stops the run with one line (:func:`write_error`);
* on ``--resume`` a damaged checkpoint (missing file, wrong size, unreadable file) is named in one line,
  moved aside to ``damaged_step_<N>`` and the previous one is used (:func:`load_newest`);
* the final ``config.json`` and ``model.safetensors`` are written beside the run and renamed into place,
  ``model.safetensors`` last (:func:`write_final_model`), so a folder holding it is a finished run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CrossCoderError
from ..io import atomic_dir, fsync_dir

_STEP = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(CrossCoderError):
    """A checkpoint or the final model that cannot be written, or a damaged checkpoint."""


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """Every ``step_<N>`` folder under ``out/checkpoints`` (complete or not), oldest first."""
    root = Path(out) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out/checkpoints`` (every file present), oldest first."""
    return [(s, p) for s, p in checkpoint_dirs(out) if all((p / f).is_file() for f in FILES)]


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- writing
class _Sink:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write (torch reports only
    ``RuntimeError: unexpected pos``)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, b: Any) -> int:
        try:
            return self.fh.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)``, flushed and fsynced; a failed write raises its ``OSError``."""
    with open(path, "wb") as fh:
        sink = _Sink(fh)
        try:
            write(sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(e: BaseException) -> OSError | None:
    """The operating-system error behind a failed write: an ``OSError``, or the ``(os error N)`` that
    safetensors' writer puts in its message; ``None`` for anything else."""
    if isinstance(e, OSError) and e.errno is not None:
        return e
    m = re.search(r"\(os error (\d+)\)", str(e))
    if m:
        n = int(m.group(1))
        return OSError(n, os.strerror(n))
    return None


def write_error(out: Path, target: Path, e: BaseException, what: str) -> CheckpointError:
    """The one line for a failed write of ``what`` at ``target``: disk full or another OS error, which
    checkpoint is intact, and what to do."""
    oe = os_error(e)
    reason = (oe.strerror if oe is not None else None) or str(e).splitlines()[0]
    done = list_checkpoints(out)
    if what == "the final model":
        kept = f"training finished and its checkpoint {done[-1][1].name} is intact" if done else ""
        fix = "rerun with --resume to write the model"
    elif done:
        kept, fix = f"the previous checkpoint {done[-1][1].name} is intact", "rerun with --resume"
    elif (out / "config.json").is_file():
        kept, fix = "no checkpoint yet (--resume starts over)", "rerun with --resume"
    else:
        kept, fix = "", "rerun"
    if oe is not None and oe.errno in DISK_FULL:
        head, fix = f"disk full while writing {what} ({reason})", f"free space and {fix}"
    else:
        head, fix = f"cannot write {what} ({reason})", f"fix the cause and {fix}"
    return CheckpointError("; ".join(p for p in (f"{target}: {head}", kept, fix) if p))


def save_checkpoint(
    out: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the newest ``keep``; a failed write (disk full,
    I/O error) raises :class:`CheckpointError` and leaves the earlier checkpoints as they were."""
    root = Path(out) / "checkpoints"
    target = root / f"step_{step}"
    if target.exists():  # same step saved again (e.g. a signal right after a periodic save)
        return target
    try:
        with atomic_dir(target) as tmp:
            cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            save_file(cpu, str(tmp / "model.safetensors"))
            _fsync_file(tmp / "model.safetensors")
            for name, obj in (
                ("optimizer.pt", optimizer.state_dict()),
                ("scheduler.pt", scheduler.state_dict()),
                ("rng.pt", rng_state()),
            ):
                _write_file(tmp / name, lambda fh, obj=obj: torch.save(obj, fh))
            sizes = {f: (tmp / f).stat().st_size for f in FILES if f != "state.json"}
            text = json.dumps({**state, "files": sizes}, indent=2) + "\n"
            _write_file(tmp / "state.json", lambda fh: fh.write(text.encode()))
        fsync_dir(root)
    except Exception as e:  # noqa: BLE001 - an OS error becomes one line, anything else propagates
        raise_write_error(out, target, e, "a checkpoint")
    prune(out, keep)
    return target


def raise_write_error(out: Path, target: Path, e: Exception, what: str) -> None:
    """Re-raise ``e`` as :func:`write_error`'s one line when an OS error is behind it (disk full, I/O
    error), else as it is."""
    if isinstance(e, CheckpointError) or os_error(e) is None:
        raise e
    raise write_error(out, target, e, what) from None


def prune(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_final_model(model: Any, out: Path, extra_config: dict[str, Any]) -> None:
    """``model.save_pretrained`` into a temp folder in ``out``, then ``config.json`` and
    ``model.safetensors`` renamed into place, the weights last: a run folder with ``model.safetensors`` is
    a finished run. A failed write raises :class:`CheckpointError` (the final checkpoint stays)."""
    out = Path(out)
    try:
        with tempfile.TemporaryDirectory(prefix=".final.", suffix=".tmp", dir=out) as tmp:
            model.save_pretrained(tmp, extra_config=extra_config)
            for name in ("config.json", "model.safetensors"):
                _fsync_file(Path(tmp) / name)
                os.replace(Path(tmp) / name, out / name)
        fsync_dir(out)
    except Exception as e:  # noqa: BLE001
        if os_error(e) is None:
            raise
        raise write_error(out, out / "model.safetensors", e, "the final model") from None


@contextlib.contextmanager
def disk_full_errors(out: Path) -> Iterator[None]:
    """A full disk while writing the run's other files (``config.json``, ``metrics.jsonl``) -> one line."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise write_error(out, Path(e.filename or out), e, "the run's files") from None


def remove_temp_files(out: Path) -> None:
    """What a killed run left half-written: the temp folders and files of the atomic writes
    (``checkpoints/.step_<N>.*.tmp``, ``.final.*.tmp``, ``.config.json.*.tmp``...). Call only while holding
    the folder's lock."""
    for pattern in ("checkpoints/.step_*.tmp", ".*.tmp"):
        for p in Path(out).glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- reading
def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint folder; raises :class:`CheckpointError` naming the first missing, truncated or
    unreadable file."""
    path = Path(path)

    def damaged(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path / name}: damaged checkpoint ({why})")

    for name in FILES:
        if not (path / name).is_file():
            raise damaged(name, "missing")
    try:
        state = json.loads((path / "state.json").read_text())
        step = int(state["step"])
    except Exception as e:  # noqa: BLE001
        raise damaged("state.json", _first_line(e)) from None
    m = _STEP.match(path.name)
    if m and int(m.group(1)) != step:
        raise damaged("state.json", f"step {step} in the folder of step {m.group(1)}")
    for name, size in state.get("files", {}).items():  # recorded since the sizes were added
        if not (path / name).is_file():
            raise damaged(name, "missing")
        actual = (path / name).stat().st_size
        if actual != size:
            short = actual < size
            raise damaged(
                name, f"truncated: {actual} of {size} bytes" if short else f"{actual} bytes, not {size}"
            )
    loaded: dict[str, Any] = {"state": state}
    for key, name in (
        ("tensors", "model.safetensors"),
        ("optimizer", "optimizer.pt"),
        ("scheduler", "scheduler.pt"),
        ("rng", "rng.pt"),
    ):
        try:
            if name.endswith(".safetensors"):
                loaded[key] = load_file(str(path / name))
            else:
                loaded[key] = torch.load(path / name, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file -> one line naming it
            raise damaged(name, _first_line(e)) from None
    if "latent_shards" in state:  # a latent-sharded run's checkpoint: the whole dictionary from its shards
        from .checkpoint_shards import assemble

        assemble(path, state, loaded, damaged)
    return loaded


def load_newest(out: Path, main: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, or ``None`` when there is none. Each damaged newer checkpoint is
    reported in one line (stderr) and, by ``main`` (rank 0), moved aside to ``damaged_step_<N>``; when
    every checkpoint is damaged, :class:`CheckpointError` lists them."""
    bad: list[tuple[Path, str]] = []
    for _, path in reversed(checkpoint_dirs(out)):
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:
            bad.append((path, str(e)))
            continue
        for damaged, why in bad if main else ():
            aside = damaged.with_name(f"damaged_{damaged.name}")
            n = 1
            while aside.exists():
                n += 1
                aside = damaged.with_name(f"damaged_{damaged.name}.{n}")
            damaged.rename(aside)
            print(
                f"warning: {why}; resuming from {path.name} instead (moved to {aside.name})", file=sys.stderr
            )
        return path, ck
    if bad:
        raise CheckpointError(
            f"{Path(out) / 'checkpoints'}: no usable checkpoint to resume from ("
            + "; ".join(why for _, why in bad)
            + "); rerun with --overwrite to start over"
        )
    return None
