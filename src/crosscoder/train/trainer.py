"""The training loop: Adam + LambdaLR, L1 warm-up, clipping, AuxK, logging, validation, checkpoints.

``run_training(cfg, out)`` is the one path used by ``crosscoder train``, the demo and the tests; the
optimisation step itself is :class:`~crosscoder.train.step.TrainStep`, which ``crosscoder bench`` times.
Metrics stay on the device and are read once per ``log_every`` steps (one host sync per log).
Validation runs in eval mode under ``no_grad`` and touches no training state (counters, threshold,
RNG, data position), so it never changes the trained weights.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..distributed import LOCAL, Dist, from_env, setup, setup_mesh
from ..errors import CrossCoderError
from ..model import CrossCoder, compute_loss
from ..model.losses import ev_moments, explained_variance_from_moments
from ..model.sharding import LatentShard, make_shard, slice_checkpoint, whole_model
from .checkpoint import disk_full_errors, load_newest, save_checkpoint, set_rng_state, write_final_model
from .checkpoint_shards import save_sharded_checkpoint
from .elastic import Stopper, elastic_resume, lock_wait
from .lock import ending, is_lock, output_lock, prepare_folder
from .logging import MetricsLogger
from .sources import make_source
from .step import TrainStep

# Training rows scored to calibrate an inference rule (BatchTopK's threshold) before validation and
# at the end.
CALIBRATION_TOKENS = 32_768


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
    if out.exists() and any(not is_lock(p) for p in out.iterdir()) and not (overwrite or resume):
        raise CrossCoderError(
            f"{out}: output folder exists; pass --resume to continue it or --overwrite to replace it"
        )
    if resume and not (out / "config.json").is_file():
        raise CrossCoderError(f"{out}: nothing to resume (no config.json)")


def run_training(
    cfg: RunConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train a crosscoder as configured; write ``out/{config.json,model.safetensors,metrics.jsonl}``.

    ``stop_after_steps`` simulates an interruption (checkpoint, then :class:`Interrupted`) for tests.
    Returns the final training and validation metrics.
    """
    cfg = copy.deepcopy(cfg)
    cfg.validate()
    out = Path(out)
    resume = resume or elastic_resume(out)  # a torchrun restart continues from the newest checkpoint
    with output_lock(out, take=from_env().is_main, wait=lock_wait()):  # rank 0, before the process group
        check_out(out, overwrite, resume)
        torch.set_num_threads(cfg.train.threads)
        d, device = setup(cfg.train.device)  # torchrun: process group from the environment
        with ending(d, agreed=Interrupted):  # no final barrier after a failure of one rank alone
            d.barrier()  # every rank checked OUT before rank 0 writes to it
            # --latent-shards S: the 2-D mesh; data = the ranks holding the same shard (rows, gradients)
            data, shard_group = setup_mesh(d, cfg.train.latent_shards)
            shard = (
                LatentShard(d.rank % cfg.train.latent_shards, cfg.train.latent_shards, 0, shard_group)
                if shard_group is not None
                else None
            )
            resume = bool(d.broadcast_object(resume))  # rank 0's view of OUT decides
            if d.enabled and not d.is_main:
                d.barrier()  # rank 0 builds a synthetic/converted cache first
            source, info = make_source(cfg, device, data)  # validates the data before OUT is touched
            if d.enabled and d.is_main:
                d.barrier()
            try:
                if d.is_main:
                    prepare_folder(out, overwrite=overwrite and not resume)  # or only a killed run's temps
                d.barrier()
                with disk_full_errors(out):
                    loop = _Loop(cfg, out, source, info, device, resume, stop_after_steps, d, data, shard)
                    return loop.run()
            finally:
                source.close()


