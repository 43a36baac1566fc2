"""Text datasets -> token sequences, shared by ``crosscoder collect`` and the on-the-fly buffer.

* :func:`load_text_dataset` opens a Hugging Face dataset by hub id, ``save_to_disk`` folder, or local
  ``json``/``jsonl``/``parquet``/``txt``/``csv`` files (one file, a folder of them, or a glob).
* :func:`iter_texts` yields one string per row: the ``text_column``, or chat ``messages`` rendered with
  the base or fine-tuned tokenizer's chat template.
* :func:`iter_sequences` tokenizes with ONE tokenizer (so every model sees the same ids) and packs the
  documents into ``seq_len`` windows (or truncates each document), each starting with BOS when the
  tokenizer has one. Sequence ids are consecutive from 0 in stream order, so the stream is a pure
  function of (dataset, tokenizer, seq_len, pack): a resumed collection regenerates it and skips.
* :func:`tokenizer_fingerprint` and :func:`check_tokenizer_set` guarantee alignment: a tokenizer that
  gives other ids than the reference (first) model's on a sample is refused unless ``allow_mismatch``.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

log = logging.getLogger(__name__)

FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
    ".arrow": "arrow",
}
CHAT_COLUMN = "messages"
TOKENIZE_CHUNK = 256  # documents tokenized per call of the fast tokenizer


@dataclass
class TokenSequence:
    """One model input: ``ids`` (list of ``len <= seq_len`` token ids) with its stream ``seq_id``."""

    seq_id: int
    ids: list[int]


# ---------------------------------------------------------------------------------------------- loading
def _local_files(spec: str) -> list[str] | None:
    """Data files named by ``spec`` (a file, a folder of data files, or a glob), or None."""
    if any(c in spec for c in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
    elif os.path.isfile(spec):
        files = [spec]
    elif os.path.isdir(spec):
        files = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix in FILE_BUILDERS and p.is_file())
    else:
        return None
    return [f for f in files if Path(f).suffix in FILE_BUILDERS]


def load_text_dataset(
    spec: str, split: str = "train", config_name: str | None = None, streaming: bool = True
) -> Any:
    """Open a dataset by hub id, ``save_to_disk`` folder or local files; returns a (Iterable)Dataset.

    Local files and folders load eagerly (map-style ``Dataset``); a hub id streams by default.
    """
    import datasets

    path = Path(spec)
    try:
        if path.is_dir() and any(
            (path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{spec}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            return ds
        files = _local_files(spec)
        if files is not None:
            if not files:
                raise DataError(f"{spec}: no json/jsonl/parquet/txt/csv files found")
            builders = {FILE_BUILDERS[Path(f).suffix] for f in files}
            if len(builders) > 1:
                raise DataError(f"{spec}: mixed file types ({', '.join(sorted(builders))})")
            bars = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()  # local files: no "Generating train split" noise
            try:
                return datasets.load_dataset(builders.pop(), data_files=files, split="train")
            finally:
                if bars:
                    datasets.enable_progress_bars()
        return datasets.load_dataset(spec, config_name, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any loading failure becomes one line naming the source
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{spec}: cannot load dataset ({type(e).__name__}: {msg})") from None


def _columns(ds: Any) -> list[str] | None:
    cols = getattr(ds, "column_names", None)
    return list(cols) if cols else None


# ---------------------------------------------------------------------------------------------- texts
def render_chat(messages: Any, tokenizer: Any, which: str) -> str:
    """Render one conversation (a list of ``{"role", "content"}``) with ``tokenizer``'s chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"--chat-template {which}: the {which} model's tokenizer has no chat template")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"--chat-template {which}: cannot render a conversation ({type(e).__name__}: {e})"
        ) from None


