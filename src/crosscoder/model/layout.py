"""Which latents may use which model: dedicated partitions and designated shared latents.

The dictionary is laid out as ``[dedicated base | dedicated ft | designated shared | free]``:

* **dedicated** (Jiralerspong & Bricken 2026, "dedicated feature crosscoders"): the first
  ``dedicated_base`` latents read from and write to model 0 only, the next ``dedicated_ft`` model 1 only.
  Their encoder columns and decoder rows of the other model are exactly zero, at initialisation and after
  every step (their gradients are masked, so Adam's moments stay zero): exclusivity by construction.
* **designated shared** (Anthropic, "Insights on crosscoder model diffing", Feb 2025): ``shared_latents``
  latents whose decoder vector is one vector tied across models (identical in the normalised space: the
  copies start equal and receive the summed gradient, so every update is the same), with their own
  sparsity factor ``shared_sparsity_coeff`` (relative to the others'; Anthropic's example 3/30 = 0.1).
* **free**: the rest, an ordinary crosscoder.

Works with every architecture: penalties are multiplied by :meth:`LatentLayout.sparsity_scale`, selection
scores divided by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentLayout:
    d_latent: int
    n_models: int
    dedicated_base: int = 0
    dedicated_ft: int = 0
    shared: int = 0
    shared_factor: float = 0.1

    @classmethod
    def of(cls, cfg: object) -> LatentLayout:
        factor = cfg.shared_sparsity_coeff
        if factor is None:  # the architecture's default (Architecture.default_shared_factor)
            from .registry import get_architecture

            factor = get_architecture(cfg.arch).default_shared_factor
        return cls(
            cfg.d_latent, cfg.n_models, cfg.dedicated_base, cfg.dedicated_ft, cfg.shared_latents, factor
        )

    @property
    def constrained(self) -> bool:
        return self.dedicated_base + self.dedicated_ft + self.shared > 0

    @property
    def base_only(self) -> slice:
        return slice(0, self.dedicated_base)

    @property
    def ft_only(self) -> slice:
        return slice(self.dedicated_base, self.dedicated_base + self.dedicated_ft)

    @property
    def tied(self) -> slice:
        start = self.dedicated_base + self.dedicated_ft
        return slice(start, start + self.shared)

    @property
    def free(self) -> slice:
        return slice(self.dedicated_base + self.dedicated_ft + self.shared, self.d_latent)

    def kinds(self) -> list[str]:
        """Per latent: ``base_only``, ``ft_only``, ``designated_shared`` or ``free``."""
        out = ["free"] * self.d_latent
        for name, s in (
            ("base_only", self.base_only),
            ("ft_only", self.ft_only),
            ("designated_shared", self.tied),
        ):
            out[s] = [name] * (s.stop - s.start)
        return out

    def model_mask(self) -> torch.Tensor | None:
        """``[d_latent, n_models]`` float: 1 where latent ``i`` may read/write model ``m`` (None: all)."""
        if self.dedicated_base + self.dedicated_ft == 0:
            return None
        mask = torch.ones(self.d_latent, self.n_models)
        mask[self.base_only, 1:] = 0.0
        mask[self.ft_only, 0] = 0.0
        if self.n_models > 2:
            mask[self.ft_only, 2:] = 0.0
        return mask

    def forbidden(self, device: torch.device) -> torch.Tensor | None:
        """``[d_latent, n_models]`` bool: latent ``i`` may not read/write model ``m`` (None: all allowed)."""
        mask = self.model_mask()
        return None if mask is None else (mask == 0).to(device)

    def sparsity_scale(self) -> torch.Tensor:
        """``[d_latent]``: ``shared_factor`` on designated shared latents, 1 elsewhere."""
        scale = torch.ones(self.d_latent)
        scale[self.tied] = self.shared_factor
        return scale

    @torch.no_grad()
    def apply_(self, w_enc: torch.Tensor, w_dec: torch.Tensor) -> None:
        """Impose the layout on ``w_enc [M, Dm, H]`` and ``w_dec [H, M, Dm]`` (in place): zero the forbidden
        blocks (``+0.0``: ``masked_fill``, not a product that would leave ``-0.0`` under negative weights),
        copy model 0's decoder vector of each designated shared latent to every model."""
        off = self.forbidden(w_dec.device)
        if off is not None:
            w_dec.masked_fill_(off[:, :, None], 0.0)
            w_enc.masked_fill_(off.t()[:, None, :], 0.0)
        if self.shared:
            w_dec[self.tied] = w_dec[self.tied, :1].expand(-1, self.n_models, -1)

    @torch.no_grad()
    def project_grads_(self, w_enc: torch.Tensor, w_dec: torch.Tensor) -> None:
        """Keep the layout through an optimiser step: zero the gradients of forbidden blocks, and give every
        copy of a tied decoder vector the summed gradient (the gradient of the one shared vector).

        With zero gradients from the first step on, Adam's moments and updates of the forbidden blocks are
        exactly 0, so the blocks stay exactly ``+0.0``; the tied copies start equal and get identical
        gradients, moments and updates (Adam and clipping act element by element), so they stay bitwise
        equal. (Clipping sees the summed gradient once per model: ``sqrt(n_models)`` times the shared
        vector's own gradient norm in the global norm.)"""
        off = self.forbidden(w_dec.device)
        if off is not None:
            if w_dec.grad is not None:
                w_dec.grad.masked_fill_(off[:, :, None], 0.0)
            if w_enc.grad is not None:
                w_enc.grad.masked_fill_(off.t()[:, None, :], 0.0)
        if self.shared and w_dec.grad is not None:
            g = w_dec.grad[self.tied].sum(1, keepdim=True)
            w_dec.grad[self.tied] = g.expand(-1, self.n_models, -1)

    # ---------------------------------------------------------------- folding (saved models take raw inputs)
    @torch.no_grad()
    def fold_decoder_(self, w_dec: torch.Tensor, norm_scale: torch.Tensor) -> int:
        """``w_dec[:, m] /= norm_scale[m]`` (in place; :meth:`CrossCoder.fold`), keeping the designated shared
        latents tied **exactly** in the normalised space.

        A plain division leaves ``fl(fl(v / s_m) * s_m) != v`` for about 10-25% of the float32 entries
        (one ulp; measured over several scale pairs), so ``W_dec[i, m] * norm_scale[m]`` would differ
        across models by up to one ulp. Here each tied entry ``v`` gets folded values ``b_m`` (within two
        ulps of ``v / s_m``) with ``fl32(b_m * s_m) == c`` for every model, ``c`` = ``v`` or, where no such
        ``b_m`` exists for some model (multiplication by ``s_m`` skips some float32 values), the nearest
        float32 to ``v`` (a few ulps at most) that every model reaches. Unfolding (``W_dec[:, m] * s_m`` in
        float32, as :meth:`CrossCoder.unfold` and the analysis do) then gives bitwise-identical vectors.
        Returns the number of entries left with a plain division because no such ``c`` was found (0 in
        every case measured; float64 products cannot be made exact: ``b_0 s_0 = b_1 s_1`` has no float32
        solutions in general, and they stay within one float32 ulp of each other).
        """
        s = torch.as_tensor(norm_scale, dtype=w_dec.dtype, device=w_dec.device)
        v = w_dec[self.tied, 0].clone() if self.shared else None
        w_dec.div_(s[None, :, None])
        if v is None or w_dec.dtype != torch.float32:
            return 0
        folded, missed = exact_fold(v, s)
        w_dec[self.tied] = folded
        return missed

    @torch.no_grad()
    def violations(
        self, w_enc: torch.Tensor, w_dec: torch.Tensor, norm_scale: torch.Tensor | None = None
    ) -> dict[str, float]:
        """How far weights are from the layout: the largest absolute entry of a forbidden encoder / decoder
        block (``forbidden_enc``, ``forbidden_dec``) and the largest absolute difference between the copies
        of a tied decoder vector in the normalised space (``tied_dec``: ``W_dec[i, m] * norm_scale[m]``,
        float32). All 0.0 for a model trained with this layout (see :meth:`fold_decoder_`)."""
        out = {"forbidden_enc": 0.0, "forbidden_dec": 0.0, "tied_dec": 0.0}
        off = self.forbidden(w_dec.device)
        if off is not None:
            out["forbidden_dec"] = float(w_dec.detach().abs().masked_fill(~off[:, :, None], 0).max())
            out["forbidden_enc"] = float(w_enc.detach().abs().masked_fill(~off.t()[:, None, :], 0).max())
        if self.shared:
            t = w_dec.detach()[self.tied].float()
            if norm_scale is not None:
                t = t * torch.as_tensor(norm_scale, dtype=torch.float32, device=t.device)[None, :, None]
            out["tied_dec"] = float((t - t[:, :1]).abs().max())
        return out

    def describe(self) -> dict[str, object]:
        """The layout as plain values (``crosscoder analyze``'s summary): sizes, latent ranges, factor."""

        def rng(s: slice) -> list[int]:
            return [s.start, s.stop]

        return {
            "dedicated_base": self.dedicated_base,
            "dedicated_ft": self.dedicated_ft,
            "shared_latents": self.shared,
            "shared_sparsity_coeff": self.shared_factor,
            "free": self.d_latent - self.dedicated_base - self.dedicated_ft - self.shared,
            "ranges": {
                "base_only": rng(self.base_only),
                "ft_only": rng(self.ft_only),
                "designated_shared": rng(self.tied),
                "free": rng(self.free),
            },
        }