class _Loop:
    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        source: Any,
        info: dict[str, Any],
        device: torch.device,
        resume: bool,
        stop_after: int | None,
        dist: Dist = LOCAL,
        data: Dist | None = None,
        shard: LatentShard | None = None,
    ) -> None:
        tc = cfg.train
        self.cfg, self.out, self.source, self.device, self.stop_after = cfg, out, source, device, stop_after
        self.dist = dist  # every rank
        self.data = data or dist  # the data-parallel ranks (with latent shards: those holding this shard)
        cfg.model.n_models, cfg.model.d_model = source.n_models, source.d_model
        cfg.model.norm_scale = cfg.model.norm_mean = None
        cfg.model.model_names = info.get("model_names") or cfg.model.model_names
        cfg.model.site = info.get("site") or cfg.model.site
        blocks = info.get("blocks") or {}  # mixed widths and (model, site) blocks: the data's description
        for key in ("d_models", "sites", "block_models", "block_sites"):
            if key in blocks:
                setattr(cfg.model, key, blocks[key])
        cfg.data.fingerprints = dict(info.get("fingerprints", {}))
        self.info = info
        self.norm_scale = list(source.norm_scale)
        self.norm_mean = getattr(source, "norm_mean", None)
        self.total = tc.total_steps
        self.aux_k = tc.resolved_aux_k(cfg.model.arch, cfg.model.d_latent)
        gen = torch.Generator().manual_seed(tc.seed)
        if shard is None:
            self.model = CrossCoder(dataclasses.replace(cfg.model), generator=gen)
        else:  # this rank's slice of the initial dictionary of one process
            self.model = make_shard(dataclasses.replace(cfg.model), gen, shard)
        self.model.train()
        self.model.to(device)
        self.train_step = TrainStep(self.model, tc, self.total, device, dist, self.data)
        self.opt, self.sched, self.since_fired = (
            self.train_step.opt,
            self.train_step.sched,
            self.train_step.since_fired,
        )
        self.step, self.first_batch, self.saved_metrics = 0, None, {}
        found = load_newest(out, dist.is_main) if resume else None  # skips (and names) damaged ones
        if found:
            self._restore(*found)
        elif tc.b_dec_init == "geometric_median":
            self.first_batch = source.next_batch()
            with torch.no_grad():
                self.model.b_dec.copy_(geometric_median(self.first_batch))
        elif tc.b_dec_init == "mean" and getattr(source, "train_mean", None) is not None:
            # The data mean in the training space: 0 for centred data, s * mu without centring.
            with torch.no_grad():
                self.model.b_dec.copy_(source.train_mean)

    # ------------------------------------------------------------------ state
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The model's state dict (weights, the architecture's parameters and buffers) and the counters."""
        t = dict(self.model.state_dict())
        t["tokens_since_fired"] = self.since_fired
        return t

    def _restore(self, path: Path, ck: dict[str, Any]) -> None:
        tensors = dict(ck["tensors"])  # the whole dictionary, whatever mesh wrote it
        optimizer = ck["optimizer"]
        if self.model.shard is not None:  # this rank's slices of it
            tensors, optimizer = slice_checkpoint(self.model, tensors, optimizer, str(path))
        with torch.no_grad():
            self.since_fired.copy_(tensors.pop("tokens_since_fired"))
            try:
                self.model.load_state_dict(tensors)
            except RuntimeError as e:
                raise CrossCoderError(
                    f"{path}: checkpoint does not match the model ({str(e).splitlines()[0]})"
                ) from None
        self.opt.load_state_dict(optimizer)
        self.sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        self.source.load_state_dict(ck["state"]["data"])
        self.step = int(ck["state"]["step"])
        self.saved_metrics = ck["state"].get("metrics", {})  # the final checkpoint's

    def _save(self, metrics: dict[str, Any] | None = None) -> Path | None:
        state = {
            "step": self.step,
            "tokens": self.step * self.cfg.train.batch_size,
            "data": self.source.state_dict(),
            **({"metrics": metrics} if metrics else {}),
        }
        if self.model.shard is not None:  # every rank takes part; one file per shard
            return save_sharded_checkpoint(
                self.out,
                self.step,
                self.model,
                self.since_fired,
                self.opt,
                self.sched,
                state,
                self.cfg.train.keep_checkpoints,
                self.dist,
                self.data,
            )
        if not self.dist.is_main:  # rank 0 alone writes checkpoints
            return None
        return save_checkpoint(
            self.out, self.step, self._tensors(), self.opt, self.sched, state, self.cfg.train.keep_checkpoints
        )

    def _run_config(self, **extra: Any) -> dict[str, Any]:
        d = self.cfg.to_dict()
        d["norm_scale"] = self.norm_scale
        d["norm_mean"] = self.norm_mean
        d.update(extra)
        return d

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(self, l1: float) -> dict[str, float]:
        """Metrics over the whole held-out set, in eval mode.

        Per-token metrics (losses, L0, the per-token explained variance) are row-weighted means; the
        explained variances are ``1 - SSE / SST`` from sums pooled over every held-out row (SST around the
        held-out mean), so they do not depend on how the rows fall into batches.
        """
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        m, d = self.model.cfg.n_models, self.model.cfg.d_model
        pooled = torch.zeros(2 * m + m * d + 1, dtype=torch.float64, device=self.device)  # summed ev_moments
        n = 0
        for x in self.source.val_batches():
            with self._autocast():
                out = compute_loss(self.model, x, sparsity_coeff=l1, l2=self.cfg.train.l2_loss)
            for k, v in out.metrics.items():
                if not k.startswith("explained_variance") or k == "explained_variance_legacy":
                    sums[k] = sums.get(k, 0) + v.float() * x.shape[0]
            pooled = pooled + ev_moments(x, out.x_hat)
            n += x.shape[0]
        self.model.train()
        keys = list(sums)
        if self.dist.enabled:  # every rank evaluated a disjoint share of the held-out batches
            keys = self.dist.broadcast_object(keys)
            tot = torch.stack(
                [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32, device=self.device) for k in keys]
                + [torch.tensor(float(n), device=self.device)]
            )
            tot = self.dist.all_reduce_sum(tot)
            sums, n = dict(zip(keys, tot[:-1], strict=True)), int(tot[-1])
            pooled = self.dist.all_reduce_sum(pooled)
        if n == 0:
            return {}
        out_metrics = {
            f"val/{k}": v
            for k, v in zip(keys, (torch.stack([sums[k] for k in keys]) / n).tolist(), strict=True)
        }
        ev = explained_variance_from_moments(pooled, m)
        out_metrics.update({f"val/{k}": float(v) for k, v in ev.items()})
        # The architecture's own numbers (Matryoshka's per-prefix explained variance) pooled over the held-out
        # set; under torchrun they stay row-weighted means over the ranks' shares.
        if not self.dist.enabled:
            with self._autocast():
                pooled_arch = self.model.arch.analysis_metrics(self.source.val_batches())
            out_metrics.update({f"val/{k}": v for k, v in pooled_arch.items()})
        return out_metrics

    def _validate_calibrated(self, l1: float, final: bool) -> dict[str, float]:
        """Validation as the saved model would run it: BatchTopK with a threshold calibrated on the current
        weights. Before the end the training EMA threshold is put back afterwards, so validation never
        changes the training state."""
        arch = self.model.arch
        if final or not arch.calibrates:
            return self.validate(l1)
        training_state = {k: v.clone() for k, v in arch.state_dict().items()}
        try:
            self.calibrate()
            return self.validate(l1)
        finally:
            arch.load_state_dict(training_state)

    def calibrate(self) -> None:
        """The architecture's inference rule from the current weights on training rows (BatchTopK: its
        threshold, see :meth:`~crosscoder.model.architectures.batchtopk.BatchTopK.calibrate`); every rank
        reads the same rows and gets the same value."""
        if not self.model.arch.calibrates:
            return
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            self.model.arch.calibrate(self.source.sample_batches(CALIBRATION_TOKENS))
        self.model.train(was_training)

    def _autocast(self) -> Any:
        return self.train_step.autocast()

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        tc, model = self.cfg.train, self.model
        from ..io import write_json

        main = self.dist.is_main
        if main:
            write_json(self.out / "config.json", self._run_config())
        logger = (
            MetricsLogger(
                self.out, self._run_config(), tc.wandb, tc.wandb_project, self.total, self.step, tc.progress
            )
            if main
            else _NullLogger()
        )
        n_acc, t_last, last, val = 0, time.perf_counter(), {}, {}
        paused = 0.0  # seconds spent validating and checkpointing since the last log (not training)
        try:
            with Stopper(self.dist, self.stop_after) as stopper:
                while self.step < self.total:
                    x = self.first_batch if self.first_batch is not None else self.source.next_batch()
                    self.first_batch = None
                    lr = self.sched.get_last_lr()[0]  # the rate this step uses
                    l1 = self.train_step(x, self.step)
                    self.step += 1
                    n_acc += 1
                    logger.advance()
                    if self.step % tc.log_every == 0 or self.step == self.total:
                        now = time.perf_counter()
                        last = self.train_step.read_metrics()
                        last.update(
                            l1_coeff=l1 if model.arch.penalty_name else 0.0,
                            lr=lr,
                            tokens=self.step * tc.batch_size,
                            tokens_per_s=n_acc * tc.batch_size / max(now - t_last - paused, 1e-9),
                        )
                        last.update(model.arch.log_metrics())
                        logger.log(last, self.step)
                        n_acc, t_last, paused = 0, time.perf_counter(), 0.0
                    t0 = time.perf_counter()
                    if self.step == self.total:
                        self.calibrate()  # the saved model's inference threshold, from the final weights
                    if (
                        tc.val_every
                        and tc.val_tokens
                        and (self.step % tc.val_every == 0 or self.step == self.total)
                    ):
                        val = self._validate_calibrated(l1, final=self.step == self.total)
                        if val:
                            logger.log(val, self.step)
                    if tc.save_every and self.step % tc.save_every == 0 and self.step < self.total:
                        self._save()
                    paused += time.perf_counter() - t0
                    if stopper.should_stop(self.step):  # the ranks agree after every step
                        ck = self._save()
                        raise Interrupted(
                            f"{stopper.reason()}: stopped at step {self.step}/{self.total}; checkpoint {ck}; "
                            "continue with --resume"
                        )
        finally:
            logger.close()
        metrics = {**last, **val} or self.saved_metrics  # resumed after the last step: the saved ones
        self._save(metrics)
        if self.model.shard is not None and self.data.rank == 0:  # the first replica's shards
            whole = whole_model(self.model, dataclasses.replace(self.cfg.model))  # on rank 0, else None
        if not main:
            return metrics
        if self.model.shard is None:
            whole = copy.deepcopy(model).cpu()
        final = whole.fold(self.norm_scale, self.norm_mean)
        write_final_model(  # config.json, then model.safetensors (a finished run), each renamed into place
            final,
            self.out,
            extra_config={
                "train": dataclasses.asdict(self.cfg.train),
                "data": dataclasses.asdict(self.cfg.data),
                "metrics": metrics,
                "source": {k: v for k, v in self.info.items() if k != "fingerprints"},
            },
        )
        return metrics


class _NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
