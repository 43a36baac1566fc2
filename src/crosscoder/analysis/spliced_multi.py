"""Spliced-in evaluation of a crosscoder over n models and/or several sites
(:mod:`crosscoder.analysis.spliced` for the classic pair).

For each batch of held-out sequences (left-padded, explicit ``position_ids``): every model's site outputs
are read at the positions the crosscoder was trained on (real, non-BOS tokens), the crosscoder (the saved,
folded model: raw activations in, narrower blocks zero-padded) encodes all blocks together and decodes
``x_hat [n, n_blocks, d_model]``; then each model runs with **all of its sites at once** replaced at those
positions by its own reconstruction (*spliced*, each block cut back to its real width) and by zeros
(*zero-ablated*). Per model: ``ce_clean``, ``ce_spliced``, ``ce_zero``, ``kl_spliced``, ``kl_zero``
(``KL(clean || variant)``) and ``frac_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)``, averaged
over next-token predictions at replaced positions whose next token is real.

Models are loaded one at a time (``load(i)``) and released, twice: a first pass reads every model's
activations, a second pass runs the replaced forwards, so at most one language model is in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..data.text import TokenSequence
from ..errors import CrossCoderError
from ..model import CrossCoder
from .blocks import BlockLayout
from .spliced import _token_metrics

KEYS = ("ce_clean", "ce_spliced", "ce_zero", "frac_recovered", "kl_spliced", "kl_zero")


def _tensor(out: Any, site: str) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        raise CrossCoderError(
            f"--site {site}: its output is a tuple; spliced-in evaluation needs a module "
            "that returns one tensor (a block, an MLP)"
        )
    return out


def _trace_sites(
    sm: Any, batch: dict[str, torch.Tensor], replace: dict[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One nnsight trace of ``sm`` (:class:`~crosscoder.data.site_model.SiteModel`): logits ``[B, T,
    vocab]`` and, without ``replace``, every site's output ``[B, T, d_site]`` (sites order); with
    ``replace`` ``{site index: [B, T, d_site]}`` those outputs are replaced (in execution order)."""
    order = sm._execution_order(batch)
    saved: dict[int, Any] = {}
    with sm.nn.trace(batch):
        for i in order:
            mod = sm.nn.get(sm.sites[i])
            if replace is not None:
                mod.output = replace[i]
            else:
                saved[i] = mod.output.save()
        logits = sm.nn.output.logits.save()
    outs = [_tensor(saved[i], sm.sites[i]) for i in range(len(sm.sites))] if replace is None else []
    return logits.float(), outs


