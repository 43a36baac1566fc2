"""Under a scheduler (torchrun on CPU/gloo, 2 ranks): an elastic restart after a killed rank resumes by
itself, and SIGTERM checkpoints within one step; both end with the weights of an uninterrupted run,
bit for bit."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import ARGS, descendants, env

from crosscoder.train.checkpoint import list_checkpoints

STEPS = 150
EXTRA = ["--arch", "batchtopk", "--save-every", "4", "--log-every", "1", "--num-tokens", str(256 * STEPS)]


def torchrun(out, *extra, restarts=0, environ=None, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        "-m",
        "crosscoder",
        "train",
        "--out",
        str(out),
        *ARGS,
        *EXTRA,
        *extra,
    ]
    e = {**env(), **(environ or {})}
    if not wait:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("elastic") / "ref"
    r = torchrun(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def assert_equal_weights(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, (wa[k] - wb[k]).abs().max())


@pytest.mark.slow
def test_killed_rank_restarts_from_checkpoint(tmp_path, reference):
    """Rank 1 SIGKILLs itself after step 10 (first attempt only); torchrun restarts both workers, which
    resume from step_8 without --resume (rank 0 gets OUT's lock again) and finish as if never killed."""
    out = tmp_path / "run"
    r = torchrun(out, restarts=1, environ={"CROSSCODER_TEST_KILL_AT_STEP": "1:10"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exitcode: -9" in r.stderr, r.stderr[-3000:]  # rank 1 was SIGKILLed and restarted
    steps = [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl") if '"loss"' in ln]
    assert steps == list(range(1, STEPS + 1))  # resumed from step_8: no step logged twice
    assert_equal_weights(reference, out)
    assert not (out / ".train.lock").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_within_one_step(tmp_path, reference):
    """SIGTERM to torchrun and its workers (as a scheduler does): every rank stops after the same step, at
    most one step after the signal arrived; --resume then finishes with the uninterrupted weights."""
    out = tmp_path / "run"
    p = torchrun(out, wait=False)
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 12):
        time.sleep(0.02)
    for pid in [p.pid, *descendants(p.pid)]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode != 0
    pattern = r"interrupted: signal 15 \(received after step (\d+)\): stopped at step (\d+)/"
    lines = re.findall(pattern, stdout)
    assert len(lines) == 2, stdout[-2000:] + stderr[-2000:]  # both ranks
    stopped = {int(s) for _, s in lines}
    assert len(stopped) == 1, lines  # the ranks agreed
    stop = stopped.pop()
    assert stop < STEPS, "the run ended before the signal"
    for received, _ in lines:
        assert stop - int(received) <= 1, lines
    assert list_checkpoints(out)[-1][0] == stop
    assert not (out / "model.safetensors").exists()
    r = torchrun(out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_equal_weights(reference, out)
