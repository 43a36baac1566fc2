"""Shared helpers for the collection tests (imported by test_collect/test_buffer/test_demo_pair).

The tiny offline model pair is the ``SMALL`` demo pair (2 layers, d_model 32, vocab 384), built once per
test process (a few seconds) in a fresh temporary folder, so no stale cache can leak between runs.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from crosscoder.data.collect import CollectConfig
from crosscoder.data.demo_pair import SMALL, DemoPair, build_demo_pair, code_documents, prose_documents

torch.set_num_threads(1)


@functools.cache
def cache_root() -> Path:
    """A per-process folder usable as ``CROSSCODER_CACHE_DIR`` (the pair lives in ``demo_pair/``),
    removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix="crosscoder-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def tiny_pair() -> DemoPair:
    """The SMALL demo pair (base: prose, ft: + code), built once per process."""
    return build_demo_pair(SMALL, root=cache_root() / "demo_pair")


@functools.cache
def corpus(n_chars: int = 400_000) -> Path:
    """A jsonl of stdlib prose and code documents (column ``text``), larger than the pair's own corpus."""
    path = cache_root() / f"corpus-{n_chars}.jsonl"
    if not path.exists():
        docs = prose_documents(n_chars // 2) + code_documents(n_chars // 2)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@functools.cache
def mixed_lengths() -> Path:
    """A jsonl of short documents of very different lengths (so batches are padded)."""
    path = cache_root() / "mixed.jsonl"
    words = "the quick brown fox jumps over the lazy dog def return import class while".split()
    rows = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + (i * 5) % 23)) for i in range(40)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


@functools.cache
def mismatched_ft() -> Path:
    """The fine-tuned model with a different tokenizer (trained on other text, other vocab size)."""
    from crosscoder.data.demo_pair import train_tokenizer

    pair = tiny_pair()
    path = cache_root() / "ft-other-tokenizer"
    if not path.exists():
        shutil.copytree(pair.ft, path)
        tok = train_tokenizer(code_documents(40_000), 300)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (path / f).unlink(missing_ok=True)
        tok.save_pretrained(path)
    return path


def collect_config(out: Path | str, **kw: object) -> CollectConfig:
    """A collection on the tiny pair (block 0 output, float32, small shards, no progress bar)."""
    pair = tiny_pair()
    base = dict(
        base_model=str(pair.base),
        ft_model=str(pair.ft),
        site="transformer.h.0",
        dataset=str(corpus()),
        out=str(out),
        num_tokens=2000,
        seq_len=32,
        batch_size=8,
        dtype="float32",
        shard_mb=0.05,
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return CollectConfig(**base)  # type: ignore[arg-type]


def quiet(*_: object) -> None:
    """A ``say`` that prints nothing."""


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
