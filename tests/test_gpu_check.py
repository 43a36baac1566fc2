"""benchmarks/gpu_check.sh in its CPU mode: tiny sizes, one valid JSON document on stdout (never a GPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
)


def _run(**env_extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SMALL": "1", "PYTHON": sys.executable}
    env.update(env_extra)
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    return json.loads(p.stdout), p


@pytest.mark.slow
def test_gpu_check_cpu_mode_prints_one_json():
    doc, p = _run()
    assert p.returncode == 0, p.stderr[-2000:]
    assert doc["ok"], (doc["failed_steps"], p.stderr[-2000:])
    assert doc["device"] == "cpu" and doc["small"] and not doc["compile_runs"]
    assert set(doc["bench"]) == {"vanilla_256", "vanilla_512", "batchtopk_256", "batchtopk_512"}
    for run in doc["bench"].values():
        res = run["result"]
        assert res["dtype"] == "bfloat16" and res["tokens_per_s"] > 0
        assert 0 < res["frac_of_peak"] and res["peak_mem_mb"] > 0
    assert doc["ddp_1gpu"]["ok"] and doc["ddp_1gpu"]["tokens_per_s"] > 0
    sh = doc["sharded"]  # two gloo processes, --latent-shards 2
    assert sh["ok"] and sh["tokens_per_s"] > 0 and sh["config"]["latent_shards"] == 2
    assert doc["elapsed_s"] < 90


def test_gpu_check_budget_spent_still_valid_json():
    """Every step skipped (budget too small): still one JSON document, with the reasons."""
    doc, _ = _run(GPU_CHECK_BUDGET_S="1")
    assert not doc["ok"]
    assert all("skipped: budget" in v["error"] for v in doc["bench"].values())
    assert "skipped" in doc["ddp_1gpu"]["error"]


@pytest.mark.slow
def test_gpu_check_failing_step_recorded():
    """A step that fails (an invalid device) is recorded with its exit code and stderr tail."""
    doc, _ = _run(GPU_CHECK_DEVICE="nodevice")
    assert not doc["ok"]
    run = doc["bench"]["vanilla_256"]
    assert run["ok"] is False and run["rc"] != 0 and run["stderr_tail"]
    assert "ddp" in doc["failed_steps"]
