"""Sequences -> aligned paired rows: :class:`PairCollector` (the alignment rules of
:mod:`crosscoder.data.collect`), its norm-outlier filter, and one worker's share of a sequence stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .site_model import SiteModel, load_site_model
from .text import TokenSequence, make_batch


class NormFilter:
    """Drop positions whose norm exceeds ``ratio`` x the running median (per model, last ``window`` rows)."""

    def __init__(self, ratio: float, n_models: int, window: int = 8192) -> None:
        if ratio <= 1.0:
            raise DataError(f"max_norm_ratio: must be > 1, got {ratio}")
        self.ratio, self.window = ratio, window
        self.hist = np.zeros((0, n_models), np.float64)

    def seed(self, norms: np.ndarray) -> None:
        """Start from known norms ``[n, n_models]`` (a resumed collection's last rows)."""
        self.hist = np.asarray(norms, np.float64)[-self.window :]

    def __call__(self, norms: torch.Tensor) -> torch.Tensor:
        """``norms [n, n_models]`` -> keep mask ``[n]`` (bool)."""
        x = norms.detach().double().cpu().numpy()
        med = np.median(self.hist if len(self.hist) else x, axis=0)
        keep = (x <= self.ratio * med).all(1)
        self.hist = np.concatenate([self.hist, x[keep]])[-self.window :]
        return torch.from_numpy(keep).to(norms.device)


@dataclass
class PairCollector:
    """Sequences -> aligned rows ``[n, n_models, d_model]`` from every model at its site."""

    models: list[SiteModel]
    bos_id: int | None
    pad_id: int
    device: torch.device
    max_norm_ratio: float | None = None
    dropped: dict[str, int] = field(default_factory=lambda: {"bos": 0, "pad": 0, "norm_outlier": 0})
    kept: int = 0

    def __post_init__(self) -> None:
        self.filter = NormFilter(self.max_norm_ratio, len(self.models)) if self.max_norm_ratio else None
        self._d_model: int | None = None

    @property
    def d_model(self) -> int:
        """Width of the site output (one 2-token probe forward, agreed by all models)."""
        if self._d_model is None:
            tok = self.bos_id if self.bos_id is not None else self.pad_id
            batch = make_batch([TokenSequence(0, [tok, tok])], self.pad_id, self.device)
            widths = [m.read(batch).shape[-1] for m in self.models]
            if len(set(widths)) != 1:
                raise DataError(
                    "site widths differ between models: "
                    f"{dict(zip([m.name for m in self.models], widths, strict=False))}"
                )
            self._d_model = widths[0]
        return self._d_model

    def rows(self, seqs: list[TokenSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward per model -> (``acts [n, n_models, d_model]`` float32 on ``device``,
        ``index [n, 3]`` int64: token id, sequence id, position), rows in (sequence, position) order."""
        batch = make_batch(seqs, self.pad_id, self.device)
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        keep = mask.clone()
        if self.bos_id is not None:
            is_bos = ids == self.bos_id
            keep &= ~is_bos
            self.dropped["bos"] += int((is_bos & mask).sum())
        self.dropped["pad"] += int((~mask).sum())
        acts = torch.stack([m.read(batch)[keep] for m in self.models], dim=1).float()  # [n, M, d]
        seq_ids = torch.tensor([s.seq_id for s in seqs], dtype=torch.long, device=ids.device)
        index = torch.stack(
            [ids[keep], seq_ids[:, None].expand_as(ids)[keep], batch["position_ids"][keep]], dim=1
        )
        if self.filter is not None and len(acts):
            ok = self.filter(acts.norm(dim=-1))
            self.dropped["norm_outlier"] += int((~ok).sum())
            acts, index = acts[ok], index[ok]
        self.kept += len(acts)
        return acts, index

    def iter_rows(
        self, seqs: Iterable[TokenSequence], batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` sequences -> ``(acts, index)`` per batch (see :meth:`rows`)."""
        chunk: list[TokenSequence] = []
        for s in seqs:
            chunk.append(s)
            if len(chunk) == batch_size:
                yield self.rows(chunk)
                chunk = []
        if chunk:
            yield self.rows(chunk)


def sequence_slice(
    seqs: Iterable[TokenSequence], start: int = 0, stop: int | None = None, rank: int = 0, world_size: int = 1
) -> Iterator[TokenSequence]:
    """Sequences with ``start <= seq_id < stop`` and ``seq_id % world_size == rank`` (one worker's share)."""
    for s in seqs:
        if stop is not None and s.seq_id >= stop:
            return
        if s.seq_id >= start and s.seq_id % world_size == rank:
            yield s


def build_collector(
    base_model: str,
    ft_model: str,
    site: str,
    *,
    tokenizer: Any,
    model_dtype: str = "float32",
    device: torch.device,
    trust_remote_code: bool = False,
    revisions: tuple[str | None, str | None] = (None, None),
    max_norm_ratio: float | None = None,
) -> PairCollector:
    """Load both models (through nnsight) and return the collector for ``site``."""
    models = [
        load_site_model(
            spec,
            site,
            tokenizer=tokenizer,
            revision=rev,
            dtype=model_dtype,
            device=device,
            trust_remote_code=trust_remote_code,
        )
        for spec, rev in zip((base_model, ft_model), revisions, strict=True)
    ]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return PairCollector(
        models=models, bos_id=tokenizer.bos_token_id, pad_id=pad, device=device, max_norm_ratio=max_norm_ratio
    )
