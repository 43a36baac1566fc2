"""Spliced-in evaluation: run each model with its site output replaced by the crosscoder reconstruction.

For a batch of held-out token sequences (left-padded, explicit ``position_ids``, as collection does):

1. one nnsight trace per model saves the clean logits and the site output ``x_m [B, T, d_model]``;
2. the crosscoder (the saved, folded model: it takes raw activations) encodes the paired
   ``[x_base, x_ft]`` at every real, non-BOS position (the positions it was trained on) and decodes
   ``x_hat [n, 2, d_model]``;
3. each model runs again with the site output replaced, at those positions, by
   * its own reconstruction ``x_hat_m`` (*spliced*),
   * zeros (*zero-ablated*),
   and the fine-tuned model also with the **base** model's reconstruction ``x_hat_base`` and with the
   base model's raw activation ``x_base`` (*swaps*: how much of the fine-tuned behaviour the base side
   carries at this site — a diffing signal).

Metrics are averaged over next-token predictions made at replaced positions whose next token is real:
cross-entropy ``ce_*``, ``KL(clean || variant)`` ``kl_*``, and the fraction of loss recovered
``(ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (1 = the reconstruction is as good as the clean
activation, 0 = no better than zeros).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..data.text import TokenSequence
from ..errors import CrossCoderError
from ..model import CrossCoder


def heldout_sequences(
    dataset: str,
    tokenizer: Any,
    seq_len: int,
    n: int,
    skip: int = 0,
    text_column: str = "text",
    pack: bool = True,
) -> list[TokenSequence]:
    """``n`` token sequences of ``dataset`` after the first ``skip`` (e.g. the ones a cache was
    collected from), tokenized like collection does (:func:`crosscoder.data.text.iter_sequences`)."""
    from ..data.text import iter_sequences, iter_texts, load_text_dataset

    ds = load_text_dataset(dataset)
    out: list[TokenSequence] = []
    for s in iter_sequences(iter_texts(ds, text_column, source=dataset), tokenizer, seq_len, pack=pack):
        if s.seq_id >= skip:
            out.append(s)
            if len(out) >= n:
                break
    return out


def _trace(
    site_model: Any,
    batch: dict[str, torch.Tensor],
    replace: torch.Tensor | None = None,
    save_site: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One nnsight trace: logits ``[B, T, vocab]`` (and the site output when ``save_site``), with the
    site output replaced by ``replace [B, T, d_model]`` when given."""
    nn = site_model.nn
    site_out = None
    with nn.trace(batch):
        mod = nn.get(site_model.site)
        if replace is not None:
            mod.output = replace
        elif save_site:
            site_out = mod.output.save()
        logits = nn.output.logits.save()
    if isinstance(site_out, (tuple, list)):
        raise CrossCoderError(
            f"--site {site_model.site}: its output is a tuple; spliced-in evaluation needs a module "
            "that returns one tensor (a block, an MLP)"
        )
    return logits.float(), site_out


