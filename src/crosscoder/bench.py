"""Benchmark of the full training step (``crosscoder bench``; methodology in ``docs/performance.md``).

:func:`run_bench` builds a crosscoder and the trainer's :class:`~crosscoder.train.step.TrainStep`
(forward, losses, backward, clipping, Adam, schedules, dead-latent counters, on-device metrics) and
times it on synthetic batches after warm-up. In the same process it times the machine's matmul peak
on the step's dominant GEMM shape ``[batch, n_models * d_model] x [n_models * d_model, dict_size]``,
one peak GEMM after every timed step so that both see the same load. Numbers are medians.

FLOPs counted per step (``D = n_models * d_model``, ``H = dict_size``, ``B = batch``):

* architectures with dense latents (vanilla, jumprelu): ``10 B D H`` (encoder, decoder, and three backward
  GEMMs; no gradient w.r.t. the input);
* sparse ones (batchtopk, matryoshka): ``2 B D H`` (dense encoder) ``+ 8 N D`` over the ``N = k B``
  selected entries (sparse decode, its two backward products, the sparse encoder backward) ``+`` the
  AuxK work over the dead latents (``8 B n_dead D`` as GEMMs over the dead columns, or ``8 B aux_k D``
  as sparse entries).
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from typing import Any

import torch

from .config import CrossCoderConfig, TrainConfig
from .errors import CrossCoderError
from .model import CrossCoder, architecture_names, get_architecture
from .model.selection import AUX_SPARSE_DENSITY


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_seconds(
    m: int,
    k: int,
    n: int,
    device: torch.device,
    dtype: torch.dtype,
    reps: int = 1,
    bufs: dict[str, torch.Tensor] | None = None,
) -> list[float]:
    """Wall times of ``reps`` GEMMs ``[m, k] x [k, n]`` (buffers reused through ``bufs``)."""
    bufs = {} if bufs is None else bufs
    key = (m, k, n, str(device), dtype)
    if bufs.get("key") != key:
        g = torch.Generator(device="cpu").manual_seed(0)
        bufs.update(
            key=key,
            a=torch.randn(m, k, generator=g).to(device, dtype),
            b=torch.randn(k, n, generator=g).to(device, dtype),
            c=torch.empty(m, n, device=device, dtype=dtype),
        )
        torch.mm(bufs["a"], bufs["b"], out=bufs["c"])  # warm-up
    out = []
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        torch.mm(bufs["a"], bufs["b"], out=bufs["c"])
        synchronize(device)
        out.append(time.perf_counter() - t)
    return out


def step_flops(arch: str, b: int, d: int, h: int, k: int, n_dead: int = 0, aux_k: int = 0) -> float:
    """Useful matmul FLOPs of one training step of our implementation (see the module docstring)."""
    if get_architecture(arch).dense_latents:
        flops = 10.0 * b * d * h
    else:
        flops = 2.0 * b * d * h + 8.0 * min(k * b, b * h) * d
    if aux_k > 0 and n_dead > 0:
        ka = min(aux_k, n_dead)
        cols = n_dead if ka >= AUX_SPARSE_DENSITY * n_dead else ka
        flops += 8.0 * b * cols * d
    return flops


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def build_step(
    arch: str,
    d_model: int,
    dict_size: int,
    batch_size: int,
    k: int,
    total_steps: int,
    device: torch.device,
    dtype: str = "float32",
    compile: bool = False,
    n_models: int = 2,
    aux_k: int | None = None,
    seed: int = 0,
) -> Any:
    """A crosscoder and its trainer step with the default training configuration."""
    from .train.step import TrainStep

    cfg = CrossCoderConfig(arch=arch, d_latent=dict_size, k=k, n_models=n_models, d_model=d_model)
    model = CrossCoder(cfg, generator=torch.Generator().manual_seed(seed)).to(device)
    model.train()
    tc = TrainConfig(
        batch_size=batch_size,
        num_tokens=batch_size * total_steps,
        dtype=dtype,
        compile=compile,
        aux_k=aux_k,
        device=str(device),
    )
    return TrainStep(model, tc, total_steps, device)


def synthetic_batches(
    n: int, batch_size: int, n_models: int, d_model: int, device: torch.device, seed: int = 0
) -> list[torch.Tensor]:
    """``n`` Gaussian batches ``[batch_size, n_models, d_model]`` (unit variance, norm ~ sqrt(d_model))."""
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(batch_size, n_models, d_model, generator=g).to(device) for _ in range(n)]


def dead_set(dict_size: int, dead_frac: float, seed: int = 0) -> torch.Tensor:
    """Indices of the latents forced dead (a fixed random ``dead_frac`` of them)."""
    n = int(round(dead_frac * dict_size))
    return torch.randperm(dict_size, generator=torch.Generator().manual_seed(seed + 2))[:n]


def run_bench(
    arch: str = "vanilla",
    d_model: int = 256,
    dict_size: int = 8192,
    batch_size: int = 2048,
    k: int = 32,
    steps: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    compile: bool = False,
    threads: int | None = None,
    n_models: int = 2,
    aux_k: int | None = None,
    dead_frac: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` and return the result as a JSON-able dict."""
    if arch not in architecture_names():
        raise CrossCoderError(
            f"--arch: unknown architecture {arch!r} (choices: {', '.join(architecture_names())})"
        )
    for name, v in (
        ("d-model", d_model),
        ("dict-size", dict_size),
        ("batch-size", batch_size),
        ("k", k),
        ("steps", steps),
    ):
        if v <= 0:
            raise CrossCoderError(f"--{name}: must be positive, got {v}")
    if not 0.0 <= dead_frac <= 1.0:
        raise CrossCoderError(f"--dead-frac: must be in [0, 1], got {dead_frac}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CrossCoderError("--device cuda: CUDA is not available on this machine")
    if threads:
        torch.set_num_threads(threads)
    step = build_step(
        arch, d_model, dict_size, batch_size, k, warmup + steps, dev, dtype, compile, n_models, aux_k, seed
    )
    xs = synthetic_batches(min(4, warmup + steps), batch_size, n_models, d_model, dev, seed)
    dead_idx = dead_set(dict_size, dead_frac, seed).to(dev)
    d = n_models * d_model
    peak_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    bufs: dict[str, torch.Tensor] = {}
    times, peaks, faults = [], [], 0
    for i in range(warmup + steps):
        step.since_fired[dead_idx] = step.dead_tokens  # keep the forced-dead latents dead
        if i == warmup:
            synchronize(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            faults = _minflt()
        synchronize(dev)
        t = time.perf_counter()
        step(xs[i % len(xs)], i)
        synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            peaks += gemm_seconds(batch_size, d, dict_size, dev, peak_dtype, 1, bufs)
    faults = _minflt() - faults
    metrics = step.read_metrics()
    ms = statistics.median(times)
    flops = step_flops(arch, batch_size, d, dict_size, k, int(dead_idx.numel()), step.aux_k)
    peak = 2.0 * batch_size * d * dict_size / statistics.median(peaks) / 1e9
    achieved = flops / ms / 1e9
    mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mb()
    out = {
        "arch": arch,
        "device": str(dev),
        "dtype": dtype,
        "compile": compile,
        "threads": torch.get_num_threads(),
        "n_models": n_models,
        "d_model": d_model,
        "dict_size": dict_size,
        "batch_size": batch_size,
        "k": k,
        "aux_k": step.aux_k,
        "dead_frac": dead_frac,
        "steps": steps,
        "warmup": warmup,
        "tokens_per_s": batch_size / ms,
        "ms_per_step": ms * 1e3,
        "ms_per_step_mean": statistics.fmean(times) * 1e3,
        "ms_per_step_min": min(times) * 1e3,
        "gflop_per_step": flops / 1e9,
        "achieved_gflop_s": achieved,
        "peak_gflop_s": peak,
        "peak_shape": [batch_size, d, dict_size],
        "peak_dtype": str(peak_dtype).split(".")[-1],
        "frac_of_peak": achieved / peak,
        "peak_mem_mb": mem,
        "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "process_max_rss",
        "loss": metrics.get("loss", math.nan),
        "torch": torch.__version__,
    }
    if dev.type == "cpu":
        out["minor_faults_per_step"] = faults / steps
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def add_shape_arguments(p: argparse.ArgumentParser, arch: str = "vanilla") -> None:
    """The step-shape flags shared by ``crosscoder bench`` and the scripts in ``benchmarks/``."""
    p.add_argument(
        "--arch", choices=architecture_names(), default=arch, help=f"architecture (default: {arch})"
    )
    p.add_argument("--d-model", type=int, default=256, help="activation width per model (default: 256)")
    p.add_argument("--n-models", type=int, default=2, help="number of models (default: 2)")
    p.add_argument(
        "--dict-size",
        "--d-latent",
        dest="dict_size",
        type=int,
        default=8192,
        help="number of latents (default: 8192)",
    )
    p.add_argument("--batch-size", type=int, default=2048, help="tokens per step (default: 2048)")
    p.add_argument("--k", type=int, default=32, help="batchtopk: mean active latents per token (default: 32)")
