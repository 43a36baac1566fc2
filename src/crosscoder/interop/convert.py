"""Convert crosscoders trained elsewhere into this library's folder format ("bring your own crosscoder").

Sources (see ``docs/interop.md`` for the exact input formats):

* ``kissane``: Kissane's replication (:mod:`.convert_kissane`), ``vanilla``;
* ``dictionary_learning``: the science-of-finetuning fork's ``CrossCoder`` / ``BatchTopKCrossCoder``
  (:mod:`.convert_dictionary_learning`), ``vanilla`` / ``batchtopk``.

The result is a folder with ``config.json`` + ``model.safetensors`` that
:meth:`crosscoder.CrossCoder.from_pretrained` loads, written atomically. Conversions are exact: a
source feature we cannot represent with the same mathematics is refused with a one-line error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import CrossCoderError
from .common import Conversion, save_conversion
from .convert_dictionary_learning import from_dictionary_learning
from .convert_kissane import from_kissane

SOURCES: dict[str, Callable[..., Conversion]] = {
    "kissane": from_kissane,
    "dictionary_learning": from_dictionary_learning,
}


def load_foreign(
    source: str,
    path: str | os.PathLike,
    *,
    cfg_path: str | os.PathLike | None = None,
    norm_scale: list[float] | None = None,
    model_names: list[str] | None = None,
    site: str | None = None,
    code_normalization: str | None = None,
) -> Conversion:
    """Read a crosscoder of format ``source`` (a key of :data:`SOURCES`) into our model, in eval mode.

    The returned model takes ``x [batch, n_models, d_model]`` and gives the source's latents
    ``[batch, d_latent]`` and reconstructions ``[batch, n_models, d_model]``. ``code_normalization``
    (dictionary_learning only) states the weighting of files that do not record it.
    """
    if source not in SOURCES:
        raise CrossCoderError(f"--from: unknown source {source!r} (choices: {', '.join(SOURCES)})")
    extra = {}
    if code_normalization is not None:
        if source != "dictionary_learning":
            raise CrossCoderError("--code-normalization: only for --from dictionary_learning")
        extra["code_normalization"] = code_normalization
    return SOURCES[source](
        path, cfg_path=cfg_path, norm_scale=norm_scale, model_names=model_names, site=site, **extra
    )


def convert(
    source: str,
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    cfg_path: str | os.PathLike | None = None,
    norm_scale: list[float] | None = None,
    model_names: list[str] | None = None,
    site: str | None = None,
    overwrite: bool = False,
    code_normalization: str | None = None,
) -> tuple[Path, Conversion]:
    """Convert ``path`` (format ``source``) and write the crosscoder folder ``out`` atomically.

    An existing ``out`` is refused unless ``overwrite``. Returns ``(out, conversion)``; the
    conversion's ``notes`` are caveats for the user (e.g. Kissane's unstored normalisation factors).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CrossCoderError(f"{out}: already exists (pass --overwrite to replace it)")
    conv = load_foreign(
        source,
        path,
        cfg_path=cfg_path,
        norm_scale=norm_scale,
        model_names=model_names,
        site=site,
        code_normalization=code_normalization,
    )
    return save_conversion(conv, out, overwrite=overwrite), conv
