"""One file per architecture; importing this package registers each (see ``docs/architectures.md``).

Adding an architecture: write ``<name>.py`` here with a subclass of :class:`Architecture` decorated with
``@register("<name>")``, and add its name to the import below (one line).
"""

from . import (  # noqa: F401  (registration)
    batchtopk,
    jumprelu,
    matryoshka,
    vanilla,
)
from .base import Architecture, DistContext, ForwardOut, Latents, StepInput

__all__ = ["Architecture", "DistContext", "ForwardOut", "Latents", "StepInput"]
