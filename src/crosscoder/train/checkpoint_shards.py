"""Checkpoints of latent-sharded runs (``--latent-shards S``): one file per shard, read back on any mesh.

A sharded checkpoint is an ordinary ``step_<N>`` folder (:mod:`crosscoder.train.checkpoint`) plus
``shard_<s>_of_<S>.safetensors`` for ``s < S``, each written by the rank holding shard ``s`` of the first
data-parallel replica: that shard's slices of the weights (``W_enc``, ``W_dec``, ``b_enc``, the
architecture's per-latent tensors), its dead-latent counters and its Adam moments
(``optimizer.<name>.exp_avg``, ``optimizer.<name>.exp_avg_sq``). Rank 0 writes the rest as for an
unsharded run: ``model.safetensors`` with the replicated tensors (``b_dec``, BatchTopK's threshold),
``optimizer.pt`` without the sharded moments, ``scheduler.pt``, ``rng.pt``, and ``state.json`` recording
``latent_shards``, the latent dimension of every sharded tensor and the byte size of every file (shards
included). Rank 0 renames the folder into place only after every shard reported its file written
(fsynced), so a ``step_<N>`` folder is complete or absent; when any rank fails (disk full) the temp
folder is removed on every rank's word and the earlier checkpoints stay.

:func:`assemble` (called by :func:`~crosscoder.train.checkpoint.load_checkpoint`) concatenates the shards
into the whole dictionary's state and Adam state, the same structure an unsharded checkpoint holds: any
checkpoint resumes on any mesh (the trainer slices it again for its own shards).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..distributed import Dist
from ..io import atomic_dir, fsync_dir
from ..model.sharding import latent_dims, parameter_names
from .checkpoint import (
    CheckpointError,
    _fsync_file,
    _write_file,
    os_error,
    prune,
    raise_write_error,
    rng_state,
    write_error,
)

COUNTERS = "tokens_since_fired"


def shard_file(index: int, count: int) -> str:
    return f"shard_{index}_of_{count}.safetensors"


def _shard_payload(
    model: Any, since_fired: torch.Tensor, opt_state: dict[str, Any]
) -> dict[str, torch.Tensor]:
    dims, names = latent_dims(model), parameter_names(model)
    sd = model.state_dict()
    out = {k: sd[k] for k in dims}
    out[COUNTERS] = since_fired
    for i, st in opt_state["state"].items():
        if names[int(i)] in dims:
            out.update({f"optimizer.{names[int(i)]}.{k}": v for k, v in st.items() if v.dim() > 0})
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _write_shard(
    tmp: Path, model: Any, since_fired: torch.Tensor, opt_state: dict[str, Any]
) -> BaseException | None:
    """Write this shard's file into ``tmp``; an OS error (disk full) is returned, anything else raised."""
    path = tmp / shard_file(model.shard.index, model.shard.count)
    try:
        save_file(_shard_payload(model, since_fired, opt_state), str(path))
        _fsync_file(path)
    except Exception as e:  # noqa: BLE001
        if os_error(e) is None:
            raise
        return e
    return None


def save_sharded_checkpoint(
    out: Path,
    step: int,
    model: Any,
    since_fired: torch.Tensor,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
    world: Dist,
    data: Dist,
) -> Path | None:
    """Every rank calls this; see the module docstring. Returns the folder on rank 0, ``None`` elsewhere."""
    root = Path(out) / "checkpoints"
    target = root / f"step_{step}"
    writer = data.rank == 0  # the first replica's ranks, one per shard
    opt_state = optimizer.state_dict()
    if not world.is_main:
        tmp = world.broadcast_object(None)
        error = _write_shard(Path(tmp), model, since_fired, opt_state) if tmp and writer else None
        if tmp and world.any_rank(error is not None):
            if error is not None:
                raise write_error(out, target, error, "a checkpoint shard") from None
            raise CheckpointError(
                f"{target}: another rank could not write its shard; the earlier checkpoints stay"
            )
        return None
    if target.exists():  # same step saved again (e.g. a signal right after a periodic save)
        world.broadcast_object("")
        return target
    dims, names = latent_dims(model), parameter_names(model)
    count = model.shard.count
    try:
        with atomic_dir(target) as tmp:
            world.broadcast_object(str(tmp))
            error = _write_shard(tmp, model, since_fired, opt_state)
            if world.any_rank(error is not None):
                if error is not None:
                    raise error
                raise CheckpointError(
                    f"{target}: another rank could not write its shard; the earlier checkpoints stay"
                )
            replicated = {
                k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in dims
            }
            save_file(replicated, str(tmp / "model.safetensors"))
            _fsync_file(tmp / "model.safetensors")
            rest = {
                "state": {
                    i: {k: v for k, v in st.items() if not (names[int(i)] in dims and v.dim() > 0)}
                    for i, st in opt_state["state"].items()
                },
                "param_groups": opt_state["param_groups"],
            }
            for name, obj in (
                ("optimizer.pt", rest),
                ("scheduler.pt", scheduler.state_dict()),
                ("rng.pt", rng_state()),
            ):
                _write_file(tmp / name, lambda fh, obj=obj: torch.save(obj, fh))
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            meta = {
                **state,
                "latent_shards": count,
                "latent_dims": {**dims, COUNTERS: 0},
                "param_names": names,
                "files": sizes,
            }
            text = json.dumps(meta, indent=2) + "\n"
            _write_file(tmp / "state.json", lambda fh: fh.write(text.encode()))
        fsync_dir(root)
    except Exception as e:  # noqa: BLE001 - an OS error becomes one line, anything else propagates
        raise_write_error(out, target, e, "a checkpoint")
    prune(out, keep)
    return target


def assemble(path: Path, state: dict[str, Any], loaded: dict[str, Any], damaged: Any) -> None:
    """Fill ``loaded["tensors"]`` and ``loaded["optimizer"]`` (read from a sharded checkpoint's rank-0
    files) with the whole dictionary, from the shard files; ``damaged(name, why)`` makes the error."""
    count, dims, names = int(state["latent_shards"]), state["latent_dims"], state["param_names"]
    shards = []
    for i in range(count):
        name = shard_file(i, count)
        if not (path / name).is_file():
            raise damaged(name, "missing")
        try:
            shards.append(load_file(str(path / name)))
        except Exception as e:  # noqa: BLE001
            raise damaged(name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    tensors = loaded["tensors"]
    for k, dim in dims.items():
        tensors[k] = torch.cat([s[k] for s in shards], dim=dim)
    for i, st in loaded["optimizer"]["state"].items():
        n = names[int(i)]
        if n in dims:
            for key in [k.rsplit(".", 1)[1] for k in shards[0] if k.startswith(f"optimizer.{n}.")]:
                st[key] = torch.cat([s[f"optimizer.{n}.{key}"] for s in shards], dim=dims[n])
