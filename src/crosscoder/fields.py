"""The one helper that declares a config field: default, help text, CLI aliases and choices.

Used by :mod:`crosscoder.config` and by each architecture's ``Options`` dataclass (its own config fields);
:mod:`crosscoder.cli.args` turns every field whose ``cli`` is true into a ``--field-name`` flag.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(
    default: Any, help: str, *, aliases: tuple[str, ...] = (), choices: tuple | None = None, cli: bool = True
) -> Any:
    """A dataclass field with the metadata the CLI generator reads (mutable defaults are copied)."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
