"""User-facing errors.

Any :class:`CrossCoderError` raised below the CLI is printed by ``crosscoder`` as one line
(``error: <message>``) with exit code 2 and no traceback. Messages name the file or field at fault.
"""

from __future__ import annotations


class CrossCoderError(Exception):
    """A problem with the user's input (data, config, paths), reported without a traceback."""


class DataError(CrossCoderError):
    """Bad or inconsistent activation data (lengths, d_model, non-finite rows, missing column...)."""


class ConfigError(CrossCoderError):
    """An invalid configuration value or an unknown key in a config file."""
