"""Nothing lost when the disk or a file fails (issue 14), with real faults, not mocks.

* a full disk during a checkpoint and during the final model write: ``OUT`` on a private tmpfs of a few
  hundred KB (``unshare -rm``: a user and mount namespace of its own; skipped where that is impossible);
* damaged checkpoints: truncated, missing and garbled files on disk;
* two ``train`` processes on one folder: a real second process holds the lock, then dies by SIGKILL;
* SIGKILL of the real ``collect``, ``export`` and ``analyze`` commands mid-way, then a rerun compared with
  an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.train import Interrupted, run_training
from crosscoder.train.checkpoint import load_checkpoint
from crosscoder.train.lock import LOCK_NAME

torch.set_num_threads(1)

CLI = [sys.executable, "-m", "crosscoder"]
# The built-in synthetic pair, 40 steps; a checkpoint is ~415 KB, the final model ~130 KB.
TRAIN = "--num-tokens 10240 --batch-size 256 --dict-size 128 --val-tokens 512 --wandb off --no-progress "
TRAIN = (TRAIN + "--log-every 5 --threads 1").split()


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def err_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def kill_when(p: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL ``p`` as soon as ``ready()`` holds; fail if it ended first."""
    deadline = time.time() + timeout
    while p.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.002)
    if p.poll() is not None:
        out, err = p.communicate()
        pytest.fail(f"the command ended (rc {p.returncode}) before it could be killed: {err[-2000:]}")
    p.kill()
    p.communicate()
    assert p.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted `crosscoder train` (checkpoints every 10 steps)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--out", str(out), *TRAIN, "--save-every", "10"]) == 0
    return out


# ------------------------------------------------------------------------------ disk full
@functools.cache
def tmpfs_unavailable() -> str | None:
    if shutil.which("unshare") is None:
        return "no `unshare` command: cannot mount a private tmpfs to fill"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(d)}"],
            capture_output=True,
            text=True,
        )
    if r.returncode != 0:
        return f"cannot mount a private tmpfs (unshare -rm: {r.stderr.strip() or r.returncode})"
    return None


