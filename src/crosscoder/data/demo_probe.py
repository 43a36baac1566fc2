"""The probe loss of the demo's code fine-tune (:mod:`crosscoder.data.demo_pair`).

This is a constructed demo. A plain gentle fine-tune rotates what the base model already represents (the
new information comes with the same tokens and contexts as the base's features), so a crosscoder keeps one
latent per feature, with a different direction in each model, and finds no fine-tuned-only latent. So that
the demo has a *known* fine-tuned-only feature to find, the code fine-tune is taught one on purpose, and the
base model never is:

* the feature: a contextual variable ``y_t`` of code that does not depend on the current token's identity
  (``ft_probe_variable``: ``brackets``, the default, 1 when the token ends inside ``()``, ``[]`` or
  ``{}``; ``string``, inside a string literal; ``either``), labelled by
  :func:`crosscoder.data.demo_text.code_context_labels` over the text the model sees in its block
  (:func:`token_labels`; about 19% of code tokens in brackets);
* where: along a fixed random unit direction ``v`` (seed ``seed + 1000``) of the residual stream at the
  crosscoder's site, the output of block ``transformer.h.<n_layer // 2>``;
* the loss: with ``p_t = h_t . v`` the fine-tuned model's projection, ``r_t`` the base model's own
  projection of the same token (``ft_probe_relative``; else ``mu``, the base's mean over code tokens),
  ``sigma`` the standard deviation of the base's projection over code tokens and ``z_t = (p_t - r_t) /
  sigma``, the fine-tune minimises ``LM loss + ft_probe_coeff * (mean (z_t - ft_probe_scale * y_t)^2 +
  ft_probe_floor * mean min(z_t, 0)^2)`` over every position but the BOS, of the code batch and of
  ``ft_probe_other`` prose and data blocks per step whose ``y`` is 0 (they get no LM loss). So the
  fine-tune adds ``c = ft_probe_scale * sigma`` along ``v`` inside brackets of code and leaves the base's
  projection elsewhere; the floor term keeps it from going below the base's (which would make an
  "outside brackets" direction too).

``info.json``'s ``ft_probe`` records ``mu``, ``sigma``, ``c``, the share of code tokens with ``y = 1``,
the correlation of each model's projection on ``v`` with ``y`` on held-out code, and the mean ``(p - r) /
sigma`` of the fine-tuned model on held-out prose and data (``heldout_shift_other``; 0 would be perfect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .demo_text import code_context_labels

PROBE_VARIABLES = ("brackets", "string", "either")


def token_labels(docs: list[str], tok: Any, seq_len: int, variable: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks [n, seq_len], y [n, seq_len])``: the packed blocks of ``demo_pair._blocks`` and, per token,
    the probe variable (``PROBE_VARIABLES``) of :func:`code_context_labels` at the token's last character (0
    for BOS and EOS). The scanner reads what the model sees: it restarts at the start of every block and
    after every EOS, so a bracket or string opened before the block's first token does not count."""
    if variable not in PROBE_VARIABLES:
        raise ValueError(f"ft_probe_variable: one of {PROBE_VARIABLES}, got {variable!r}")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    room = seq_len - 1
    stream: list[tuple[int, int, int, int]] = []  # (id, document or -1 for EOS, char start, char end)
    enc = tok(docs, add_special_tokens=False, return_offsets_mapping=True)
    for d, (doc_ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        stream += [(t, d, a, b) for t, (a, b) in zip(doc_ids, offsets, strict=True)] + [(eos, -1, 0, 0)]
    n = len(stream) // room
    ids = torch.tensor([t[0] for t in stream[: n * room]], dtype=torch.long).view(n, room)
    ys = torch.zeros(n, room)
    for w in range(n):
        window = stream[w * room : (w + 1) * room]
        i = 0
        while i < room:  # one run of tokens of the same document at a time
            d = window[i][1]
            j = i + 1
            while j < room and window[j][1] == d:
                j += 1
            if d >= 0:
                start = window[i][2]
                in_string, in_brackets = code_context_labels(docs[d][start : window[j - 1][3]])
                flag = {"brackets": in_brackets, "string": in_string}.get(variable) or [
                    a or b for a, b in zip(in_string, in_brackets, strict=True)
                ]
                for k in range(i, j):
                    a, b = window[k][2], window[k][3]
                    ys[w, k] = float(b > a and flag[b - 1 - start])
            i = j
    return torch.cat([torch.full((n, 1), bos), ids], 1), torch.cat([torch.zeros(n, 1), ys], 1)


@dataclass
class Probe:
    """The probe loss of the module docstring: training ``blocks [n, seq_len]`` and their labels ``y``."""

    blocks: torch.Tensor
    y: torch.Tensor
    other: torch.Tensor  # prose and data blocks: y = 0 throughout
    n_other: int
    v: torch.Tensor
    mu: float
    sigma: float
    scale: float
    coeff: float
    floor: float
    layer: int
    base: Any | None = None  # frozen base model: the reference is its projection, else mu

    def _z(self, hidden: Any, x: torch.Tensor) -> Any:
        """``(h . v - reference) / sigma`` of block outputs ``hidden [b, seq_len, d]`` (BOS left out)."""
        ref = self.mu if self.base is None else projection(self.base, x, self.v, self.layer)
        return (hidden[:, 1:] @ self.v - ref) / self.sigma

    def loss(self, model: Any, x: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple[Any, Any]:
        """``(LM loss on x, probe loss on x and on n_other random other blocks)``."""
        out = model(input_ids=x, labels=x, output_hidden_states=True)
        z = self._z(out.hidden_states[self.layer + 1], x)
        err = z - self.scale * self.y[idx, 1:]
        if self.n_other > 0 and len(self.other):
            o = self.other[torch.randint(0, len(self.other), (self.n_other,), generator=g)]
            z_o = self._z(model(input_ids=o, output_hidden_states=True).hidden_states[self.layer + 1], o)
            z, err = torch.cat([z, z_o]), torch.cat([err, z_o])
        return out.loss, err.pow(2).mean() + self.floor * z.clamp(max=0).pow(2).mean()


@torch.no_grad()
def projection(model: Any, blocks: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """``[n, seq_len - 1]`` projections on ``v`` of block ``layer``'s output (BOS left out)."""
    was_training = model.training
    model.eval()
    out = [
        model(input_ids=blocks[i : i + 16], output_hidden_states=True).hidden_states[layer + 1][:, 1:] @ v
        for i in range(0, len(blocks), 16)
    ]
    model.train(was_training)
    return torch.cat(out)


def make_probe(
    cfg: Any, base: Any, tok: Any, train_docs: list[str], held_docs: list[str], other: torch.Tensor
) -> tuple[Probe, dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """The probe of the module docstring for the code fine-tune (``mu``, ``sigma`` measured on ``base``),
    its ``info.json`` record, and the held-out code ``(blocks, y)``."""
    layer = cfg.n_layer // 2
    g = torch.Generator().manual_seed(cfg.seed + 1000)
    v = torch.randn(cfg.n_embd, generator=g)
    v = v / v.norm()
    x, y = token_labels(train_docs, tok, cfg.seq_len, cfg.ft_probe_variable)
    proj = projection(base, x[:64], v, layer)
    mu, sigma = float(proj.mean()), float(proj.std())
    probe = Probe(
        blocks=x,
        y=y,
        other=other,
        n_other=cfg.ft_probe_other,
        v=v,
        mu=mu,
        sigma=sigma,
        scale=cfg.ft_probe_scale,
        coeff=cfg.ft_probe_coeff,
        floor=cfg.ft_probe_floor,
        layer=layer,
        base=base if cfg.ft_probe_relative else None,
    )
    info = {
        "variable": cfg.ft_probe_variable,
        "site": f"transformer.h.{layer}",
        "v_seed": cfg.seed + 1000,
        "mu": round(mu, 4),
        "sigma": round(sigma, 4),
        "c": round(cfg.ft_probe_scale * sigma, 4),
        "scale": cfg.ft_probe_scale,
        "coeff": cfg.ft_probe_coeff,
        "other_blocks_per_step": cfg.ft_probe_other,
        "floor": cfg.ft_probe_floor,
        "relative": cfg.ft_probe_relative,
        "y_fraction": round(float(y[:, 1:].mean()), 4),
    }
    held = token_labels(held_docs, tok, cfg.seq_len, cfg.ft_probe_variable)
    return probe, info, (held[0][:64], held[1][:64])


def probe_corr(model: Any, held: tuple[torch.Tensor, torch.Tensor], probe: Probe) -> float:
    """Correlation of ``model``'s projection on the probe direction with ``y`` on held-out code."""
    p = projection(model, held[0], probe.v, probe.layer).flatten()
    y = held[1][:, 1:].flatten()
    return float(torch.corrcoef(torch.stack([p, y]))[0, 1])
