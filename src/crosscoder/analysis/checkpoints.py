"""Models that are checkpoints of one training run: their order by step, and when latents appear and vanish.

The step of a model is parsed from its revision (not a commit hash), else from its name (a
``repo@revision`` spec is split on the last ``@``; an existing local path is a path), trying in order
``step(\\d+)``, ``checkpoint[-_](\\d+)`` and a trailing ``(\\d+)`` (on the last path component). When
**every** model has a step the models are ordered by it (:func:`model_order`) and treated as a checkpoint
series; otherwise they keep their given order and no series is assumed.

For a series, with ``present [d_latent, n_models]`` (:func:`crosscoder.analysis.patterns.presence`) read
in step order, :func:`timeline` counts per checkpoint the latents present there, the latents whose first
present checkpoint it is (*appear*) and those whose last present checkpoint it is (*vanish*), and splits
the latents into ``contiguous`` (present on one unbroken run of checkpoints) and ``gapped`` ones.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

STEP_PATTERNS = (re.compile(r"step(\d+)"), re.compile(r"checkpoint[-_](\d+)"), re.compile(r"(\d+)$"))
COMMIT = re.compile(r"[0-9a-f]{40}")  # a resolved commit hash names no step


def split_spec(spec: str) -> tuple[str, str | None]:
    """``repo@rev`` -> ``("repo", "rev")``; an existing local path (or a spec without '@') -> ``(spec,
    None)``."""
    if "@" in spec and not Path(spec).expanduser().exists():
        path, rev = spec.rsplit("@", 1)
        if path and rev:
            return path, rev
    return spec, None


def parse_step(name: str, revision: str | None = None) -> int | None:
    """The training step named by ``revision``, else by ``name``'s revision or last path component, or
    None (see the module docstring)."""
    path, rev = split_spec(str(name))
    cands = [c for c in (revision, rev) if c and not COMMIT.fullmatch(c)]
    cands.append(Path(path.rstrip("/")).name or path)
    for pat in STEP_PATTERNS:
        for c in cands:
            m = pat.search(c)
            if m:
                return int(m.group(1))
    return None


def model_order(
    names: list[str], revisions: list[str | None] | None = None
) -> tuple[list[int], list[int] | None]:
    """``(order, steps)``: model indices in display order and the step of each model (in the given order),
    or ``(given order, None)`` unless every model names a step."""
    revisions = revisions or [None] * len(names)
    steps = [parse_step(n, r) for n, r in zip(names, revisions, strict=True)]
    if len(names) < 2 or any(s is None for s in steps):
        return list(range(len(names))), None
    order = sorted(range(len(names)), key=lambda i: (steps[i], i))
    return order, [int(s) for s in steps]  # type: ignore[arg-type]


def timeline(present: np.ndarray, order: list[int], live: np.ndarray | None = None) -> dict[str, Any]:
    """Per checkpoint (in ``order``): ``present``, ``appear`` (first present checkpoint) and ``vanish``
    (last present checkpoint) counts over the ``live [d_latent]`` latents with a non-empty pattern;
    ``contiguous`` / ``gapped`` totals. ``present [d_latent, n_models]`` bool."""
    p = np.asarray(present, bool)[:, order]
    keep = p.any(1) if live is None else (p.any(1) & np.asarray(live, bool))
    p = p[keep]
    n = p.shape[1]
    first = np.argmax(p, axis=1)
    last = n - 1 - np.argmax(p[:, ::-1], axis=1)
    span = last - first + 1
    contiguous = p.sum(1) == span
    return {
        "present": [int(v) for v in p.sum(0)],
        "appear": [int(v) for v in np.bincount(first, minlength=n)],
        "vanish": [int(v) for v in np.bincount(last, minlength=n)],
        "contiguous": int(contiguous.sum()),
        "gapped": int((~contiguous).sum()),
        "latents": int(p.shape[0]),
    }


def checkpoint_summary(
    names: list[str], revisions: list[str | None], present: np.ndarray, live: np.ndarray
) -> tuple[list[int], dict[str, Any]]:
    """``(model_order, checkpoints)`` for ``summary.json``: ``checkpoints`` is ``{"series": False}`` unless
    every model names a step, else the steps, the models in step order and :func:`timeline`."""
    order, steps = model_order(names, revisions)
    if steps is None:
        return order, {"series": False}
    info: dict[str, Any] = {
        "series": True,
        "steps": [steps[i] for i in order],
        "models": [names[i] for i in order],
    }
    info.update(timeline(present, order, live))
    return order, info