def _step(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` moved by ``n`` float steps (ulps), towards +inf for ``n > 0``."""
    inf = torch.full_like(t, float("inf") if n > 0 else float("-inf"))
    for _ in range(abs(n)):
        t = torch.nextafter(t, inf)
    return t


@torch.no_grad()
def exact_fold(v: torch.Tensor, s: torch.Tensor, max_nudge: int = 4) -> tuple[torch.Tensor, int]:
    """Folded copies of tied vectors: ``v [n, Dm]`` float32 (normalised space), ``s [M]`` float32 ->
    ``(b [n, M, Dm], missed)`` with ``fl32(b[:, m] * s[m])`` the same float32 ``c`` for every ``m`` (``c = v``
    where possible, else within ``max_nudge`` ulps of ``v``); ``missed`` entries (none in practice) keep
    ``v / s[m]``. See :meth:`LatentLayout.fold_decoder_`."""
    v = v.float()
    s = s.float().to(v.device)
    m = s.shape[0]
    out = (v[:, None, :] / s[None, :, None]).clone()
    done = torch.zeros_like(v, dtype=torch.bool)
    offsets = [0] + [k for j in range(1, max_nudge + 1) for k in (j, -j)]
    for off in offsets:
        c = _step(v, off)
        ok = ~done
        picks = []
        for j in range(m):
            q = c / s[j]
            found = torch.zeros_like(ok)
            b = q.clone()
            for d in (0, 1, -1, 2, -2):
                cand = _step(q, d)
                hit = ~found & (cand * s[j] == c)
                b = torch.where(hit, cand, b)
                found |= hit
            ok &= found
            picks.append(b)
        for j in range(m):
            out[:, j] = torch.where(ok, picks[j], out[:, j])
        done |= ok
        if bool(done.all()):
            break
    return out, int((~done).sum())
