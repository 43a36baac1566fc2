"""The diffing story in two measured figures, for a corpus whose documents carry a ``domain`` column.

When the activations were collected from a dataset with a ``domain`` column (the demo corpus: ``prose``,
``code``, ``data``), ``crosscoder analyze`` adds ``summary["story"]``:

* ``ft_only_confirmed``: latents classed ``ft_only`` that Latent Scaling confirmed (free latents whose
  final class is ``ft_only``: a large fine-tuned decoder norm, and the base model does not carry the
  direction; :mod:`crosscoder.analysis.table`);
* ``ft_only_contexts``: their top contexts read back from the cache, and ``ft_only_domains``: the
  fraction of those contexts whose **activating token** comes from a document of each domain
  (``ft_only_code_fraction``: the ``code`` share);
* ``shared_median_cos``: the median cosine between the base and fine-tuned decoder vectors of the
  latents classed ``shared`` (``shared``: how many).

The domain of a cache row ``(sequence, position)`` is recovered by replaying the collection's packing
(:func:`token_domains`, the same rule as :func:`crosscoder.data.text.iter_sequences`: documents joined
with EOS, cut into windows that start with BOS; the EOS after a document belongs to it, the BOS to the
document of the next token).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = [
    "domain_fractions",
    "format_story",
    "load_token_domains",
    "story_figures",
    "story_section",
    "token_domains",
]

BOS_DOMAIN = -1  # placeholder while the BOS's domain is still unknown


def token_domains(
    docs: Iterable[tuple[Sequence[int], int]],
    bos_id: int | None,
    eos_id: int | None,
    seq_len: int,
    n_sequences: int,
    pack: bool = True,
) -> np.ndarray:
    """``[n_sequences, seq_len]`` domain code of every token the collection produced (-1: padding past a
    short last sequence), from ``docs``: ``(token ids without specials, domain code)`` in dataset order.

    Mirrors :func:`crosscoder.data.text.iter_sequences`: with ``pack`` the documents are one stream (each
    followed by EOS) cut into windows of ``seq_len - 1`` tokens after a BOS; without, each document is
    truncated to one sequence. A window's BOS takes the domain of the window's first real token.
    """
    head = 1 if bos_id is not None else 0
    room = seq_len - head
    out = np.full((n_sequences, seq_len), -1, np.int64)
    if n_sequences <= 0:
        return out
    seq = 0
    if not pack:
        for ids, dom in docs:
            ids = list(ids)
            if ids and bos_id is not None and ids[0] == bos_id:
                ids = ids[1:]
            n = head + len(ids[:room])
            if n < 2:
                continue
            out[seq, :n] = dom
            seq += 1
            if seq == n_sequences:
                break
        return out
    buf: list[int] = []  # domain code per buffered token
    for ids, dom in docs:
        ids = list(ids)
        if ids and bos_id is not None and ids[0] == bos_id:
            ids = ids[1:]
        buf.extend([dom] * (len(ids) + (1 if eos_id is not None else 0)))
        while len(buf) >= room:
            out[seq, head:] = buf[:room]
            if head:
                out[seq, 0] = buf[0]
            seq += 1
            del buf[:room]
            if seq == n_sequences:
                return out
    if buf and seq < n_sequences and head + len(buf) >= 2:
        out[seq, head : head + len(buf)] = buf
        if head:
            out[seq, 0] = buf[0]
    return out


def load_token_domains(
    meta: Mapping[str, Any], tokenizer: Any, domain_column: str = "domain"
) -> tuple[np.ndarray, list[str]] | None:
    """Token domains of a cache collected from a dataset with a ``domain_column``: ``(codes [n_sequences,
    seq_len], names)`` (``names[code]``), or None when the cache records no plain-text dataset with that
    column (a chat collection, another dataset, or one that cannot be read here)."""
    from ..data.text import iter_documents, load_text_dataset

    col = meta.get("collect") or {}
    dataset = col.get("dataset")
    n_seq = int(meta.get("n_sequences") or 0)
    if not dataset or tokenizer is None or n_seq <= 0 or col.get("chat_template", "none") != "none":
        return None
    try:
        ds = load_text_dataset(dataset, col.get("split") or "train", col.get("dataset_config"))
    except DataError:
        return None
    cols = getattr(ds, "column_names", None) or []
    text_col = col.get("text_column") or "text"
    if domain_column not in cols or text_col not in cols:
        return None
    names: list[str] = []
    pending: deque[int] = deque()  # domain codes of texts handed to the tokenizer, not yet paired

    def texts() -> Iterator[str]:
        for row in ds:
            text, key = row[text_col], str(row[domain_column])
            if text is None:  # skipped by the collection too
                continue
            if key not in names:
                names.append(key)
            pending.append(names.index(key))
            yield text

    docs = ((doc, pending.popleft()) for doc in iter_documents(texts(), tokenizer))  # lazy: stops early
    codes = token_domains(
        docs,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        int(col.get("seq_len") or 128),
        n_seq,
        bool(col.get("pack", True)),
    )
    return codes, names


def domain_fractions(
    contexts: Mapping[int, Sequence[Mapping[str, Any]]],
    latents: Iterable[int],
    codes: np.ndarray,
    names: Sequence[str],
) -> tuple[dict[str, float], int]:
    """Share of each domain among the activating tokens of the top contexts of ``latents`` (each context's
    ``seq`` and ``pos`` looked up in ``codes [n_sequences, seq_len]``), and how many contexts were counted
    (contexts whose position is unknown are left out)."""
    counts = np.zeros(len(names), np.int64)
    for j in latents:
        for item in contexts.get(int(j), ()):
            seq, pos = int(item.get("seq", -1)), int(item.get("pos", -1))
            if 0 <= seq < codes.shape[0] and 0 <= pos < codes.shape[1] and codes[seq, pos] >= 0:
                counts[codes[seq, pos]] += 1
    n = int(counts.sum())
    return ({name: float(counts[i] / n) for i, name in enumerate(names)} if n else {}), n


def story_figures(
    cols: Mapping[str, np.ndarray],
    contexts: Mapping[int, Sequence[Mapping[str, Any]]],
    codes: np.ndarray,
    names: Sequence[str],
    latent_scaling: bool = True,
) -> dict[str, Any]:
    """The ``story`` section (module docstring) from the latent table ``cols`` (``class``, ``cos_sim``,
    ``kind`` when present) and the contexts of :func:`crosscoder.analysis.contexts.build_contexts`.
    Without Latent Scaling (``latent_scaling=False``) no ft-only latent counts as confirmed."""
    cls = np.asarray(cols["class"], dtype=object)
    free = np.asarray(cols["kind"], dtype=object) == "free" if "kind" in cols else np.ones(len(cls), bool)
    ft_only = np.flatnonzero(free & (cls == "ft_only")) if latent_scaling else np.array([], np.int64)
    shared = free & (cls == "shared")
    cos = np.asarray(cols["cos_sim"], np.float64)[shared]
    fractions, n_ctx = domain_fractions(contexts, ft_only.tolist(), codes, names)
    return {
        "ft_only_confirmed": int(len(ft_only)),
        "ft_only_latents": [int(j) for j in ft_only],
        "ft_only_contexts": n_ctx,
        "ft_only_domains": fractions,
        "ft_only_code_fraction": fractions.get("code") if n_ctx else None,
        "shared": int(shared.sum()),
        "shared_median_cos": float(np.median(cos)) if len(cos) else None,
    }


def story_section(
    cols: Mapping[str, np.ndarray],
    contexts: Mapping[int, Sequence[Mapping[str, Any]]],
    meta: Mapping[str, Any],
    tokenizer: Any,
    latent_scaling: bool = True,
) -> dict[str, Any] | None:
    """:func:`story_figures` for a cache whose dataset has a ``domain`` column, else None."""
    found = load_token_domains(meta, tokenizer)
    if found is None:
        return None
    return story_figures(cols, contexts, *found, latent_scaling=latent_scaling)


def format_story(s: Mapping[str, Any]) -> str:
    """One line of the story figures."""
    frac = s.get("ft_only_code_fraction")
    cos = s.get("shared_median_cos")
    return (
        f"story: {s['ft_only_confirmed']} confirmed ft-only latents"
        + (
            f", {frac:.0%} of their {s['ft_only_contexts']} top contexts from code"
            if frac is not None
            else ""
        )
        + f"; {s['shared']} shared latents, median decoder cosine "
        + (f"{cos:.3f}" if cos is not None else "n/a")
    )
