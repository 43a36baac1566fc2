"""On-the-fly training under torchrun (issue 14): each rank runs both models on its own share of the text;
the normalisation, the held-out set and the calibration rows do not depend on the number of ranks; a
2-rank run killed and resumed ends with the weights of an uninterrupted one, bit for bit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest_collect import corpus, tiny_pair
from safetensors.torch import load_file
from test_buffer import keys, run_config
from test_distributed import env, kill_tree

from crosscoder.data.buffer import Buffer, buffer_source
from crosscoder.distributed import Dist


def test_ranks_share_the_text_and_agree_on_normalisation_and_validation() -> None:
    cfg = run_config(buffer_tokens=1024, batch_size=128, val_tokens=256)
    one = buffer_source(cfg, "cpu")
    ranks = [
        buffer_source(run_config(buffer_tokens=1024, batch_size=128, val_tokens=256), "cpu", Dist(r, 2))
        for r in (0, 1)
    ]
    for b in ranks:
        assert isinstance(b, Buffer) and b.local_batch == 64 and b.val_chunks == one.val_chunks
        assert b.norm_scale == one.norm_scale and b.norm_mean == one.norm_mean  # bit for bit
        assert torch.equal(b.sample, one.sample)  # calibration rows: the same on every rank
    # the held-out set is the single process's, split between the ranks by whole batches
    v0, v1 = keys(ranks[0].val_index), keys(ranks[1].val_index)
    assert len(v0) == len(v1) == 128 and not (v0 & v1) and v0 | v1 == keys(one.val_index)
    val_rows = torch.cat([*ranks[0].val_batches(), *ranks[1].val_batches()])
    torch.testing.assert_close(val_rows, torch.cat(list(one.val_batches())), rtol=0, atol=0)
    seen: list[set[tuple[int, int]]] = [set(), set()]
    for _ in range(12):  # three generations of 4 steps
        for r, b in enumerate(ranks):
            x = b.next_batch()
            assert x.shape == (64, 2, 32)
            k = keys(b.last_index)
            assert len(k) == 64 and not (k & seen[r])
            seen[r] |= k
            chunks = {int(s) // 8 - b.val_chunks for s in b.last_index[:, 1]}  # 8 sequences a chunk
            assert chunks and all(c >= 0 and c % 2 == r for c in chunks)  # rank r's share: chunks r, r+2, ...
    assert not (seen[0] & seen[1]) and not ((seen[0] | seen[1]) & keys(one.val_index))
    for b in [one, *ranks]:
        b.close()


ARGS = [
    "--site",
    "transformer.h.0",
    "--seq-len",
    "32",
    "--model-batch-size",
    "8",
    "--buffer-tokens",
    "1024",
    "--batch-size",
    "128",
    "--num-tokens",
    str(128 * 24),
    "--arch",
    "batchtopk",
    "--dict-size",
    "64",
    "--k",
    "4",
    "--val-tokens",
    "256",
    "--val-every",
    "8",
    "--log-every",
    "4",
    "--save-every",
    "3",
    "--dead-tokens",
    "512",
    "--wandb",
    "off",
    "--no-progress",
    "--device",
    "cpu",
]


def data_args() -> list[str]:
    pair = tiny_pair()
    return ["--base-model", str(pair.base), "--ft-model", str(pair.ft), "--dataset", str(corpus())]


def train(out: Path, *extra: str, nproc: int = 2, environ: dict[str, str] | None = None) -> tuple[int, str]:
    """``crosscoder train`` (under torchrun when ``nproc > 1``) -> (exit code, stderr)."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "crosscoder", "train", "--out", str(out), *extra]
    p = subprocess.Popen(
        cmd, env={**env(), **(environ or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)  # torchrun's workers too
        _, err = p.communicate()
        raise AssertionError(f"{out}: no exit after 300 s\n{err[-3000:]}") from None
    return p.returncode, err


@pytest.mark.slow  # three torchrun launches and one process: about 45 s alone on 2 cores
def test_two_ranks_killed_and_resumed_match_an_uninterrupted_run(tmp_path: Path) -> None:
    rc, err = train(tmp_path / "ref", *data_args(), *ARGS)
    assert rc == 0, err[-3000:]
    cut = tmp_path / "cut"
    rc, err = train(cut, *data_args(), *ARGS, environ={"CROSSCODER_TEST_KILL_AT_STEP": "1:11"})
    assert rc != 0 and not (cut / "model.safetensors").exists(), err[-3000:]
    state = json.loads((cut / "checkpoints" / "step_9" / "state.json").read_text())["data"]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    # 4 steps a generation: step 9 is one batch into generation 2, re-read from where generation 1 began
    assert [(s["generation"], s["pointer"]) for s in state["ranks"]] == [(2, 1), (2, 1)]
    shutil.copytree(cut, tmp_path / "one")
    rc, err = train(cut, "--resume", "--no-progress")
    assert rc == 0, err[-3000:]
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    ma = json.loads((tmp_path / "ref" / "config.json").read_text())["metrics"]
    mb = json.loads((cut / "config.json").read_text())["metrics"]
    assert ma["val/explained_variance"] == mb["val/explained_variance"]

    # one process resuming the 2-rank checkpoint: not the exact rows (each rank had its own buffer), but
    # text no rank had read, said in one line
    rc, err = train(tmp_path / "one", "--resume", "--no-progress", nproc=1)
    assert rc == 0, err[-3000:]
    assert "not the rows an uninterrupted run would have used" in err
    assert (tmp_path / "one" / "model.safetensors").exists()