@torch.no_grad()
def spliced_eval_multi(
    crosscoder: CrossCoder,
    layout: BlockLayout,
    load: Callable[[int], Any],
    seqs: Sequence[TokenSequence],
    pad_id: int,
    bos_id: int | None = None,
    batch_size: int = 16,
    release: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Spliced-in CE/KL per model (module docstring). ``load(i)`` returns model ``i`` as a
    :class:`~crosscoder.data.site_model.SiteModel` reading ``layout.sites``. Returns ``{"models": [{"name",
    "ce_clean", "ce_spliced", "ce_zero", "frac_recovered", "kl_spliced", "kl_zero"}, ...],
    "n_predictions", "n_sequences", "sites"}``."""
    from ..data.collect import make_batch

    crosscoder = crosscoder.eval()
    dev = crosscoder.W_dec.device
    seqs = list(seqs)
    if not seqs:
        raise CrossCoderError("spliced-in evaluation: no held-out sequences")
    batches = []
    for lo in range(0, len(seqs), batch_size):
        batch = make_batch(seqs[lo : lo + batch_size], pad_id, dev)
        ids, attn = batch["input_ids"], batch["attention_mask"].bool()
        mask = attn & (ids != bos_id) if bos_id is not None else attn.clone()
        pred = mask[:, :-1] & attn[:, 1:]
        if pred.any():
            batches.append((batch, mask, pred))
    if not batches:
        raise CrossCoderError(
            "spliced-in evaluation: no predictions at replaced positions (sequences too short?)"
        )
    nb, d = layout.n_blocks, crosscoder.cfg.d_model
    # pass 1: every block's raw activations at the replaced positions, x [n, n_blocks, d_model] per batch
    xs = [torch.zeros(int(m.sum()), nb, d) for _, m, _ in batches]
    for i in range(layout.n_models):
        sm = load(i)
        for k, (batch, mask, _) in enumerate(batches):
            _, outs = _trace_sites(sm, batch)
            for s, out in enumerate(outs):
                b = layout.block(i, s)
                if b is None:
                    continue
                v = out[mask].float().cpu()
                if v.shape[-1] != layout.widths[b]:
                    raise CrossCoderError(
                        f"{sm.name} {sm.sites[s]}: width {v.shape[-1]}, "
                        f"the crosscoder's block has {layout.widths[b]}"
                    )
                xs[k][:, b, : v.shape[-1]] = v
        if release is not None:
            release(sm)
        del sm
    x_hats = [crosscoder(x.to(dev))[0].cpu() for x in xs]  # [n, n_blocks, d_model] each
    # pass 2: each model with all of its sites replaced
    names, sums = [], []
    n_pred = sum(int(p.sum()) for _, _, p in batches)
    for i in range(layout.n_models):
        sm = load(i)
        names.append(sm.name)
        acc = dict.fromkeys(("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero"), 0.0)
        for k, (batch, mask, pred) in enumerate(batches):
            clean, outs = _trace_sites(sm, batch)
            clean_logp = F.log_softmax(clean[:, :-1], dim=-1)
            targets = batch["input_ids"][:, 1:]
            acc["ce_clean"] += _token_metrics(clean, clean_logp, targets, pred)[0]
            spliced, zero = {}, {}
            for s, out in enumerate(outs):
                b = layout.block(i, s)
                if b is None:
                    continue
                rec = out.clone()
                rec[mask] = x_hats[k][:, b, : out.shape[-1]].to(out.device, out.dtype)
                z = out.clone()
                z[mask] = 0
                spliced[s], zero[s] = rec, z
            for name, rep in (("spliced", spliced), ("zero", zero)):
                logits, _ = _trace_sites(
                    sm, batch, replace={s: rep.get(s, outs[s]) for s in range(len(outs))}
                )
                ce, kl = _token_metrics(logits, clean_logp, targets, pred)
                acc[f"ce_{name}"] += ce
                acc[f"kl_{name}"] += kl
        sums.append(acc)
        if release is not None:
            release(sm)
        del sm
    models = []
    for name, acc in zip(names, sums, strict=True):
        r = {k: v / n_pred for k, v in acc.items()}
        gap = r["ce_zero"] - r["ce_clean"]
        r["frac_recovered"] = (r["ce_zero"] - r["ce_spliced"]) / gap if abs(gap) > 1e-9 else float("nan")
        models.append({"name": name, **{k: r[k] for k in KEYS}})
    return {
        "models": models,
        "n_predictions": n_pred,
        "n_sequences": sum(int(b["input_ids"].shape[0]) for b, _, _ in batches),
        "sites": list(layout.sites),
    }


def format_spliced_multi(res: dict[str, Any]) -> str:
    lines = [
        f"spliced-in evaluation ({res['n_sequences']} held-out sequences, "
        f"{res['n_predictions']} predictions, sites {', '.join(res['sites'])}):"
    ]
    for i, r in enumerate(res["models"]):
        lines.append(
            f"  {i} {r['name']}: CE clean {r['ce_clean']:.4f}  spliced {r['ce_spliced']:.4f}"
            f"  zero {r['ce_zero']:.4f}  recovered {100 * r['frac_recovered']:.1f}%"
            f"  KL spliced {r['kl_spliced']:.4f}  zero {r['kl_zero']:.4f}"
        )
    return "\n".join(lines)
