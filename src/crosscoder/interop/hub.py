"""Share crosscoders on the Hugging Face Hub: a model card and :func:`push_to_hub`.

What is uploaded is one folder: ``config.json`` + ``model.safetensors`` (loadable with
:meth:`crosscoder.CrossCoder.from_pretrained`), a ``README.md`` model card, and ``relative_norms.png``
when the run folder has one. ``push_to_hub(..., local_dir=DIR)`` writes exactly that folder to ``DIR``
instead of uploading it: this is how the export is tested without network access, and a way to inspect
what would be published.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CrossCoderError
from ..io import atomic_path
from ..model.registry import ARCHITECTURES
from .common import CONVERTED_KEY, first_line, write_folder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
PLOT_NAME = "relative_norms.png"
DEFAULT_COMMIT_MESSAGE = "Upload crosscoder"
TAGS = ("crosscoder", "model-diffing", "sparse-autoencoder", "interpretability")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


# ---------------------------------------------------------------------------------------------- card
def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)) and all(isinstance(v, float) for v in value) and value:
        text = "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, f"{name}."))
        else:
            out.append((name, value))
    return out


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] = ("Field", "Value")) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def render_model_card(config: dict[str, Any], *, repo_id: str | None = None, has_plot: bool = False) -> str:
    """The ``README.md`` text for a crosscoder whose ``config.json`` is ``config``.

    YAML front matter (``library_name: crosscoder`` and tags), then the models and site, the
    architecture and sizes, usage, the ``train`` section and final ``metrics`` when present, the
    relative decoder norm plot when ``has_plot``, and the source of a converted model.
    """
    from ..model.losses import model_letter

    arch = str(config.get("arch", "vanilla"))
    n_models = int(config.get("n_models", 2))
    names = config.get("model_names") or []
    site = config.get("site")
    lines = ["---", "library_name: crosscoder", "tags:"]
    lines += [f"- {t}" for t in (*TAGS, arch)]
    lines += ["---", ""]
    title = " vs ".join(f"`{n}`" for n in names) if names else f"{n_models} models"
    lines += [f"# Crosscoder: {title}", ""]
    lines += [
        f"A {arch} crosscoder: one sparse dictionary of {config.get('d_latent')} latents over the paired "
        f"activations of {n_models} models{f' at `{site}`' if site else ''}, for model diffing "
        "(latents whose decoder vectors live in only one model point at what differs). "
        "Made with the `crosscoder` library.",
        "",
    ]

    lines += ["## Models", ""]
    block_models = config.get("block_models")
    sites = config.get("sites") or ([site] if site else [])
    widths = config.get("d_models")
    n_real = len(names) if block_models and names else n_models
    roles = {0: "base", 1: "fine-tuned"} if n_real == 2 else {0: "reference"}
    rows = []
    for i in range(n_real):
        name = names[i] if i < len(names) else "(not recorded)"
        rows.append((f"{model_letter(i)}{f' ({roles[i]})' if i in roles else ''}", name))
    lines += _table(rows, ("Model", "Name"))
    if block_models:  # (model, site) blocks: the acausal crosscoder's model axis
        block_sites = config.get("block_sites") or [0] * n_models
        lines += ["", "Blocks of the model axis (model, site, width):", ""]
        brows = [
            (
                str(b),
                names[m] if m < len(names) else str(m),
                sites[s] if s < len(sites) else str(s),
                widths[b] if widths else config.get("d_model"),
            )
            for b, (m, s) in enumerate(zip(block_models, block_sites, strict=False))
        ]
        lines += _table(brows, ("Block", "Model", "Site", "Width"))
    elif widths:
        lines += ["", "Widths: " + ", ".join(f"{model_letter(i)} {w}" for i, w in enumerate(widths))]
    where = ", ".join(f"`{x}`" for x in sites)
    lines += ["", f"Site (module whose output is read): {where}" if sites else "Site: not recorded", ""]

    lines += ["## Architecture", ""]
    rows = [
        ("architecture", arch),
        ("n_models", n_models),
        ("d_model", config.get("d_model")),
        ("d_latent", config.get("d_latent")),
    ]
    cls = ARCHITECTURES.get(arch)
    options = (
        []
        if cls is None
        else list(
            dict.fromkeys(c.Options for c in reversed(cls.__mro__) if getattr(c, "Options", None) is not None)
        )
    )
    for opts in options:  # the architecture's own fields (and those it inherits, e.g. matryoshka's k)
        for f in dataclasses.fields(opts):
            if config.get(f.name) is not None:
                what = f.metadata.get("help", "").split(": ", 1)[-1].split(" (")[0]
                rows.append((f"{f.name} ({what})", config[f.name]))
    if config.get("threshold") is not None:
        rows.append(("inference threshold (on decoder-norm-weighted activations)", config["threshold"]))
    rows += [
        (name, config[name])
        for name in ("dedicated_base", "dedicated_ft", "shared_latents")
        if config.get(name)
    ]
    rows += [("decoder-norm weighting", config.get("l1_weighting"))]
    scale = config.get("norm_scale")
    centred = config.get("norm_mean") is not None
    if scale is not None:
        folded = any(float(s) != 1.0 for s in scale) or centred
        rows.append(("norm_scale", scale))
        rows.append(
            (
                "norm_mean",
                "per-model mean subtracted before scaling (in config.json)"
                if centred
                else "none (mean-inclusive scaling)",
            )
        )
        rows.append(
            (
                "input",
                "raw activations (normalisation folded into the weights)"
                if folded
                else "activations as seen in training (norm_scale = 1)",
            )
        )
    lines += _table(rows)
    lines += [
        "",
        "Shapes: `W_enc [n_models, d_model, d_latent]`, `W_dec [d_latent, n_models, d_model]`, "
        "`b_enc [d_latent]`, `b_dec [n_models, d_model]`"
        + (
            "; in the file each block at its own width: `W_enc.<i> [d_i, d_latent]`, "
            "`W_dec.<i> [d_latent, d_i]`, `b_dec.<i> [d_i]` (`CrossCoder.from_pretrained` zero-pads them "
            "to the largest width)."
            if widths
            else "."
        ),
        "",
    ]

    lines += [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from crosscoder import CrossCoder",
        "",
        f'cc = CrossCoder.from_pretrained("{repo_id or "PATH_OR_REPO_ID"}")',
        (
            "x = torch.randn(8, cc.cfg.n_models, cc.cfg.d_model)"
            "  # paired activations [batch, n_models, d_model]"
        ),
        "x_hat, f = cc(x)  # reconstruction [batch, n_models, d_model], latents [batch, d_latent]",
        "```",
        "",
    ]

    train = config.get("train")
    if isinstance(train, dict) and train:
        lines += ["## Training configuration", ""] + _table(_flatten(train)) + [""]
    metrics = config.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines += ["## Final metrics", ""] + _table(_flatten(metrics), ("Metric", "Value")) + [""]
    if has_plot:
        lines += [
            "## Relative decoder norms",
            "",
            "Relative decoder norm of each latent, `|d_B| / (|d_A| + |d_B|)`: "
            "0 = base only, 0.5 = shared, 1 = fine-tuned only.",
            "",
            f"![Relative decoder norms]({PLOT_NAME})",
            "",
        ]
    conv = config.get(CONVERTED_KEY)
    if isinstance(conv, dict) and conv:
        rows = [(k, v) for k, v in conv.items() if k != "config"]
        lines += ["## Converted from", ""] + _table(rows) + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` (atomically) from ``folder/config.json``; returns its path.

    The plot ``relative_norms.png`` is embedded when it is in ``folder``.
    """
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CrossCoderError(f"{cfg_path}: not found (expected a crosscoder folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise CrossCoderError(f"{cfg_path}: cannot parse ({first_line(e)})") from None
    text = render_model_card(config, repo_id=repo_id, has_plot=(folder / PLOT_NAME).is_file())
    target = folder / CARD_NAME
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return target


# ---------------------------------------------------------------------------------------------- push
def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def stage_folder(model_or_dir: Any, target: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write into the existing folder ``target`` exactly what :func:`push_to_hub` uploads.

    ``model_or_dir`` is a :class:`~crosscoder.CrossCoder` or a run/model folder; a folder is first
    loaded with :meth:`CrossCoder.from_pretrained` (so a broken folder is refused before any upload),
    then its ``config.json`` (with its ``train`` / ``metrics`` sections), ``model.safetensors`` and
    ``relative_norms.png`` are copied unchanged.
    """
    from ..model.crosscoder import CrossCoder

    target = Path(target)
    if isinstance(model_or_dir, CrossCoder):
        model_or_dir.save_pretrained(target)
    else:
        src = Path(model_or_dir)
        if not src.is_dir():
            raise CrossCoderError(
                f"{src}: not a folder (expected a run folder with config.json and model.safetensors)"
            )
        CrossCoder.from_pretrained(src)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            _copy(src / name, target / name)
        if (src / PLOT_NAME).is_file():
            _copy(src / PLOT_NAME, target / PLOT_NAME)
    write_model_card(target, repo_id=repo_id)
    return target


def push_to_hub(
    model_or_dir: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    local_dir: str | os.PathLike | None = None,
) -> str:
    """Upload a crosscoder (a :class:`~crosscoder.CrossCoder` or a run folder) to the Hub repo ``repo_id``.

    Creates the repo if needed (``private`` applies only then), and the branch ``revision`` if given,
    then uploads ``config.json``, ``model.safetensors``, ``README.md`` (model card) and
    ``relative_norms.png`` (when present) in one commit. ``token`` defaults to the cached login /
    ``HF_TOKEN``.

    With ``local_dir``, nothing is uploaded: the exact folder that would be uploaded is written to
    ``local_dir`` (which must not exist, or be empty) -- the offline/test path.

    Returns the commit URL (or ``local_dir``).
    """
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise CrossCoderError(f"{repo_id!r}: not a valid Hub repo id (expected 'user/name')")
    if local_dir is not None:
        out = Path(local_dir)
        empty = out.is_dir() and not any(out.iterdir())
        if out.exists() and not empty:
            raise CrossCoderError(f"{out}: already exists and is not empty (choose a new local folder)")
        return str(write_folder(out, lambda tmp: stage_folder(model_or_dir, tmp, repo_id), overwrite=empty))
    with tempfile.TemporaryDirectory(prefix="crosscoder-push-") as tmp:
        stage_folder(model_or_dir, tmp, repo_id)
        try:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
            )
        except Exception as e:  # noqa: BLE001 - auth, network and Hub errors -> one line
            raise CrossCoderError(
                f"{repo_id}: upload to the Hugging Face Hub failed ({type(e).__name__}: {first_line(e)})"
            ) from None
    return str(getattr(info, "commit_url", None) or url)
