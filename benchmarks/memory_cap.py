"""Bounded memory on a big cache: train and analyze under an OS memory cap smaller than the cache.

    sudo .venv/bin/python benchmarks/memory_cap.py                       # 1800 MiB cache, 448 MiB cap
    .venv/bin/python benchmarks/memory_cap.py --cache-mb 200 --cap-mb 300 --json-out /tmp/m.json

Writes a random paired cache of ``--cache-mb`` MiB (``PairedCacheWriter``, float32 rows of
``[n_models, d_model]``) in a temporary folder, evicts its files from the page cache
(``posix_fadvise(DONTNEED)``, so that the capped runs must read every byte through their own cgroup instead
of finding it charged to the parent), then runs, each in a fresh child memory cgroup (cgroup v1,
``memory.limit_in_bytes = --cap-mb``; the process joins it before ``exec``):

* ``crosscoder train --cache CACHE`` for ``--num-tokens`` rows (random rows of the whole cache, read by
  the shuffled loader; the cache's CRC32 check at open first reads every byte once);
* ``crosscoder analyze RUN --max-tokens 0`` (scans every row of the cache).

Mapped and read cache pages are charged to the cgroup but are reclaimable: a run that streams the cache
stays under the cap; one whose anonymous memory grew with the rows read would be OOM-killed. Reported per
run (one JSON document on stdout): exit code, whether the kernel OOM-killed it (``memory.oom_control``),
wall time, peak RSS from ``wait4`` (``ru_maxrss``: anonymous + mapped file pages), peak anonymous RSS and
peak mapped-file RSS polled from ``/proc/PID/status`` every 50 ms, the cgroup's ``max_usage_in_bytes``
(anonymous + page cache, bounded by the cap), its ``failcnt`` (times the cap forced reclaim), the peak
``rss``/``cache`` of its ``memory.stat``, and a coarse anonymous-RSS timeline (to see that it is flat).

Needs root and a cgroup v1 memory controller; without them it exits 2 with the reason
(``--no-cap`` runs the same measurement uncapped). The cache and runs are deleted at the end unless
``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 1 << 20
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


# ---------------------------------------------------------------------------------------------- cgroups
def own_memory_cgroup() -> Path:
    """Folder of this process's cgroup v1 memory controller; raises RuntimeError (the reason) if none."""
    if not CGROUP_ROOT.is_dir() or not (CGROUP_ROOT / "memory.limit_in_bytes").is_file():
        raise RuntimeError(f"no cgroup v1 memory controller mounted at {CGROUP_ROOT}")
    rel = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            rel = path
    if rel is None:
        raise RuntimeError("/proc/self/cgroup lists no memory controller")
    here = CGROUP_ROOT / rel.lstrip("/")
    if not here.is_dir():
        raise RuntimeError(f"{here}: own memory cgroup not visible")
    return here


class MemoryCgroup:
    """A child memory cgroup with a hard limit; ``join()`` (in a child before exec) moves the caller in."""

    def __init__(self, limit_bytes: int, name: str) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("creating a memory cgroup needs root")
        parent = own_memory_cgroup()
        self.path = parent / name
        try:
            self.path.mkdir()
        except OSError as e:
            raise RuntimeError(f"cannot create cgroup {self.path}: {e}") from None
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            got = int((self.path / "memory.limit_in_bytes").read_text())
            if abs(got - limit_bytes) > 1 << 16:  # the kernel rounds to pages
                raise RuntimeError(f"{self.path}: limit {limit_bytes} not applied (reads {got})")
            swap = self.path / "memory.memsw.limit_in_bytes"  # no swapping out of the cap either
            if swap.is_file():
                try:
                    swap.write_text(str(limit_bytes))
                except OSError:
                    pass
        except Exception:
            self.remove()
            raise
        self.limit = got

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def read_int(self, name: str) -> int:
        return int((self.path / name).read_text())

    def stat(self) -> dict[str, int]:
        out = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, v = line.split()
            out[k] = int(v)
        return out

    def oom_kills(self) -> int:
        m = re.search(r"oom_kill (\d+)", (self.path / "memory.oom_control").read_text())
        return int(m.group(1)) if m else 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def cgroup_unavailable_reason() -> str | None:
    """None when a capped child cgroup can be created here, else why not."""
    try:
        cg = MemoryCgroup(64 * MIB, f"cc_probe_{os.getpid()}")
    except (RuntimeError, OSError) as e:
        return str(e)
    cg.remove()
    return None


