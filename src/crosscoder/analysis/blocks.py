"""The model axis of a crosscoder as the analysis sees it: real models, sites and (model, site) blocks.

The crosscoder's ``n_models`` axis holds **blocks** (``docs/analysis.md``, "Several models, sites and
checkpoints"): with one site, block ``b`` is model ``b``; with several sites, blocks are (model, site)
pairs in model-major order. Narrower blocks are zero-padded to ``d_model`` (``d_models``). The block
description comes from the crosscoder's config (``block_models``, ``block_sites``, ``sites``,
``d_models``, ``model_names``), with the paired cache's ``meta.json`` (``blocks``, ``sites``,
``d_models``, ``models``) filling what the config does not record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CrossCoderError


@dataclass
class BlockLayout:
    """``block_models [n_blocks]`` model of each block, ``block_sites [n_blocks]`` site of each block,
    ``widths [n_blocks]`` real width of each block, ``model_names [n_models]``, ``sites [n_sites]``."""

    block_models: list[int]
    block_sites: list[int]
    widths: list[int]
    model_names: list[str]
    sites: list[str]
    revisions: list[str | None]

    @property
    def n_blocks(self) -> int:
        return len(self.block_models)

    @property
    def n_models(self) -> int:
        return len(self.model_names)

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    @property
    def one_block_per_model(self) -> bool:
        return self.n_blocks == self.n_models

    def blocks_of(self, model: int) -> list[int]:
        """Blocks of ``model`` in site order."""
        return sorted(
            (b for b in range(self.n_blocks) if self.block_models[b] == model),
            key=lambda b: self.block_sites[b],
        )

    def block(self, model: int, site: int) -> int | None:
        """The block of (``model``, ``site``), or None."""
        for b in range(self.n_blocks):
            if self.block_models[b] == model and self.block_sites[b] == site:
                return b
        return None

    def model_widths(self, model: int) -> tuple[int, ...]:
        """``(width of the model's block at site 0, at site 1, ...)``; 0 where it has no block there."""
        return tuple(
            self.widths[b] if (b := self.block(model, s)) is not None else 0 for s in range(self.n_sites)
        )

    def same_space(self, i: int, j: int) -> bool:
        """Whether models ``i`` and ``j`` have blocks of the same widths at the same sites (their decoder
        vectors live in comparable spaces: decoder cosines and Latent Scaling across them are defined)."""
        return self.model_widths(i) == self.model_widths(j)

    def width_mask(self, d_model: int) -> np.ndarray:
        """``[n_blocks, d_model]`` bool: the real (not padded) entries of each block."""
        return np.arange(d_model)[None, :] < np.asarray(self.widths)[:, None]

    def block_label(self, b: int) -> str:
        m, s = self.block_models[b], self.block_sites[b]
        return f"{m}" if self.n_sites == 1 else f"{m}/{self.sites[s]}"

    def describe(self) -> dict[str, Any]:
        return {
            "n_models": self.n_models,
            "n_blocks": self.n_blocks,
            "sites": list(self.sites),
            "blocks": [
                {"model": m, "site": s} for m, s in zip(self.block_models, self.block_sites, strict=True)
            ],
            "d_models": list(self.widths),
        }


def block_layout(cfg: Any, meta: dict[str, Any] | None = None) -> BlockLayout:
    """The block description of a crosscoder config ``cfg`` (:class:`~crosscoder.config.CrossCoderConfig`),
    completed from a cache's ``meta``."""
    meta = meta or {}
    n_blocks = int(cfg.n_models)
    bm = getattr(cfg, "block_models", None)
    bs = getattr(cfg, "block_sites", None)
    sites = getattr(cfg, "sites", None)
    blocks = meta.get("blocks")
    if bm is None and blocks and len(blocks) == n_blocks:
        bm = [int(b["model"]) for b in blocks]
        bs = [int(b.get("site", 0)) for b in blocks]
    if sites is None:
        sites = meta.get("sites")
    bm = list(range(n_blocks)) if bm is None else [int(i) for i in bm]
    bs = [0] * n_blocks if bs is None else [int(i) for i in bs]
    n_sites = max(bs) + 1
    site0 = getattr(cfg, "site", None) or meta.get("site") or ""
    sites = list(sites) if sites and len(sites) >= n_sites else ([site0] if n_sites == 1 else [])
    if len(sites) < n_sites:
        sites = [f"site{j}" for j in range(n_sites)]
    widths = getattr(cfg, "d_models", None) or meta.get("d_models") or [cfg.d_model] * n_blocks
    widths = [int(w) for w in widths]
    n_models = max(bm) + 1
    if len(bm) != n_blocks or len(bs) != n_blocks or len(widths) != n_blocks:
        raise CrossCoderError(
            f"block description: expected {n_blocks} blocks (block_models, block_sites, d_models)"
        )
    if len({(m, s) for m, s in zip(bm, bs, strict=True)}) != n_blocks:
        raise CrossCoderError("block description: two blocks share a (model, site) pair")
    metas = meta.get("models") or []
    names = list(getattr(cfg, "model_names", None) or [m.get("name") for m in metas] or [])
    if len(names) != n_models:
        names = [f"model_{i}" for i in range(n_models)]
    asked = (meta.get("collect") or {}).get("revisions")  # as given to collect (e.g. "step1000")
    if asked and len(asked) == n_models:
        revs = list(asked)
    else:  # the resolved revisions (may be commit hashes)
        revs = [m.get("revision") for m in metas] if len(metas) == n_models else [None] * n_models
    return BlockLayout(bm, bs, widths, [str(n) for n in names], [str(s) for s in sites], revs)
