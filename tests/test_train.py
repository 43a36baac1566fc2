"""Training loop: resume bit-for-bit, validation leaves weights alone, logs, checkpoints, schedules."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from crosscoder import CrossCoder
from crosscoder.config import CrossCoderConfig, RunConfig, TrainConfig
from crosscoder.model import architecture_names
from crosscoder.train import Interrupted, run_training
from crosscoder.train.checkpoint import list_checkpoints
from crosscoder.train.schedules import l1_coeff_at, lr_lambda

PLAN_METRICS = [
    "loss",
    "l2_loss",
    "l1_loss",
    "l0_loss",
    "l1_coeff",
    "lr",
    "explained_variance",
    "explained_variance_A",
    "explained_variance_B",
]


def small_cfg(arch="vanilla", **train):
    t = dict(
        num_tokens=256 * 40,
        batch_size=256,
        val_tokens=512,
        val_every=0,
        log_every=5,
        save_every=0,
        wandb="off",
        progress=False,
        dead_tokens=2000,
        seed=3,
    )
    t.update(train)
    return RunConfig(model=CrossCoderConfig(arch=arch, d_latent=128, k=4), train=TrainConfig(**t))


def weights(out):
    return load_file(str(out / "model.safetensors"))


def test_schedules_at_chosen_steps():
    f = lr_lambda(100, warmup_frac=0.1, decay_frac=0.2)
    assert [f(s) for s in (0, 4, 9, 10, 50, 79, 80, 90, 99)] == pytest.approx(
        [0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.05]
    )
    g = lr_lambda(10, 0.0, 0.2)
    assert [g(s) for s in range(10)] == pytest.approx([1] * 8 + [1.0, 0.5])
    assert l1_coeff_at(0, 1000, 2.0, 0.05) == 0.0
    assert l1_coeff_at(25, 1000, 2.0, 0.05) == pytest.approx(1.0)
    assert l1_coeff_at(50, 1000, 2.0, 0.05) == pytest.approx(2.0)
    assert l1_coeff_at(999, 1000, 2.0, 0.05) == pytest.approx(2.0)


@pytest.mark.parametrize("arch", architecture_names())  # every registered architecture
def test_resume_is_bit_for_bit(tmp_path, arch):
    cfg = small_cfg(arch, aux_k=16, save_every=7)
    full = run_training(cfg, tmp_path / "full")
    with pytest.raises(Interrupted):
        run_training(cfg, tmp_path / "cut", stop_after_steps=17)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [14, 17]  # keep_checkpoints=2
    resumed = run_training(cfg, tmp_path / "cut", resume=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["loss"] == full["loss"]
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated log lines after resume


def test_validation_does_not_change_training(tmp_path):
    run_training(small_cfg("batchtopk", aux_k=16, val_every=0), tmp_path / "a")
    m = run_training(small_cfg("batchtopk", aux_k=16, val_every=1), tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "val/explained_variance" in m
    rows = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val/loss" in r for r in rows) == 40


def test_metrics_log_and_artifacts(tmp_path):
    out = tmp_path / "run"
    run_training(small_cfg(), out)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for r in rows:
        for k in PLAN_METRICS + ["tokens", "tokens_per_s", "dead_fraction", "explained_variance_legacy"]:
            assert k in r, k
    assert rows[-1]["tokens"] == 40 * 256
    assert rows[0]["l1_coeff"] == pytest.approx(1.0)  # warm-up over 5% of 40 steps = 2 steps
    # The logged rate is the one the logged step used (0-based step s - 1): the decay over the last 8 of
    # 40 steps reaches 1/8 of the base rate on the last step (and 0 only after it).
    f = lr_lambda(40, 0.0, 0.2)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f(r["step"] - 1) for r in rows])
    assert rows[-1]["lr"] == pytest.approx(1e-3 / 8)
    cfg = json.loads((out / "config.json").read_text())
    for k in (
        "arch",
        "n_models",
        "d_model",
        "d_latent",
        "k",
        "norm_scale",
        "version",
        "train",
        "data",
        "metrics",
    ):
        assert k in cfg, k
    assert cfg["n_models"] == 2 and cfg["d_model"] == 64 and len(cfg["norm_scale"]) == 2
    assert cfg["data"]["fingerprints"]["cache"]
    model = CrossCoder.from_pretrained(out)
    assert model.cfg.norm_scale == cfg["norm_scale"]


def test_config_json_reproduces_run(tmp_path):
    from crosscoder.cli import main

    out1, out2 = tmp_path / "one", tmp_path / "two"
    assert (
        main(
            [
                "train",
                "--out",
                str(out1),
                "--num-tokens",
                "5120",
                "--batch-size",
                "256",
                "--dict-size",
                "64",
                "--val-tokens",
                "256",
                "--wandb",
                "off",
                "--no-progress",
                "--seed",
                "7",
                "--lr",
                "0.002",
            ]
        )
        == 0
    )
    assert main(["train", "--config", str(out1 / "config.json"), "--out", str(out2), "--no-progress"]) == 0
    a, b = weights(out1), weights(out2)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c1, c2 = (json.loads((o / "config.json").read_text()) for o in (out1, out2))
    assert c1["d_latent"] == 64 and c2["train"]["lr"] == 0.002 and c2["train"]["seed"] == 7


def test_sigint_saves_checkpoint_and_resume_matches(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [
        "--num-tokens",
        str(256 * 400),
        "--batch-size",
        "256",
        "--dict-size",
        "128",
        "--val-tokens",
        "256",
        "--wandb",
        "off",
        "--no-progress",
        "--log-every",
        "1",
        "--save-every",
        "0",
    ]
    ref = tmp_path / "ref"
    subprocess.run(
        [sys.executable, "-m", "crosscoder", "train", "--out", str(ref), *args],
        check=True,
        env=env,
        capture_output=True,
    )
    out = tmp_path / "cut"
    p = subprocess.Popen(
        [sys.executable, "-m", "crosscoder", "train", "--out", str(out), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 20):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 130, stdout
    assert "interrupted" in stdout
    assert list_checkpoints(out) and not (out / "model.safetensors").exists()
    r = subprocess.run(
        [sys.executable, "-m", "crosscoder", "train", "--out", str(out), "--resume", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    a, b = weights(ref), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tokens_per_s_counts_training_time_only(tmp_path, monkeypatch):
    """Validation and checkpoints are not training: a validation pass made to take 0.2 s every step must
    not drag the logged throughput below what the steps alone achieve."""
    from crosscoder.train import trainer

    real = trainer._Loop.validate

    def slow(self, l1):
        time.sleep(0.2)
        return real(self, l1)

    monkeypatch.setattr(trainer._Loop, "validate", slow)
    run_training(small_cfg(val_every=1, num_tokens=256 * 10), tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    # with the 5 x 0.2 s of validation counted, 5 steps of 256 tokens could not exceed 1,280 tokens/s
    assert tps and min(tps) > 4 * 1280, tps
