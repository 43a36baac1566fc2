"""Collect paired activations of a base and a fine-tuned model at one site, through nnsight.

Alignment rules (the same for ``crosscoder collect`` and the on-the-fly buffer):

* ONE tokenization (the base tokenizer's) feeds both models; tokenizers that disagree on a sample are
  refused (:func:`~crosscoder.data.text.check_tokenizers`);
* batches are left-padded, as nnsight pads, with explicit ``attention_mask`` and ``position_ids`` counted
  from each row's first real token (GPT-2-style models would otherwise shift padded rows);
* the same positions are kept for both models: padding and BOS positions (any token equal to BOS) are
  dropped for both, and with ``max_norm_ratio`` a position is dropped for both when either model's norm
  exceeds ``max_norm_ratio`` times that model's running median norm (last 8192 kept rows);
* the forward stops after the site (``tracer.stop()``), under ``torch.no_grad()``.

``import nnsight`` happens only in :func:`wrap_nnsight` (it costs ~2.4 s).
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .collect_config import BYTES, CollectConfig, _check_resume, _gb, disk_estimate, prepare_out  # noqa: F401
from .text import TokenSequence, make_batch  # noqa: F401 - make_batch is part of this API

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def from_pretrained(loader: Any, spec: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(spec, **kwargs)`` (hub id or local folder) with one-line errors."""
    if spec.startswith(("/", "./", "../", "~")) and not Path(spec).expanduser().exists():
        raise DataError(f"{spec}: no such folder")
    quiet_transformers()
    try:
        return loader.from_pretrained(spec, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loading failure becomes one line naming the model
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{spec}: cannot load {what} ({type(e).__name__}: {msg})") from None


def load_tokenizer(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained``."""
    from transformers import AutoTokenizer

    return from_pretrained(
        AutoTokenizer, spec, "tokenizer", revision=revision, trust_remote_code=trust_remote_code
    )


def load_hf_model(
    spec: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype``, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    extra = {"device_map": str(device)} if device.type == "cuda" else {}  # load straight onto the GPU
    model = from_pretrained(
        AutoModelForCausalLM,
        spec,
        "model",
        revision=revision,
        dtype=TORCH_DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        **extra,
    )
    return model.to(device).eval()


def wrap_nnsight(model: Any, tokenizer: Any) -> Any:
    """Wrap a loaded transformers model for tracing (nnsight 0.8's ``TransformersModel``, the class its
    deprecated ``LanguageModel`` alias pins to ``text-generation``). nnsight edits the tokenizer it is
    given (left padding, a pad token), so it gets a copy."""
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(model, tokenizer=copy.deepcopy(tokenizer), task="text-generation")


def check_site(model: Any, site: str, name: str) -> None:
    """Raise DataError if ``site`` is not a module path of ``model``."""
    try:
        model.get_submodule(site)
    except AttributeError:
        lists = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        hint = f" (blocks live under {', '.join(lists)}.N)" if lists else ""
        raise DataError(
            f"--site {site}: no such module in {name}{hint}; `crosscoder sites {name}` lists them"
        ) from None


@dataclass
class SiteModel:
    """One model ready to read ``site``: the transformers module and its nnsight wrapper."""

    name: str
    hf: Any
    nn: Any
    site: str
    revision: str | None = None

    @torch.no_grad()
    def read(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Left-padded ``batch`` (input_ids, attention_mask, position_ids ``[B, T]``) -> site output
        ``[B, T, d_model]``; the layers after the site do not run."""
        with self.nn.trace(batch) as tracer:
            out = self.nn.get(self.site).output.save()
            tracer.stop()
        if isinstance(out, (tuple, list)):  # attention modules still return tuples
            out = out[0]
        ids = batch["input_ids"]
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(
                f"--site {self.site}: output of {self.name} is {shape}, expected [batch, seq, d_model]"
            )
        return out


def load_site_model(
    spec: str,
    site: str,
    *,
    tokenizer: Any,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> SiteModel:
    hf = load_hf_model(spec, revision, dtype, device, trust_remote_code)
    check_site(hf, site, spec)
    rev = revision or getattr(hf.config, "_commit_hash", None)
    return SiteModel(name=spec, hf=hf, nn=wrap_nnsight(hf, tokenizer), site=site, revision=rev)


class NormFilter:
    """Drop positions whose norm exceeds ``ratio`` x the running median (per model, last ``window`` rows)."""

    def __init__(self, ratio: float, n_models: int, window: int = 8192) -> None:
        if ratio <= 1.0:
            raise DataError(f"max_norm_ratio: must be > 1, got {ratio}")
        self.ratio, self.window = ratio, window
        self.hist = np.zeros((0, n_models), np.float64)

    def seed(self, norms: np.ndarray) -> None:
        """Start from known norms ``[n, n_models]`` (a resumed collection's last rows)."""
        self.hist = np.asarray(norms, np.float64)[-self.window :]

    def __call__(self, norms: torch.Tensor) -> torch.Tensor:
        """``norms [n, n_models]`` -> keep mask ``[n]`` (bool)."""
        x = norms.detach().double().cpu().numpy()
        med = np.median(self.hist if len(self.hist) else x, axis=0)
        keep = (x <= self.ratio * med).all(1)
        self.hist = np.concatenate([self.hist, x[keep]])[-self.window :]
        return torch.from_numpy(keep).to(norms.device)


@dataclass
class PairCollector:
    """Sequences -> aligned rows ``[n, n_models, d_model]`` from every model at its site."""

    models: list[SiteModel]
    bos_id: int | None
    pad_id: int
    device: torch.device
    max_norm_ratio: float | None = None
    dropped: dict[str, int] = field(default_factory=lambda: {"bos": 0, "pad": 0, "norm_outlier": 0})
    kept: int = 0

    def __post_init__(self) -> None:
        self.filter = NormFilter(self.max_norm_ratio, len(self.models)) if self.max_norm_ratio else None
        self._d_model: int | None = None

    @property
    def d_model(self) -> int:
        """Width of the site output (one 2-token probe forward, agreed by all models)."""
        if self._d_model is None:
            tok = self.bos_id if self.bos_id is not None else self.pad_id
            batch = make_batch([TokenSequence(0, [tok, tok])], self.pad_id, self.device)
            widths = [m.read(batch).shape[-1] for m in self.models]
            if len(set(widths)) != 1:
                raise DataError(
                    "site widths differ between models: "
                    f"{dict(zip([m.name for m in self.models], widths, strict=False))}"
                )
            self._d_model = widths[0]
        return self._d_model

    def rows(self, seqs: list[TokenSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward per model -> (``acts [n, n_models, d_model]`` float32 on ``device``,
        ``index [n, 3]`` int64: token id, sequence id, position), rows in (sequence, position) order."""
        batch = make_batch(seqs, self.pad_id, self.device)
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        keep = mask.clone()
        if self.bos_id is not None:
            is_bos = ids == self.bos_id
            keep &= ~is_bos
            self.dropped["bos"] += int((is_bos & mask).sum())
        self.dropped["pad"] += int((~mask).sum())
        acts = torch.stack([m.read(batch)[keep] for m in self.models], dim=1).float()  # [n, M, d]
        seq_ids = torch.tensor([s.seq_id for s in seqs], dtype=torch.long, device=ids.device)
        index = torch.stack(
            [ids[keep], seq_ids[:, None].expand_as(ids)[keep], batch["position_ids"][keep]], dim=1
        )
        if self.filter is not None and len(acts):
            ok = self.filter(acts.norm(dim=-1))
            self.dropped["norm_outlier"] += int((~ok).sum())
            acts, index = acts[ok], index[ok]
        self.kept += len(acts)
        return acts, index

    def iter_rows(
        self, seqs: Iterable[TokenSequence], batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` sequences -> ``(acts, index)`` per batch (see :meth:`rows`)."""
        chunk: list[TokenSequence] = []
        for s in seqs:
            chunk.append(s)
            if len(chunk) == batch_size:
                yield self.rows(chunk)
                chunk = []
        if chunk:
            yield self.rows(chunk)


def sequence_slice(
    seqs: Iterable[TokenSequence], start: int = 0, stop: int | None = None, rank: int = 0, world_size: int = 1
) -> Iterator[TokenSequence]:
    """Sequences with ``start <= seq_id < stop`` and ``seq_id % world_size == rank`` (one worker's share)."""
    for s in seqs:
        if stop is not None and s.seq_id >= stop:
            return
        if s.seq_id >= start and s.seq_id % world_size == rank:
            yield s


def build_collector(
    base_model: str,
    ft_model: str,
    site: str,
    *,
    tokenizer: Any,
    model_dtype: str = "float32",
    device: torch.device,
    trust_remote_code: bool = False,
    revisions: tuple[str | None, str | None] = (None, None),
    max_norm_ratio: float | None = None,
) -> PairCollector:
    """Load both models (through nnsight) and return the collector for ``site``."""
    models = [
        load_site_model(
            spec,
            site,
            tokenizer=tokenizer,
            revision=rev,
            dtype=model_dtype,
            device=device,
            trust_remote_code=trust_remote_code,
        )
        for spec, rev in zip((base_model, ft_model), revisions, strict=True)
    ]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return PairCollector(
        models=models, bos_id=tokenizer.bos_token_id, pad_id=pad, device=device, max_norm_ratio=max_norm_ratio
    )


def collect(
    cfg: CollectConfig,
    on_batch: Callable[[int], None] | None = None,
    say: Callable[[str], None] = print,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Run a collection into ``cfg.out`` (resumable); returns a summary dict.

    ``on_batch(rows_total)`` is called after every model batch (tests use it to measure memory).
    ``rank``/``world_size``: collect only the sequences with ``seq_id % world_size == rank``
    (see :mod:`crosscoder.data.collect_dist`).
    """
    from .. import __version__
    from .paired import PairedCache, PairedCacheWriter
    from .text import prepare_stream

    if not cfg.out and not cfg.dry_run:
        raise DataError("--out: required")
    if cfg.dtype not in BYTES:
        raise DataError(f"--dtype: must be one of {', '.join(BYTES)}, got {cfg.dtype!r}")
    if cfg.num_tokens <= 0 or cfg.batch_size <= 0:
        raise DataError("--num-tokens and --batch-size must be positive")
    torch.set_num_threads(cfg.threads)
    existing = prepare_out(cfg) if cfg.out else None
    if existing is not None and existing.get("complete"):
        say(f"{cfg.out}: already complete ({existing['n_rows']} rows); nothing to do")
        return {"rows": existing["n_rows"], "complete": True, "resumed": True}
    tok_b = load_tokenizer(cfg.base_model, cfg.base_revision, cfg.trust_remote_code)
    tok_f = load_tokenizer(cfg.ft_model, cfg.ft_revision, cfg.trust_remote_code)
    sequences, tok_info = prepare_stream(
        cfg.dataset,
        {"base": tok_b, "ft": tok_f},
        text_column=cfg.text_column,
        chat_template=cfg.chat_template,
        seq_len=cfg.seq_len,
        pack=cfg.pack,
        split=cfg.split,
        dataset_config=cfg.dataset_config,
        allow_mismatch=cfg.allow_tokenizer_mismatch,
    )
    device = resolve_device(cfg.device)
    collector = build_collector(
        cfg.base_model,
        cfg.ft_model,
        cfg.site,
        tokenizer=tok_b,
        model_dtype=cfg.model_dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        revisions=(cfg.base_revision, cfg.ft_revision),
        max_norm_ratio=cfg.max_norm_ratio,
    )
    d_model = collector.d_model
    est = disk_estimate(cfg.num_tokens, 2, d_model, cfg.dtype)
    free_dir = Path(cfg.out).resolve() if cfg.out else Path.cwd()
    while not free_dir.exists():
        free_dir = free_dir.parent
    free = shutil.disk_usage(free_dir).free
    say(
        f"disk estimate: {cfg.num_tokens:,} tokens x 2 models x {d_model} ({cfg.dtype}) = "
        f"{_gb(est['acts_bytes'])} + index {_gb(est['index_bytes'])} = {_gb(est['total_bytes'])} "
        f"(free: {_gb(free)})"
    )
    if est["total_bytes"] > free:
        say("warning: the estimate exceeds the free disk space")
    if cfg.dry_run:
        return {"dry_run": True, "d_model": d_model, **est, "free_bytes": free}

    record = {
        k: getattr(cfg, k)
        for k in (
            "base_model",
            "ft_model",
            "site",
            "dataset",
            "dataset_config",
            "split",
            "text_column",
            "chat_template",
            "seq_len",
            "pack",
            "max_norm_ratio",
            "model_dtype",
            "num_tokens",
            "batch_size",
        )
    }
    record["tokenizer_fingerprint"] = tok_info["base"]
    record["dtype"] = cfg.dtype
    if existing is not None:
        _check_resume(existing, record, cfg.out)
    meta = {
        "models": [{"name": m.name, "revision": m.revision} for m in collector.models],
        "site": cfg.site,
        "tokenizer": tok_info,
        "tokenizer_fingerprint": tok_info["base"],
        "collect": record,
        "library_version": __version__,
    }
    row_bytes = 2 * d_model * BYTES[cfg.dtype] + 24
    shard_rows = max(1, int(cfg.shard_mb * 1e6 // row_bytes))
    writer = PairedCacheWriter(cfg.out, 2, d_model, cfg.dtype, shard_rows=shard_rows, meta=meta)
    total = writer.rows_written
    last_seq, last_pos = -1, -1
    if total:
        done = PairedCache(cfg.out, verify="size", require_complete=False)
        last_seq, last_pos = (int(v) for v in done.read_index(np.array([total - 1]))[0, 1:])
        if collector.filter is not None:
            tail = np.arange(max(0, total - collector.filter.window), total)
            collector.filter.seed(done.read(tail).norm(dim=-1).numpy())
        say(f"resuming {cfg.out} after {total:,} rows (sequence {last_seq}, position {last_pos})")
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.num_tokens, initial=total, unit="tok", desc="collect", disable=not cfg.progress)
    n_seq = 0
    for acts, index in collector.iter_rows(
        sequence_slice(sequences(), start=max(last_seq, 0), rank=rank, world_size=world_size), cfg.batch_size
    ):
        if last_seq >= 0:
            new = (index[:, 1] > last_seq) | (index[:, 2] > last_pos)
            acts, index = acts[new], index[new]
        take = min(len(acts), cfg.num_tokens - total)
        if take > 0:
            writer.add(acts[:take].cpu(), index[:take].cpu())
            total += take
            n_seq = int(index[take - 1, 1]) + 1
        bar.update(max(take, 0))
        if on_batch is not None:
            on_batch(total)
        if total >= cfg.num_tokens:
            break
    bar.close()
    if total == 0:
        raise DataError(f"{cfg.dataset}: no tokens to collect (empty texts, or every position dropped)")
    if total < cfg.num_tokens:
        say(f"warning: dataset exhausted after {total:,} tokens (asked for {cfg.num_tokens:,})")
    seconds = time.perf_counter() - t0
    prev = writer.meta.get("dropped", {})
    dropped = {k: v + int(prev.get(k, 0)) for k, v in collector.dropped.items()}
    writer.close(
        {
            "dropped": dropped,
            "n_sequences": max(n_seq, int(writer.meta.get("n_sequences", 0))),
            "exhausted": total < cfg.num_tokens,
        }
    )
    new_rows = collector.kept
    say(f"collected {total:,} rows into {cfg.out} ({new_rows / max(seconds, 1e-9):,.0f} tokens/s this run)")
    return {
        "rows": total,
        "complete": True,
        "resumed": existing is not None,
        "seconds": seconds,
        "tokens_per_s": new_rows / max(seconds, 1e-9),
        "d_model": d_model,
        "dropped": dropped,
    }
