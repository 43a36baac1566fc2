"""Stopping and restarting under a scheduler: SIGINT/SIGTERM, the per-step stop agreement of the ranks, and
torchrun's elastic restarts (docs/training.md, "Several processes").

* A signal sets a flag; after every step the ranks agree on it (:meth:`Dist.any_rank`, one one-byte
  all-reduce on the host), so every rank checkpoints and stops after the same step, at most one step after
  the signal arrived. One process stops after the current step with no collective.
* ``torchrun --max-restarts N`` restarts every worker after one fails, with ``TORCHELASTIC_RESTART_COUNT``
  > 0: such a restart resumes the run in ``OUT`` from its newest usable checkpoint as ``--resume`` does, and
  its rank 0 waits up to :data:`LOCK_WAIT_S` for ``OUT``'s lock (the previous rank 0 may still be ending).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from ..distributed import Dist

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
LOCK_WAIT_S = 60.0
# Test only: ``RANK:STEP`` makes that rank SIGKILL itself after that step, on the first attempt only (read
# here and nowhere else; tests/test_elastic.py).
TEST_KILL_ENV = "CROSSCODER_TEST_KILL_AT_STEP"


def restart_count() -> int:
    """How many times torchrun restarted the workers (0 on the first attempt and without torchrun)."""
    try:
        return int(os.environ.get(RESTART_ENV, "0"))
    except ValueError:
        return 0


def elastic_resume(out: Path) -> bool:
    """A torchrun restart of a run that got as far as writing ``OUT/config.json``: resume it."""
    return restart_count() > 0 and (Path(out) / "config.json").is_file()


def lock_wait() -> float:
    """Seconds rank 0 waits for ``OUT``'s lock: a restart waits for the previous rank 0 to end."""
    return LOCK_WAIT_S if restart_count() > 0 else 0.0


def _test_kill_step(rank: int) -> int | None:
    spec = os.environ.get(TEST_KILL_ENV)
    if not spec or restart_count() > 0:
        return None
    r, s = spec.split(":")
    return int(s) if int(r) == rank else None


class Stopper:
    """Turns SIGINT/SIGTERM into a flag (handlers installed for the block, main thread only) and decides,
    after each step, whether every rank stops there."""

    def __init__(self, dist: Dist, stop_after: int | None = None) -> None:
        self.dist, self.stop_after = dist, stop_after
        self.signum: int | None = None
        self.step = 0  # steps done, kept current by :meth:`should_stop`
        self.received_at: int | None = None  # steps done when the signal arrived
        self.kill_at = _test_kill_step(dist.rank)
        self.agreed = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, self.step

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def should_stop(self, step: int) -> bool:
        """After step ``step`` (steps done): a signal on any rank, or ``stop_after`` reached."""
        self.step = step
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        requested = self.stop_after is not None and step >= self.stop_after
        self.agreed = self.dist.any_rank(self.signum is not None)
        return self.agreed or requested

    def reason(self) -> str:
        if self.signum is None:
            return "signal on another rank" if self.agreed else "stop requested"
        return f"signal {self.signum} (received after step {self.received_at})"
