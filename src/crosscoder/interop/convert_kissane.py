"""Read crosscoders saved by Kissane's replication (``ckkissane/crosscoder-model-diff-replication``).

On disk a checkpoint is ``torch.save(state_dict)`` as ``<N>.pt`` with a JSON config ``<N>_cfg.json`` beside
it (the Hub release uses ``cc_weights.pt`` + ``cfg.json``). The state dict holds exactly::

    W_enc [2, d_in, dict_size]     b_enc [dict_size]
    W_dec [dict_size, 2, d_in]     b_dec [2, d_in]

and the forward pass, on inputs ``x [batch, 2, d_in]`` already scaled per model to mean norm
``sqrt(d_in)``, is::

    acts  = relu(einsum("bmd,mdh->bh", x, W_enc) + b_enc)        [batch, dict_size]
    x_hat = einsum("bh,hmd->bmd", acts, W_dec) + b_dec            [batch, 2, d_in]

which is our ``vanilla`` architecture with the same tensor layout. The per-model scaling factors are
not stored: pass them as ``norm_scale`` (factors multiplying raw activations) to fold them in, or the
converted model keeps working in Kissane's normalised space (``norm_scale = 1``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import CrossCoderConfig
from ..errors import CrossCoderError
from .common import Conversion, parse_norm_scale, read_json_object, safe_torch_load, tensor

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
_CKPT = re.compile(r"^(\d+)\.pt$")

NORM_NOTE = (
    "Kissane's crosscoders take activations scaled per model to mean norm sqrt(d_in) by factors "
    "that are not stored in the checkpoint; the converted model works in that normalised space "
    "(norm_scale = 1). Pass --norm-scale A B (the factors multiplying raw activations) to fold them "
    "in so that it takes raw activations."
)


def resolve_kissane(path: str | Path, cfg_path: str | Path | None = None) -> tuple[Path, Path, list[str]]:
    """Find ``(weights.pt, cfg.json, notes)`` from a ``.pt`` file or a checkpoint folder.

    A folder may hold ``cc_weights.pt`` + ``cfg.json`` (Hub layout) or ``<N>.pt`` + ``<N>_cfg.json``
    pairs (training layout; the highest ``N`` is used).
    """
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        if (path / "cc_weights.pt").is_file():
            weights, default_cfg = path / "cc_weights.pt", path / "cfg.json"
        else:
            ckpts = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _CKPT.match(p.name)))
            if not ckpts:
                raise CrossCoderError(
                    f"{path}: no Kissane checkpoint in folder (expected <N>.pt or cc_weights.pt)"
                )
            weights = ckpts[-1][1]
            default_cfg = path / f"{ckpts[-1][0]}_cfg.json"
            if len(ckpts) > 1:
                notes.append(f"{path} holds {len(ckpts)} checkpoints; converting the latest, {weights.name}")
    elif path.is_file():
        weights = path
        default_cfg = path.with_name(f"{path.stem}_cfg.json")
        if not default_cfg.is_file() and (path.parent / "cfg.json").is_file():
            default_cfg = path.parent / "cfg.json"
    else:
        raise CrossCoderError(f"{path}: not found")
    cfg = Path(cfg_path) if cfg_path is not None else default_cfg
    if not cfg.is_file():
        raise CrossCoderError(f"{cfg}: Kissane config not found (pass --cfg FILE)")
    return weights, cfg, notes


def from_kissane(
    path: str | Path,
    *,
    cfg_path: str | Path | None = None,
    norm_scale: list[float] | None = None,
    model_names: list[str] | None = None,
    site: str | None = None,
) -> Conversion:
    """Convert a Kissane checkpoint into a ``vanilla`` :class:`~crosscoder.model.CrossCoder`.

    Args:
        path: the ``.pt`` file, or a folder holding it and its config.
        cfg_path: the config JSON when it is not beside the weights.
        norm_scale: ``[n_models]`` factors multiplying raw activations into Kissane's normalised space;
            when given they are folded in (:meth:`CrossCoder.fold`) so the model takes raw activations.
        model_names: names of the models, base first (Kissane's config names only the base model).
        site: hook point; defaults to the config's ``hook_point``.

    Returns:
        A :class:`Conversion` whose model maps ``x [batch, 2, d_in]`` to the same latents
        ``[batch, dict_size]`` as Kissane's ``encode`` (on ``norm_scale * x`` when folded) and to
        reconstructions ``[batch, 2, d_in]`` (in raw units when folded).
    """
    from ..model.crosscoder import CrossCoder

    weights, cfg_file, notes = resolve_kissane(path, cfg_path)
    kcfg = read_json_object(cfg_file)
    sd = safe_torch_load(weights)
    where = str(weights)
    if "encoder.weight" in sd and "W_enc" not in sd:
        raise CrossCoderError(
            f"{where}: this is a dictionary_learning state dict (encoder.weight, decoder.weight), not a "
            "Kissane checkpoint: use --from dictionary_learning"
        )
    unknown = sorted(set(sd) - set(PARAMS))
    if unknown:
        raise CrossCoderError(
            f"{where}: unexpected key {unknown[0]!r} (a Kissane checkpoint holds only {', '.join(PARAMS)})"
        )
    w_enc = tensor(sd, "W_enc", where)
    if w_enc.dim() != 3:
        raise CrossCoderError(
            f"{where}: 'W_enc' has shape {tuple(w_enc.shape)}, expected [n_models, d_in, dict_size]"
        )
    m, d, h = w_enc.shape
    for key, val in (("d_in", d), ("dict_size", h)):
        if key in kcfg and int(kcfg[key]) != val:
            raise CrossCoderError(
                f"{cfg_file}: {key} = {kcfg[key]} but 'W_enc' has shape {tuple(w_enc.shape)}"
            )
    params = {
        "W_enc": w_enc,
        "b_enc": tensor(sd, "b_enc", where, (h,)),
        "W_dec": tensor(sd, "W_dec", where, (h, m, d)),
        "b_dec": tensor(sd, "b_dec", where, (m, d)),
    }
    scale = parse_norm_scale(norm_scale, m)
    if model_names is not None and len(model_names) != m:
        raise CrossCoderError(f"--model-names: expected {m} names, got {len(model_names)}")
    cfg = CrossCoderConfig(
        arch="vanilla",
        d_latent=h,
        n_models=m,
        d_model=d,
        l1_weighting="sum",
        dec_init_norm=float(kcfg.get("dec_init_norm", 0.08)),
        model_names=list(model_names) if model_names else None,
        site=site or kcfg.get("hook_point") or kcfg.get("site"),
    )
    model = CrossCoder(cfg)
    with torch.no_grad():
        for name, value in params.items():
            getattr(model, name).copy_(value)
    if scale is not None:
        model.fold(scale)
    else:
        notes.append(NORM_NOTE)
    model.eval()
    source = {
        "format": "kissane",
        "weights": weights.name,
        "config": kcfg,
        "norm_scale_folded": scale is not None,
    }
    return Conversion(model=model, notes=notes, source=source)