def iter_texts(
    ds: Any,
    text_column: str = "text",
    chat_template: str = "none",
    tokenizers: dict[str, Any] | None = None,
    source: str = "dataset",
) -> Iterator[str]:
    """Yield one text per row: ``row[text_column]``, or a conversation rendered as chat.

    Chat conversations are read from ``messages`` (or ``text_column`` when it is not ``"text"``).

    ``chat_template``: ``none`` (plain text), ``base`` or ``ft`` (whose tokenizer's template renders
    ``messages``; ``tokenizers`` maps those names to tokenizers). A missing column raises DataError.
    """
    if chat_template not in ("none", "base", "ft"):
        raise DataError(f"chat_template: must be base, ft or none, got {chat_template!r}")
    chat = chat_template != "none"
    # Chat data is read from `messages` unless the user named another column.
    column = CHAT_COLUMN if chat and text_column == "text" else text_column
    cols = _columns(ds)
    if cols is not None and column not in cols:
        hint = " (chat data: use --chat-template base|ft)" if CHAT_COLUMN in cols and not chat else ""
        raise DataError(f"{source}: no column {column!r} (columns: {', '.join(cols)}){hint}")
    tok = (tokenizers or {}).get(chat_template) if chat else None
    if chat and tok is None:
        raise DataError(f"--chat-template {chat_template}: no tokenizer given to render chats")
    for i, row in enumerate(ds):
        if column not in row:
            raise DataError(f"{source}: row {i} has no column {column!r} (columns: {', '.join(row)})")
        value = row[column]
        if chat:
            yield render_chat(value, tok, chat_template)
        elif isinstance(value, str):
            yield value
        elif value is None:
            continue
        else:
            raise DataError(
                f"{source}: column {column!r} holds {type(value).__name__}, not text"
                + (" (chat data: use --chat-template base|ft)" if isinstance(value, list) else "")
            )