def _replaced(site_out: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """``site_out [B, T, d]`` with the positions in ``mask [B, T]`` set to ``values [n, d]``
    (zeros if None)."""
    out = site_out.clone()
    out[mask] = 0 if values is None else values.to(out.dtype)
    return out


def _token_metrics(
    logits: torch.Tensor, clean_logp: torch.Tensor, targets: torch.Tensor, pred_mask: torch.Tensor
) -> tuple[float, float]:
    """Summed CE and KL(clean || variant) over predictions in ``pred_mask [B, T-1]``."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, targets[..., None])[..., 0]
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return float(ce[pred_mask].sum()), float(kl[pred_mask].sum())


@torch.no_grad()
def spliced_eval(
    crosscoder: CrossCoder,
    base: Any,
    ft: Any,
    seqs: Iterable[TokenSequence],
    pad_id: int,
    bos_id: int | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Spliced-in CE/KL for both models (``base``, ``ft``: :class:`crosscoder.data.site_model.SiteModel`).

    ``crosscoder`` is the saved (folded) model; it runs in eval mode. Returns
    ``{"base": {...}, "ft": {...}, "ft_swap": {...}, "n_predictions": int, "n_sequences": int}``.
    """
    from ..data.collect import make_batch

    crosscoder = crosscoder.eval()
    dev = crosscoder.W_dec.device
    names = ("base", "ft")
    sums: dict[str, float] = {}
    n_pred, n_seq = 0, 0
    seqs = list(seqs)
    if not seqs:
        raise CrossCoderError("spliced-in evaluation: no held-out sequences")
    for lo in range(0, len(seqs), batch_size):
        part = seqs[lo : lo + batch_size]
        batch = make_batch(part, pad_id, dev)
        ids, attn = batch["input_ids"], batch["attention_mask"].bool()
        mask = attn & (ids != bos_id) if bos_id is not None else attn.clone()  # replaced positions
        pred_mask = mask[:, :-1] & attn[:, 1:]
        if not pred_mask.any():
            continue
        targets = ids[:, 1:]
        clean, acts = {}, {}
        for name, sm in zip(names, (base, ft), strict=True):
            clean[name], acts[name] = _trace(sm, batch, save_site=True)
        x = torch.stack([acts["base"][mask], acts["ft"][mask]], dim=1).float()  # [n, 2, d] raw
        x_hat, _ = crosscoder(x.to(dev))
        x_hat = x_hat.to(acts["base"].dtype)

        variants = {
            "base": {
                "spliced": _replaced(acts["base"], mask, x_hat[:, 0]),
                "zero": _replaced(acts["base"], mask),
            },
            "ft": {
                "spliced": _replaced(acts["ft"], mask, x_hat[:, 1]),
                "zero": _replaced(acts["ft"], mask),
                "base_recon": _replaced(acts["ft"], mask, x_hat[:, 0]),
                "base_acts": _replaced(acts["ft"], mask, x[:, 0]),
            },
        }
        for name, sm in zip(names, (base, ft), strict=True):
            clean_logp = F.log_softmax(clean[name][:, :-1], dim=-1)
            ce, _ = _token_metrics(clean[name], clean_logp, targets, pred_mask)
            sums[f"{name}/ce_clean"] = sums.get(f"{name}/ce_clean", 0.0) + ce
            for vname, rep in variants[name].items():
                logits, _ = _trace(sm, batch, replace=rep)
                ce, kl = _token_metrics(logits, clean_logp, targets, pred_mask)
                sums[f"{name}/ce_{vname}"] = sums.get(f"{name}/ce_{vname}", 0.0) + ce
                sums[f"{name}/kl_{vname}"] = sums.get(f"{name}/kl_{vname}", 0.0) + kl
        n_pred += int(pred_mask.sum())
        n_seq += len(part)
        if progress is not None:
            progress(n_seq)
    if n_pred == 0:
        raise CrossCoderError(
            "spliced-in evaluation: no predictions at replaced positions (sequences too short?)"
        )
    mean = {k: v / n_pred for k, v in sums.items()}
    out: dict[str, Any] = {"n_predictions": n_pred, "n_sequences": n_seq}
    for name in names:
        r = {k.split("/", 1)[1]: v for k, v in mean.items() if k.startswith(name + "/")}
        gap = r["ce_zero"] - r["ce_clean"]
        r["frac_recovered"] = (r["ce_zero"] - r["ce_spliced"]) / gap if abs(gap) > 1e-9 else float("nan")
        out[name] = {k: v for k, v in r.items() if not k.endswith(("base_recon", "base_acts"))}
    f = out["ft"]
    out["ft_swap"] = {
        "ce_base_recon": mean["ft/ce_base_recon"],
        "kl_base_recon": mean["ft/kl_base_recon"],
        "ce_base_acts": mean["ft/ce_base_acts"],
        "kl_base_acts": mean["ft/kl_base_acts"],
        "ce_increase_base_recon": mean["ft/ce_base_recon"] - f["ce_spliced"],
    }
    return out


def format_spliced(res: dict[str, Any]) -> str:
    lines = [
        f"spliced-in evaluation ({res['n_sequences']} held-out sequences, "
        f"{res['n_predictions']} predictions):"
    ]
    for name in ("base", "ft"):
        r = res[name]
        lines.append(
            f"  {name:<4} CE clean {r['ce_clean']:.4f}  spliced {r['ce_spliced']:.4f}"
            f"  zero {r['ce_zero']:.4f}  recovered {100 * r['frac_recovered']:.1f}%"
            f"  KL spliced {r['kl_spliced']:.4f}  zero {r['kl_zero']:.4f}"
        )
    s = res["ft_swap"]
    lines.append(
        f"  ft with the base reconstruction swapped in: CE {s['ce_base_recon']:.4f} "
        f"(KL {s['kl_base_recon']:.4f}); "
        f"with the base activation: CE {s['ce_base_acts']:.4f} (KL {s['kl_base_acts']:.4f})"
    )
    return "\n".join(lines)
