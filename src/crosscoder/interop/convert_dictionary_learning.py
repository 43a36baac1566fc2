"""Read ``CrossCoder`` / ``BatchTopKCrossCoder`` from the science-of-finetuning ``dictionary_learning`` fork.

Accepted inputs: a ``torch.save(state_dict)`` file (``.pt``), a ``.safetensors`` file, or a folder written
by their ``save_pretrained`` (Hugging Face ``PyTorchModelHubMixin``: ``model.safetensors`` + ``config.json``
holding the constructor arguments, e.g. ``activation_dim``, ``dict_size``, ``num_layers``, ``k``,
``code_normalization``, ``dict_class``). State dict keys (``L`` = number of models, their "layers")::

    encoder.weight [L, d, h]    encoder.bias [h]
    decoder.weight [L, h, d]    decoder.bias [L, d]
    code_normalization_id []    1 CROSSCODER, 2 SAE, 3 MIXED, 4 NONE, 5 DECOUPLED (absent: unknown)
    k []  threshold []          BatchTopKCrossCoder only
    activation_mean [L, d]  activation_std [L, d]  activation_global_scale [L]  target_rms []
                                optional input normaliser (all-NaN mean/std = no normaliser)

Their maths, for ``x [batch, L, d]``::

    x'    = (x - activation_mean) * activation_global_scale[l]          (only with a normaliser)
    f     = relu(einsum("bld,ldh->bh", x', encoder.weight) + encoder.bias)
    code  = sum_l ||decoder.weight[l, i]||   (CROSSCODER)   or   ||decoder.weight[:, i]||  (SAE, concat)
    BatchTopK, inference (use_threshold=True): f = f * (f * code > threshold)
    x_hat = einsum("bh,lhd->bld", f, decoder.weight) + decoder.bias
    x_hat = x_hat / (activation_global_scale[l] + 1e-8) + activation_mean  (only with a normaliser)

Our layout is ``W_enc = encoder.weight``, ``W_dec = decoder.weight.permute(1, 0, 2)`` (``[h, L, d]``),
CROSSCODER/SAE code normalisation map to ``l1_weighting`` ``sum``/``concat`` (the BatchTopK score), and a
normaliser is folded into the weights (its mean into the biases, its scale via :meth:`CrossCoder.fold`).

The code normalisation enters inference only through the BatchTopK threshold rule. So a ReLU
``CrossCoder`` converts exactly to ``vanilla`` whatever its code normalisation (MIXED, NONE and DECOUPLED
only change their training loss), and so does a ``BatchTopKCrossCoder`` whose threshold was never set
(``-1``: ``f * code > -1`` holds for every ``f >= 0``, so inference keeps every positive latent, which is
``relu``; ``batchtopk`` with threshold 0 would instead drop positive latents whose decoder norm is 0).
A BatchTopK file with a set threshold needs its code normalisation: from ``code_normalization_id``, the
config, or the caller (``code_normalization``); files of the older layout carry no id, and their
weighting is then refused as unknown rather than guessed. MIXED/NONE/DECOUPLED BatchTopK, per-layer
thresholds, encoder layer subsets and unknown keys have no exact equivalent and are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import CrossCoderConfig
from ..errors import CrossCoderError
from .common import (
    Conversion,
    load_safetensors,
    parse_norm_scale,
    read_json_object,
    safe_torch_load,
    tensor,
)

CODE_NORMALIZATION = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
L1_WEIGHTING = {"CROSSCODER": "sum", "SAE": "concat"}
CLASSES = ("CrossCoder", "BatchTopKCrossCoder")
KISSANE_KEYS = {"W_enc", "b_enc", "W_dec", "b_dec"}
# Names of a training folder's final model, most specific first (the fork's trainer; the original's).
FINAL_NAMES = ("model_final.pt", "ae.pt", "final.pt", "model.pt")
_STEP = re.compile(r"(\d+)\.pt$")
NORMALIZER_KEYS = ("activation_mean", "activation_std", "activation_global_scale", "target_rms")
KNOWN_KEYS = {
    "encoder.weight",
    "encoder.bias",
    "decoder.weight",
    "decoder.bias",
    "code_normalization_id",
    "k",
    "threshold",
    *NORMALIZER_KEYS,
}


def _final_pt(path: Path, notes: list[str] | None) -> Path:
    """The final model among a training folder's ``.pt`` files (``checkpoints/`` below it is ignored)."""
    pts = sorted(path.glob("*.pt"))
    if not pts:
        raise CrossCoderError(
            f"{path}: expected model.safetensors (+ config.json) or a .pt state dict in the folder, "
            "found none"
        )
    if len(pts) == 1:
        return pts[0]
    by_name = {p.name: p for p in pts}
    final = next((by_name[n] for n in FINAL_NAMES if n in by_name), None)
    why = "the final model"
    if final is None:
        stepped = sorted((int(m.group(1)), p.name, p) for p in pts if (m := _STEP.search(p.name)))
        if len(stepped) != len(pts):
            raise CrossCoderError(
                f"{path}: {len(pts)} .pt files and none is the final model "
                f"({', '.join(FINAL_NAMES)}); pass the file to convert"
            )
        final, why = stepped[-1][2], "the latest checkpoint"
    if notes is not None:
        notes.append(f"{path} holds {len(pts)} .pt files; converting {why}, {final.name}")
    return final


