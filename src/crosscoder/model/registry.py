"""The architecture registry: ``--arch NAME`` -> the class that owns its maths. It only registers and
looks up.

An architecture is one file in :mod:`crosscoder.model.architectures` that subclasses
:class:`~crosscoder.model.architectures.base.Architecture` and is decorated with ``@register("name")``;
the package's ``__init__`` imports it. See ``docs/architectures.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ARCHITECTURES: dict[str, type[Any]] = {}


def register(name: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: make ``cls`` the architecture called ``name``."""

    def deco(cls: type[Any]) -> type[Any]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        cls.name = name
        ARCHITECTURES[name] = cls
        return cls

    return deco


def get_architecture(name: str) -> type[Any]:
    """The class registered as ``name`` (``KeyError`` naming the registered ones otherwise)."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; registered: {', '.join(ARCHITECTURES)}") from None


def architecture_names() -> tuple[str, ...]:
    """Every registered name, in registration order (the ``--arch`` choices)."""
    return tuple(ARCHITECTURES)
