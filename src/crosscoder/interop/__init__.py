"""Interoperability: convert crosscoders from other codebases, share ours on the Hugging Face Hub.

* :func:`crosscoder.interop.convert.convert` (and :func:`load_foreign`, returning the model without
  writing it): Kissane's replication and the science-of-finetuning ``dictionary_learning`` fork -> our
  folder format;
* :func:`push_to_hub` / :func:`write_model_card` (:mod:`crosscoder.interop.hub`).

Submodules are imported on use (``huggingface_hub`` only when pushing). See ``docs/interop.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_foreign", "push_to_hub", "write_model_card"]


def __getattr__(name: str) -> Any:
    if name == "load_foreign":
        from .convert import load_foreign

        return load_foreign
    if name in ("push_to_hub", "write_model_card"):
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
