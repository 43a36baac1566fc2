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
    assert (buf.gen_rows, buf.carry_rows, buf.steps_per_gen) == (512, 256, 8)
    val = keys(buf.val_index)
    assert len(val) == 128
    seen: set[tuple[int, int]] = set()
    first_gen: set[tuple[int, int]] = set()
    new_later = 0
    for t in range(40):  # 2560 rows: five generations of half a buffer
        x = buf.next_batch()
        assert x.shape == (64, 2, 32) and x.dtype == torch.float32
        k = keys(buf.last_index)
        assert len(k) == 64 and not (k & seen) and not (k & val)  # never served twice, never validation
        seen |= k
        if t < 8:
            first_gen |= k
        elif t >= 16:
            new_later += sum(1 for s, _ in k if s > max(s for s, _ in first_gen))
    assert buf.generation == 4
    assert new_later > 1000  # later batches are mostly tokens never seen before
    # validation text comes first: every training row is from a later sequence than every held-out one
    assert min(s for s, _ in seen) > max(s for s, _ in val)
    buf.close()


def test_buffer_matches_collect_rows_and_normalisation(tmp_path: Path) -> None:
    """Same alignment and masking as `collect`; the normalisation from the first buffer_tokens rows:
    collect's mean, then E||x - mean|| = sqrt(d_model) (and without centring collect's mean-norm factors)."""
    buf = buffer_source(run_config(buffer_tokens=1024), "cpu")
    collect(collect_config(tmp_path / "c", num_tokens=1024), say=quiet)
    cache = PairedCache(tmp_path / "c")
    np.testing.assert_allclose(
        np.asarray(buf.norm_mean), np.asarray(cache.stats["mean"]), rtol=1e-5, atol=1e-6
    )
    index = cache.read_index(np.arange(cache.n_rows))
    where = {(int(s), int(p)): i for i, (s, p) in enumerate(index[:, 1:].tolist())}
    scale = torch.tensor(buf.norm_scale, dtype=torch.float32).view(1, 2, 1)
    mean = torch.tensor(buf.norm_mean, dtype=torch.float32)
    for _ in range(8):  # the first generation: rows among the first 768 of the stream
        x = buf.next_batch()
        rows = np.array([where[k] for k in [(int(s), int(p)) for s, p in buf.last_index[:, 1:].tolist()]])
        torch.testing.assert_close(x, (cache.read(rows) - mean) * scale, atol=1e-4, rtol=1e-4)
    assert len(buf.sample) == 1024  # the normalisation rows, normalised: mean norm sqrt(d_model)
    torch.testing.assert_close(
        buf.sample.norm(dim=-1).mean(0), torch.full((2,), 32**0.5), rtol=1e-4, atol=1e-4
    )
    # residual streams carry a large mean: centring changes the factors several-fold
    assert min(buf.norm_scale[i] / cache.norm_scale()[i] for i in range(2)) > 2
    cfg = run_config(buffer_tokens=1024)
    cfg.data.norm_center = False
    plain = buffer_source(cfg, "cpu")
    np.testing.assert_allclose(plain.norm_scale, cache.norm_scale(), rtol=1e-9)
    assert plain.norm_mean is None
    buf.close()


def served(buf: Buffer, n: int) -> list[torch.Tensor]:
    return [buf.next_batch().clone() for _ in range(n)]


