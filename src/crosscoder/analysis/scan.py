"""One streaming pass of a crosscoder over paired activations, feeding several accumulators.

The pass reads ``rows`` of a :class:`~crosscoder.data.paired.PairedCache` in chunks of ``chunk`` rows,
maps them by the model's recorded normalisation (``norm_scale * (x - norm_mean)``: raw -> normalised
training space), encodes them with the
model in eval mode (BatchTopK then uses its inference threshold, not the batch rule) and hands
``(x [n, n_models, d_model], f [n, d_latent], x_hat [n, n_models, d_model], rows [n])`` to each
accumulator. Nothing of size ``[n_tokens, d_latent]`` is ever held.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from ..data.paired import PairedCache
from ..errors import CrossCoderError
from ..model import CrossCoder
from ..normalization import Normalization


class Accumulator(Protocol):
    def update(
        self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: np.ndarray | None = None
    ) -> None:
        """``x, x_hat [n, n_models, d_model]`` (normalised), ``f [n, d_latent]``, ``rows [n]`` cache rows."""


def normalised_model(model: CrossCoder) -> CrossCoder:
    """A copy of ``model`` with its weights in the normalised training space (``norm_scale == 1``), eval mode.

    Saved crosscoders are folded (they take raw activations); their decoder norms, betas and
    reconstructions are only comparable across models in the space they were trained in.
    """
    m = copy.deepcopy(model).float()
    if not torch.all(m.norm_scale == 1) or torch.any(m.norm_mean != 0):
        m.unfold()
    return m.eval()


def open_pair(
    cache: str | None = None,
    base_data: str | None = None,
    ft_data: str | None = None,
    column: str = "activation",
) -> PairedCache:
    """The paired activations to analyse: a cache folder, or two aligned HF datasets (converted once)."""
    if cache:
        return PairedCache(cache, verify="size")
    if base_data and ft_data:
        from ..data.hf import pair_to_cache

        return pair_to_cache(base_data, ft_data, column, verify="size")
    raise CrossCoderError("analyze: give --cache, or --base-data and --ft-data")


def select_rows(n_rows: int, max_tokens: int | None, seed: int = 0) -> np.ndarray:
    """All rows, or a seeded sorted sample of ``max_tokens`` of them ``[n] int64``."""
    if max_tokens is None or max_tokens >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng([seed, 0xA11])
    return np.sort(rng.choice(n_rows, size=max_tokens, replace=False)).astype(np.int64)


def iter_chunks(
    cache: PairedCache,
    rows: np.ndarray,
    norm: Normalization | Sequence[float],
    chunk: int = 1024,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(rows [n], x [n, n_models, d_model])`` with ``x`` normalised (``norm``, e.g. the saved model's
    :meth:`~crosscoder.model.CrossCoder.normalization`, or bare per-model factors)."""
    norm = Normalization.of(norm)
    for lo in range(0, len(rows), chunk):
        r = rows[lo : lo + chunk]
        yield r, norm.apply_(cache.read(r)).to(device)


class ActivationStats:
    """Per-latent firing count, sum, sum of squares and maximum of the activations ``[d_latent]``."""

    def __init__(self, d_latent: int, device: str | torch.device = "cpu") -> None:
        self.n_tokens = 0
        self.count = torch.zeros(d_latent, dtype=torch.long, device=device)
        self.sum = torch.zeros(d_latent, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_latent, dtype=torch.float32, device=device)

    def update(
        self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: np.ndarray | None = None
    ) -> None:
        self.n_tokens += f.shape[0]
        self.count += torch.count_nonzero(f, dim=0)
        self.sum += f.sum(0).double()
        self.max = torch.maximum(self.max, f.amax(0))

    def result(self) -> dict[str, np.ndarray]:
        """``freq`` (fraction of tokens firing), ``mean_act`` (mean over firing tokens), ``mean_act_all``
        (mean over all tokens), ``max_act``, ``n_active``, ``dead`` (never fired); each ``[d_latent]``."""
        n = max(self.n_tokens, 1)
        count = self.count.cpu().numpy()
        s = self.sum.cpu().numpy()
        return {
            "freq": count / n,
            "mean_act": np.where(count > 0, s / np.maximum(count, 1), 0.0),
            "mean_act_all": s / n,
            "max_act": self.max.cpu().numpy().astype(np.float64),
            "n_active": count,
            "dead": count == 0,
        }


