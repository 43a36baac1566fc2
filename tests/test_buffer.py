"""On-the-fly Buffer (issue 3): refresh with new tokens, normalisation as collect's, resume, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_collect import collect_config, corpus, quiet, tiny_pair

from crosscoder.config import CrossCoderConfig, DataConfig, RunConfig, TrainConfig
from crosscoder.data.buffer import Buffer, buffer_source
from crosscoder.data.collect import collect
from crosscoder.data.paired import PairedCache
from crosscoder.errors import DataError

torch.set_num_threads(1)


def run_config(
    buffer_tokens: int = 1024, batch_size: int = 64, val_tokens: int = 0, **train: object
) -> RunConfig:
    pair = tiny_pair()
    return RunConfig(
        model=CrossCoderConfig(arch="batchtopk", d_latent=64, k=4),
        train=TrainConfig(batch_size=batch_size, val_tokens=val_tokens, seed=3, **train),  # type: ignore[arg-type]
        data=DataConfig(
            base_model=str(pair.base),
            ft_model=str(pair.ft),
            site="transformer.h.0",
            dataset=str(corpus()),
            seq_len=32,
            model_batch_size=8,
            buffer_tokens=buffer_tokens,
        ),
    )


def keys(index: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(s), int(p)) for s, p in index[:, 1:].tolist()}


def test_refresh_serves_new_tokens_each_exactly_once() -> None:
    buf = buffer_source(run_config(buffer_tokens=1024, batch_size=64, val_tokens=128), "cpu")
    assert isinstance(buf, Buffer) and buf.n_models == 2 and buf.d_model == 32
    first_fill = keys(buf.index)
    max_first = int(buf.index[:, 1].max())
    val = keys(buf.val_index)
    assert len(val) == 128 and not (val & first_fill)
    seen: set[tuple[int, int]] = set()
    new_after_refresh = 0
    for t in range(40):  # 2560 rows: five refreshes of half a buffer
        x = buf.next_batch()
        assert x.shape == (64, 2, 32) and x.dtype == torch.float32
        k = keys(buf.last_index)
        assert len(k) == 64 and not (k & seen) and not (k & val)  # never served twice, never validation
        seen |= k
        if t >= 8:
            new_after_refresh += sum(1 for s, _ in k if s > max_first)
    assert buf.refreshes >= 4
    assert new_after_refresh > 1000  # later batches are mostly tokens never seen before
    assert len(seen - first_fill) > 1500


def test_buffer_matches_collect_rows_and_normalisation(tmp_path: Path) -> None:
    """Same alignment and masking as `collect`; the normalisation from the first fill: collect's mean, then
    E||x - mean|| = sqrt(d_model) (and without centring collect's mean-norm factors)."""
    buf = buffer_source(run_config(buffer_tokens=1024), "cpu")
    collect(collect_config(tmp_path / "c", num_tokens=1024), say=quiet)
    cache = PairedCache(tmp_path / "c")
    np.testing.assert_allclose(
        np.asarray(buf.norm_mean), np.asarray(cache.stats["mean"]), rtol=1e-5, atol=1e-6
    )
    index = cache.read_index(np.arange(cache.n_rows))
    where = {(int(s), int(p)): i for i, (s, p) in enumerate(index[:, 1:].tolist())}
    assert keys(buf.index) == set(where)
    x = buf.next_batch()
    rows = np.array([where[k] for k in [(int(s), int(p)) for s, p in buf.last_index[:, 1:].tolist()]])
    scale = torch.tensor(buf.norm_scale, dtype=torch.float32).view(1, 2, 1)
    mean = torch.tensor(buf.norm_mean, dtype=torch.float32)
    torch.testing.assert_close(x, (cache.read(rows) - mean) * scale, atol=1e-4, rtol=1e-4)
    full = buf.buf.norm(dim=-1).mean(0)  # normalised mean norm = sqrt(d_model)
    torch.testing.assert_close(full, torch.full((2,), 32**0.5), rtol=1e-4, atol=1e-4)
    # residual streams carry a large mean: centring changes the factors several-fold
    assert min(buf.norm_scale[i] / cache.norm_scale()[i] for i in range(2)) > 2
    cfg = run_config(buffer_tokens=1024)
    cfg.data.norm_center = False
    plain = buffer_source(cfg, "cpu")
    np.testing.assert_allclose(plain.norm_scale, cache.norm_scale(), rtol=1e-9)
    assert plain.norm_mean is None


def test_state_dict_resumes_with_new_tokens_and_same_scale() -> None:
    buf = buffer_source(run_config(buffer_tokens=512), "cpu")
    for _ in range(10):
        buf.next_batch()
    state = json.loads(json.dumps(buf.state_dict()))
    fresh = buffer_source(run_config(buffer_tokens=512), "cpu")
    fresh.norm_scale = [1.0, 1.0]  # load_state_dict must restore the run's scale
    fresh.load_state_dict(state)
    assert fresh.norm_scale == pytest.approx(buf.norm_scale)
    assert int(fresh.index[:, 1].min()) >= state["next_sequence"]
    fresh.next_batch()
    assert fresh.state_dict()["batches_served"] == 11


def test_buffer_refuses_a_batch_larger_than_half_the_buffer() -> None:
    with pytest.raises(DataError, match="buffer_tokens"):
        buffer_source(run_config(buffer_tokens=100, batch_size=64), "cpu")


def test_on_the_fly_training_end_to_end(tmp_path: Path) -> None:
    from crosscoder.model import CrossCoder
    from crosscoder.train import run_training

    cfg = run_config(
        buffer_tokens=1024,
        batch_size=128,
        val_tokens=256,
        num_tokens=128 * 12,
        log_every=4,
        val_every=6,
        save_every=0,
        wandb="off",
        progress=False,
        dead_tokens=10_000,
    )
    metrics = run_training(cfg, tmp_path / "run")
    assert np.isfinite(metrics["loss"]) and "val/explained_variance" in metrics
    model = CrossCoder.from_pretrained(tmp_path / "run")
    pair = tiny_pair()
    assert model.cfg.model_names == [str(pair.base), str(pair.ft)] and model.cfg.site == "transformer.h.0"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["base_model"] == str(pair.base) and saved["data"]["fingerprints"]["tokenizer"]
