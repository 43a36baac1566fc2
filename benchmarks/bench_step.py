"""Our training step against the plain dense reference step, in one process; prints one JSON object.

    python benchmarks/bench_step.py --arch batchtopk --d-model 256 --dict-size 8192 --batch-size 2048 \
        --k 32 --threads 2 --steps 3 --rounds 3

Both steps start from the same weights and see the same batches. Each round times ``steps`` steps of
ours and ``steps`` of the reference, alternating one step of each, every step followed by one timed
matmul-peak GEMM (``[batch, n_models * d_model] x [n_models * d_model, dict_size]``), so that both
implementations and the peak see the same machine load. Reported times are medians over all timed
steps; ``speedup`` = reference time / our time. ``first_l2_rel_diff`` compares the first step's l2
loss of both (same maths, same weights and batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_step import ReferenceStep  # noqa: E402

from crosscoder.bench import (  # noqa: E402
    add_shape_arguments,
    build_step,
    dead_set,
    gemm_seconds,
    step_flops,
    synthetic_batches,
)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p, arch="batchtopk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each implementation first")
    p.add_argument("--aux-k", type=int, default=None)
    p.add_argument("--dead-frac", type=float, default=0.0, help="fraction of latents held dead (AuxK runs)")
    p.add_argument(
        "--ref-select",
        choices=("sort", "topk"),
        default="sort",
        help="reference BatchTopK: sort the flattened scores (default) or one flattened topk",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    total = a.warmup + a.steps * a.rounds
    ours = build_step(a.arch, a.d_model, a.dict_size, a.batch_size, a.k, total, dev, aux_k=a.aux_k)
    init = {n: getattr(ours.model, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    ref = ReferenceStep(
        a.arch,
        a.n_models,
        a.d_model,
        a.dict_size,
        a.k,
        aux_k=ours.aux_k,
        total_steps=total,
        dead_tokens=ours.dead_tokens,
        init=init,
        select=a.ref_select,
    )
    xs = synthetic_batches(4, a.batch_size, a.n_models, a.d_model, dev)
    dead_idx = dead_set(a.dict_size, a.dead_frac)
    d = a.n_models * a.d_model
    bufs: dict = {}
    t_ours, t_ref, peaks = [], [], []
    first: dict[str, float] = {}

    def run_ours(i: int) -> float:
        ours.since_fired[dead_idx] = ours.dead_tokens
        t = time.perf_counter()
        ours(xs[i % len(xs)], i)
        return time.perf_counter() - t

    def run_ref(i: int) -> float:
        ref.since_fired[dead_idx] = ref.dead_tokens
        t = time.perf_counter()
        m = ref.step(xs[i % len(xs)])
        dt = time.perf_counter() - t
        first.setdefault("ref", m["l2_loss"])
        return dt

    for i in range(a.warmup):
        run_ours(i)
        if i == 0:
            first["ours"] = ours.read_metrics()["l2_loss"]
        run_ref(i)
    i_ours = i_ref = a.warmup
    for _ in range(a.rounds * a.steps):
        t_ours.append(run_ours(i_ours))
        i_ours += 1
        peaks += gemm_seconds(a.batch_size, d, a.dict_size, dev, torch.float32, 1, bufs)
        t_ref.append(run_ref(i_ref))
        i_ref += 1
        peaks += gemm_seconds(a.batch_size, d, a.dict_size, dev, torch.float32, 1, bufs)
    ms_o, ms_r = statistics.median(t_ours), statistics.median(t_ref)
    peak = 2.0 * a.batch_size * d * a.dict_size / statistics.median(peaks) / 1e9
    flops_o = step_flops(a.arch, a.batch_size, d, a.dict_size, a.k, int(dead_idx.numel()), ours.aux_k)
    flops_dense = step_flops("vanilla", a.batch_size, d, a.dict_size, a.k)
    out = {
        "arch": a.arch,
        "d_model": a.d_model,
        "n_models": a.n_models,
        "dict_size": a.dict_size,
        "batch_size": a.batch_size,
        "k": a.k,
        "threads": a.threads,
        "aux_k": ours.aux_k,
        "dead_frac": a.dead_frac,
        "ref_select": a.ref_select if a.arch == "batchtopk" else None,
        "steps_timed_each": len(t_ours),
        "peak_gflop_s": peak,
        "ours": {
            "ms_per_step": ms_o * 1e3,
            "tokens_per_s": a.batch_size / ms_o,
            "achieved_gflop_s": flops_o / ms_o / 1e9,
            "frac_of_peak": flops_o / ms_o / 1e9 / peak,
        },
        "reference": {
            "ms_per_step": ms_r * 1e3,
            "tokens_per_s": a.batch_size / ms_r,
            "dense_gflop_s": flops_dense / ms_r / 1e9,
            "frac_of_peak": flops_dense / ms_r / 1e9 / peak,
        },
        "speedup": ms_r / ms_o,
        "first_l2_rel_diff": abs(first["ours"] - first["ref"]) / max(abs(first["ref"]), 1e-12),
        "torch": torch.__version__,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