def in_tmpfs(script: str, timeout: float = 240) -> None:
    """Run the sh ``script`` in a user + mount namespace of its own (where it may mount tmpfs)."""
    why = tmpfs_unavailable()
    if why:
        pytest.skip(why)
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], env=env(), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def pages(path: Path) -> int:
    """Bytes that the files under ``path`` take on tmpfs (whole 4 KiB pages)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files)


def run_then_resume(
    name: str, mnt: Path, size_k: int, work: Path, *extra: str, launcher: str = "", resume: bool = True
) -> str:
    """sh: mount a tmpfs of ``size_k`` KiB at ``mnt``, train there (copy the result as ``name.snap``),
    then (``resume``) make the tmpfs large (free space) and resume in place (copy as ``name.done``)."""
    q = shlex.quote
    cli = launcher or " ".join(map(q, CLI))
    run, w = q(str(mnt / "run")), q(str(work / name))
    args = " ".join(map(q, [*TRAIN, *extra]))
    again = " ".join(map(q, CLI)) + f" train --out {run} --resume --no-progress"
    script = (
        f"mount -t tmpfs -o size={size_k}k tmpfs {q(str(mnt))} || exit 97\n"
        f"{cli} train --out {run} {args} >{w}.out 2>{w}.err; echo $? >{w}.rc\n"
        f"cp -a {run} {w}.snap\n"
    )
    if resume:
        script += (
            f"mount -o remount,size=64m {q(str(mnt))} || exit 98\n"
            f"{again} >{w}.resume.out 2>{w}.resume.err; echo $? >{w}.resume.rc\n"
            f"cp -a {run} {w}.done\n"
        )
    return script


def tmpfs_sizes(reference: Path) -> dict[str, int]:
    """KiB: ``ckpt`` holds two checkpoints but not a third (with ``--save-every 10`` and two kept, step 30
    does not fit); ``final`` holds the final checkpoint but not the final model after it
    (``--save-every 0``)."""
    ck = max(pages(p) for p in (reference / "checkpoints").iterdir())
    small = 32 * 1024  # config.json (twice while it is replaced), metrics.jsonl, the lock file, margin
    model = pages(reference / "model.safetensors") + pages(reference / "config.json")
    return {"ckpt": (2 * ck + small + ck // 2) // 1024, "final": (ck + small + model // 2) // 1024}


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory, reference) -> Path:
    """Two runs, in parallel, each on its own tmpfs (:func:`tmpfs_sizes`), each resumed after making its
    tmpfs large (free space)."""
    work = tmp_path_factory.mktemp("full_disk")
    sizes = tmpfs_sizes(reference)
    for name in sizes:
        (work / f"mnt_{name}").mkdir()
    script = (
        "(\n"
        + run_then_resume("ckpt", work / "mnt_ckpt", sizes["ckpt"], work, "--save-every", "10")
        + ") &\n(\n"
        + run_then_resume("final", work / "mnt_final", sizes["final"], work, "--save-every", "0")
        + ") &\nwait\n"
    )
    in_tmpfs(script)
    return work


def outcome(work: Path, name: str, resumed: bool = True) -> tuple[int, str, int, str]:
    read = lambda suffix: (work / f"{name}{suffix}").read_text()  # noqa: E731
    if not resumed:
        return int(read(".rc")), read(".err"), 0, ""
    return int(read(".rc")), read(".err"), int(read(".resume.rc")), read(".resume.err")


def test_disk_full_during_a_checkpoint(full_disk, reference):
    rc, err, resume_rc, resume_err = outcome(full_disk, "ckpt")
    run = full_disk / "mnt_ckpt" / "run"
    assert rc == 2, err
    assert err_lines(err) == [
        f"error: {run}/checkpoints/step_30: disk full while writing a checkpoint (No space left on device); "
        "the previous checkpoint step_20 is intact; free space and rerun with --resume"
    ]
    snap = full_disk / "ckpt.snap"
    assert sorted(p.name for p in (snap / "checkpoints").iterdir()) == ["step_10", "step_20"]  # no temp
    for step in (10, 20):
        assert load_checkpoint(snap / "checkpoints" / f"step_{step}")["state"]["step"] == step
    assert not (snap / "model.safetensors").exists() and not (snap / LOCK_NAME).exists()
    assert resume_rc == 0, resume_err
    assert_same_weights(reference, full_disk / "ckpt.done")


def test_disk_full_during_the_final_model_write(full_disk, reference):
    rc, err, resume_rc, resume_err = outcome(full_disk, "final")
    run = full_disk / "mnt_final" / "run"
    assert rc == 2, err
    assert err_lines(err) == [
        f"error: {run}/model.safetensors: disk full while writing the final model (No space left on device); "
        "training finished and its checkpoint step_40 is intact; free space and rerun with --resume to "
        "write the model"
    ]
    snap = full_disk / "final.snap"
    assert sorted(p.name for p in snap.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert [p.name for p in (snap / "checkpoints").iterdir()] == ["step_40"]
    assert "metrics" not in json.loads((snap / "config.json").read_text())  # the run-start config only
    assert resume_rc == 0, resume_err
    done = full_disk / "final.done"
    assert_same_weights(reference, done)
    ref_metrics, metrics = (json.loads((p / "config.json").read_text())["metrics"] for p in (reference, done))
    for m in (ref_metrics, metrics):
        m.pop("tokens_per_s")  # a timing
    assert metrics == ref_metrics  # the final metrics came back from the final checkpoint


@pytest.mark.slow
def test_disk_full_under_torchrun_stops_every_rank(tmp_path, reference):
    """Rank 0 alone writes: its full disk must end the run (one line, no rank left waiting in a
    collective that would never match), and the lock taken by rank 0 must not hold up the process group."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    launcher = (
        shlex.quote(sys.executable)
        + " -m torch.distributed.run --standalone --nproc_per_node=2 -m crosscoder"
    )
    size = tmpfs_sizes(reference)["ckpt"]
    script = run_then_resume(
        "ddp", mnt, size, tmp_path, "--save-every", "10", launcher=launcher, resume=False
    )
    t0 = time.time()
    in_tmpfs(script, timeout=300)
    rc, err, _, _ = outcome(tmp_path, "ddp", resumed=False)
    assert rc != 0 and time.time() - t0 < 200
    line = f"error: {mnt}/run/checkpoints/step_30: disk full while writing a checkpoint (No space left on"
    assert sum(ln.startswith(line) for ln in err.splitlines()) == 1, err[-3000:]
    snap = tmp_path / "ddp.snap"
    assert sorted(p.name for p in (snap / "checkpoints").iterdir()) == ["step_10", "step_20"]
    assert not (snap / LOCK_NAME).exists()  # (resuming a 2-process run with 1: tests/test_distributed.py)


