"""Sequences -> aligned rows of n models at one or several sites: :class:`PairCollector` (the alignment
rules of :mod:`crosscoder.data.collect`), its norm-outlier filter, and one worker's share of a sequence
stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .site_model import SiteModel, load_site_model
from .text import TokenSequence, make_batch

DROP_KINDS = ("bos", "pad", "norm_outlier")


class NormFilter:
    """Drop positions whose norm exceeds ``ratio`` x the running median (per block, last ``window`` rows)."""

    def __init__(self, ratio: float, n_models: int, window: int = 8192) -> None:
        if ratio <= 1.0:
            raise DataError(f"max_norm_ratio: must be > 1, got {ratio}")
        self.ratio, self.window = ratio, window
        self.hist = np.zeros((0, n_models), np.float64)

    def seed(self, norms: np.ndarray) -> None:
        """Start from known norms ``[n, n_blocks]`` (a resumed collection's last rows)."""
        self.hist = np.asarray(norms, np.float64)[-self.window :]

    def __call__(self, norms: torch.Tensor) -> torch.Tensor:
        """``norms [n, n_blocks]`` -> keep mask ``[n]`` (bool): a row goes when any block is an outlier."""
        x = norms.detach().double().cpu().numpy()
        med = np.median(self.hist if len(self.hist) else x, axis=0)
        keep = (x <= self.ratio * med).all(1)
        self.hist = np.concatenate([self.hist, x[keep]])[-self.window :]
        return torch.from_numpy(keep).to(norms.device)


@dataclass
class PairCollector:
    """Sequences -> aligned rows ``[n, n_blocks, d_model]``: every model at each of its sites.

    Blocks are (model, site) pairs in model-major order (model 0 at sites 0..S-1, then model 1, ...); with
    one site, block ``i`` is model ``i``. ``d_model`` is the largest block width; narrower blocks are
    zero-padded on the right (their columns ``d_i..d_model-1`` are exactly 0).
    """

    models: list[SiteModel]
    bos_id: int | None
    pad_id: int
    device: torch.device
    max_norm_ratio: float | None = None
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_KINDS, 0))
    #: per sequence id: [bos, pad, norm_outlier] positions dropped (until committed by :meth:`take_dropped`)
    seq_dropped: dict[int, list[int]] = field(default_factory=dict)
    kept: int = 0

    def __post_init__(self) -> None:
        self.filter = NormFilter(self.max_norm_ratio, self.n_blocks) if self.max_norm_ratio else None
        self._d_models: list[int] | None = None

    @property
    def sites(self) -> list[str]:
        """The module paths read (the same for every model)."""
        return list(self.models[0].sites)

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """``(model index, site index)`` of each block, model-major."""
        return [(i, j) for i, m in enumerate(self.models) for j in range(len(m.sites))]

    @property
    def n_blocks(self) -> int:
        return sum(len(m.sites) for m in self.models)

    @property
    def d_models(self) -> list[int]:
        """Width of each block's site output (one 2-token probe forward per model)."""
        if self._d_models is None:
            tok = self.bos_id if self.bos_id is not None else self.pad_id
            batch = make_batch([TokenSequence(0, [tok, tok])], self.pad_id, self.device)
            self._d_models = [int(o.shape[-1]) for m in self.models for o in m.read_sites(batch)]
        return self._d_models

    @property
    def d_model(self) -> int:
        """The largest block width (the cache's last axis)."""
        return max(self.d_models)

    def rows(self, seqs: list[TokenSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward per model (all its sites) -> (``acts [n, n_blocks, d_model]`` float32 on ``device``,
        narrower blocks zero-padded; ``index [n, 3]`` int64: token id, sequence id, position), rows in
        (sequence, position) order."""
        widths = self.d_models
        batch = make_batch(seqs, self.pad_id, self.device)
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        keep = mask.clone()
        per_seq = torch.zeros(len(seqs), 3, dtype=torch.long)  # bos, pad, norm_outlier of each sequence
        if self.bos_id is not None:
            is_bos = ids == self.bos_id
            keep &= ~is_bos
            per_seq[:, 0] = (is_bos & mask).sum(1).cpu()
        per_seq[:, 1] = (~mask).sum(1).cpu()
        outs = [out[keep] for m in self.models for out in m.read_sites(batch)]  # [n, d_b] each
        if len(set(widths)) == 1:
            acts = torch.stack(outs, dim=1).float()  # [n, B, d]
        else:
            acts = torch.zeros(len(outs[0]), len(outs), max(widths), dtype=torch.float32, device=ids.device)
            for b, out in enumerate(outs):
                acts[:, b, : out.shape[-1]] = out
        seq_ids = torch.tensor([s.seq_id for s in seqs], dtype=torch.long, device=ids.device)
        index = torch.stack(
            [ids[keep], seq_ids[:, None].expand_as(ids)[keep], batch["position_ids"][keep]], dim=1
        )
        if self.filter is not None and len(acts):
            ok = self.filter(acts.norm(dim=-1))  # per-block norms [n, B] (padding adds nothing)
            row_of = {int(s.seq_id): i for i, s in enumerate(seqs)}
            for sid in index[~ok, 1].tolist():
                per_seq[row_of[sid], 2] += 1
            acts, index = acts[ok], index[ok]
        for s, counts in zip(seqs, per_seq.tolist(), strict=True):
            self.seq_dropped[int(s.seq_id)] = counts
        for k, c in zip(DROP_KINDS, per_seq.sum(0).tolist(), strict=True):
            self.dropped[k] += int(c)
        self.kept += len(acts)
        return acts, index

    def take_dropped(self, upto_seq: int) -> dict[str, int]:
        """Remove and return the summed drop counts of the sequences with ``seq_id <= upto_seq``
        (what a cache commits once its rows reach past them; see :func:`crosscoder.data.collect.collect`)."""
        out = dict.fromkeys(DROP_KINDS, 0)
        for sid in [k for k in self.seq_dropped if k <= upto_seq]:
            for k, c in zip(DROP_KINDS, self.seq_dropped.pop(sid), strict=True):
                out[k] += c
        return out

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
    models: str | Sequence[str],
    sites: str | Sequence[str],
    *legacy_site: str,
    tokenizer: Any,
    model_dtype: str = "float32",
    device: torch.device,
    trust_remote_code: bool = False,
    revisions: Sequence[str | None] | None = None,
    max_norm_ratio: float | None = None,
) -> PairCollector:
    """Load every model of ``models`` (specs; ``repo@revision`` allowed) through nnsight, ready to read
    ``sites``, and return their collector. ``revisions``: one per model (None: the spec's or the default).

    The two-model spelling ``build_collector(base, ft, site, ...)`` is still accepted.
    """
    if isinstance(models, str):  # build_collector(base_model, ft_model, site, ...)
        if len(legacy_site) != 1 or not isinstance(sites, str):
            raise TypeError("build_collector(models, sites, ...) or build_collector(base, ft, site, ...)")
        models, sites = [models, sites], legacy_site[0]
    elif legacy_site:
        raise TypeError("build_collector(models, sites, ...): too many positional arguments")
    specs = list(models)
    site_list = [sites] if isinstance(sites, str) else list(sites)
    revs = list(revisions) if revisions is not None else [None] * len(specs)
    if len(revs) != len(specs):
        raise DataError(f"revisions: expected {len(specs)} (one per model), got {len(revs)}")
    loaded = [
        load_site_model(
            spec,
            site_list,
            tokenizer=tokenizer,
            revision=rev,
            dtype=model_dtype,
            device=device,
            trust_remote_code=trust_remote_code,
        )
        for spec, rev in zip(specs, revs, strict=True)
    ]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return PairCollector(
        models=loaded, bos_id=tokenizer.bos_token_id, pad_id=pad, device=device, max_norm_ratio=max_norm_ratio
    )
