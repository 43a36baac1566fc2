"""One model ready to read the outputs of one or several sites through nnsight (:class:`SiteModel`), and
the loading of models and tokenizers (hub id, local folder or ``repo@revision``) with one-line errors.

``import nnsight`` happens only in :func:`wrap_nnsight` (it costs ~2.4 s).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
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


def parse_model_spec(spec: str, revision: str | None = None, flag: str = "--model") -> tuple[str, str | None]:
    """``spec`` -> ``(path or hub id, revision)``.

    An existing local path is used as is (even if it contains '@'); otherwise ``X@R`` splits on the LAST
    '@' into ``(X, R)``. ``revision`` (e.g. ``--base-revision``) is used when the spec names none; both
    naming different revisions is an error.
    """
    path, rev = spec, None
    if "@" in spec and not Path(spec).expanduser().exists():
        path, rev = spec.rsplit("@", 1)
        if not path or not rev:
            raise DataError(f"{flag} {spec}: expected ID_OR_PATH or REPO@REVISION")
    if rev is not None and revision is not None and rev != revision:
        raise DataError(f"{flag} {spec}: names revision {rev!r} but {revision!r} was also given")
    return path, rev if rev is not None else revision


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
    """``AutoTokenizer.from_pretrained`` (``spec`` may be ``repo@revision``)."""
    from transformers import AutoTokenizer

    path, revision = parse_model_spec(spec, revision)
    return from_pretrained(
        AutoTokenizer, path, "tokenizer", revision=revision, trust_remote_code=trust_remote_code
    )


def load_hf_model(
    spec: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype``, eval mode, on ``device`` (``spec`` may be
    ``repo@revision``)."""
    from transformers import AutoModelForCausalLM

    spec, revision = parse_model_spec(spec, revision)
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


class _Reached(Exception):
    """Raised by the site-order probe once every site has run (the rest of the forward is skipped)."""


@dataclass
class SiteModel:
    """One model ready to read ``sites`` (``site`` = the first): the transformers module and its nnsight
    wrapper. ``name`` is the model spec as given (``repo@revision`` included)."""

    name: str
    hf: Any
    nn: Any
    site: str
    revision: str | None = None
    sites: list[str] = field(default_factory=list)
    _order: list[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.sites:
            self.sites = [self.site]
        self.site = self.sites[0]

    def _execution_order(self, batch: dict[str, torch.Tensor]) -> list[int]:
        """Indices of ``sites`` in the order their outputs are produced (nnsight must read them in that
        order): one forward of two tokens with plain hooks, stopped once every site has run."""
        if self._order is None:
            if len(self.sites) == 1:
                self._order = [0]
                return self._order
            seen: list[int] = []

            def hook(i: int) -> Any:
                def fn(*_: Any) -> None:
                    if i not in seen:
                        seen.append(i)
                    if len(seen) == len(self.sites):
                        raise _Reached

                return fn

            handles = [
                self.hf.get_submodule(s).register_forward_hook(hook(i)) for i, s in enumerate(self.sites)
            ]
            probe = {k: v[:1, -2:] for k, v in batch.items()}
            probe["attention_mask"] = torch.ones_like(probe["attention_mask"])
            try:
                with torch.no_grad():
                    self.hf(**probe)
            except _Reached:
                pass
            finally:
                for h in handles:
                    h.remove()
            missing = [s for i, s in enumerate(self.sites) if i not in seen]
            if missing:
                raise DataError(f"--site {missing[0]}: module of {self.name} never runs in a forward")
            self._order = seen
        return self._order

    @torch.no_grad()
    def read_sites(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Left-padded ``batch`` (input_ids, attention_mask, position_ids ``[B, T]``) -> the output of every
        site, ``[B, T, d_site]`` each, in ``sites`` order; one forward, the layers after the last site
        (in execution order) do not run."""
        order = self._execution_order(batch)
        saved: dict[int, Any] = {}
        with self.nn.trace(batch) as tracer:
            for i in order:
                saved[i] = self.nn.get(self.sites[i]).output.save()
            tracer.stop()
        return [self._checked(saved[i], self.sites[i], batch) for i in range(len(self.sites))]

    def read(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The first site's output ``[B, T, d_model]`` (see :meth:`read_sites`)."""
        return self.read_sites(batch)[0]

    def _checked(self, out: Any, site: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(out, (tuple, list)):  # attention modules still return tuples
            out = out[0]
        ids = batch["input_ids"]
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(
                f"--site {site}: output of {self.name} is {shape}, expected [batch, seq, d_model]"
            )
        return out


def load_site_model(
    spec: str,
    site: str | Sequence[str],
    *,
    tokenizer: Any,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> SiteModel:
    """Load ``spec`` (hub id, local folder or ``repo@revision``) ready to read ``site`` (one module path
    or several)."""
    sites = [site] if isinstance(site, str) else list(site)
    revision = parse_model_spec(spec, revision)[1]
    hf = load_hf_model(spec, revision, dtype, device, trust_remote_code)
    for s in sites:
        check_site(hf, s, spec)
    rev = revision or getattr(hf.config, "_commit_hash", None)
    return SiteModel(
        name=spec, hf=hf, nn=wrap_nnsight(hf, tokenizer), site=sites[0], revision=rev, sites=sites
    )
