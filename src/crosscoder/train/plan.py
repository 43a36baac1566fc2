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

Latent sharding (``--latent-shards S``, ``W`` ranks: ``W / S`` data-parallel replicas of ``S`` shards):
each rank holds ``1 / S`` of every per-latent tensor (``W_enc``, ``W_dec``, ``b_enc`` and their gradients
and Adam moments) plus the replicated ``b_dec``; its local batch is ``batch_size * S / W`` rows, its
activations span ``d_latent / S`` latents plus the decoder's partial sum ``[b, n_models * d_model]``
(summed over the shards) and, for the BatchTopK family, the candidate scores gathered from every rank
(``W * k * batch_size * S / W`` floats). A rank never holds the whole dictionary: it draws its shard of
the initial weights from the seed's random stream (the rows before it in 64 MiB chunks, dropped), and only
the final model is assembled, on the host. :func:`shards_needed` finds the smallest ``S`` that fits.

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
    latent_shards: int = 1

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
    latent_shards: int = 1,
) -> MemoryPlan:
    """Estimate per-rank memory (bytes) of a training step and the disk of a cache of ``cache_tokens``.

    ``d_models``: each model's width when they differ (then ``n_models = len(d_models)`` and ``d_model``
    is ignored); ``n_sites``: sites read per model (blocks = models x sites); ``latent_shards``: ranks the
    latents are split over (``world_size`` must be a multiple)."""
    widths = list(d_models) if d_models else [d_model] * n_models
    real = sum(widths) * n_sites
    n_models, d_model = len(widths) * n_sites, max(widths)  # the model axis: blocks, padded width
    md = n_models * d_model
    s = latent_shards
    h = -(-dict_size // s)  # latents per rank
    p = 2 * md * h + h + md  # per rank: its shard and the replicated b_dec
    param = 4 * p
    replicas = max(1, world_size // s)
    b = -(-batch_size // replicas)
    a = BYTES[dtype]
    if get_architecture(arch).dense_latents:
        act = a * (4 * b * h + 3 * b * md)
    else:
        act = a * (2 * b * h + 3 * b * md) + 16 * k * b * (replicas if s > 1 else 1)
        if s > 1:  # candidate scores gathered from every rank
            act += 4 * world_size * k * b * replicas
    if s > 1:  # the decoder's partial sum and its reduced copy
        act += 2 * 4 * b * md
    if aux_k:
        act += a * b * h
    ddp = param if replicas > 1 else 0
    total = param + param + 2 * param + ddp + act
    cache = cache_tokens * (md * BYTES[cache_dtype] + 24)
    pad = 1.0 - real / (n_models * d_model)
    return MemoryPlan(p, param, param, 2 * param, ddp, act, total, b, cache, n_models, d_model, pad, s)


#: Allocator and framework overhead assumed on top of :func:`plan`'s estimate when deciding what fits.
OVERHEAD = 1.15


def shards_needed(device_bytes: float, world_size: int, **kwargs: object) -> int | None:
    """The smallest latent-shard count ``S`` (a divisor of ``world_size``) whose per-rank estimate, with
    :data:`OVERHEAD`, fits ``device_bytes``; ``None`` when even ``S = world_size`` does not."""
    for s in range(1, world_size + 1):
        if world_size % s == 0:
            pl = plan(world_size=world_size, latent_shards=s, **kwargs)  # type: ignore[arg-type]
            if pl.total_bytes_per_rank * OVERHEAD <= device_bytes:
                return s
    return None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
