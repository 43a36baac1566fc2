"""Run guards: one ``crosscoder train`` per output folder, and an end that never deadlocks torchrun.

The folder's guard is an exclusive ``flock`` on ``OUT/.train.lock``.

The kernel releases a flock when its holder exits, however it exits (SIGKILL included), so a lock file
left behind by a killed run never blocks the next one; the file only tells who holds it (pid, host,
start time) for the message. The holder removes it when it ends. Under torchrun only rank 0 takes it,
before the process group starts, so no collective waits on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..distributed import Dist, teardown
from ..errors import CrossCoderError

LOCK_NAME = ".train.lock"


class OutputLocked(CrossCoderError):
    """Another live process holds the output folder's lock."""


def _acquire(path: Path, wait: float = 0.0) -> int | None:
    """The locked file descriptor of ``path``; raises :class:`OutputLocked` while another process holds it
    (after ``wait`` seconds of retries), ``None`` (with a note) on a filesystem without ``flock``."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CrossCoderError(f"{path}: cannot create the lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 400).decode(errors="replace").strip() or "starting"
            os.close(fd)
            if time.monotonic() < deadline:  # an elastic restart: the previous rank 0 is still ending
                time.sleep(0.1)
                continue
            raise OutputLocked(
                f"{path.parent}: another crosscoder train is writing to this folder ({holder}); wait for it "
                f"to end or choose another --out (lock: {path})"
            ) from None
        except OSError as e:
            os.close(fd)
            print(f"note: {path}: cannot lock the output folder ({e.strerror}); run one train at a time")
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we took it: lock the one now at the path
    info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with contextlib.suppress(OSError):  # who holds it, for the message (a full disk only loses that)
        os.ftruncate(fd, 0)
        os.write(fd, (info + "\n").encode())
    return fd


@contextlib.contextmanager
def output_lock(out: Path, take: bool = True, wait: float = 0.0) -> Iterator[None]:
    """Hold ``out``'s lock for the block (creating ``out``; an ``out`` created here and left empty is
    removed again), waiting up to ``wait`` seconds for another holder to end (a torchrun restart).
    ``take=False`` (ranks other than 0) does nothing."""
    if not take:
        yield
        return
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CrossCoderError(f"{out}: cannot create the output folder ({e.strerror})") from None
    path = out / LOCK_NAME
    fd = _acquire(path, wait)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding it (see the inode check in _acquire)
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: a run that failed before writing anything


def is_lock(p: Path) -> bool:
    return p.name == LOCK_NAME


def prepare_folder(out: Path, overwrite: bool) -> None:
    """With the lock held: ``overwrite`` removes everything in ``out`` but the lock file (which must keep
    its inode); otherwise only what a killed run left half-written goes (temp files and folders)."""
    if not overwrite:
        from .checkpoint import remove_temp_files

        remove_temp_files(out)
        return
    for p in Path(out).iterdir():
        if is_lock(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def ending(d: Dist, agreed: type[BaseException]) -> Iterator[None]:
    """End the torchrun process group: with its final barrier after success or after an exception every
    rank raises together (``agreed``: a stop at a log step); without it after a failure of this rank alone
    (rank 0's disk full), whose peers wait in a collective the barrier would never match. Their next
    collective then fails and torchrun ends the run, instead of every rank hanging."""
    try:
        yield
    except BaseException as e:
        if d.enabled and not isinstance(e, agreed):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        raise
    finally:
        teardown(d)  # nothing left to do once destroyed
