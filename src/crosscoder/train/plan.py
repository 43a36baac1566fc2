"""Memory and disk planner: size a run before paying for it (``crosscoder plan``).

Per rank, with ``P = n_models * d_model * d_latent * 2 + d_latent + n_models * d_model`` parameters and
a local batch ``b = batch_size / world_size``:

* parameters, gradients: ``P * 4`` bytes each (float32 master weights, also under bfloat16 autocast);
* Adam state: ``2 * P * 4``; DDP gradient buckets: ``P * 4`` more when ``world_size > 1``;
* activations (peak of one step, ``a`` = bytes of the compute dtype): dense-latent architectures
  (vanilla, jumprelu) keep about ``4 * b * d_latent`` values (pre-activations, latents, their
  gradients) and ``3 * b * n_models * d_model`` (input, reconstruction, error); sparse ones (batchtopk,
  matryoshka) keep ``2 * b * d_latent`` (pre-activations, scores) plus the ``k * b`` selected entries;
  AuxK adds ``b * d_latent``;
* a paired cache of N tokens: ``N * n_models * d_model * bytes(dtype) + N * 24`` (the int64 index).

Several models, sites and widths: the model axis holds ``n_blocks = n_models * n_sites`` blocks (one per
model and site, acausal crosscoder) and ``d_model`` is the largest width: narrower models are
zero-padded, in memory and in the cache, so every formula above uses ``n_blocks`` and the largest width;
``padding_fraction`` says how much of it is padding (``1 - sum of real widths / (n_blocks * d_model)``).

These are estimates (allocator overheads and framework buffers come on top: budget ~10-20% more).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..model.registry import get_architecture

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryPlan:
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    ddp_bytes: int
    activation_bytes: int
    total_bytes_per_rank: int
    local_batch: int
    cache_bytes: int
    n_blocks: int = 2
    d_model: int = 0
    padding_fraction: float = 0.0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def plan(
    d_model: int,
    dict_size: int,
    batch_size: int,
    n_models: int = 2,
    arch: str = "batchtopk",
    k: int = 32,
    aux_k: int = 0,
    dtype: str = "float32",
    world_size: int = 1,
    cache_tokens: int = 0,
    cache_dtype: str = "bfloat16",
    d_models: list[int] | None = None,
    n_sites: int = 1,
) -> MemoryPlan:
    """Estimate per-rank memory (bytes) of a training step and the disk of a cache of ``cache_tokens``.

    ``d_models``: each model's width when they differ (then ``n_models = len(d_models)`` and ``d_model``
    is ignored); ``n_sites``: sites read per model (blocks = models x sites)."""
    widths = list(d_models) if d_models else [d_model] * n_models
    real = sum(widths) * n_sites
    n_models, d_model = len(widths) * n_sites, max(widths)  # the model axis: blocks, padded width
    p = 2 * n_models * d_model * dict_size + dict_size + n_models * d_model
    param = 4 * p
    b = -(-batch_size // world_size)
    a = BYTES[dtype]
    md = n_models * d_model
    if get_architecture(arch).dense_latents:
        act = a * (4 * b * dict_size + 3 * b * md)
    else:
        act = a * (2 * b * dict_size + 3 * b * md) + 16 * k * b
    if aux_k:
        act += a * b * dict_size
    ddp = param if world_size > 1 else 0
    total = param + param + 2 * param + ddp + act
    cache = cache_tokens * (md * BYTES[cache_dtype] + 24)
    pad = 1.0 - real / (n_models * d_model)
    return MemoryPlan(p, param, param, 2 * param, ddp, act, total, b, cache, n_models, d_model, pad)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
