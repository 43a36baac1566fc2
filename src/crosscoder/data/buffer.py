"""On-the-fly training data: a shuffled buffer of paired activations, refilled while training runs.

:class:`Buffer` serves normalised batches ``[batch_size / W, n_models, d_model]`` (``W`` ranks under
torchrun, 1 otherwise) of paired activations collected by a
:class:`~crosscoder.data.pair_collector.PairCollector` (the same alignment, masking and outlier rules as
``crosscoder collect``). The text stream is cut into chunks of ``model_batch_size`` sequences, one model
forward each (:mod:`crosscoder.data.buffer_stream`):

* **validation**: the first ``val_tokens`` rows of the stream (chunks 0, 1, ...; the rest of the last one
  is dropped) are held out, never trained on. Every rank computes them; rank ``r`` evaluates held-out
  batches ``r, r + W, ...``, so the held-out set is the same whatever ``W``;
* **normalisation**: the next ``min(buffer_tokens, norm_sample_tokens)`` rows give the run's
  :class:`~crosscoder.normalization.Normalization` (per-model mean from the float64 running statistics,
  exactly what ``collect`` stores in ``meta.json``, and ``norm_scale = sqrt(d_model) / E||x - mean||``),
  computed by every rank from the same rows, so it is the same on every rank and for every ``W``; it is
  kept for the run (and restored on resume). A seeded choice of up to 32,768 of them, the same on every
  rank, are the rows :meth:`Buffer.sample_batches` returns (BatchTopK's threshold calibration);
* **training**: the chunks after the validation ones, ``j = 0, 1, ...``; rank ``r`` runs both models on the
  chunks ``j = r, r + W, r + 2W, ...`` only (its share of the text) and keeps a buffer of its own of
  ``buffer_tokens / W`` rows. A generation serves ``s`` rows (half the rank's buffer, whole batches): a
  seeded half of them were read in the previous generation, the other half in this one, shuffled together
  (see :mod:`~crosscoder.data.buffer_stream`). Every row is served exactly once.

With ``overlap`` the next generation is built in a background thread while the current one is served
(``next_batch`` waits only if it is not ready; ``wait_s`` / ``build_s`` count the seconds); the rows served
never depend on timing. Rows on the device per rank: the pool being served, the one being built and the
carried rows, about ``1.5 x buffer_tokens / W`` at most (``buffer_tokens / W`` without ``overlap``).

**Exact resume.** ``state_dict()`` records, for every rank, the stream position where the previous
generation's block of rows began (and the norm filter's window there), so ``load_state_dict`` re-runs
the models over at most two generations' blocks (``1.25 x buffer_tokens / W`` rows) and rebuilds the
buffer exactly: the resumed run serves the rows the uninterrupted one would have, and its weights end
bit-identical. Under torchrun ``state_dict()`` is a collective (every rank's state is gathered). Resuming
with another number of ranks (or from an older checkpoint) continues with text no rank has read yet, not
the exact rows.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..normalization import Normalization, estimate
from .buffer_stream import Generation, Generations, Producer, RowStream, decode_window, encode_window
from .collect import PairCollector
from .paired import RunningStats
from .text import TokenSequence

log = logging.getLogger(__name__)

SAMPLE_ROWS = 32_768  # normalisation rows kept for sample_batches (the trainer's calibration asks 32,768)


class Buffer:
    """A refreshing, shuffled buffer of paired activations (see module docstring). A ``BatchSource``."""

    def __init__(
        self,
        collector: PairCollector,
        sequences: Callable[[], Iterator[TokenSequence]],
        *,
        buffer_tokens: int,
        batch_size: int,
        model_batch_size: int,
        seed: int = 0,
        val_tokens: int = 0,
        norm_tokens: int | None = None,
        norm_scaling: bool = True,
        norm_center: bool = True,
        device: str | torch.device = "cpu",
        info: dict[str, Any] | None = None,
        source_name: str = "dataset",
        rank: int = 0,
        world_size: int = 1,
        gather: Callable[[Any], list[Any]] | None = None,
        overlap: bool = True,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size: {batch_size} is not divisible by the number of ranks ({world_size})"
            )
        if buffer_tokens < 2 * batch_size:
            raise DataError(
                f"buffer_tokens: {buffer_tokens} must be at least twice the batch size ({batch_size})"
            )
        self.collector, self.sequences, self.model_batch_size = collector, sequences, model_batch_size
        self.n_models, self.d_model = collector.n_blocks, collector.d_model
        self.buffer_tokens, self.batch_size, self.seed = buffer_tokens, batch_size, seed
        self.rank, self.world_size, self.overlap = rank, world_size, overlap
        if gather is None and world_size > 1:

            def gather(obj: Any) -> list[Any]:
                raise RuntimeError("Buffer.state_dict under several ranks needs `gather` (see buffer_source)")

        self.gather = gather if gather is not None else (lambda obj: [obj])
        self.local_batch = batch_size // world_size
        local = buffer_tokens // world_size
        self.gen_rows = max(1, local // 2 // self.local_batch) * self.local_batch  # s: served per generation
        self.carry_rows = self.gen_rows // 2  # c: read in one generation, served in the next
        self.steps_per_gen = self.gen_rows // self.local_batch
        self.device, self.source_name = torch.device(device), source_name
        self.info = dict(info or {})

        # held-out rows: the first val_tokens rows of the stream, the same on every rank
        head = RowStream(collector, sequences, model_batch_size, first=0, name=source_name)
        val_index = torch.zeros(0, 3, dtype=torch.long)
        self.val_chunks = 0  # chunks 0 .. val_chunks - 1 are validation text
        val = None
        if val_tokens > 0:
            blk = head.take(val_tokens)
            val, val_index = blk.acts, blk.index
            self.val_chunks = blk.end[0] + (blk.end[1] > 0)
        filt = collector.filter
        self._window0 = None if filt is None else filt.hist.copy()  # the training streams start here

        # normalisation from the next rows, the same on every rank; this rank's chunks among them are kept
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(c: int, acts: torch.Tensor, index: torch.Tensor) -> None:
            if filt is None and (c - self.val_chunks) % world_size == rank:
                self._cache[c] = (acts, index)

        if filt is not None:  # the estimate's own window: this rank's stream re-reads its chunks
            collector.filter = copy.deepcopy(filt)
        try:
            stats_rows = RowStream(
                collector, sequences, model_batch_size, first=self.val_chunks, on_chunk=keep, name=source_name
            ).take(min(buffer_tokens, norm_tokens or buffer_tokens))
        finally:
            collector.filter = filt
        raw = stats_rows.acts  # [n, M, d]
        stats = RunningStats(self.n_models, self.d_model)
        stats.update(raw)
        self.stats = stats.to_dict()
        mu = torch.from_numpy(stats.mean)
        self._set_norm(
            estimate(raw, center=norm_center, scaling=norm_scaling, mean=mu if norm_center else None)
        )
        # [n_models, d_model] training-space mean of those rows (b_dec_init="mean"; 0 when centred)
        self.train_mean = None if self.norm.mean is not None else self.norm.apply(mu.float()[None])[0].cpu()
        pick = np.random.default_rng([seed, 0xCA1]).choice(
            len(raw), size=min(len(raw), SAMPLE_ROWS), replace=False
        )
        # kept on the host (calibration is rare): [<= 32768, n_models, d_model]
        self.sample = self.norm.apply(raw[torch.from_numpy(np.sort(pick)).to(raw.device)]).cpu()
        del raw, stats_rows

        # this rank's share of the held-out batches
        self.val: list[torch.Tensor] = []
        self.val_index = val_index[:0]
        if val is not None:
            self.norm.apply_(val)
            mine = list(range(0, len(val), batch_size))[rank::world_size]
            self.val = [val[i : i + batch_size].to(self.device) for i in mine]
            if mine:
                self.val_index = torch.cat([val_index[i : i + batch_size] for i in mine])

        # the training stream: a layout starts at global step t0, training chunk j0; serial `restart`
        self._layout: dict[str, int] = {"t0": 0, "j0": 0, "restart": 0}
        self._served = 0
        self._gen: Generation | None = None
        self._ptr = 0
        self._gens: Generations | None = None
        self._producer: Producer | None = None
        self._stop = threading.Event()
        self.wait_s = 0.0  # seconds next_batch waited for a generation (all of its building without overlap)
        self.build_s = 0.0  # seconds spent building generations (in the background with overlap)
        self.last_index: torch.Tensor | None = None

    def _set_norm(self, norm: Normalization) -> None:
        self.norm, self.norm_scale, self.norm_mean = norm, list(norm.scale), norm.mean

    @property
    def generation(self) -> int:
        """The generation being served (-1 before the first batch)."""
        return -1 if self._gen is None else self._gen.g

    # ------------------------------------------------------------------ generations
    def _size(self, g: int) -> int:
        return self.gen_rows + self.carry_rows if g == 0 else self.gen_rows

    def _perms(self, g: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(split of block ``F_g``'s ``n`` rows, permutation of the pool), seeded by the layout and ``g``."""
        rng = np.random.default_rng(
            [self.seed, 0xB0F, self._layout["restart"], self.world_size, self.rank, g]
        )
        return torch.from_numpy(rng.permutation(n)), torch.from_numpy(rng.permutation(self.gen_rows))

    def _prepare(self, acts: torch.Tensor) -> torch.Tensor:
        return self.norm.apply_(acts)

    def _generations(
        self, start: tuple[int, int] = (0, 0), window: np.ndarray | None = None, first_gen: int = 0
    ) -> Generations:
        rows = RowStream(
            self.collector,
            self.sequences,
            self.model_batch_size,
            first=self.val_chunks + self._layout["j0"] + self.rank,
            step=self.world_size,
            start=start,
            window=window if window is not None else self._window0,
            cache=self._cache,
            name=self.source_name,
            stop=self._stop,
        )
        return Generations(
            rows,
            first_gen,
            self._size,
            self.carry_rows,
            self._perms,
            self._prepare,
            self.n_models,
            self.d_model,
            self.device,
        )

    def _advance(self) -> None:
        t = time.perf_counter()
        if self._gens is None:
            self._gens = self._generations()
        if self.overlap:
            if self._producer is None:
                self._producer = Producer(self._gens, self._stop)
            gen = self._producer.get()
        else:
            self._gen = None  # its pool is not needed while the next one is built
            with torch.no_grad():
                gen = self._gens.next()
        self.wait_s += time.perf_counter() - t
        self.build_s += gen.seconds
        self._gen, self._ptr = gen, 0

    def _halt(self) -> None:
        """Stop the background builder (its stream is dropped: a new one starts where the state says)."""
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        self._stop = threading.Event()
        self._gens = None

    # ------------------------------------------------------------------ serving
    def next_batch(self) -> torch.Tensor:
        """``[batch_size / W, n_models, d_model]`` float32, normalised (``last_index [batch_size / W, 3]``
        holds its rows' token id, sequence id and position)."""
        if self._gen is None or self._ptr == self.steps_per_gen:
            self._advance()
        assert self._gen is not None
        lo = self._ptr * self.local_batch
        self._ptr += 1
        self._served += 1
        self.last_index = self._gen.index[lo : lo + self.local_batch]
        return self._gen.acts[lo : lo + self.local_batch].to(self.device)

    def val_batches(self) -> Iterator[torch.Tensor]:
        """This rank's held-out batches (batches ``rank, rank + W, ...`` of the held-out set)."""
        yield from self.val

    def sample_batches(self, n_tokens: int) -> Iterator[torch.Tensor]:
        """Up to ``n_tokens`` rows of the normalisation sample (at least one batch when there are enough),
        the same on every rank; the training stream is left untouched."""
        n = min(len(self.sample), max(self.batch_size, n_tokens))
        for i in range(0, n, self.batch_size):
            yield self.sample[i : min(i + self.batch_size, n)].to(self.device)

    # ------------------------------------------------------------------ state
    def rank_state(self) -> dict[str, Any]:
        """This rank's position: where to re-read from to rebuild the current generation exactly."""
        out: dict[str, Any] = {"layout": dict(self._layout), "generation": None}
        gen = self._gen
        if gen is not None:
            start, window = (gen.prev_start, gen.prev_window) if gen.g > 0 else (gen.start, gen.start_window)
            out.update(
                generation=gen.g,
                pointer=self._ptr,
                start=list(start),
                window=encode_window(window),
                end=list(gen.end),
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; under torchrun a collective (every rank's :meth:`rank_state` is gathered)."""
        return {
            "kind": "buffer",
            "version": 2,
            "world_size": self.world_size,
            "batches_served": self._served,
            "val_chunks": self.val_chunks,
            "model_batch_size": self.model_batch_size,
            "norm_scale": list(self.norm_scale),
            "norm_mean": self.norm_mean,
            "ranks": self.gather(self.rank_state()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the saved normalisation, and the exact buffer when the state comes from as many ranks
        (else text no rank had read, see module docstring)."""
        self._halt()
        self._gen, self._ptr = None, 0
        self._served = int(state.get("batches_served", 0))
        if state.get("norm_scale"):
            self._renormalise(Normalization([float(v) for v in state["norm_scale"]], state.get("norm_mean")))
        ranks = state.get("ranks")
        exact = (
            state.get("version") == 2
            and ranks
            and int(state["world_size"]) == self.world_size
            and state.get("val_chunks") == self.val_chunks
            and state.get("model_batch_size") == self.model_batch_size
        )
        if exact:
            rs = ranks[self.rank]
            self._layout = {k: int(v) for k, v in rs["layout"].items()}
            if rs["generation"] is not None:
                self._rebuild(rs)
            return
        self._cache.clear()
        nxt = self._unread(state)
        restart = int(ranks[0]["layout"]["restart"]) + 1 if ranks else 1
        self._layout = {"t0": self._served, "j0": max(0, nxt - self.val_chunks), "restart": restart}
        log.warning(
            "%s: resuming the on-the-fly buffer from a state of %s rank(s) on %d: continuing with unread "
            "text from chunk %d (not the rows an uninterrupted run would have used)",
            self.source_name,
            state.get("world_size", "?"),
            self.world_size,
            nxt,
        )

    def _rebuild(self, rs: dict[str, Any]) -> None:
        g = int(rs["generation"])
        gens = self._generations(
            tuple(rs["start"]),  # type: ignore[arg-type]
            decode_window(rs["window"]),
            first_gen=max(g - 1, 0),
        )
        with torch.no_grad():
            if g > 0:
                gens.skip()
            gen = gens.next()
        if gen.g != g or list(gen.end) != list(rs["end"]):
            raise DataError(
                f"{self.source_name}: cannot rebuild the on-the-fly buffer of the checkpoint (generation "
                f"{g} ended at {rs['end']}, re-read {list(gen.end)}): the text or the models changed"
            )
        self._gens, self._gen, self._ptr = gens, gen, int(rs["pointer"])

    def _unread(self, state: dict[str, Any]) -> int:
        """The first global chunk after every chunk any rank of ``state`` had trained on."""
        ranks = state.get("ranks")
        if not ranks:  # a state of the first buffer (one process): the next unread sequence
            seq = int(state.get("next_sequence", 0))
            return -(-seq // self.model_batch_size)
        w, first = int(state["world_size"]), int(state.get("val_chunks", 0))
        out = 0
        for r, rs in enumerate(ranks):
            k = 0 if rs["generation"] is None else rs["end"][0] + (rs["end"][1] > 0)
            out = max(out, first + int(rs["layout"]["j0"]) + k * w + r)
        return out

    def _renormalise(self, new: Normalization) -> None:
        """Switch to ``new`` (a saved run's normalisation), mapping the held-out and sample rows to it."""
        old = self.norm
        if new.scale != old.scale or new.mean != old.mean:
            for t in [*self.val, self.sample]:
                t.div_(old.scale_tensor(t.device))
                mean = old.mean_tensor(t.device)
                if mean is not None:
                    t.add_(mean)
                new.apply_(t)
        self._set_norm(new)
        self.train_mean = None if new.mean is not None else self.train_mean

    def close(self) -> None:
        self._halt()


from .buffer_source import buffer_source  # noqa: E402, F401 - re-exported (this module's API)