class ReconstructionStats:
    """Explained variance of the scanned rows per model (normalised space, around the rows' mean)."""

    def __init__(self, n_models: int) -> None:
        self.n = 0
        self.sse = torch.zeros(n_models, dtype=torch.float64)
        self.sx = None
        self.sxx = torch.zeros(n_models, dtype=torch.float64)

    def update(
        self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: np.ndarray | None = None
    ) -> None:
        xd = x.double().cpu()
        self.sse += (xd - x_hat.double().cpu()).pow(2).sum((0, 2))
        self.sx = xd.sum(0) if self.sx is None else self.sx + xd.sum(0)  # [M, d]
        self.sxx += xd.pow(2).sum((0, 2))
        self.n += x.shape[0]

    def result(self) -> dict[str, float]:
        if self.n == 0 or self.sx is None:
            return {}
        sst = self.sxx - self.sx.pow(2).sum(-1) / self.n  # [M]
        out = {"explained_variance": float(1 - self.sse.sum() / sst.sum())}
        for i, name in enumerate(("base", "ft")[: len(sst)]):
            out[f"explained_variance_{name}"] = float(1 - self.sse[i] / sst[i])
        return out


@torch.no_grad()
def scan(
    model: CrossCoder,
    cache: PairedCache,
    rows: np.ndarray,
    accumulators: Sequence[Accumulator],
    norm: Normalization | Sequence[float],
    chunk: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run ``model`` (normalised, see :func:`normalised_model`) over ``rows`` of ``cache``.

    ``norm``: the raw-to-normalised map (the saved model's :meth:`~crosscoder.model.CrossCoder.normalization`,
    or bare per-model factors). Each accumulator gets ``update(x, f, x_hat, rows)`` per chunk.
    """
    norm = Normalization.of(norm)
    if len(norm.scale) != cache.n_models or cache.n_models != model.cfg.n_models:
        raise CrossCoderError(
            f"{cache.path}: {cache.n_models} models, the crosscoder has {model.cfg.n_models}"
        )
    if cache.d_model != model.cfg.d_model:
        raise CrossCoderError(
            f"{cache.path}: d_model {cache.d_model}, the crosscoder has {model.cfg.d_model}"
        )
    model.eval()
    dev = model.W_dec.device
    done = 0
    for r, x_norm in iter_chunks(cache, rows, norm, chunk, dev):
        f = model.encode(x_norm)
        x_hat = model.decode(f)
        for acc in accumulators:
            acc.update(x_norm, f, x_hat, r)
        done += len(r)
        if progress is not None:
            progress(done, len(rows))


#: Rows the architecture's own analysis metrics (``Architecture.analysis_metrics``) are computed on.
ARCH_METRIC_ROWS = 65_536


def architecture_metrics(
    model: CrossCoder,
    cache: PairedCache,
    rows: np.ndarray,
    norm: Normalization | Sequence[float],
    chunk: int,
    device: torch.device,
) -> tuple[dict[str, float], int]:
    """The architecture's own numbers (Matryoshka: explained variance per prefix) on at most
    ``ARCH_METRIC_ROWS`` evenly spaced ``rows``; ``model`` is the normalised model. Returns the metrics
    and the number of rows used."""
    sub = rows[:: max(1, len(rows) // ARCH_METRIC_ROWS)][:ARCH_METRIC_ROWS]
    return model.arch.analysis_metrics(x for _, x in iter_chunks(cache, sub, norm, chunk, device)), len(sub)
