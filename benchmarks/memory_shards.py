"""Peak memory per rank with and without latent sharding, printed as one JSON object.

    python benchmarks/memory_shards.py --dict-size 262144 --batch-size 128 --steps 10

Trains BatchTopK on the built-in synthetic pair (d_model 64, 2 models) on the CPU three ways: one
process, ``torchrun --nproc_per_node=2 --latent-shards 2`` and ``--nproc_per_node=4 --latent-shards 4``,
and reports the peak anonymous resident memory (``RssAnon`` of ``/proc/PID/status``, sampled every 20 ms;
the cache's file pages, shared and reclaimable, are left out) of the largest worker next to
``crosscoder plan``'s per-rank estimate: during the training steps, and over the whole run (start-up,
calibration, the final checkpoint, whose serialisation holds a copy of each rank's state, and the final
model assembled on rank 0). Peaks include the interpreter, torch and the CLI (~220 MiB of anonymous
memory, measured in RESULTS_memory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crosscoder.train.plan import plan


def peak_mb(out: Path, shards: int, args: argparse.Namespace) -> dict[str, float]:
    train = [
        "train",
        "--out",
        str(out),
        "--arch",
        "batchtopk",
        "--dict-size",
        str(args.dict_size),
        "--k",
        "8",
        "--batch-size",
        str(args.batch_size),
        "--num-tokens",
        str(args.batch_size * args.steps),
        "--val-tokens",
        "0",
        "--save-every",
        "0",
        "--wandb",
        "off",
        "--no-progress",
        "--device",
        "cpu",
        "--log-every",
        "1",
    ]
    head = [sys.executable, "-m", "crosscoder"]
    if shards > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={shards}"]
        head += ["-m", "crosscoder"]
        train += ["--latent-shards", str(shards)]
    proc = subprocess.Popen(
        [*head, *train],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = {"training": 0, "whole_run": 0}
    log = out / "metrics.jsonl"
    while proc.poll() is None:
        pids = [p for p in _tree(proc.pid) if p != proc.pid or shards == 1]  # the workers, not torchrun
        top = max((_rss_anon_kib(p) for p in pids), default=0)
        logged = sum(1 for _ in open(log)) if log.exists() else 0
        peak["whole_run"] = max(peak["whole_run"], top)
        if 1 <= logged < args.steps:  # between the first and the last step
            peak["training"] = max(peak["training"], top)
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.read()[-2000:])
    return {k: round(v / 1024, 1) for k, v in peak.items()}


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss_anon_kib(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dict-size", type=int, default=262_144)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--shards", default="1,2,4")
    args = p.parse_args()
    out = {"dict_size": args.dict_size, "batch_size": args.batch_size, "d_model": 64, "n_models": 2}
    with tempfile.TemporaryDirectory() as tmp:
        for s in (int(v) for v in args.shards.split(",")):
            est = plan(
                64,
                args.dict_size,
                args.batch_size,
                2,
                "batchtopk",
                8,
                min(512, args.dict_size // 2),
                world_size=s,
                latent_shards=s,
            )
            peaks = peak_mb(Path(tmp) / f"s{s}", s, args)
            out[f"shards_{s}"] = {
                "peak_anon_mib_training": peaks["training"],
                "peak_anon_mib_whole_run": peaks["whole_run"],
                "plan_estimate_mib_per_rank": round(est.total_bytes_per_rank / 2**20, 1),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
