"""One model ready to read a site's output through nnsight (:class:`SiteModel`), and the loading of models
and tokenizers (hub id or local folder) with one-line errors.

``import nnsight`` happens only in :func:`wrap_nnsight` (it costs ~2.4 s).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def from_pretrained(loader: Any, spec: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(spec, **kwargs)`` (hub id or local folder) with one-line errors."""
    if spec.startswith(("/", "./", "../", "~")) and not Path(spec).expanduser().exists():
        raise DataError(f"{spec}: no such folder")
    quiet_transformers()
    try:
        return loader.from_pretrained(spec, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loading failure becomes one line naming the model
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{spec}: cannot load {what} ({type(e).__name__}: {msg})") from None


def load_tokenizer(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained``."""
    from transformers import AutoTokenizer

    return from_pretrained(
        AutoTokenizer, spec, "tokenizer", revision=revision, trust_remote_code=trust_remote_code
    )


def load_hf_model(
    spec: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype``, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    extra = {"device_map": str(device)} if device.type == "cuda" else {}  # load straight onto the GPU
    model = from_pretrained(
        AutoModelForCausalLM,
        spec,
        "model",
        revision=revision,
        dtype=TORCH_DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        **extra,
    )
    return model.to(device).eval()


def wrap_nnsight(model: Any, tokenizer: Any) -> Any:
    """Wrap a loaded transformers model for tracing (nnsight 0.8's ``TransformersModel``, the class its
    deprecated ``LanguageModel`` alias pins to ``text-generation``). nnsight edits the tokenizer it is
    given (left padding, a pad token), so it gets a copy."""
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(model, tokenizer=copy.deepcopy(tokenizer), task="text-generation")


def check_site(model: Any, site: str, name: str) -> None:
    """Raise DataError if ``site`` is not a module path of ``model``."""
    try:
        model.get_submodule(site)
    except AttributeError:
        lists = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        hint = f" (blocks live under {', '.join(lists)}.N)" if lists else ""
        raise DataError(
            f"--site {site}: no such module in {name}{hint}; `crosscoder sites {name}` lists them"
        ) from None


@dataclass
class SiteModel:
    """One model ready to read ``site``: the transformers module and its nnsight wrapper."""

    name: str
    hf: Any
    nn: Any
    site: str
    revision: str | None = None

    @torch.no_grad()
    def read(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Left-padded ``batch`` (input_ids, attention_mask, position_ids ``[B, T]``) -> site output
        ``[B, T, d_model]``; the layers after the site do not run."""
        with self.nn.trace(batch) as tracer:
            out = self.nn.get(self.site).output.save()
            tracer.stop()
        if isinstance(out, (tuple, list)):  # attention modules still return tuples
            out = out[0]
        ids = batch["input_ids"]
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(
                f"--site {self.site}: output of {self.name} is {shape}, expected [batch, seq, d_model]"
            )
        return out


def load_site_model(
    spec: str,
    site: str,
    *,
    tokenizer: Any,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> SiteModel:
    hf = load_hf_model(spec, revision, dtype, device, trust_remote_code)
    check_site(hf, site, spec)
    rev = revision or getattr(hf.config, "_commit_hash", None)
    return SiteModel(name=spec, hf=hf, nn=wrap_nnsight(hf, tokenizer), site=site, revision=rev)
