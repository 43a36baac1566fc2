"""Top activating contexts per latent, read back from the paired cache.

:class:`TopActivations` keeps, during the streaming pass, the ``k`` largest activations of every latent
and their cache rows (``[k, d_latent]``, merged chunk by chunk with ``topk``). :func:`build_contexts`
then reads, for each kept row, a window of neighbouring rows of the same sequence (the cache stores
rows in (sequence, position) order with ``index = (token id, sequence id, position)``), decodes the
token ids with the tokenizer, and evaluates the latent on every token of the window. For the
activating token it also reports how strongly each model's activation points along the latent's
decoder direction (``proj_base``, ``proj_ft``: projection of the normalised base / fine-tuned
activation on the unit decoder vector of the model with the larger decoder norm) — the same position
seen by the base and by the fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.paired import PairedCache
from ..model import CrossCoder
from ..normalization import Normalization


class TopActivations:
    """Streaming top-``k`` activations per latent: ``values [k, d_latent]``, ``rows [k, d_latent]``."""

    def __init__(self, d_latent: int, k: int = 8, device: str | torch.device = "cpu") -> None:
        self.k = k
        self.values = torch.zeros(k, d_latent, device=device)
        self.rows = torch.full((k, d_latent), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(
        self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, rows: np.ndarray | None = None
    ) -> None:
        """``f [n, d_latent]`` with ``rows [n]`` (cache row of each token)."""
        if rows is None:
            raise ValueError("TopActivations needs the cache rows")
        # Only latents whose chunk maximum beats their current k-th value can change.
        live = torch.nonzero(f.amax(0) > self.values[-1]).flatten()
        if live.numel() == 0:
            return
        fl = f[:, live]
        kk = min(self.k, f.shape[0])
        v, i = fl.topk(kk, dim=0)  # [kk, live]
        r = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=f.device)[i]
        vals = torch.cat([self.values[:, live], v])
        cand = torch.cat([self.rows[:, live], r])
        top, idx = vals.topk(self.k, dim=0)
        self.values[:, live] = top
        self.rows[:, live] = cand.gather(0, idx)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values [k, d_latent], rows [k, d_latent])`` sorted by value, row -1 where nothing fired."""
        vals = self.values.cpu().numpy()
        rows = np.where(vals > 0, self.rows.cpu().numpy(), -1)
        return vals, rows


class TokenText:
    """Token id -> display text (each id decoded alone, memoised); ``#id`` without a tokenizer."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tok = tokenizer
        self.memo: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id < 0:
            return "?"
        if token_id not in self.memo:
            if self.tok is None:
                self.memo[token_id] = f"#{token_id}"
            else:
                try:
                    self.memo[token_id] = self.tok.decode([token_id])
                except Exception:  # noqa: BLE001 - an id outside the vocabulary
                    self.memo[token_id] = f"#{token_id}"
        return self.memo[token_id]


@torch.no_grad()
def latent_acts(model: CrossCoder, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Activation of latent ``latents[n]`` on row ``x[n]``: ``x [n, n_models, d_model]`` (normalised),
    ``latents [n]`` -> ``[n]``, with the architecture's own eval rule (BatchTopK: the threshold)."""
    pre = torch.empty(len(latents), dtype=x.dtype, device=x.device)
    step = 1024  # rows at a time: the gathered encoder columns are [n_models, d_model, step]
    for lo in range(0, len(latents), step):
        idx = latents[lo : lo + step]
        w = model.W_enc[:, :, idx]  # [M, d, step]
        pre[lo : lo + step] = torch.einsum("nmd,mdn->n", x[lo : lo + step], w)
    return model.arch.activate_entries(pre + model.b_enc[latents], latents)


