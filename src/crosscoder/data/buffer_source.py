"""The on-the-fly :class:`~crosscoder.data.buffer.Buffer` of a run: models, tokenizers and text from the
run's ``DataConfig``, and this rank's share under torchrun."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import DEFAULT_VAL_TOKENS, RunConfig
from ..distributed import LOCAL, Dist
from ..errors import DataError

if TYPE_CHECKING:
    from .buffer import Buffer


def buffer_source(cfg: RunConfig, device: str | torch.device, dist: Dist = LOCAL) -> Buffer:
    """The on-the-fly :class:`Buffer` for ``cfg.data`` (base_model, ft_model, site, dataset ...): this
    rank's share under torchrun (``dist``: the data-parallel ranks)."""
    from .buffer import Buffer
    from .collect import build_collector, load_tokenizer, resolve_device
    from .text import prepare_stream

    d = cfg.data
    missing = [n for n in ("base_model", "ft_model", "site", "dataset") if not getattr(d, n)]
    if missing:
        raise DataError("on-the-fly training needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    device = resolve_device(str(device))
    specs = [d.base_model, d.ft_model]
    tokenizers = [(spec, load_tokenizer(spec, trust_remote_code=d.trust_remote_code)) for spec in specs]
    sequences, tok_info = prepare_stream(
        d.dataset,
        tokenizers,
        text_column=d.text_column,
        chat_template=d.chat_template,
        seq_len=d.seq_len,
        pack=True,
        allow_mismatch=d.allow_tokenizer_mismatch,
    )
    collector = build_collector(
        specs,
        [d.site],
        tokenizer=tokenizers[0][1],
        model_dtype=d.model_dtype,
        device=device,
        trust_remote_code=d.trust_remote_code,
        max_norm_ratio=d.max_norm_ratio,
    )
    info = {
        "source": {
            "buffer": {
                k: getattr(d, k)
                for k in (
                    "base_model",
                    "ft_model",
                    "site",
                    "dataset",
                    "text_column",
                    "chat_template",
                    "seq_len",
                    "buffer_tokens",
                    "model_dtype",
                    "max_norm_ratio",
                )
            }
        },
        "model_names": [m.name for m in collector.models],
        "site": d.site,
        "fingerprints": {"tokenizer": tok_info["base"]},
        "tokenizer": tok_info,
        "revisions": [m.revision for m in collector.models],
    }
    if cfg.train.val_tokens is None:  # the stream has no end: the default held-out size, within the buffer
        cfg.train.val_tokens = min(DEFAULT_VAL_TOKENS, d.buffer_tokens // 4)

    groups: list[Any] = []

    def gather(obj: Any) -> list[Any]:
        """Every data-parallel rank's state, in rank order; called by every process at each checkpoint.

        Over a gloo group of its own (made at the first call), not the default group: gathered Python
        tensors captured by the run's final barrier as pending work were freed by gloo's thread at
        interpreter exit, which waits for the GIL that the exiting main thread holds (a hang at exit)."""
        import torch.distributed as tdist

        if not groups:
            groups.append(tdist.new_group(backend="gloo"))
        out: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, (dist.rank, obj), group=groups[0])
        by_rank: dict[int, Any] = {}
        for r, o in out:  # with latent shards the ranks of one replica hold the same buffer
            by_rank.setdefault(r, o)
        return [by_rank[r] for r in range(dist.world_size)]

    return Buffer(
        collector,
        sequences,
        buffer_tokens=d.buffer_tokens,
        batch_size=cfg.train.batch_size,
        model_batch_size=d.model_batch_size,
        seed=cfg.train.seed,
        val_tokens=cfg.train.val_tokens,
        norm_tokens=d.norm_sample_tokens,
        norm_scaling=d.norm_scaling,
        norm_center=d.norm_center,
        device=device,
        info=info,
        source_name=d.dataset,
        rank=dist.rank,
        world_size=dist.world_size,
        gather=gather if dist.enabled else None,
        overlap=d.refill_overlap,
    )
