"""The data section of a run's configuration (``DataConfig``: ``"data"`` in ``config.json``); the other
sections and the run's whole configuration are in :mod:`crosscoder.config`, which re-exports this class."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import option as _f


@dataclass
class DataConfig:
    """Where the paired activations come from. With no source set, the built-in synthetic pair."""

    base_data: str | None = _f(
        None, "base-model activations: HF dataset (save_to_disk folder, parquet, or hub id)"
    )
    ft_data: str | None = _f(None, "fine-tuned-model activations, row-aligned with --base-data")
    column: str = _f("activation", "vector column of --base-data / --ft-data")
    cache: str | None = _f(None, "paired activation cache folder (from `crosscoder collect` or a conversion)")
    skip_nonfinite: bool = _f(False, "skip rows with NaN/Inf (counted) instead of failing")
    norm_scaling: bool = _f(True, "scale each model so the mean activation norm is sqrt(d_model)")
    norm_center: bool = _f(
        True,
        "subtract each model's mean activation before scaling (--no-norm-center: the "
        "plan's mean-inclusive scaling, as in published runs)",
    )
    norm_sample_tokens: int = _f(
        100_000, "tokens sampled to estimate the norm scale (when no stored statistics)"
    )
    prefetch: int = _f(4, "batches prepared ahead by the background reader")
    verify_cache: str = _f("crc", "cache check at open: crc (checksums) or size", choices=("crc", "size"))
    # On-the-fly collection (the plan's Buffer): used when --base-model/--ft-model/--dataset are given.
    base_model: str | None = _f(None, "on-the-fly: base model (hub id or local folder)")
    ft_model: str | None = _f(None, "on-the-fly: fine-tuned model (hub id or local folder)")
    site: str | None = _f(None, "on-the-fly: module path to read, e.g. model.layers.13")
    dataset: str | None = _f(
        None, "on-the-fly: text dataset (hub id, save_to_disk folder, json/jsonl/parquet/txt)"
    )
    text_column: str = _f("text", "on-the-fly: text column of --dataset")
    chat_template: str = _f(
        "none", "on-the-fly: render a `messages` column with a chat template", choices=("base", "ft", "none")
    )
    seq_len: int = _f(128, "on-the-fly: tokens per sequence (packed or truncated)")
    model_batch_size: int = _f(32, "on-the-fly: sequences per model forward")
    buffer_tokens: int = _f(262_144, "on-the-fly: paired activations held by the buffer")
    refill_overlap: bool = _f(True, "on-the-fly: build the next buffer generation in a background thread")
    model_dtype: str = _f(
        "float32", "on-the-fly: dtype the models run in", choices=("float32", "bfloat16", "float16")
    )
    allow_tokenizer_mismatch: bool = _f(False, "on-the-fly: allow tokenizers that disagree")
    max_norm_ratio: float | None = _f(
        None, "on-the-fly: drop positions whose norm exceeds this ratio to the running median"
    )
    trust_remote_code: bool = _f(False, "on-the-fly: pass trust_remote_code to transformers")
    fingerprints: dict[str, str] = _f({}, "data fingerprints (filled in by the run)", cli=False)
