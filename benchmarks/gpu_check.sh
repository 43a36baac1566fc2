#!/usr/bin/env bash
# One-shot GPU check: prints ONE JSON document on stdout (progress goes to stderr).
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, after the README install
#                                                # (python -m venv .venv && pip install torch==2.13.0
#                                                #  && pip install -e .) on a machine with one NVIDIA GPU
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh   # tiny sizes on CPU, < 60 s
#
# What it runs (bench without --compile, then DDP, then the --compile runs, slowest last; each step under `timeout`, and skipped when the remaining budget cannot hold its timeout,
# so the whole script stays under GPU_CHECK_BUDGET_S, default 450 s < 8 minutes):
#   * `crosscoder bench` (the full training step: forward, losses, backward, clipping, Adam) for vanilla
#     and BatchTopK, d_model 2304, 16,384 and 73,728 latents, batch 4096, bf16 autocast, without and with
#     --compile. bench already prints one JSON object: tokens/s, ms/step, achieved GFLOP/s, the measured
#     bf16 matmul peak (peak_gflop_s, a timed matmul of the step's shape) and frac_of_peak, and peak
#     memory (peak_mem_mb; torch.cuda.max_memory_allocated on a GPU, max RSS on CPU). Those objects are
#     embedded as they are.
#   * the 1-GPU DDP path: a small random bf16 paired cache, then
#     `torchrun --nproc_per_node=1 -m crosscoder train --cache ... --dtype bfloat16`, BatchTopK 16,384
#     latents, batch 4096; tokens/s from its metrics.jsonl (median of the logged values after the
#     first), host max RSS (/usr/bin/time when present) and the GPU's peak memory.used (nvidia-smi polled).
#   * the latent-sharded path: the same run on 2 ranks with --latent-shards 2 (each rank half the latents);
#     NCCL refuses two ranks on one GPU, so on CUDA it runs when 2 GPUs are visible and is recorded as
#     skipped (with that reason) on one; in CPU mode two gloo processes.
# A failing, hung or skipped step is recorded in the JSON ({"ok": false, "rc": ..., "error": ...});
# the document is valid JSON whatever happens.
#
# Environment:
#   GPU_CHECK_DEVICE   cuda (default) or cpu
#   GPU_CHECK_SMALL    1: tiny sizes (d_model 64, 256/512 latents, batch 256, 2 steps) and no --compile
#   GPU_CHECK_COMPILE  1/0: include the --compile runs (default 1, 0 when GPU_CHECK_SMALL=1)
#   GPU_CHECK_BUDGET_S total budget in seconds (default 450)
#   PYTHON             interpreter (default: the active venv's python, else ./.venv/bin/python, else python3)
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SMALL="${GPU_CHECK_SMALL:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
if [ "$SMALL" = 1 ]; then COMPILE="${GPU_CHECK_COMPILE:-0}"; else COMPILE="${GPU_CHECK_COMPILE:-1}"; fi

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi
PYBIN="$(dirname "$PY")"
export PATH="$PYBIN:$PATH"

if [ "$SMALL" = 1 ]; then
  D_MODEL=64; DICTS="256 512"; BATCH=256; STEPS=2; WARMUP=1
  DDP_ROWS=8192; DDP_DICT=256; DDP_BATCH=256; DDP_STEPS=20
  T_BENCH=40; T_COMPILE=120; T_CACHE=40; T_DDP=60
else
  D_MODEL=2304; DICTS="16384 73728"; BATCH=4096; STEPS=20; WARMUP=3
  DDP_ROWS=32768; DDP_DICT=16384; DDP_BATCH=4096; DDP_STEPS=60
  T_BENCH=60; T_COMPILE=110; T_CACHE=60; T_DDP=100
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
STEPS_FILE="$WORK/steps.tsv"   # name \t rc \t seconds \t stdout file \t stderr file \t note
: > "$STEPS_FILE"

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }

# run_step NAME TIMEOUT CMD...: runs CMD under timeout unless the budget is spent; records the outcome
run_step() {
  local name="$1" t="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local out="$WORK/$name.out" err="$WORK/$name.err"
  : > "$out"; : > "$err"
  if [ "$left" -lt "$t" ]; then
    log "$name: skipped (${left}s of the budget left, step needs up to ${t}s)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "-1" "0" "$out" "$err" "skipped: budget (${left}s left < ${t}s)" >> "$STEPS_FILE"
    return 1
  fi
  log "$name: $*"
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$out" 2> "$err"
  local rc=$?
  local note=""
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="timed out after ${t}s"; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$out" "$err" "$note" >> "$STEPS_FILE"
  log "$name: rc=$rc"
  return "$rc"
}