def resolve_dictionary_learning(
    path: str | Path, cfg_path: str | Path | None = None, notes: list[str] | None = None
) -> tuple[Path, Path | None]:
    """``(weights file, config.json or None)`` from a file or a ``save_pretrained`` / training folder.

    A training folder with several ``.pt`` files gives its final model (``model_final.pt``, ``ae.pt``, ...;
    else the highest step number); a note naming it is appended to ``notes``.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                weights = path / name
                break
        else:
            weights = _final_pt(path, notes)
        default_cfg: Path | None = path / "config.json"
    elif path.is_file():
        weights = path
        # Beside a .pt the config.json is usually the trainer's, not the model's: read it only on request.
        default_cfg = path.with_name("config.json") if path.suffix == ".safetensors" else None
    else:
        raise CrossCoderError(f"{path}: not found")
    if cfg_path is not None:
        if not Path(cfg_path).is_file():
            raise CrossCoderError(f"{cfg_path}: config file not found")
        return weights, Path(cfg_path)
    return weights, default_cfg if default_cfg is not None and default_cfg.is_file() else None


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    cfg = read_json_object(path)
    if isinstance(cfg.get("trainer"), dict):  # a dictionary_learning training config
        cfg = cfg["trainer"]
    return cfg


def _code_normalization(
    sd: dict[str, Any], cfg: dict[str, Any], where: str, given: str | None = None
) -> str | None:
    """The file's code normalisation name, from its id, its config and/or ``given``; None when unknown."""
    from_cfg = cfg.get("code_normalization", cfg.get("sparsity_loss_type"))
    from_sd = None
    if "code_normalization_id" in sd:
        cid = int(sd["code_normalization_id"].reshape(-1)[0].item())
        if cid not in CODE_NORMALIZATION:
            raise CrossCoderError(
                f"{where}: 'code_normalization_id' = {cid} is not a known code normalisation"
            )
        from_sd = CODE_NORMALIZATION[cid]
    if from_cfg is not None:
        name = str(from_cfg).upper().split(".")[-1]  # "CROSSCODER" or "CodeNormalization.CROSSCODER"
        if from_sd is not None and name != from_sd:
            raise CrossCoderError(
                f"{where}: code_normalization: config says {name} but 'code_normalization_id' says {from_sd}"
            )
    elif from_sd is not None:
        name = from_sd
    else:
        name = None
    if given is not None:
        flag = str(given).upper()
        if flag not in CODE_NORMALIZATION.values():
            raise CrossCoderError(
                f"--code-normalization: unknown value {given!r} "
                f"(choices: {', '.join(v.lower() for v in CODE_NORMALIZATION.values())})"
            )
        if name is not None and flag != name:
            raise CrossCoderError(f"--code-normalization {flag}: the file (or its config) says {name}")
        name = flag
    return name