# ---------------------------------------------------------------------------------------------- cache
def write_cache(path: Path, cache_mb: int, n_models: int, d_model: int, seed: int = 0) -> dict:
    """A float32 cache of at least ``cache_mb`` MiB of activations, random rows."""
    import torch

    from crosscoder.data.paired import PairedCacheWriter

    row_bytes = n_models * d_model * 4
    rows = -(-cache_mb * MIB // row_bytes)
    shard_rows = max(1024, (64 * MIB) // row_bytes)  # 64 MiB shards: the writer's buffer stays small
    t = time.perf_counter()
    w = PairedCacheWriter(path, n_models, d_model, dtype="float32", shard_rows=shard_rows)
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n_models, d_model, generator=g) + 0.5
    step = 8192
    for i in range(0, rows, step):
        w.add(torch.randn(min(step, rows - i), n_models, d_model, generator=g) * scale)
    w.close()
    size = sum(f.stat().st_size for f in path.iterdir())
    return {
        "rows": rows,
        "n_models": n_models,
        "d_model": d_model,
        "dtype": "float32",
        "shards": len(list(path.glob("shard_*.acts.npy"))),
        "bytes": size,
        "mib": round(size / MIB, 1),
        "write_s": round(time.perf_counter() - t, 1),
    }


def evict(path: Path) -> None:
    """Drop this folder's (clean, fsynced) pages from the page cache."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------- runs
def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[key] = int(m.group(1))
    return out


def run_capped(
    cmd: list[str], cgroup: MemoryCgroup | None, timeout: float, log: Path, poll_s: float = 0.05
) -> dict:
    """Run ``cmd`` inside ``cgroup`` (None: uncapped), polling its memory; returns the measurements."""
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "cg_rss": 0, "cg_cache": 0}
    timeline: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=cgroup.join if cgroup else None
        )
        done = threading.Event()

        def poll() -> None:
            last = -1.0
            while not done.is_set():
                st = _status_kb(proc.pid)
                for k in ("RssAnon", "RssFile", "VmRSS"):
                    peaks[k] = max(peaks[k], st.get(k, 0))
                if cgroup is not None:
                    try:
                        s = cgroup.stat()
                        peaks["cg_rss"] = max(peaks["cg_rss"], s.get("rss", 0))
                        peaks["cg_cache"] = max(peaks["cg_cache"], s.get("cache", 0))
                    except OSError:
                        pass
                now = time.perf_counter() - t0
                if "RssAnon" in st and now - last >= 1.0:
                    timeline.append((round(now, 1), st["RssAnon"] // 1024))
                    last = now
                done.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        timed_out = False
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline and not timed_out:
                proc.kill()
                timed_out = True
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        th.join()
    wall = time.perf_counter() - t0
    out = {
        "cmd": " ".join(cmd[2:] if cmd[1:3] == ["-m", "crosscoder"] else cmd),
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),  # wait4: Linux reports kB
        "peak_rss_anon_mib": round(peaks["RssAnon"] / 1024, 1),
        "peak_rss_file_mib": round(peaks["RssFile"] / 1024, 1),
    }
    if cgroup is not None:
        out.update(
            {
                "oom_killed": cgroup.oom_kills() > 0,
                "cgroup_max_usage_mib": round(cgroup.read_int("memory.max_usage_in_bytes") / MIB, 1),
                "cgroup_failcnt": cgroup.read_int("memory.failcnt"),
                "cgroup_peak_anon_mib": round(peaks["cg_rss"] / MIB, 1),
                "cgroup_peak_page_cache_mib": round(peaks["cg_cache"] / MIB, 1),
            }
        )
    # a short, evenly spaced view of the anonymous RSS over time (MiB), to see that it does not grow
    if timeline:
        idx = sorted({round(i * (len(timeline) - 1) / 9) for i in range(10)})
        out["rss_anon_timeline_mib"] = [timeline[i][1] for i in idx]
    tail = log.read_text(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        out["log_tail"] = tail[-15:]
    return out


def tokens_per_s(run: Path) -> float | None:
    try:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return None
    vals = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    return round(vals[-1], 1) if vals else None


def dumps(obj: dict) -> str:
    """Indented JSON with short lists (the timelines) on one line."""
    text = json.dumps(obj, indent=2)
    return re.sub(
        r"\[[^\[\]{}]*\]",
        lambda m: re.sub(r"\s+", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]"),
        text,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-mb", type=int, default=1800, help="cache size in MiB (default 1800)")
    p.add_argument("--cap-mb", type=int, default=448, help="memory cap per run in MiB (default 448)")
    p.add_argument("--n-models", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-latent", type=int, default=256)
    p.add_argument("--arch", default="batchtopk")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument(
        "--num-tokens",
        type=int,
        default=40960,
        help="training tokens (default 40960: random rows, page-fault bound under the cap; 0 = one epoch)",
    )
    p.add_argument("--max-tokens", type=int, default=0, help="analyze --max-tokens (default 0: all rows)")
    p.add_argument("--chunk", type=int, default=1024, help="analyze --chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    p.add_argument("--workdir", default=None, help="parent of the temporary folder (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the cache and runs")
    p.add_argument("--no-cap", action="store_true", help="measure without a cgroup (no root needed)")
    p.add_argument("--json-out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)

    if not a.no_cap:
        reason = cgroup_unavailable_reason()
        if reason is not None:
            print(json.dumps({"error": f"memory cgroup unavailable: {reason}"}), flush=True)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="cc_memcap_", dir=a.workdir))
    result: dict = {"cap_mib": None if a.no_cap else a.cap_mb}
    try:
        cache, run, report = tmp / "cache", tmp / "run", tmp / "report"
        result["cache"] = write_cache(cache, a.cache_mb, a.n_models, a.d_model)
        result["cache_over_cap"] = None if a.no_cap else round(result["cache"]["bytes"] / (a.cap_mb * MIB), 2)
        rows = result["cache"]["rows"]
        val = min(65536, rows // 10)
        num_tokens = a.num_tokens or (rows - val) // a.batch_size * a.batch_size
        py = [sys.executable, "-m", "crosscoder"]
        train = py + [
            "train", "--cache", str(cache), "--out", str(run), "--arch", a.arch,
            "--d-latent", str(a.d_latent), "--batch-size", str(a.batch_size),
            "--num-tokens", str(num_tokens), "--val-tokens", str(val), "--val-every", "0",
            "--save-every", "0", "--log-every", "20", "--wandb", "off", "--no-progress",
            "--threads", str(a.threads),
        ]  # fmt: skip
        analyze = py + [
            "analyze", str(run), "--out", str(report), "--cache", str(cache),
            "--max-tokens", str(a.max_tokens), "--chunk", str(a.chunk), "--no-spliced",
            "--threads", str(a.threads),
        ]  # fmt: skip
        result["train_tokens"] = num_tokens
        for name, cmd in (("train", train), ("analyze", analyze)):
            evict(cache)
            cg = None if a.no_cap else MemoryCgroup(a.cap_mb * MIB, f"cc_cap_{os.getpid()}_{name}")
            try:
                result[name] = run_capped(cmd, cg, a.timeout, tmp / f"{name}.log")
            finally:
                if cg is not None:
                    cg.remove()
            if name == "train":
                result[name]["tokens_per_s"] = tokens_per_s(run)
            if result[name]["exit_code"] != 0:
                break
        result["ok"] = all(result.get(n, {}).get("exit_code") == 0 for n in ("train", "analyze"))
    finally:
        if a.keep:
            result["workdir"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = dumps(result)
    print(text, flush=True)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