# ------------------------------------------------------------------ environment
run_step env 60 "$PY" -c '
import json, torch
d = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    d["gpu"] = torch.cuda.get_device_name(0)
    d["gpu_count"] = torch.cuda.device_count()
    d["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    d["cuda"] = torch.version.cuda
print(json.dumps(d))
'

# ------------------------------------------------------------------ crosscoder bench
# bench_pass "" | --compile: the four (arch, latents) runs
bench_pass() {
  local cflag="$1" arch dict name t
  for arch in vanilla batchtopk; do
    for dict in $DICTS; do
      name="bench_${arch}_${dict}"; t=$T_BENCH
      if [ -n "$cflag" ]; then name="${name}_compile"; t=$T_COMPILE; fi
      run_step "$name" "$t" "$PY" -m crosscoder bench --arch "$arch" --d-model "$D_MODEL" --dict-size "$dict" \
        --batch-size "$BATCH" --dtype bfloat16 --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" $cflag
    done
  done
}
bench_pass ""

# ------------------------------------------------------------------ 1-GPU DDP path
CACHE="$WORK/cache"
if run_step ddp_cache "$T_CACHE" "$PY" -c "
import torch
from crosscoder.data.paired import PairedCacheWriter
rows, d = $DDP_ROWS, $D_MODEL
w = PairedCacheWriter('$CACHE', 2, d, dtype='bfloat16', shard_rows=16384)
g = torch.Generator().manual_seed(0)
for i in range(0, rows, 4096):
    w.add(torch.randn(min(4096, rows - i), 2, d, generator=g))
w.close()
print('{\"rows\": %d, \"d_model\": %d, \"dtype\": \"bfloat16\"}' % (rows, d))
"; then
  DDP_DEVICE="$DEVICE"
  TIMEV=()
  if [ -x /usr/bin/time ]; then TIMEV=(/usr/bin/time -v); fi
  SMI_PID=""
  if [ "$DEVICE" != cpu ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/smi.txt" 2> /dev/null &
    SMI_PID=$!
  fi
  run_step ddp "$T_DDP" "${TIMEV[@]}" "$PYBIN/torchrun" --standalone --nproc_per_node=1 -m crosscoder train \
    --cache "$CACHE" --out "$WORK/ddp_run" --device "$DDP_DEVICE" --dtype bfloat16 --arch batchtopk \
    --d-latent "$DDP_DICT" --batch-size "$DDP_BATCH" --num-tokens $(( DDP_BATCH * DDP_STEPS )) \
    --val-tokens "$DDP_BATCH" --val-every 0 --save-every 0 --log-every 5 --wandb off --no-progress
  if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2> /dev/null; wait "$SMI_PID" 2> /dev/null; fi
  # the latent-sharded path: 2 ranks, each half of the latents (NCCL refuses two ranks on one GPU, so on
  # CUDA it needs 2 visible GPUs; on CPU two gloo processes)
  NGPU=0
  if [ "$DEVICE" != cpu ]; then NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2> /dev/null || echo 0); fi
  if [ "$DEVICE" = cpu ] || [ "$NGPU" -ge 2 ]; then
    run_step sharded "$T_DDP" "$PYBIN/torchrun" --standalone --nproc_per_node=2 -m crosscoder train \
      --cache "$CACHE" --out "$WORK/sharded_run" --device "$DDP_DEVICE" --dtype bfloat16 --arch batchtopk \
      --d-latent "$DDP_DICT" --batch-size "$DDP_BATCH" --num-tokens $(( DDP_BATCH * DDP_STEPS )) \
      --val-tokens "$DDP_BATCH" --val-every 0 --save-every 0 --log-every 5 --wandb off --no-progress \
      --latent-shards 2
  else
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' sharded -1 0 /dev/null /dev/null \
      "not applicable: $NGPU GPU visible; 2 latent shards need 2 GPUs (NCCL refuses two ranks on one GPU)" >> "$STEPS_FILE"
  fi
fi

# ------------------------------------------------------------------ --compile runs (slowest, last)
if [ "$COMPILE" = 1 ]; then bench_pass --compile; fi

SHARDED_HELP=0

# ------------------------------------------------------------------ one JSON document
"$PY" - "$STEPS_FILE" "$WORK" "$START" "$DEVICE" "$SMALL" "$COMPILE" "$BUDGET" "$SHARDED_HELP" \
  "$D_MODEL" "$BATCH" "$DDP_DICT" "$DDP_BATCH" <<'PYEOF'
import json, re, statistics, subprocess, sys, time
from pathlib import Path

(steps_file, work, start, device, small, compile_, budget, sharded_help,
 d_model, batch, ddp_dict, ddp_batch) = sys.argv[1:13]
work = Path(work)

def tail(path, n=8):
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return []
    return [x[-300:] for x in lines[-n:]]

def last_json(path):
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None

steps = {}
for line in Path(steps_file).read_text().splitlines():
    name, rc, secs, out, err, note = (line.split("\t") + [""] * 6)[:6]
    rc = int(rc)
    rec = {"ok": rc == 0, "rc": rc, "seconds": int(secs)}
    if note:
        rec["error"] = note
    if rc != 0 and rc != -1:
        rec.setdefault("error", "exit code %d" % rc)
        rec["stderr_tail"] = tail(err)
    rec["_out"], rec["_err"] = out, err
    steps[name] = rec

def clean(rec):
    return {k: v for k, v in rec.items() if not k.startswith("_")}

doc = {
    "device": device,
    "small": small == "1",
    "compile_runs": compile_ == "1",
    "budget_s": int(budget),
}
try:
    doc["git_commit"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
    ).stdout.strip() or None
except Exception:  # noqa: BLE001
    doc["git_commit"] = None

env = steps.get("env")
if env is not None:
    doc["env"] = last_json(env["_out"]) if env["ok"] else clean(env)

bench = {}
for name, rec in steps.items():
    if not name.startswith("bench_"):
        continue
    res = last_json(rec["_out"]) if rec["ok"] else None
    if rec["ok"] and res is None:
        rec["ok"], rec["error"] = False, "no JSON on stdout"
        rec["stderr_tail"] = tail(rec["_err"])
    entry = clean(rec)
    if res is not None:
        entry["result"] = res
    bench[name[len("bench_"):]] = entry
doc["bench"] = bench
doc["bench_summary"] = [
    {
        "run": k,
        "tokens_per_s": v["result"].get("tokens_per_s"),
        "ms_per_step": v["result"].get("ms_per_step"),
        "frac_of_peak": v["result"].get("frac_of_peak"),
        "peak_tflop_s": (v["result"].get("peak_gflop_s") or 0) / 1000 or None,
        "peak_mem_mb": v["result"].get("peak_mem_mb"),
    }
    if "result" in v
    else {"run": k, "error": v.get("error")}
    for k, v in bench.items()
]

def run_rate(entry, rows, rec):
    tps = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    if tps:
        later = tps[1:] or tps
        entry["tokens_per_s"] = statistics.median(later)
        entry["tokens_per_s_logged"] = [round(x, 1) for x in tps]
        entry["steps_logged"] = rows[-1].get("step")
    elif rec.get("ok"):
        entry["ok"], entry["error"] = False, "no tokens_per_s in metrics.jsonl"

def metric_rows(path):
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows

ddp = {"config": {"arch": "batchtopk", "d_model": int(d_model), "d_latent": int(ddp_dict),
                  "batch_size": int(ddp_batch), "dtype": "bfloat16", "nproc_per_node": 1}}
cache = steps.get("ddp_cache")
if cache is None:
    ddp.update({"ok": False, "error": "not run"})
elif not cache["ok"]:
    ddp.update({"ok": False, "error": "cache: " + cache.get("error", "failed"),
                "stderr_tail": cache.get("stderr_tail", [])})
else:
    ddp["cache"] = last_json(cache["_out"])
    rec = steps.get("ddp", {"ok": False, "rc": -1, "error": "not run", "_err": ""})
    ddp.update(clean(rec))
    metrics = work / "ddp_run" / "metrics.jsonl"
    rows = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    run_rate(ddp, rows, rec)
    err = Path(rec["_err"]).read_text(errors="replace") if rec.get("_err") else ""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if m:
        ddp["host_max_rss_mb"] = round(int(m.group(1)) / 1024, 1)
    smi = work / "smi.txt"
    if smi.is_file():
        used = [int(x) for x in re.findall(r"\d+", smi.read_text())]
        if used:
            ddp["gpu_memory_used_peak_mib"] = max(used)
doc["ddp_1gpu"] = ddp
sharded = {"config": {**ddp["config"], "nproc_per_node": 2, "latent_shards": 2}}
rec = steps.get("sharded", {"ok": False, "rc": -1, "error": "not run (no cache)", "_err": ""})
sharded.update(clean(rec))
if rec.get("rc") != -1:
    run_rate(sharded, metric_rows(work / "sharded_run" / "metrics.jsonl"), rec)
doc["sharded"] = sharded
failed = [k for k, v in steps.items() if not v["ok"] and not v.get("error", "").startswith("not applicable")]
doc["failed_steps"] = failed
doc["ok"] = not failed
doc["elapsed_s"] = int(time.time() - int(start))
print(json.dumps(doc, indent=1))
PYEOF