# ---------------------------------------------------------------------------------------------- tokens
def _chunks(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_documents(texts: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Tokenize documents (no special tokens added; specials written in the text are kept)."""
    for chunk in _chunks(texts, TOKENIZE_CHUNK):
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def iter_sequences(
    texts: Iterable[str], tokenizer: Any, seq_len: int, pack: bool = True, min_tokens: int = 2
) -> Iterator[TokenSequence]:
    """Token sequences of at most ``seq_len`` ids, each starting with BOS when the tokenizer has one.

    ``pack``: documents are joined with EOS into one stream cut into full windows (the last window may
    be shorter); otherwise each document is truncated to one sequence (mixed lengths). Sequences with
    fewer than ``min_tokens`` ids are skipped. ``seq_id`` counts the sequences yielded, from 0.
    """
    if seq_len < 2:
        raise DataError(f"seq_len: must be at least 2, got {seq_len}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    room = seq_len - len(head)
    seq_id = 0
    if not pack:
        for doc in iter_documents(texts, tokenizer):
            if doc and bos is not None and doc[0] == bos:
                doc = doc[1:]
            ids = head + doc[:room]
            if len(ids) >= min_tokens:
                yield TokenSequence(seq_id, ids)
                seq_id += 1
        return
    buf: list[int] = []
    for doc in iter_documents(texts, tokenizer):
        if doc and bos is not None and doc[0] == bos:
            doc = doc[1:]
        buf.extend(doc)
        if eos is not None:
            buf.append(eos)
        while len(buf) >= room:
            yield TokenSequence(seq_id, head + buf[:room])
            seq_id += 1
            del buf[:room]
    if len(head) + len(buf) >= min_tokens:
        yield TokenSequence(seq_id, head + buf)


# ---------------------------------------------------------------------------------------------- checks
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's full definition (vocabulary, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk")}
    payload += json.dumps(specials, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _tokenizer_problem(ref: Any, other: Any, samples: list[str], names: tuple[str, str]) -> str | None:
    """The first disagreement of two tokenizers (BOS id, or ids of a sample text), or None."""
    if ref.bos_token_id != other.bos_token_id:
        return f"BOS ids differ ({names[0]} {ref.bos_token_id}, {names[1]} {other.bos_token_id})"
    for i, text in enumerate(samples):
        a = ref(text, add_special_tokens=False)["input_ids"]
        b = other(text, add_special_tokens=False)["input_ids"]
        if a != b:
            j = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            return (
                f"sample {i} tokenizes differently from token {j} "
                f"({names[0]} {a[j : j + 4]} vs {names[1]} {b[j : j + 4]})"
            )
    return None


def check_tokenizer_set(
    tokenizers: list[tuple[str, Any]], samples: list[str], allow_mismatch: bool = False
) -> dict[str, Any]:
    """Refuse tokenizers that would not align with the reference (the first of ``(name, tokenizer)``):
    a different BOS id or different ids on any sample text.

    Returns ``{"base": fp of the reference, "ft": fp of the second, "fingerprints": [fp per model],
    "identical": bool, "mismatch": str|None}``; raises a one-line DataError naming the two models on a
    disagreement unless ``allow_mismatch`` (then the first disagreement is logged and recorded).
    """
    fps = [tokenizer_fingerprint(t) for _, t in tokenizers]
    info: dict[str, Any] = {
        "base": fps[0],
        "ft": fps[1] if len(fps) > 1 else fps[0],
        "fingerprints": fps,
        "identical": len(set(fps)) == 1,
        "mismatch": None,
    }
    (ref_name, ref), two = tokenizers[0], len(tokenizers) == 2
    for j, (name, tok) in enumerate(tokenizers[1:], start=1):
        if fps[j] == fps[0]:
            continue
        labels = ("base", "ft") if two else ("model 0", f"model {j}")
        problem = _tokenizer_problem(ref, tok, samples, labels)
        if problem is None:
            continue
        found = problem if two else f"{name}: {problem}"
        info["mismatch"] = info["mismatch"] or found  # the first difference
        if not allow_mismatch:
            who = (
                f"the base and fine-tuned models differ ({ref_name} vs {name})"
                if two
                else f"the reference model {ref_name} and model {j} {name} differ"
            )
            raise DataError(
                f"tokenizers of {who}: {problem}; activations would not align "
                "(pass --allow-tokenizer-mismatch to feed the reference tokenization to every model)"
            )
        log.warning("tokenizer mismatch allowed: %s (the reference tokenizer feeds every model)", found)
    return info


def check_tokenizers(base: Any, ft: Any, samples: list[str], allow_mismatch: bool = False) -> dict[str, Any]:
    """Two-model :func:`check_tokenizer_set` (``base`` is the reference)."""
    return check_tokenizer_set([("base", base), ("ft", ft)], samples, allow_mismatch)


# ---------------------------------------------------------------------------------------------- together
def prepare_stream(
    dataset: str,
    tokenizers: dict[str, Any] | list[tuple[str, Any]],
    *,
    text_column: str = "text",
    chat_template: str = "none",
    seq_len: int = 128,
    pack: bool = True,
    split: str = "train",
    dataset_config: str | None = None,
    allow_mismatch: bool = False,
) -> tuple[Callable[[], Iterator[TokenSequence]], dict[str, Any]]:
    """Open ``dataset``, check the tokenizers on its first 32 texts, and return
    ``(sequences, tokenizer_info)``: ``sequences()`` restarts the deterministic stream of
    :class:`TokenSequence` (tokenized by the reference tokenizer) from the beginning.

    ``tokenizers``: ``(model name, tokenizer)`` per model, the reference first (or the two-model dict
    ``{"base": ..., "ft": ...}``). Chat templates: ``base`` is the first model's, ``ft`` the second's.
    """
    pairs = list(tokenizers.items()) if isinstance(tokenizers, dict) else list(tokenizers)
    ref = pairs[0][1]
    by_role = {"base": ref, "ft": pairs[1][1] if len(pairs) > 1 else ref}
    ds = load_text_dataset(dataset, split, dataset_config)

    def texts() -> Iterator[str]:
        return iter_texts(ds, text_column, chat_template, by_role, source=dataset)

    samples = list(itertools.islice(texts(), 32))
    if not samples:
        raise DataError(f"{dataset}: dataset is empty")
    info = check_tokenizer_set(pairs, samples, allow_mismatch)
    return (lambda: iter_sequences(texts(), ref, seq_len, pack=pack)), info


def make_batch(seqs: list[TokenSequence], pad_id: int, device: Any = "cpu") -> dict[str, Any]:
    """Left-pad sequences (as nnsight pads) -> ``input_ids``, ``attention_mask``, ``position_ids`` ``[B, T]``;
    positions count from each row's first real token, so padding never shifts a row."""
    import torch

    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s.ids) :] = torch.tensor(s.ids, dtype=torch.long)
        mask[i, width - len(s.ids) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {k: v.to(device) for k, v in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos))}
