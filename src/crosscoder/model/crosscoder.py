"""The crosscoder: one sparse dictionary over the activations of ``n_models`` blocks (models, or
(model, site) pairs for an acausal crosscoder over several sites; ``cfg.block_models``).

Shapes (the community's convention)::

    x      [batch, n_models, d_model]     paired activations
    W_enc  [n_models, d_model, d_latent]  encoder (sums over models inside one affine map)
    b_enc  [d_latent]
    W_dec  [d_latent, n_models, d_model]  one decoder vector per latent and model
    b_dec  [n_models, d_model]
    f      [batch, d_latent]              latents

``norm_scale [n_models]`` and ``norm_mean [n_models, d_model]`` record the map from raw activations to
the normalised training space, ``x' = norm_scale * (x - norm_mean)`` (see
:mod:`crosscoder.normalization`). A model trained on normalised inputs has ``norm_scale == 1`` and
``norm_mean == 0``; :meth:`CrossCoder.fold` folds the map into the weights so the crosscoder applies to
raw activations, and keeps the factors so that decoder norms (the L1 weighting, the BatchTopK scores,
the diffing metrics) are still measured in the normalised space: latents are identical before and
after folding.

Blocks of different widths (``cfg.d_models``) are zero-padded to ``d_model`` (the largest):
``width_mask [n_models, d_model]`` marks the real entries. Padded entries of ``W_enc``, ``W_dec``,
``b_dec`` start at 0 and stay exactly 0 (their inputs and targets are 0, so are their gradients); the
saved file holds each block at its own width (:meth:`CrossCoder.tensors`).

The architecture (``cfg.arch``, from :mod:`crosscoder.model.registry`) is the submodule ``arch``: it owns
the activation rule, its sparsity term, its own parameters and buffers and what it saves. The latent
layout (:mod:`crosscoder.model.layout`: dedicated partitions, designated shared latents) constrains the
weights for every architecture.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CrossCoderError
from ..io import atomic_path
from ..normalization import Normalization
from .architectures import Architecture
from .layout import LatentLayout
from .registry import get_architecture

if TYPE_CHECKING:
    from ..config import CrossCoderConfig
    from .sharding import LatentShard

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class CrossCoder(nn.Module):
    """A crosscoder of architecture ``cfg.arch`` (see :mod:`crosscoder.model.registry`)."""

    arch: Architecture

    def __init__(
        self,
        cfg: CrossCoderConfig,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
        empty: bool = False,
    ) -> None:
        """``empty``: allocate ``W_enc``/``W_dec`` without initialising them (no random draw, no pages
        touched), for weights loaded right after (:meth:`from_pretrained`, assembling latent shards)."""
        super().__init__()
        cfg.validate()
        if cfg.d_model <= 0:
            raise CrossCoderError("d_model: must be set (positive) before building a CrossCoder")
        self.cfg = cfg
        m, d, h = cfg.n_models, cfg.d_model, cfg.d_latent
        widths = cfg.widths()
        #: True when blocks have different widths: narrower blocks are zero-padded to ``d_model``
        self.mixed_widths = any(w != d for w in widths)
        mask = torch.arange(d)[None, :] < torch.tensor(widths)[:, None]  # [n_models, d_model]
        self.register_buffer("width_mask", mask, persistent=False)
        w_dec = torch.empty(h, m, d) if empty else initial_decoder(cfg, mask, generator, 0, h)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(torch.empty(m, d, h) if empty else w_dec.permute(1, 2, 0).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(h))
        self.b_dec = nn.Parameter(torch.zeros(m, d))
        scale = torch.tensor(cfg.norm_scale if cfg.norm_scale is not None else [1.0] * m, dtype=torch.float32)
        self.register_buffer("norm_scale", scale, persistent=False)
        mean = torch.zeros(m, d)
        if cfg.norm_mean is not None:  # rows of each block's own width (mixed widths) or of d_model
            for i, row in enumerate(cfg.norm_mean):
                mean[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        self.register_buffer("norm_mean", mean, persistent=False)
        self.layout = LatentLayout.of(cfg)
        self.register_buffer("sparsity_scale", self.layout.sparsity_scale(), persistent=False)
        if not empty:
            self.layout.apply_(self.W_enc.data, self.W_dec.data)
        self.arch = get_architecture(cfg.arch)(self)
        #: set when this model is one shard of a latent-sharded dictionary (:mod:`crosscoder.model.sharding`)
        self.shard: LatentShard | None = None
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ core maths
    def dec_norms(self) -> torch.Tensor:
        """Per-latent, per-model decoder norms in the normalised space: ``[d_latent, n_models]``."""
        return self.W_dec.norm(dim=-1) * self.norm_scale

    def latent_weight(self) -> torch.Tensor:
        """Decoder-norm weight of each latent ``[d_latent]``: sum over models (or concat norm). The
        architecture's sparsity weight (:meth:`Architecture.weight`) adds the layout's per-latent factor."""
        norms = self.dec_norms()
        if self.cfg.l1_weighting == "concat":
            return norms.pow(2).sum(-1).sqrt()
        return norms.sum(-1)

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """``x [batch, n_models, d_model]`` -> pre-activations ``[batch, d_latent]``."""
        b = x.shape[0]
        return torch.addmm(self.b_enc, x.reshape(b, -1), self.W_enc.reshape(-1, self.cfg.d_latent))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [batch, n_models, d_model]`` -> latents ``f [batch, d_latent]``.

        BatchTopK uses the batch rule in training mode and the threshold in eval mode.
        """
        return self.arch.activate(self.encode_pre(x), self.arch.weight(), self.training)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``f [batch, d_latent]`` -> reconstruction ``[batch, n_models, d_model]`` (a latent shard: its
        partial sum, summed over the shards, then ``+ b_dec``)."""
        w_dec2 = self.W_dec.reshape(self.cfg.d_latent, -1)
        if self.shard is None:
            out = torch.addmm(self.b_dec.reshape(1, -1), f, w_dec2)
        else:
            out = self.add_partials(f @ w_dec2)
        return out.view(f.shape[0], self.cfg.n_models, self.cfg.d_model)

    def add_partials(self, partial: torch.Tensor) -> torch.Tensor:
        """``partial [batch, n_models * d_model]`` (a decoder product without bias) -> ``+ b_dec``, after
        summing it over the latent shards when this model is one."""
        if self.shard is not None:
            partial = self.shard.reduce(partial)
        return partial + self.b_dec.reshape(1, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [batch, n_models, d_model]`` -> ``(x_hat [batch, n_models, d_model], f [batch, d_latent])``."""
        f = self.encode(x)
        return self.decode(f), f

    def constrain_grads(self) -> None:
        """After ``backward()``: keep the latent layout (dedicated blocks zero, shared decoders tied)."""
        if self.layout.constrained:
            self.layout.project_grads_(self.W_enc, self.W_dec)

    # ------------------------------------------------------------------ normalisation
    def normalization(self) -> Normalization:
        """The recorded raw -> training-space map (identity for an unfolded model)."""
        mu = self.norm_mean.detach().cpu()
        return Normalization(
            [float(v) for v in self.norm_scale.tolist()],
            [[float(v) for v in row] for row in mu.tolist()] if torch.any(mu != 0) else None,
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``x [batch, n_models, d_model]`` -> normalised training space
        ``norm_scale * (x - norm_mean)``."""
        return (x.float() - self.norm_mean) * self.norm_scale[:, None]

    @torch.no_grad()
    def fold(
        self,
        norm_scale: torch.Tensor | list[float],
        norm_mean: torch.Tensor | list[list[float]] | None = None,
    ) -> CrossCoder:
        """Fold the input map ``x' = s * (x - mu)`` into the weights (in place) so the model takes raw inputs.

        With ``s = norm_scale [n_models]`` and ``mu = norm_mean [n_models, d_model]`` (default 0):
        ``W_enc[m] *= s[m]``, ``b_enc -= sum_m mu[m] @ W_enc[m]`` (the scaled encoder),
        ``W_dec[:, m] /= s[m]``, ``b_dec[m] = b_dec[m] / s[m] + mu[m]``. Latents on raw ``x`` then equal the
        unfolded latents on ``x'``; reconstructions come out in raw units.
        """
        dev = self.W_enc.device
        s = torch.as_tensor(norm_scale, dtype=torch.float32, device=dev)
        if not torch.all(self.norm_scale == 1) or torch.any(self.norm_mean != 0):
            raise CrossCoderError("fold: model is already folded")
        self.W_enc.mul_(s[:, None, None])
        self.layout.fold_decoder_(self.W_dec, s)  # W_dec[:, m] /= s[m]; tied latents stay exactly tied
        self.b_dec.div_(s[:, None])
        if norm_mean is not None:
            mu = torch.as_tensor(norm_mean, dtype=torch.float32, device=dev)
            shift = torch.einsum("md,mdh->h", mu.double(), self.W_enc.double())
            self.b_enc.copy_((self.b_enc.double() - shift).float())
            self.b_dec.add_(mu)
            self.norm_mean.copy_(mu)
            self.cfg.norm_mean = [[float(v) for v in row] for row in mu.tolist()]
        self.norm_scale.copy_(s)
        self.cfg.norm_scale = [float(v) for v in s.tolist()]
        return self

    @torch.no_grad()
    def unfold(self) -> CrossCoder:
        """Inverse of :meth:`fold`: weights back in the normalised training space (in place)."""
        s, mu = self.norm_scale.clone(), self.norm_mean.clone()
        if torch.any(mu != 0):
            shift = torch.einsum("md,mdh->h", mu.double(), self.W_enc.double())
            self.b_enc.copy_((self.b_enc.double() + shift).float())
            self.b_dec.sub_(mu)
            self.norm_mean.zero_()
            self.cfg.norm_mean = None
        self.W_enc.div_(s[:, None, None])
        self.W_dec.mul_(s[None, :, None])
        self.b_dec.mul_(s[:, None])
        self.norm_scale.fill_(1.0)
        return self

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``model.safetensors`` holds. Same-width blocks: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``
        (shapes in the module docstring). Mixed widths: ``b_enc`` and, per block ``i`` of width ``d_i``,
        ``W_enc.<i> [d_i, d_latent]``, ``W_dec.<i> [d_latent, d_i]``, ``b_dec.<i> [d_i]`` (no padding)."""
        out = {n: getattr(self, n).detach().contiguous().cpu() for n in PARAM_NAMES}
        if self.mixed_widths:
            w_enc, w_dec, b_dec = out.pop("W_enc"), out.pop("W_dec"), out.pop("b_dec")
            for i, w in enumerate(self.cfg.widths()):
                out[f"W_enc.{i}"] = w_enc[i, :w].contiguous()
                out[f"W_dec.{i}"] = w_dec[:, i, :w].contiguous()
                out[f"b_dec.{i}"] = b_dec[i, :w].contiguous()
        out.update(self.arch.saved_tensors())
        return out

    def _load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy the parameters of :meth:`tensors` (either layout) into this model, checking shapes."""
        if self.mixed_widths:
            expected = {"b_enc": tuple(self.b_enc.shape)}
            for i, w in enumerate(self.cfg.widths()):
                expected.update(
                    {
                        f"W_enc.{i}": (w, self.cfg.d_latent),
                        f"W_dec.{i}": (self.cfg.d_latent, w),
                        f"b_dec.{i}": (w,),
                    }
                )
        else:
            expected = {n: tuple(getattr(self, n).shape) for n in PARAM_NAMES}
        for n, shape in expected.items():
            if n not in tensors:
                raise CrossCoderError(f"{where}: missing tensor {n!r}")
            if tuple(tensors[n].shape) != shape:
                raise CrossCoderError(
                    f"{where}: {n} has shape {tuple(tensors[n].shape)}, config says {shape}"
                )
        if not self.mixed_widths:
            for n in PARAM_NAMES:
                getattr(self, n).copy_(tensors[n])
            return
        self.b_enc.copy_(tensors["b_enc"])
        for p in (self.W_enc, self.W_dec, self.b_dec):
            p.zero_()
        for i, w in enumerate(self.cfg.widths()):
            self.W_enc[i, :w].copy_(tensors[f"W_enc.{i}"])
            self.W_dec[:, i, :w].copy_(tensors[f"W_dec.{i}"])
            self.b_dec[i, :w].copy_(tensors[f"b_dec.{i}"])

    def config_dict(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        from .. import __version__

        d = dataclasses.asdict(self.cfg)
        norm = self.normalization()
        d["norm_scale"], d["norm_mean"] = norm.scale, norm.mean
        if self.mixed_widths and norm.mean is not None:  # each block's own width, not the padding
            d["norm_mean"] = [row[:w] for row, w in zip(norm.mean, self.cfg.widths(), strict=True)]
        d["shared_sparsity_coeff"] = (
            self.layout.shared_factor
        )  # the resolved factor (the architecture's default)
        d.update(self.arch.config_info())
        d["library"] = "crosscoder"
        d["version"] = __version__
        if extra:
            d.update(extra)
        return d

    def save_pretrained(self, path: str | os.PathLike, extra_config: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(self.tensors(), str(tmp), metadata={"format": "pt"})
        with atomic_path(path / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.config_dict(extra_config), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, revision: str | None = None, device: str | torch.device | None = None
    ) -> CrossCoder:
        """Load from a local folder or a Hugging Face Hub repo id
        (``config.json`` + ``model.safetensors``)."""
        folder = Path(path)
        if not folder.is_dir():
            folder = _download(str(path), revision)
        cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise CrossCoderError(f"{p}: not found (expected a crosscoder folder)")
        from ..config import CrossCoderConfig

        raw = json.loads(cfg_path.read_text())
        cfg = CrossCoderConfig(
            **{f.name: raw[f.name] for f in dataclasses.fields(CrossCoderConfig) if f.name in raw}
        )
        model = cls(cfg, empty=True)  # every weight is read from the file below
        try:
            tensors = load_file(str(w_path))
        except Exception as e:  # noqa: BLE001 - corrupt file -> one line
            raise CrossCoderError(f"{w_path}: cannot read safetensors ({e})") from None
        with torch.no_grad():
            model._load_tensors(tensors, str(w_path))
            model.arch.load_saved(tensors, str(w_path))
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload to the Hugging Face Hub; see :func:`crosscoder.interop.hub.push_to_hub` for ``kwargs``."""
        from ..interop.hub import push_to_hub  # lazy: the model layer does not import interop

        return push_to_hub(self, repo_id, **kwargs)


def initial_decoder(
    cfg: CrossCoderConfig, mask: torch.Tensor, generator: torch.Generator | None, start: int, stop: int
) -> torch.Tensor:
    """Rows ``[start, stop)`` of the initial decoder ``[d_latent, n_models, d_model]``: Gaussian directions
    (zero on ``mask``'s padding) of norm ``dec_init_norm`` per model, drawn from ``generator`` in row order.

    Rows of a latent shard are the same numbers as in the whole dictionary without drawing it whole: the
    rows before ``start`` are drawn in chunks and dropped, which gives the same stream because torch's CPU
    normal sampler transforms its uniforms in independent blocks of 16 (tests/test_latent_shards.py);
    when a row is not a multiple of 16 values the whole decoder is drawn and sliced."""
    m, d, h = cfg.n_models, cfg.d_model, cfg.d_latent
    if (start, stop) == (0, h) or (m * d) % 16:
        w = torch.randn(h, m, d, generator=generator)[start:stop]
    else:
        chunk = max(1, (1 << 24) // (m * d))  # rows per draw (64 MiB of float32)
        for r in range(0, start, chunk):
            torch.randn(min(chunk, start - r), m, d, generator=generator)
        w = torch.randn(stop - start, m, d, generator=generator)
    w = w * mask
    return w / w.norm(dim=-1, keepdim=True) * cfg.dec_init_norm


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "*.md"])
        )
    except Exception as e:  # noqa: BLE001 - network/hub errors -> one line
        raise CrossCoderError(
            f"{repo_id}: not a local folder and not loadable from the Hub ({type(e).__name__})"
        ) from None