@pytest.mark.parametrize("stop", [5, 8, 13])  # mid-generation, at a generation's end, in the second one
def test_state_dict_resumes_with_the_exact_rows(stop: int) -> None:
    """A buffer rebuilt from a JSON state serves exactly the batches the uninterrupted one serves (and
    restores the run's normalisation); the background build gives the same batches as the synchronous."""
    ref = buffer_source(run_config(buffer_tokens=512, batch_size=64), "cpu")
    ref.overlap = False
    want = served(ref, 24)
    ref.close()
    buf = buffer_source(run_config(buffer_tokens=512, batch_size=64), "cpu")
    got = served(buf, stop)
    state = json.loads(json.dumps(buf.state_dict()))
    buf.close()
    fresh = buffer_source(run_config(buffer_tokens=512, batch_size=64), "cpu")
    fresh.norm_scale = [1.0, 1.0]  # load_state_dict must restore the run's scale
    fresh.load_state_dict(state)
    assert fresh.norm_scale == pytest.approx(ref.norm_scale)
    got += served(fresh, 24 - stop)
    fresh.close()
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), t
    assert fresh.state_dict()["batches_served"] == 24


def test_exact_resume_with_the_norm_filter() -> None:
    """With --max-norm-ratio the kept rows depend on the filter's window: the state carries it."""

    def make() -> Buffer:
        cfg = run_config(buffer_tokens=512, batch_size=64)
        cfg.data.max_norm_ratio = 1.1  # drops about a tenth of the rows here
        return buffer_source(cfg, "cpu")

    ref = make()
    want = served(ref, 20)
    ref.close()
    assert ref.collector.dropped["norm_outlier"] > 0
    buf = make()
    served(buf, 11)
    state = json.loads(json.dumps(buf.state_dict()))
    buf.close()
    assert state["ranks"][0]["window"] is not None
    fresh = make()
    fresh.load_state_dict(state)
    got = served(fresh, 9)
    fresh.close()
    for t, (a, b) in enumerate(zip(got, want[11:], strict=True)):
        assert torch.equal(a, b), t + 11


def test_resume_from_another_world_size_reads_unseen_text() -> None:
    buf = buffer_source(run_config(buffer_tokens=512, batch_size=64), "cpu")
    seen = set()
    for _ in range(6):
        buf.next_batch()
        seen |= keys(buf.last_index)
    state = json.loads(json.dumps(buf.state_dict()))
    buf.close()
    last_read = state["ranks"][0]["end"]
    state["world_size"] = 2  # as if written by two ranks (rank 1's share: pretend it read nothing)
    state["ranks"].append({"layout": state["ranks"][0]["layout"], "generation": None})
    fresh = buffer_source(run_config(buffer_tokens=512, batch_size=64), "cpu")
    fresh.load_state_dict(state)
    x = fresh.next_batch()
    fresh.close()
    assert x.shape == (64, 2, 32) and fresh.state_dict()["batches_served"] == 7
    first_unread = fresh.val_chunks + last_read[0] + (last_read[1] > 0)
    assert min(int(s) for s in fresh.last_index[:, 1]) >= first_unread * 8  # 8 sequences a chunk
    assert not (keys(fresh.last_index) & seen)


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


def test_on_the_fly_training_stopped_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    """run_training stopped mid-generation (checkpoint, Interrupted) and resumed ends with the weights of
    the uninterrupted run, bit for bit (the buffer is rebuilt from the checkpoint's stream position)."""
    from safetensors.torch import load_file

    from crosscoder.train import run_training
    from crosscoder.train.trainer import Interrupted

    cfg = run_config(
        buffer_tokens=512,
        batch_size=64,
        val_tokens=128,
        num_tokens=64 * 20,
        log_every=5,
        val_every=10,
        save_every=0,
        wandb="off",
        progress=False,
        dead_tokens=640,
    )
    run_training(cfg, tmp_path / "ref")
    with pytest.raises(Interrupted):
        run_training(cfg, tmp_path / "cut", stop_after_steps=7)  # generation 1 of 4-step generations
    state = json.loads(next((tmp_path / "cut" / "checkpoints").glob("step_7/state.json")).read_text())
    assert state["data"]["ranks"][0]["generation"] == 1 and state["data"]["ranks"][0]["pointer"] == 3
    run_training(cfg, tmp_path / "cut", resume=True)
    a, b = (
        load_file(str(tmp_path / "ref" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