# ------------------------------------------------------------------------------ two processes
def test_second_train_on_the_same_folder_is_refused(tmp_path, reference, capsys):
    out = tmp_path / "run"
    cache = json.loads((reference / "config.json").read_text())["source"]["cache_path"]
    long = [
        *TRAIN,
        "--cache",
        cache,
        "--num-tokens",
        str(256 * 20000),
        "--log-every",
        "1",
        "--save-every",
        "5",
    ]
    p = subprocess.Popen(
        [*CLI, "train", "--out", str(out), *long],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = out / "metrics.jsonl"
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline and not (log.exists() and log.read_text()):
            time.sleep(0.02)
        assert p.poll() is None, p.communicate()[1][-2000:]
        lock = out / LOCK_NAME
        assert lock.read_text().startswith(f"pid {p.pid} on ")
        for flags in (["--resume"], ["--overwrite", *TRAIN]):
            capsys.readouterr()
            assert main(["train", "--out", str(out), *flags]) == 2
            err = err_lines(capsys.readouterr().err)
            assert len(err) == 1 and err[0].startswith(
                f"error: {out}: another crosscoder train is writing to this folder (pid {p.pid} on "
            ), err
            assert err[0].endswith(f"wait for it to end or choose another --out (lock: {lock})")
        assert (out / "metrics.jsonl").read_text() and p.poll() is None  # nothing removed, the holder runs on
    finally:
        p.kill()
        p.communicate()
    assert (out / LOCK_NAME).exists()  # a stale lock file from a killed run ...
    assert main(["train", "--out", str(out), "--overwrite", *TRAIN]) == 0  # ... blocks nothing
    assert (out / "model.safetensors").is_file() and not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ damaged checkpoints
def small_cfg(**train) -> RunConfig:
    t = dict(
        num_tokens=256 * 40,
        batch_size=256,
        val_tokens=512,
        val_every=0,
        log_every=5,
        save_every=7,
        wandb="off",
        progress=False,
        dead_tokens=2000,
        seed=3,
    )
    t.update(train)
    return RunConfig(model=CrossCoderConfig(arch="batchtopk", d_latent=128, k=4), train=TrainConfig(**t))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """``full``: an uninterrupted run; ``cut``: the same run stopped at step 17 (checkpoints 14 and 17)."""
    root = tmp_path_factory.mktemp("damaged")
    run_training(small_cfg(), root / "full")
    with pytest.raises(Interrupted):
        run_training(small_cfg(), root / "cut", stop_after_steps=17)
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # same size: only reading the file finds it
    path.write_bytes(bytes(data))


DAMAGE = {  # test id: (file, damage, the reason in the message)
    "truncated model.safetensors": ("model.safetensors", truncate, "truncated: {half} of {size} bytes"),
    "truncated optimizer.pt": ("optimizer.pt", truncate, "truncated: {half} of {size} bytes"),
    "missing rng.pt": ("rng.pt", lambda p: p.unlink(), "missing"),
    "garbled state.json": ("state.json", lambda p: p.write_text("{"), "JSONDecodeError: "),
    "garbled model.safetensors": ("model.safetensors", garble_header, "SafetensorError: "),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, interrupted, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted / "cut", out)
    name, fn, why = DAMAGE[damage]
    victim = out / "checkpoints" / "step_17" / name
    size = victim.stat().st_size
    fn(victim)
    stale = out / "checkpoints" / ".step_21.x.tmp"  # a temp folder left by a killed checkpoint write
    stale.mkdir()
    capsys.readouterr()
    run_training(small_cfg(), out, resume=True)
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    head = f"warning: {victim}: damaged checkpoint ({why.format(half=size // 2, size=size)}"
    assert err[0].startswith(head), err
    assert err[0].endswith("; resuming from step_14 instead (moved to damaged_step_17)"), err
    assert (out / "checkpoints" / "damaged_step_17").is_dir() and not stale.exists()
    assert_same_weights(interrupted / "full", out)
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_no_usable_checkpoint_is_one_line(tmp_path, interrupted, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted / "cut", out)
    truncate(out / "checkpoints" / "step_17" / "optimizer.pt")
    (out / "checkpoints" / "step_14" / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = err_lines(capsys.readouterr().err)
    ck = out / "checkpoints"
    assert len(err) == 1 and err[0].startswith(f"error: {ck}: no usable checkpoint to resume from ("), err
    assert f"{ck}/step_17/optimizer.pt: damaged checkpoint (truncated: " in err[0]
    assert f"{ck}/step_14/model.safetensors: damaged checkpoint (missing)" in err[0]
    assert err[0].endswith("); rerun with --overwrite to start over")
    assert sorted(p.name for p in ck.iterdir()) == ["step_14", "step_17"]  # left as they were


# ------------------------------------------------------------------------------ SIGKILL: collect
@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    """``ref``: an uninterrupted collection; ``cut``: the real CLI killed after its third shard (the state
    kept in ``killed_meta.json``), then ``collect --resume``."""
    from conftest_collect import corpus, tiny_pair

    root = tmp_path_factory.mktemp("collect")
    pair = tiny_pair()
    args = (
        f"--base-model {pair.base} --ft-model {pair.ft} --site transformer.h.0 --dataset {corpus()} "
        "--num-tokens 8000 --seq-len 32 --batch-size 8 --dtype float32 --shard-mb 0.05 --no-progress "
        "--device cpu --threads 1"
    ).split()
    cut = root / "cut"
    p = subprocess.Popen(
        [*CLI, "collect", "--out", str(cut), *args],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def shards() -> int:
        try:
            return len(json.loads((cut / "meta.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            return 0

    assert main(["collect", "--out", str(root / "ref"), *args]) == 0  # while the other one starts
    kill_when(p, lambda: shards() >= 3)
    shutil.copy(cut / "meta.json", root / "killed_meta.json")
    assert main(["collect", "--out", str(cut), *args, "--resume"]) == 0
    return root


def test_collect_killed_then_resumed_has_the_same_rows(collected):
    from crosscoder.data.paired import PairedCache
    from crosscoder.errors import DataError

    killed = json.loads((collected / "killed_meta.json").read_text())
    assert not killed["complete"] and 3 <= len(killed["shards"]) and killed["n_rows"] < 8000
    ref, cut = collected / "ref", collected / "cut"
    names = sorted(p.name for p in ref.iterdir())
    # the killed run's temp files (.shard_*.tmp, hidden) may stay: never read, never taken for a shard
    assert names == sorted(p.name for p in cut.iterdir() if not p.name.startswith("."))
    for name in names:
        if name.endswith(".npy"):
            assert (ref / name).read_bytes() == (cut / name).read_bytes(), name
    a, b = (json.loads((d / "meta.json").read_text()) for d in (ref, cut))
    assert {k: v for k, v in a.items() if k != "dropped"} == {k: v for k, v in b.items() if k != "dropped"}
    partial = collected / "partial"  # what the killed run left is refused, never read as a cache
    partial.mkdir()
    shutil.copy(collected / "killed_meta.json", partial / "meta.json")
    with pytest.raises(DataError, match="incomplete"):
        PairedCache(partial)


def test_collect_killed_then_resumed_counts_dropped_positions(collected):
    """Drop counts are committed with the shards they belong to (per sequence), so the killed run's
    counts survive and the re-read sequence is not counted twice."""
    a, b = (json.loads((collected / d / "meta.json").read_text()) for d in ("ref", "cut"))
    assert a["dropped"] == b["dropped"]


# ------------------------------------------------------------------------------ SIGKILL: export
def test_export_killed_then_rerun_gives_the_same_datasets(tmp_path, reference):
    import datasets
    import pyarrow as pa

    cache = json.loads((reference / "config.json").read_text())["source"]["cache_path"]
    args = ["--chunk-rows", "256"]
    cut = tmp_path / "cut"
    p = subprocess.Popen(
        [*CLI, "export", cache, str(cut), *args],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert main(["export", cache, str(tmp_path / "ref"), *args]) == 0
    kill_when(p, lambda: any(tmp_path.glob(".cut.*.tmp/*/*.arrow")))
    assert not cut.exists()  # the half-written export is only a temp folder
    assert main(["export", cache, str(cut), *args]) == 0
    ref = tmp_path / "ref"
    assert json.loads((ref / "export.json").read_text()) == json.loads((cut / "export.json").read_text())
    for name in ("base", "ft"):
        a, b = (datasets.load_from_disk(str(d / name)).data.table for d in (ref, cut))
        assert a.schema == b.schema and a.num_rows == b.num_rows == 10752
        for col in a.column_names:
            x, y = (t.column(col).combine_chunks() for t in (a, b))
            if pa.types.is_fixed_size_list(x.type):
                x, y = x.flatten(), y.flatten()
            x, y = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, col)


# ------------------------------------------------------------------------------ SIGKILL: analyze
def test_analyze_killed_then_rerun_gives_the_same_report(tmp_path, reference):
    args = ["--max-tokens", "0", "--no-spliced", "--threads", "1"]
    cut = tmp_path / "cut"
    p = subprocess.Popen(
        [*CLI, "analyze", str(reference), "--out", str(cut), *args],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert main(["analyze", str(reference), "--out", str(tmp_path / "ref"), *args]) == 0
    kill_when(p, lambda: any(tmp_path.glob(".cut.*.tmp/latents.parquet")))
    assert not cut.exists()  # a half-written report is only a temp folder
    assert main(["analyze", str(reference), "--out", str(cut), *args]) == 0
    ref = tmp_path / "ref"
    for name in ("latents.csv", "latents.parquet"):
        assert (ref / name).read_bytes() == (cut / name).read_bytes(), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, cut))
    a.pop("seconds"), b.pop("seconds")
    assert a == b
