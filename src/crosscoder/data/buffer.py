"""On-the-fly training data: the plan's refreshing Buffer of paired activations.

:class:`Buffer` holds ``buffer_tokens`` paired activations ``[N, n_models, d_model]`` (normalised, on the
training device) collected by a :class:`~crosscoder.data.pair_collector.PairCollector` (the same alignment,
masking and outlier rules as ``crosscoder collect``). It serves batches in a random order; when half of
the buffer has been served, the served rows are replaced by rows from NEW sequences of the text stream
and the whole buffer is reshuffled. Every row is served exactly once.

Normalisation: the first fill gives the run's :class:`~crosscoder.normalization.Normalization` (per-model
mean from the float64 running statistics, exactly what ``collect`` stores in ``meta.json``, and
``norm_scale = sqrt(d_model) / E||x - mean||``); it is kept for the run (and restored on resume) so the
crosscoder sees one fixed input space. ``val_tokens`` rows collected right
after the first fill are held out for validation and never served for training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import DEFAULT_VAL_TOKENS, RunConfig
from ..errors import DataError
from ..normalization import Normalization, estimate
from .collect import PairCollector
from .paired import RunningStats
from .text import TokenSequence

log = logging.getLogger(__name__)


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
        norm_scaling: bool = True,
        norm_center: bool = True,
        device: str | torch.device = "cpu",
        info: dict[str, Any] | None = None,
        source_name: str = "dataset",
    ) -> None:
        if buffer_tokens < 2 * batch_size:
            raise DataError(
                f"buffer_tokens: {buffer_tokens} must be at least twice the batch size ({batch_size})"
            )
        self.collector, self.sequences = collector, sequences
        self.n_models = collector.n_blocks
        self.d_model = collector.d_model
        self.buffer_tokens, self.batch_size, self.model_batch_size = (
            buffer_tokens,
            batch_size,
            model_batch_size,
        )
        self.seed, self.device, self.source_name = seed, torch.device(device), source_name
        self.info = dict(info or {})
        self.refreshes = 0
        self._served = 0
        self._start_stream(0)
        raw, index = self._take(buffer_tokens)  # [N, M, d], [N, 3]
        stats = RunningStats(self.n_models, self.d_model)
        stats.update(raw)
        self.stats = stats.to_dict()
        self._set_norm(
            estimate(
                raw,
                center=norm_center,
                scaling=norm_scaling,
                mean=torch.from_numpy(stats.mean) if norm_center else None,
            )
        )
        val, self.val_index = self._take(val_tokens) if val_tokens > 0 else (raw[:0], index[:0])
        self.val = self.norm.apply_(val.to(self.device))
        self.buf = self.norm.apply_(raw.to(self.device))
        # [n_models, d_model] training-space mean of the first fill (b_dec_init="mean"; 0 when centred)
        self.train_mean = None if self.norm.mean is not None else self.buf.double().mean(0).float().cpu()
        self.index = index.to(self.device)
        self._shuffle()
        self.last_index: torch.Tensor | None = None

    def _set_norm(self, norm: Normalization) -> None:
        self.norm, self.norm_scale, self.norm_mean = norm, list(norm.scale), norm.mean

    # ------------------------------------------------------------------ the text stream
    def _stream(self, start: int) -> Iterator[TokenSequence]:
        """Sequences with id >= ``start``, forever: the dataset restarts (ids keep growing) when exhausted."""
        offset = 0
        while True:
            n = 0
            for s in self.sequences():
                n += 1
                if s.seq_id + offset >= start:
                    yield TokenSequence(s.seq_id + offset, s.ids)
            if n == 0:
                raise DataError(f"{self.source_name}: no text to collect (empty dataset)")
            offset += n
            if offset > start:
                log.warning("%s exhausted after %d sequences; starting over", self.source_name, n)

    def _start_stream(self, start: int) -> None:
        self._rows = self.collector.iter_rows(self._stream(start), self.model_batch_size)
        self._left: tuple[torch.Tensor, torch.Tensor] | None = None
        self.next_seq = start

    def _take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``n`` raw rows of the stream: ``acts [n, M, d]`` float32 and ``index [n, 3]``."""
        acts, idx, have, empty = [], [], 0, 0
        while have < n:
            if self._left is not None:
                a, i = self._left
                self._left = None
            else:
                a, i = next(self._rows)
                empty = empty + 1 if len(a) == 0 else 0
                if empty > 1000:
                    raise DataError(
                        f"{self.source_name}: 1000 model batches in a row kept no position "
                        "(all BOS/padding, or --max-norm-ratio too low)"
                    )
            if have + len(a) > n:
                cut = n - have
                self._left = (a[cut:], i[cut:])
                a, i = a[:cut], i[:cut]
            acts.append(a)
            idx.append(i)
            have += len(a)
        a, i = torch.cat(acts), torch.cat(idx)
        if len(i):
            self.next_seq = int(i[-1, 1]) + 1
        return a, i

    # ------------------------------------------------------------------ serving
    def _shuffle(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.refreshes)
        self.perm = torch.randperm(self.buffer_tokens, generator=g).to(self.device)
        self.pointer = 0

    def refresh(self) -> None:
        """Replace the rows served since the last shuffle by new rows, then reshuffle everything."""
        served = self.perm[: self.pointer]
        raw, index = self._take(len(served))
        self.buf[served] = self.norm.apply_(raw.to(self.device))
        self.index[served] = index.to(self.device)
        self.refreshes += 1
        self._shuffle()

    def next_batch(self) -> torch.Tensor:
        """``[batch_size, n_models, d_model]`` float32, normalised (``last_index`` holds its rows' index)."""
        if self.pointer + self.batch_size > self.buffer_tokens // 2:
            self.refresh()
        rows = self.perm[self.pointer : self.pointer + self.batch_size]
        self.pointer += self.batch_size
        self._served += 1
        self.last_index = self.index[rows]
        return self.buf[rows]

    def val_batches(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.val), self.batch_size):
            yield self.val[i : i + self.batch_size]

    def sample_batches(self, n_tokens: int) -> Iterator[torch.Tensor]:
        """Rows of the current buffer (seeded choice), without serving them or moving the stream."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 0xCA1)
        n = min(self.buffer_tokens, max(self.batch_size, n_tokens))
        rows = torch.randperm(self.buffer_tokens, generator=g)[:n].to(self.device)
        for i in range(0, n, self.batch_size):
            yield self.buf[rows[i : i + self.batch_size]]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "buffer",
            "batches_served": self._served,
            "next_sequence": self.next_seq,
            "norm_scale": list(self.norm_scale),
            "norm_mean": self.norm_mean,
            "refreshes": self.refreshes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: keep the saved normalisation and refill the whole buffer from the saved stream position."""
        self._served = int(state.get("batches_served", 0))
        self.refreshes = int(state.get("refreshes", 0)) + 1
        if state.get("norm_scale"):
            new = Normalization([float(v) for v in state["norm_scale"]], state.get("norm_mean"))
            raw_val = self.val / self.norm.scale_tensor(self.device)
            if self.norm.mean is not None:
                raw_val = raw_val + self.norm.mean_tensor(self.device)
            self.val = new.apply_(raw_val)
            self._set_norm(new)
        self._start_stream(int(state.get("next_sequence", self.next_seq)))
        raw, index = self._take(self.buffer_tokens)
        self.buf = self.norm.apply_(raw.to(self.device))
        self.index = index.to(self.device)
        self._shuffle()

    def close(self) -> None:
        pass