@torch.no_grad()
def build_contexts(
    model: CrossCoder,
    cache: PairedCache,
    norm: Normalization | Sequence[float],
    latents: Sequence[int],
    top_values: np.ndarray,
    top_rows: np.ndarray,
    tokenizer: Any | None = None,
    left: int = 10,
    right: int = 3,
    chunk_latents: int = 128,
    proj_blocks: np.ndarray | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Contexts of ``latents`` from the top rows found by :class:`TopActivations`.

    ``model`` is the normalised model; ``top_values, top_rows [k, d_latent]``. Returns, per latent, a
    list of ``{"row", "act", "seq", "pos", "tokens": [str], "acts": [float], "mark": i, "proj_base",
    "proj_ft"}`` where ``tokens[mark]`` is the activating token. ``proj_blocks [d_latent, n_blocks]`` (n
    models, several sites): ``"proj": [float | None]`` per block instead of ``proj_base``/``proj_ft``, block
    ``b``'s activation projected on the unit decoder vector of block ``proj_blocks[j, b]`` (the reference
    model's block at ``b``'s site; -1: none, ``None``).
    """
    text = TokenText(tokenizer)
    norm = Normalization.of(norm)
    n_rows = cache.n_rows
    offsets = np.arange(-left, right + 1)
    norms = model.dec_norms().detach()
    if norms.shape[1] == 2:
        dominant = (norms[:, 1] >= norms[:, 0]).long()  # [h]
    else:
        dominant = norms.argmax(1)  # [h]
    w_dec = model.W_dec.detach()
    dev = w_dec.device
    out: dict[int, list[dict[str, Any]]] = {}
    latents = [int(j) for j in latents]
    for lo in range(0, len(latents), chunk_latents):
        part = latents[lo : lo + chunk_latents]
        items = [
            (j, int(top_rows[i, j]), float(top_values[i, j]))
            for j in part
            for i in range(top_rows.shape[0])
            if top_rows[i, j] >= 0
        ]
        for j in part:
            out[j] = []
        if not items:
            continue
        centre = np.array([r for _, r, _ in items], np.int64)
        win = np.clip(centre[:, None] + offsets[None, :], 0, n_rows - 1)  # [c, W]
        flat = win.reshape(-1)
        index = cache.read_index(flat).reshape(len(items), len(offsets), 3)
        x = norm.apply_(cache.read(flat)).to(dev)  # [c*W, M, d]
        lat_c = torch.tensor([j for j, _, _ in items], dtype=torch.long, device=dev)  # [c]
        acts = latent_acts(model, x, lat_c.repeat_interleave(len(offsets)))
        acts = acts.view(len(items), len(offsets)).cpu().numpy()
        xc = x.view(len(items), len(offsets), *x.shape[1:])[:, left]  # [c, M, d] activating rows
        d_unit = w_dec[lat_c, dominant[lat_c]]  # [c, d]
        d_unit = d_unit / d_unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        proj = torch.einsum("cmd,cd->cm", xc, d_unit).cpu().numpy()  # [c, M]
        if proj_blocks is not None:
            src = torch.as_tensor(proj_blocks, device=dev)[lat_c]  # [c, M]
            d_blk = torch.gather(w_dec[lat_c], 1, src.clamp_min(0)[:, :, None].expand(-1, -1, xc.shape[-1]))
            d_blk = d_blk / d_blk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            proj = torch.einsum("cmd,cmd->cm", xc, d_blk).masked_fill(src < 0, float("nan")).cpu().numpy()
        for c, (j, row, val) in enumerate(items):
            seq = index[c, left, 1]
            keep = [
                t
                for t in range(len(offsets))
                if (seq < 0 and t == left)
                or (seq >= 0 and index[c, t, 1] == seq and win[c, t] == centre[c] + offsets[t])
            ]
            item: dict[str, Any] = {
                "row": row,
                "act": val,
                "seq": int(seq),
                "pos": int(index[c, left, 2]),
                "tokens": [text(int(index[c, t, 0])) for t in keep],
                "acts": [round(float(acts[c, t]), 4) for t in keep],
                "mark": keep.index(left),
            }
            if proj_blocks is not None:
                item["proj"] = [round(float(v), 4) if np.isfinite(v) else None for v in proj[c]]
            else:
                item["proj_base"], item["proj_ft"] = float(proj[c, 0]), float(proj[c, -1])
            out[j].append(item)
    return out
