"""torchrun + DDP on CPU (gloo): results do not depend on the number of processes; resume across sizes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--num-tokens", str(256 * 30), "--batch-size", "256", "--dict-size", "128", "--k", "4",
        "--val-tokens", "512", "--val-every", "10", "--log-every", "5", "--wandb", "off", "--no-progress",
        "--dead-tokens", "1024", "--lr", "0.003"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def single(out, *extra):
    r = subprocess.run([sys.executable, "-m", "crosscoder", "train", "--out", str(out), *ARGS, *extra],
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def torchrun(out, *extra, nproc=2, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "crosscoder", "train", "--out", str(out), *ARGS, *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def descendants(pid):
    """PIDs of every process below ``pid`` (from /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid):
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_same_weights(a, b, atol=1e-5):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=1e-4), (k, (wa[k] - wb[k]).abs().max())


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_two_processes_match_one(tmp_path, arch):
    extra = ["--arch", arch, "--aux-k", "16"]
    single(tmp_path / "one", *extra)
    torchrun(tmp_path / "two", *extra)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    m1 = json.loads((tmp_path / "one" / "config.json").read_text())["metrics"]
    m2 = json.loads((tmp_path / "two" / "config.json").read_text())["metrics"]
    for k in ("loss", "l2_loss", "l0_loss", "explained_variance", "explained_variance_A", "dead_fraction",
              "val/explained_variance"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-5), k
    # rank 0 alone writes: one metrics line per log step
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == list(range(5, 31, 5))


def test_kill_two_processes_then_resume_with_one(tmp_path):
    extra = ["--arch", "batchtopk", "--save-every", "4", "--log-every", "1", "--num-tokens", str(256 * 600)]
    single(tmp_path / "ref", *extra)
    out = tmp_path / "cut"
    p = torchrun(out, *extra, wait=False)
    deadline = time.time() + 180
    while time.time() < deadline:
        ck = out / "checkpoints"
        if ck.exists() and any(d.name.startswith("step_") and int(d.name[5:]) >= 8 for d in ck.iterdir()):
            break
        time.sleep(0.05)
    kill_tree(p.pid)  # torchrun starts its workers in sessions of their own: kill them one by one
    p.communicate()
    assert not (out / "model.safetensors").exists(), sorted(x.name for x in (out / "checkpoints").iterdir())
    single_resume = subprocess.run([sys.executable, "-m", "crosscoder", "train", "--out", str(out), "--resume",
                                    "--no-progress"], env=env(), capture_output=True, text=True)
    assert single_resume.returncode == 0, single_resume.stderr[-2000:]
    assert_same_weights(tmp_path / "ref", out)


def test_distributed_collection_equals_single_process(tmp_path):
    import numpy as np
    from conftest_collect import collect_config, mixed_lengths, tiny_pair

    from crosscoder.data.collect import collect
    from crosscoder.data.paired import PairedCache

    pair = tiny_pair()
    single_out = tmp_path / "single"
    cfg = collect_config(single_out, dataset=str(mixed_lengths()), num_tokens=1_000_000, seq_len=16,
                         batch_size=4)
    collect(cfg, say=lambda s: None)
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "crosscoder",
           "collect", "--base-model", str(pair.base), "--ft-model", str(pair.ft), "--site", cfg.site,
           "--dataset", cfg.dataset, "--out", str(multi), "--num-tokens", "1000000", "--seq-len", "16",
           "--batch-size", "4", "--dtype", "float32", "--shard-mb", str(cfg.shard_mb), "--device", "cpu",
           "--no-progress"]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = PairedCache(single_out), PairedCache(multi)
    assert a.n_rows == b.n_rows > 0
    assert not any(p.name.startswith("rank_") for p in multi.iterdir())
    ia, ib = a.read_index(np.arange(a.n_rows)), b.read_index(np.arange(b.n_rows))
    oa, ob = np.lexsort((ia[:, 2], ia[:, 1])), np.lexsort((ib[:, 2], ib[:, 1]))
    np.testing.assert_array_equal(ia[oa], ib[ob])  # same (token, sequence, position) rows
    torch.testing.assert_close(a.read(oa), b.read(ob), atol=1e-5, rtol=1e-5)
    for key in ("mean_norm", "mean", "var"):  # merged float64 statistics equal the single-process ones
        np.testing.assert_allclose(np.asarray(a.stats[key]), np.asarray(b.stats[key]), rtol=1e-9, atol=1e-12)
