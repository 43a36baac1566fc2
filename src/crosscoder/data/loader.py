"""Batches for training: a seeded shuffle over a paired cache, normalised, prefetched in a thread.

A *batch source* is what the trainer consumes (:class:`BatchSource`). :class:`CacheBatches` serves one
from a :class:`~crosscoder.data.paired.PairedCache`:

* a seeded split holds out ``val_tokens`` rows that are never trained on;
* the remaining rows are shuffled per epoch with ``seed`` (epoch ``e`` uses ``[seed, e]``), so batch
  ``t`` is a pure function of ``(seed, t)`` and resume only needs ``t`` (``state_dict``);
* a background thread reads ahead ``prefetch`` batches from the memory maps; rows are mapped by the
  run's :class:`~crosscoder.normalization.Normalization` (``norm_scale * (x - norm_mean)``) so that
  batches arrive in the normalised training space;
* under ``torchrun``, rank ``r`` of ``W`` serves rows ``[r*B/W, (r+1)*B/W)`` of each global batch of ``B``
  rows, so the union over ranks is exactly the single-process batch and the state is rank-independent.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from ..normalization import Normalization
from .paired import PairedCache


class BatchSource(Protocol):
    """What the trainer needs from a data source."""

    n_models: int
    d_model: int
    norm_scale: list[float]  # factor per model multiplying raw activations (after centring)
    norm_mean: list[list[float]] | None  # per-model mean subtracted first ([n_models][d_model]), or None
    info: dict[str, Any]  # fingerprints, model names, site ... recorded in config.json

    def next_batch(self) -> torch.Tensor:
        """``[batch_size, n_models, d_model]`` float32, normalised."""

    def val_batches(self) -> Iterator[torch.Tensor]:
        """The held-out rows in fixed order, normalised (empty when there is no validation set)."""

    def sample_batches(self, n_tokens: int) -> Iterator[torch.Tensor]:
        """About ``n_tokens`` training rows, normalised, the same on every rank; the training stream's
        position and state are left untouched (used to calibrate an inference threshold)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def split_rows(n_rows: int, val_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n_rows)`` into (train, val) row indices, val of size ``val_tokens``."""
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n_rows)
    return np.sort(perm[val_tokens:]), np.sort(perm[:val_tokens])


class CacheBatches:
    """Shuffled, normalised, prefetched batches over a :class:`PairedCache` (see module docstring)."""

    def __init__(
        self,
        cache: PairedCache,
        batch_size: int,
        seed: int,
        norm: Normalization | list[float],
        val_tokens: int = 0,
        prefetch: int = 4,
        device: str | torch.device = "cpu",
        info: dict[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            from ..errors import ConfigError

            raise ConfigError(
                f"batch_size: {batch_size} is not divisible by the number of ranks ({world_size})"
            )
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.n_models, self.d_model = cache.n_models, cache.d_model
        self.norm = Normalization.of(norm)
        self.norm_scale, self.norm_mean = list(self.norm.scale), self.norm.mean
        self.train_mean: torch.Tensor | None = None  # [n_models, d_model] training-space mean, set by the run
        self.info = dict(info or {})
        self.device = torch.device(device)
        self.train_rows, self.val_rows = split_rows(cache.n_rows, val_tokens, seed)
        if len(self.train_rows) < batch_size:
            from ..errors import DataError

            raise DataError(
                f"{cache.path}: {len(self.train_rows)} training rows, fewer than one batch ({batch_size})"
            )
        self.batches_per_epoch = len(self.train_rows) // batch_size
        self.prefetch = max(0, prefetch)
        self._served = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ order
    def rows_for(self, t: int) -> np.ndarray:
        """Cache rows of global batch ``t``."""
        epoch, j = divmod(t, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.train_rows)
            self._perm_epoch = epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]

    def _make(self, t: int) -> torch.Tensor:
        lo = self.rank * self.local_batch
        x = self.cache.read(self.rows_for(t)[lo : lo + self.local_batch])
        self.norm.apply_(x)
        if self.device.type == "cuda":
            return x.pin_memory()
        return x

    # ------------------------------------------------------------------ prefetch thread
    def _worker(self, start: int) -> None:
        t = start
        while not self._stop.is_set():
            try:
                item = (t, self._make(t))
            except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
                item = (t, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            t += 1

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._worker, args=(self._served,), daemon=True)
        self._thread.start()

    def next_batch(self) -> torch.Tensor:
        if self.prefetch == 0:
            x = self._make(self._served)
        else:
            if self._thread is None:
                self._start()
            t, x = self._queue.get()
            assert t == self._served, (t, self._served)
            if isinstance(x, BaseException):
                raise x
        self._served += 1
        return x.to(self.device, non_blocking=True)

    def val_batches(self) -> Iterator[torch.Tensor]:
        """This rank's share of the held-out rows (rank r takes every world_size-th batch)."""
        starts = range(0, len(self.val_rows), self.batch_size)
        for i in list(starts)[self.rank :: self.world_size]:
            x = self.cache.read(self.val_rows[i : i + self.batch_size])
            yield self.norm.apply_(x).to(self.device)

    def sample_batches(self, n_tokens: int) -> Iterator[torch.Tensor]:
        """The first ``n_tokens`` rows (whole batches, at least one) of a seeded permutation of the
        training rows, independent of the rank and of the stream position."""
        perm = np.random.default_rng([self.seed, 0xCA1]).permutation(self.train_rows)
        n = min(len(perm), max(self.batch_size, n_tokens))
        for lo in range(0, n, self.batch_size):
            x = self.cache.read(np.sort(perm[lo : min(lo + self.batch_size, n)]))
            yield self.norm.apply_(x).to(self.device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"batches_served": self._served, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self._served = int(state["batches_served"])

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            self._queue = None
