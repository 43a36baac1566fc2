"""Metric sinks: ``OUT/metrics.jsonl`` (always), wandb (optional), and a tqdm progress bar.

wandb mode: ``off`` never imports it; ``online``/``offline`` as named; ``auto`` respects ``WANDB_MODE``
when set, else is ``online`` when an API key is configured and ``offline`` otherwise. Offline runs are
written under ``OUT/wandb`` (and ``WANDB_CACHE_DIR`` defaults to ``OUT/wandb/.cache``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def resolve_wandb_mode(mode: str) -> str:
    if mode == "off":
        return "off"
    env = os.environ.get("WANDB_MODE")
    if mode == "auto":
        if env:
            return "off" if env == "disabled" else env
        return "online" if _logged_in() else "offline"
    return mode


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class MetricsLogger:
    """Append-only JSONL log plus optional wandb run and progress bar."""

    def __init__(
        self,
        out: Path,
        config: dict[str, Any],
        wandb_mode: str = "off",
        project: str = "crosscoder",
        total_steps: int = 0,
        start_step: int = 0,
        progress: bool = True,
    ) -> None:
        self.path = Path(out) / "metrics.jsonl"
        self._truncate_after(start_step)
        self._fh = open(self.path, "a")
        self.run = None
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "off":
            os.environ.setdefault("WANDB_CACHE_DIR", str(Path(out) / "wandb" / ".cache"))
            import wandb

            self.run = wandb.init(
                project=project,
                config=config,
                dir=str(out),
                mode=mode,
                name=Path(out).name,
                resume="allow",
                id=_run_id(out),
            )
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log has no duplicated steps."""
        if not self.path.exists():
            return
        keep = [
            ln
            for ln in self.path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **metrics}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4g}",
                ev=f"{metrics.get('explained_variance', 0):.3f}",
                l0=f"{metrics.get('l0_loss', 0):.1f}",
                refresh=False,
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        self._fh.close()
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self.run.finish()


def _run_id(out: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:12]
