"""The training loop: Adam + LambdaLR, L1 warm-up, clipping, AuxK, logging, validation, checkpoints.

``run_training(cfg, out)`` is the one path used by ``crosscoder train``, the demo and the tests.
Metrics stay on the device and are read once per ``log_every`` steps (one host sync per log).
Validation runs in eval mode under ``no_grad`` and touches no training state (counters, threshold,
RNG, data position), so it never changes the trained weights.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import CrossCoderError
from ..model import CrossCoder, compute_loss
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_state
from .logging import MetricsLogger
from .schedules import l1_coeff_at, lr_lambda
from .sources import make_source


class Interrupted(CrossCoderError):
    """Raised after a checkpoint was saved in response to SIGINT/SIGTERM."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def geometric_median(x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm over the batch: ``x [batch, n_models, d_model]`` -> ``[n_models, d_model]``."""
    med = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - med).norm(dim=-1).clamp_min(1e-8)  # [b, m]
        med = (w[..., None] * x).sum(0) / w.sum(0)[:, None]
    return med


def check_out(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise CrossCoderError(f"{out}: output folder exists; pass --resume to continue it or --overwrite to replace it")
    if resume and not (out / "config.json").is_file():
        raise CrossCoderError(f"{out}: nothing to resume (no config.json)")


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def run_training(cfg: RunConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
                 stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train a crosscoder as configured; write ``out/{config.json,model.safetensors,metrics.jsonl}``.

    ``stop_after_steps`` simulates an interruption (checkpoint, then :class:`Interrupted`) for tests.
    Returns the final training and validation metrics.
    """
    cfg = copy.deepcopy(cfg)
    cfg.validate()
    out = Path(out)
    check_out(out, overwrite, resume)
    torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    source, info = make_source(cfg, device)  # validates the data before OUT is touched
    try:
        if overwrite and not resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        return _Loop(cfg, out, source, info, device, resume, stop_after_steps).run()
    finally:
        source.close()


class _Loop:
    def __init__(self, cfg: RunConfig, out: Path, source: Any, info: dict[str, Any], device: torch.device,
                 resume: bool, stop_after: int | None) -> None:
        tc = cfg.train
        self.cfg, self.out, self.source, self.device, self.stop_after = cfg, out, source, device, stop_after
        cfg.model.n_models, cfg.model.d_model = source.n_models, source.d_model
        cfg.model.norm_scale = None
        cfg.model.model_names = info.get("model_names") or cfg.model.model_names
        cfg.model.site = info.get("site") or cfg.model.site
        cfg.data.fingerprints = dict(info.get("fingerprints", {}))
        self.info = info
        self.norm_scale = list(source.norm_scale)
        self.total = tc.total_steps
        self.aux_k = tc.resolved_aux_k(cfg.model.arch)
        gen = torch.Generator().manual_seed(tc.seed)
        self.model = CrossCoder(dataclasses.replace(cfg.model), generator=gen).to(device)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.total, tc.lr_warmup_frac, tc.lr_decay_frac))
        self.since_fired = torch.zeros(cfg.model.d_latent, dtype=torch.long, device=device)
        self.step, self.first_batch = 0, None
        if resume and list_checkpoints(out):
            self._restore(list_checkpoints(out)[-1][1])
        elif tc.b_dec_init == "geometric_median":
            self.first_batch = source.next_batch()
            with torch.no_grad():
                self.model.b_dec.copy_(geometric_median(self.first_batch))
        self.loss_fn = torch.compile(compute_loss) if tc.compile else compute_loss

    # ------------------------------------------------------------------ state
    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {n: getattr(self.model, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        t["threshold"] = self.model.threshold.reshape(1)
        t["tokens_since_fired"] = self.since_fired
        return t

    def _restore(self, path: Path) -> None:
        ck = load_checkpoint(path)
        with torch.no_grad():
            for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(self.model, n).copy_(ck["tensors"][n])
            self.model.threshold.copy_(ck["tensors"]["threshold"].reshape(()))
            self.since_fired.copy_(ck["tensors"]["tokens_since_fired"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        self.source.load_state_dict(ck["state"]["data"])
        self.step = int(ck["state"]["step"])

    def _save(self) -> Path:
        state = {"step": self.step, "tokens": self.step * self.cfg.train.batch_size, "data": self.source.state_dict()}
        return save_checkpoint(self.out, self.step, self._tensors(), self.opt, self.sched, state,
                               self.cfg.train.keep_checkpoints)

    def _run_config(self, **extra: Any) -> dict[str, Any]:
        d = self.cfg.to_dict()
        d["norm_scale"] = self.norm_scale
        d.update(extra)
        return d

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(self, l1: float) -> dict[str, float]:
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for x in self.source.val_batches():
            with self._autocast():
                m = compute_loss(self.model, x, l1_coeff=l1, l2=self.cfg.train.l2_loss).metrics
            for k, v in m.items():
                sums[k] = sums.get(k, 0) + v.float() * x.shape[0]
            n += x.shape[0]
        self.model.train()
        if n == 0:
            return {}
        keys = list(sums)
        vals = (torch.stack([sums[k] for k in keys]) / n).tolist()
        return {f"val/{k}": v for k, v in zip(keys, vals, strict=True)}

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.dtype == "bfloat16")

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        tc, model = self.cfg.train, self.model
        from ..io import write_json

        write_json(self.out / "config.json", self._run_config())
        logger = MetricsLogger(self.out, self._run_config(), tc.wandb, tc.wandb_project,
                               self.total, self.step, tc.progress)
        acc: dict[str, torch.Tensor] = {}
        n_acc, t_last, last, val = 0, time.perf_counter(), {}, {}
        params = list(model.parameters())
        try:
            with _SignalFlag() as sig:
                while self.step < self.total:
                    x = self.first_batch if self.first_batch is not None else self.source.next_batch()
                    self.first_batch = None
                    l1 = l1_coeff_at(self.step, self.total, tc.l1_coeff, tc.l1_warmup_frac)
                    dead = self.since_fired >= tc.dead_tokens
                    with self._autocast():
                        res = self.loss_fn(model, x, l1_coeff=l1, l2=tc.l2_loss, aux_k=self.aux_k,
                                           aux_coeff=tc.aux_coeff, dead=dead)
                    self.opt.zero_grad(set_to_none=True)
                    res.loss.backward()
                    gnorm = (torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm) if tc.max_grad_norm > 0
                             else torch.zeros((), device=self.device))
                    self.opt.step()
                    self.sched.step()
                    fired = (res.f > 0).any(0)
                    self.since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
                    self.step += 1
                    res.metrics["grad_norm"] = gnorm.detach()
                    res.metrics["dead_fraction"] = dead.float().mean()
                    for k, v in res.metrics.items():
                        acc[k] = acc[k] + v.float() if k in acc else v.float().clone()
                    n_acc += 1
                    logger.advance()
                    if self.step % tc.log_every == 0 or self.step == self.total:
                        keys = list(acc)
                        vals = (torch.stack([acc[k] for k in keys]) / n_acc).tolist()
                        now = time.perf_counter()
                        last = dict(zip(keys, vals, strict=True))
                        last.update(l1_coeff=l1 if model.arch.uses_l1 else 0.0, lr=self.sched.get_last_lr()[0],
                                    tokens=self.step * tc.batch_size,
                                    tokens_per_s=n_acc * tc.batch_size / max(now - t_last, 1e-9))
                        if model.cfg.arch == "batchtopk":
                            last["threshold"] = float(model.threshold)
                        logger.log(last, self.step)
                        acc, n_acc, t_last = {}, 0, time.perf_counter()
                    if tc.val_every and tc.val_tokens and (self.step % tc.val_every == 0 or self.step == self.total):
                        val = self.validate(l1)
                        if val:
                            logger.log(val, self.step)
                    if tc.save_every and self.step % tc.save_every == 0 and self.step < self.total:
                        self._save()
                    if sig.signum is not None or (self.stop_after is not None and self.step >= self.stop_after):
                        ck = self._save()
                        why = f"signal {sig.signum}" if sig.signum is not None else "stop requested"
                        raise Interrupted(f"{why} at step {self.step}/{self.total}; checkpoint {ck}; "
                                          "continue with --resume")
        finally:
            logger.close()
        self._save()
        final = copy.deepcopy(model).cpu().fold(self.norm_scale)
        metrics = {**last, **val}
        final.save_pretrained(self.out, extra_config={
            "train": dataclasses.asdict(self.cfg.train), "data": dataclasses.asdict(self.cfg.data),
            "metrics": metrics, "source": {k: v for k, v in self.info.items() if k != "fingerprints"}})
        return metrics
