"""Generate argparse flags from config dataclasses, and merge them back over a config.

Every field with ``metadata["cli"]`` true becomes ``--field-name`` (plus its aliases); booleans get
``--flag/--no-flag``. Flags default to ``None`` so that only the flags a user typed override the values
from ``--config`` or the dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _base_type(args[0])
    return tp


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | Any, cls: type, title: str | None = None
) -> None:
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = meta.get("help", "")
        if default is not None or "default" not in help_:  # a None default explains itself in the help
            help_ = f"{help_} (default: {default})"
        if tp is bool:
            group.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        else:
            group.add_argument(
                *flags,
                dest=f.name,
                type=tp,
                default=None,
                choices=meta.get("choices"),
                metavar=f.name.upper() if not meta.get("choices") else None,
                help=help_,
            )


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }


def apply(obj: Any, values: dict[str, Any]) -> Any:
    return dataclasses.replace(obj, **values) if values else obj
