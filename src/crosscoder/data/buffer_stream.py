"""The on-the-fly buffer's deterministic row stream: chunks of sequences, blocks of rows, generations.

* **Chunks.** Global chunk ``c`` is the ``model_batch_size`` sequences ``[c * mb, (c + 1) * mb)`` of the
  endless sequence stream (the dataset restarts when exhausted; sequence ids keep growing), run through
  the models in ONE forward. Its rows are a pure function of ``c`` (the batch composition is fixed), so
  any process re-running chunk ``c`` gets the same rows bit for bit; with ``--max-norm-ratio`` they also
  depend on the norm filter's window, which is snapshotted before every chunk.
* **Row streams** (:class:`RowStream`): the rows of the chunks ``first, first + step, first + 2 step ...``
  (a rank's share: ``step`` = the number of ranks), taken in blocks of any size. A position is
  ``(k, offset)``: ``offset`` rows into the stream's ``k``-th chunk; a stream restarted at a position (with
  the filter window of that chunk) yields exactly the rows the first one did.
* **Generations** (:class:`Generations`): block ``F_g`` of fresh rows (``s + c`` rows for ``g = 0``, then
  ``s``) is split by a seeded permutation: ``c`` rows are carried to generation ``g + 1`` and the rest,
  with the ``c`` rows carried from ``g - 1``, make generation ``g``'s pool of ``s`` rows, shuffled with a
  seeded permutation and served in order. Every row is served exactly once, at most one generation after
  it was read; a generation depends only on ``F_{g-1}`` and ``F_g``.
* **Overlap** (:class:`Producer`): a background thread builds generation ``g + 1`` while ``g`` is served;
  generations are pure functions of the stream, so the rows served never depend on timing.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .pair_collector import PairCollector
from .text import TokenSequence

log = logging.getLogger(__name__)

Position = tuple[int, int]  # (k: the stream's k-th chunk, offset: rows of that chunk already taken)


def endless(
    sequences: Callable[[], Iterator[TokenSequence]], start: int, name: str
) -> Iterator[TokenSequence]:
    """Sequences with id >= ``start``, forever: the dataset restarts (ids keep growing) when exhausted."""
    offset = 0
    while True:
        n = 0
        for s in sequences():
            n += 1
            if s.seq_id + offset >= start:
                yield TokenSequence(s.seq_id + offset, s.ids)
        if n == 0:
            raise DataError(f"{name}: no text to collect (empty dataset)")
        offset += n
        if offset > start:
            log.warning("%s exhausted after %d sequences; starting over", name, n)


def encode_window(hist: np.ndarray | None) -> dict[str, Any] | None:
    """A norm-filter window ``[n, n_blocks]`` float64 as JSON (base64 of the bytes)."""
    if hist is None:
        return None
    a = np.ascontiguousarray(hist, dtype=np.float64)
    return {"shape": list(a.shape), "float64": base64.b64encode(a.tobytes()).decode()}


def decode_window(d: dict[str, Any] | None) -> np.ndarray | None:
    if d is None:
        return None
    return np.frombuffer(base64.b64decode(d["float64"]), dtype=np.float64).reshape(d["shape"]).copy()


class Stopped(Exception):
    """A background producer was asked to stop between two chunks."""


@dataclass
class Block:
    """Consecutive rows of a :class:`RowStream`."""

    acts: torch.Tensor | None  # [n, n_models, d_model] float32, a fresh tensor (None: given to a sink)
    index: torch.Tensor | None  # [n, 3] int64: token id, sequence id, position
    start: Position
    end: Position  # the position right after the block
    start_window: np.ndarray | None  # the norm filter's window before chunk start[0] (None: no filter)


class RowStream:
    """Rows of the chunks ``first + k * step`` (``k = 0, 1, ...``) from position ``start`` (see module
    docstring). ``window``: the norm filter's window before chunk ``start[0]`` (restored into the collector).
    ``cache``: rows of chunks computed earlier (popped when reached); ``on_chunk(c, acts, index)`` sees every
    chunk computed. One thread at a time may use a collector."""

    def __init__(
        self,
        collector: PairCollector,
        sequences: Callable[[], Iterator[TokenSequence]],
        model_batch_size: int,
        *,
        first: int,
        step: int = 1,
        start: Position = (0, 0),
        window: np.ndarray | None = None,
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        on_chunk: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        name: str = "dataset",
        stop: threading.Event | None = None,
    ) -> None:
        self.collector, self.sequences, self.mb = collector, sequences, model_batch_size
        self.first, self.step, self.name = first, step, name
        self.cache = cache if cache is not None else {}
        self.on_chunk, self.stop = on_chunk, stop
        if window is not None and collector.filter is not None:
            collector.filter.hist = window.copy()
        self._chunks = self._iter(start[0])
        self._skip = start[1]
        self._left: list[Any] | None = None  # [k, acts, index, offset, window before chunk k]
        self._next_k = start[0]
        self.forward_s = 0.0  # seconds spent in model forwards

    def global_chunk(self, k: int) -> int:
        return self.first + k * self.step

    def _window(self) -> np.ndarray | None:
        f = self.collector.filter
        return None if f is None else f.hist.copy()

    def _iter(self, k0: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, np.ndarray | None]]:
        group: list[TokenSequence] = []
        empty = 0
        for s in endless(self.sequences, self.global_chunk(k0) * self.mb, self.name):
            c = s.seq_id // self.mb
            if c < self.first or (c - self.first) % self.step:
                continue
            group.append(s)
            if len(group) < self.mb:
                continue
            if self.stop is not None and self.stop.is_set():
                raise Stopped
            window = self._window()
            if c in self.cache:
                acts, index = self.cache.pop(c)
            else:
                t = time.perf_counter()
                acts, index = self.collector.rows(group)
                self.forward_s += time.perf_counter() - t
                if self.on_chunk is not None:
                    self.on_chunk(c, acts, index)
            self.collector.take_dropped(group[-1].seq_id)  # the collector's per-sequence counts, not kept
            for old in [o for o in self.cache if o < c]:  # cached chunks this stream skipped past
                del self.cache[old]
            group = []
            empty = empty + 1 if len(acts) == 0 else 0
            if empty > 1000:
                raise DataError(
                    f"{self.name}: 1000 model batches in a row kept no position "
                    "(all BOS/padding, or --max-norm-ratio too low)"
                )
            yield (c - self.first) // self.step, acts, index, window

    def take(self, n: int, sink: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> Block:
        """The next ``n`` rows (``n >= 1``), concatenated; or, with ``sink``, handed over piece by piece as
        ``sink(offset in the block, acts, index)`` (views of one chunk's rows) and not kept."""
        acts, idx, have = [], [], 0
        start: Position | None = None
        start_window = None
        while have < n:
            if self._left is None:
                k, a, i, w = next(self._chunks)
                self._left = [k, a, i, self._skip, w]
                self._skip = 0
            k, a, i, off, w = self._left
            if start is None:
                start, start_window = (k, off), w
            m = min(n - have, len(a) - off)
            if sink is not None:
                sink(have, a[off : off + m], i[off : off + m])
            else:
                acts.append(a[off : off + m])
                idx.append(i[off : off + m])
            have += m
            if off + m == len(a):
                self._left, self._next_k = None, k + 1
            else:
                self._left[3] = off + m
        end = (self._left[0], self._left[3]) if self._left is not None else (self._next_k, 0)
        assert start is not None
        if sink is not None:
            return Block(None, None, start, end, start_window)
        return Block(torch.cat(acts), torch.cat(idx), start, end, start_window)


@dataclass
class Generation:
    """One generation's pool: ``acts [s, n_models, d_model]`` (normalised, in serving order) and
    ``index [s, 3]``; ``start``/``end``/``start_window`` locate its block ``F_g`` in the row stream (the
    block's rows are not kept), ``prev_*`` the previous block."""

    g: int
    acts: torch.Tensor
    index: torch.Tensor
    start: Position
    end: Position
    start_window: np.ndarray | None
    prev_start: Position | None = None  # where F_{g-1} began (None for g = 0)
    prev_window: np.ndarray | None = None
    seconds: float = 0.0  # building it (forwards included)


class Generations:
    """Generation ``g`` from blocks of a :class:`RowStream` (see module docstring).

    ``sizes(g)``: rows of ``F_g``; ``carry``: rows carried to the next generation; ``perms(g, n)``:
    ``(sigma over the n rows of F_g, pi over the pool)``; ``prepare(acts)`` normalises rows in place. Rows
    go from the model outputs straight to their slot in the pool or the carry, one chunk at a time: the
    block itself is never held (memory: the pool, two carries and one chunk)."""

    def __init__(
        self,
        rows: RowStream,
        first_gen: int,
        sizes: Callable[[int], int],
        carry: int,
        perms: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
        prepare: Callable[[torch.Tensor], torch.Tensor],
        n_models: int,
        d_model: int,
        device: torch.device,
    ) -> None:
        self.rows, self.g, self.sizes, self.carry_rows = rows, first_gen, sizes, carry
        self.perms, self.prepare = perms, prepare
        self.shape, self.device = (n_models, d_model), device
        self._carry: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prev: tuple[Position, np.ndarray | None] | None = None  # (start, window) of the last block

    def _empty(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.empty(n, *self.shape, dtype=torch.float32, device=self.device),
            torch.empty(n, 3, dtype=torch.long, device=self.device),
        )

    def _read(self, pool: bool) -> tuple[Block, tuple[torch.Tensor, torch.Tensor] | None]:
        """Read ``F_g``: its served rows, with the rows carried from ``g - 1``, into the pool in serving
        order (when ``pool``), the rest into the new carry."""
        n = self.sizes(self.g)
        sigma, pi = self.perms(self.g, n)
        keep = n - self.carry_rows
        j_of = torch.empty(n, dtype=torch.long)
        j_of[sigma] = torch.arange(n)  # block row p is the j-th of the split: served if j < keep
        old = self._carry
        n_old = 0 if old is None else len(old[0])
        out = self._empty(n_old + keep) if pool else None
        slot = torch.empty_like(pi)
        slot[pi] = torch.arange(len(pi))  # pre-order row q (old carry, then served) -> pool slot
        if out is not None and old is not None:
            dst = slot[:n_old].to(self.device)
            out[0][dst], out[1][dst] = old
        new = self._empty(self.carry_rows)

        def sink(lo: int, a: torch.Tensor, i: torch.Tensor) -> None:
            j = j_of[lo : lo + len(a)]
            served = j < keep
            x = self.prepare(a.clone())
            c = (~served).nonzero().flatten()
            dst = (j[c] - keep).to(self.device)
            new[0][dst], new[1][dst] = x[c.to(x.device)], i[c.to(i.device)]
            if out is not None:
                s = served.nonzero().flatten()
                dst = slot[n_old + j[s]].to(self.device)
                out[0][dst], out[1][dst] = x[s.to(x.device)], i[s.to(i.device)]

        blk = self.rows.take(n, sink)
        self._carry = new
        return blk, out

    def skip(self) -> None:
        """Read ``F_g`` only for the rows it carries to ``g + 1`` (rebuilding a generation on resume)."""
        blk, _ = self._read(pool=False)
        self._prev = (blk.start, blk.start_window)
        self.g += 1

    def next(self) -> Generation:
        t = time.perf_counter()
        blk, out = self._read(pool=True)
        assert out is not None
        prev, self._prev = self._prev, (blk.start, blk.start_window)
        gen = Generation(
            self.g,
            out[0],
            out[1],
            blk.start,
            blk.end,
            blk.start_window,
            prev[0] if prev else None,
            prev[1] if prev else None,
        )
        self.g += 1
        gen.seconds = time.perf_counter() - t
        return gen


class Producer:
    """Builds generations in a background thread, one ahead of the one being served."""

    def __init__(self, gens: Generations, stop: threading.Event) -> None:
        self.gens, self.stop = gens, stop
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(1)  # generations built but not yet taken: at most one
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="crosscoder-buffer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            while not self._slots.acquire(timeout=0.1):
                if self.stop.is_set():
                    return
            if self.stop.is_set():
                return
            # On CUDA this thread's current stream is the default one, as the trainer's: the kernels of the
            # two are ordered (a pool is written before any batch of it is read) and the host work overlaps.
            try:
                with torch.no_grad():
                    gen: Any = self.gens.next()
            except Stopped:
                return
            except BaseException as e:  # noqa: BLE001 - raised in the consumer
                self._queue.put(e)
                return
            self._queue.put(gen)

    def get(self) -> Generation:
        gen = self._queue.get()
        self._slots.release()
        if isinstance(gen, BaseException):
            raise gen
        return gen

    def close(self) -> None:
        self.stop.set()
        self._slots.release()
        self._thread.join()