def buffer_source(cfg: RunConfig, device: str | torch.device) -> Buffer:
    """The on-the-fly :class:`Buffer` for ``cfg.data`` (base_model, ft_model, site, dataset ...)."""
    from .collect import build_collector, load_tokenizer, resolve_device
    from .text import prepare_stream

    d = cfg.data
    missing = [n for n in ("base_model", "ft_model", "site", "dataset") if not getattr(d, n)]
    if missing:
        raise DataError("on-the-fly training needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    device = resolve_device(str(device))
    specs = [d.base_model, d.ft_model]
    tokenizers = [(spec, load_tokenizer(spec, trust_remote_code=d.trust_remote_code)) for spec in specs]
    sequences, tok_info = prepare_stream(
        d.dataset,
        tokenizers,
        text_column=d.text_column,
        chat_template=d.chat_template,
        seq_len=d.seq_len,
        pack=True,
        allow_mismatch=d.allow_tokenizer_mismatch,
    )
    collector = build_collector(
        specs,
        [d.site],
        tokenizer=tokenizers[0][1],
        model_dtype=d.model_dtype,
        device=device,
        trust_remote_code=d.trust_remote_code,
        max_norm_ratio=d.max_norm_ratio,
    )
    info = {
        "source": {
            "buffer": {
                k: getattr(d, k)
                for k in (
                    "base_model",
                    "ft_model",
                    "site",
                    "dataset",
                    "text_column",
                    "chat_template",
                    "seq_len",
                    "buffer_tokens",
                    "model_dtype",
                    "max_norm_ratio",
                )
            }
        },
        "model_names": [m.name for m in collector.models],
        "site": d.site,
        "fingerprints": {"tokenizer": tok_info["base"]},
        "tokenizer": tok_info,
        "revisions": [m.revision for m in collector.models],
    }
    if cfg.train.val_tokens is None:  # the stream has no end: the default held-out size, within the buffer
        cfg.train.val_tokens = min(DEFAULT_VAL_TOKENS, d.buffer_tokens // 4)
    return Buffer(
        collector,
        sequences,
        buffer_tokens=d.buffer_tokens,
        batch_size=cfg.train.batch_size,
        model_batch_size=d.model_batch_size,
        seed=cfg.train.seed,
        val_tokens=cfg.train.val_tokens,
        norm_scaling=d.norm_scaling,
        norm_center=d.norm_center,
        device=device,
        info=info,
        source_name=d.dataset,
    )