def _normalizer(
    sd: dict[str, Any], cfg: dict[str, Any], where: str, n: int, d: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean [L, d], global_scale [L])`` when the file carries an active input normaliser."""
    if "activation_mean" not in sd and "activation_std" not in sd:
        return None
    mean = tensor(sd, "activation_mean", where, (n, d))
    std = tensor(sd, "activation_std", where, (n, d))
    if torch.isnan(mean).any() or torch.isnan(std).any():
        return None  # dictionary_learning's "no normaliser" (NaN placeholders)
    if cfg.get("keep_relative_variance") is False:
        raise CrossCoderError(
            f"{where}: keep_relative_variance = false (per-dimension normalisation) "
            "cannot be represented exactly"
        )
    if "activation_global_scale" in sd:
        scale = tensor(sd, "activation_global_scale", where, (n,))
    else:
        rms = float(tensor(sd, "target_rms", where).reshape(-1)[0]) if "target_rms" in sd else 1.0
        scale = rms / torch.sqrt(std.double().pow(2).sum(-1) + 1e-8).float()
    if not bool(torch.all(scale > 0)):
        raise CrossCoderError(f"{where}: 'activation_global_scale' must be positive, got {scale.tolist()}")
    return mean, scale


def from_dictionary_learning(
    path: str | Path,
    *,
    cfg_path: str | Path | None = None,
    norm_scale: list[float] | None = None,
    model_names: list[str] | None = None,
    site: str | None = None,
    code_normalization: str | None = None,
) -> Conversion:
    """Convert a dictionary_learning ``CrossCoder`` (-> ``vanilla``) or ``BatchTopKCrossCoder``
    (-> ``batchtopk``).

    Args:
        path: ``.pt`` / ``.safetensors`` state dict, or a ``save_pretrained`` folder.
        cfg_path: the model's ``config.json`` when it is not in the folder (or beside a ``.safetensors``).
        norm_scale: ``[n_models]`` factors multiplying raw activations, for models trained on externally
            normalised inputs; refused when the file stores its own normaliser (that one is folded in).
        model_names: names of the models, base first. site: module the activations were read at.
        code_normalization: ``crosscoder``, ``sae``, ... for files that do not record it (checked
            against the file and config when they do); needed only for BatchTopK with a set threshold.

    Returns:
        A :class:`Conversion` whose model maps ``x [batch, L, d]`` to the source's latents
        ``f [batch, h]`` (its ``encode``) and reconstructions ``[batch, L, d]`` (its ``decode``);
        batchtopk models match the source's threshold rule in eval mode.
    """
    from ..model.crosscoder import CrossCoder

    notes: list[str] = []
    weights, cfg_file = resolve_dictionary_learning(path, cfg_path, notes)
    where = str(weights)
    raw = load_safetensors(weights) if weights.suffix == ".safetensors" else safe_torch_load(weights)
    sd: dict[str, Any] = {k.replace("_orig_mod.", ""): v for k, v in raw.items()}
    cfg = _read_config(cfg_file)
    hub_cfg = sd.pop("_hub_mixin_config", None)
    if isinstance(hub_cfg, dict):
        cfg = {**hub_cfg, **cfg}
    if KISSANE_KEYS <= set(sd):
        raise CrossCoderError(
            f"{where}: this is a Kissane checkpoint (keys W_enc, W_dec, b_enc, b_dec), not "
            "dictionary_learning: use --from kissane"
        )
    unknown = sorted(set(sd) - KNOWN_KEYS)
    if unknown:
        raise CrossCoderError(
            f"{where}: unsupported key {unknown[0]!r} (not a dictionary_learning "
            "CrossCoder/BatchTopKCrossCoder state dict we can convert exactly)"
        )
    dict_class = cfg.get("dict_class")
    if dict_class is not None and dict_class not in CLASSES:
        raise CrossCoderError(
            f"{where}: dict_class {dict_class!r} is not supported (only {', '.join(CLASSES)})"
        )
    w_enc = tensor(sd, "encoder.weight", where)
    if w_enc.dim() != 3:
        raise CrossCoderError(
            f"{where}: 'encoder.weight' has shape {tuple(w_enc.shape)}, expected "
            "[num_layers, activation_dim, dict_size] (is this an SAE, not a crosscoder?)"
        )
    n, d, h = w_enc.shape
    for key, val in (("activation_dim", d), ("dict_size", h), ("num_layers", n)):
        if cfg.get(key) is not None and int(cfg[key]) != val:
            raise CrossCoderError(
                f"{where}: {key} = {cfg[key]} in the config but 'encoder.weight' has shape "
                f"{tuple(w_enc.shape)}"
            )
    layers = cfg.get("encoder_layers", cfg.get("encoder_layers_indices"))
    if layers is not None and list(layers) != list(range(n)):
        raise CrossCoderError(f"{where}: encoder_layers = {layers} (a subset of the inputs) is not supported")
    b_enc = tensor(sd, "encoder.bias", where, (h,))
    w_dec = tensor(sd, "decoder.weight", where, (n, h, d))
    b_dec = tensor(sd, "decoder.bias", where, (n, d))
    code_norm = _code_normalization(sd, cfg, where, code_normalization)

    source_batchtopk = "k" in sd or "threshold" in sd or dict_class == "BatchTopKCrossCoder"
    batchtopk = source_batchtopk
    k, threshold = 32, -1.0
    if source_batchtopk:
        for key in ("k", "threshold"):
            if key not in sd:
                raise CrossCoderError(f"{where}: missing key {key!r} (BatchTopKCrossCoder)")
        k = int(sd["k"].reshape(-1)[0].item())
        if k <= 0:
            raise CrossCoderError(f"{where}: 'k' = {k} must be positive")
        thr = tensor(sd, "threshold", where)
        if bool(torch.all(thr < 0)):
            # Never set: their inference keeps f where f * code > -1, i.e. every positive latent (relu).
            batchtopk = False
            notes.append(
                f"'threshold' = {thr.reshape(-1)[0].item():g} was never set by training, so their inference "
                "keeps every positive latent: converted exactly as vanilla (relu); k is not kept"
            )
        elif thr.numel() != 1:
            raise CrossCoderError(
                f"{where}: 'threshold' has shape {tuple(thr.shape)}: per-layer "
                "(DECOUPLED) thresholds are not supported"
            )
        else:
            threshold = float(thr.reshape(-1)[0].item())
    if batchtopk and code_norm is None:
        raise CrossCoderError(
            f"{where}: BatchTopK file without code_normalization_id, so the weighting of its threshold "
            "(CROSSCODER or SAE) is unknown; pass --code-normalization crosscoder|sae, or --cfg with "
            "the model's or trainer's config.json"
        )
    if batchtopk and code_norm not in L1_WEIGHTING:
        raise CrossCoderError(
            f"{where}: code_normalization {code_norm} cannot be represented exactly for BatchTopK "
            "(supported: CROSSCODER, SAE)"
        )
    if not batchtopk and code_norm not in L1_WEIGHTING:
        notes.append(
            f"code normalisation {code_norm or 'not recorded'}: it only enters their training loss, not "
            "encode/decode; the vanilla model records l1_weighting 'sum'"
        )

    norm = _normalizer(sd, cfg, where, n, d)
    if norm is not None and norm_scale is not None:
        raise CrossCoderError(
            "--norm-scale: the file stores its own input normaliser (activation_mean/"
            "activation_std), which is folded in; do not pass --norm-scale"
        )
    scale = parse_norm_scale(norm_scale, n)
    if model_names is not None and len(model_names) != n:
        raise CrossCoderError(f"--model-names: expected {n} names, got {len(model_names)}")

    w_dec_ours = w_dec.permute(1, 0, 2).contiguous()  # [h, L, d]
    if norm is not None:
        mean, gscale = norm
        shift = gscale[:, None].double() * mean.double()  # [L, d] = normalised-space image of the mean
        b_enc = (b_enc.double() - torch.einsum("ld,ldh->h", shift, w_enc.double())).float()
        b_dec = (b_dec.double() + shift).float()
        scale = [float(v) for v in gscale.tolist()]
        notes.append(
            "folded the stored activation normaliser (mean and scale) into the weights: the "
            "converted model takes raw activations"
        )

    cfg_ours = CrossCoderConfig(
        arch="batchtopk" if batchtopk else "vanilla",
        d_latent=h,
        k=k,
        l1_weighting=L1_WEIGHTING.get(code_norm or "", "sum"),
        n_models=n,
        d_model=d,
        model_names=list(model_names) if model_names else None,
        site=site,
    )
    model = CrossCoder(cfg_ours)
    with torch.no_grad():
        model.W_enc.copy_(w_enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(w_dec_ours)
        model.b_dec.copy_(b_dec)
        if batchtopk:
            model.arch.threshold.fill_(threshold)
    if scale is not None:
        model.fold(scale)
    model.eval()
    source = {
        "format": "dictionary_learning",
        "class": "BatchTopKCrossCoder" if source_batchtopk else "CrossCoder",
        "weights": weights.name,
        "code_normalization": code_norm,
        "activation_normalizer": norm is not None,
        "config": json.loads(json.dumps(cfg, default=str)),
    }
    return Conversion(model=model, notes=notes, source=source)
