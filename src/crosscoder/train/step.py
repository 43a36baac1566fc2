"""One optimisation step (:class:`TrainStep`): forward, losses, backward, clipping, Adam, LR schedule and
dead-latent counters. ``crosscoder train`` runs it in its loop (:mod:`crosscoder.train.trainer`) and
``crosscoder bench`` times it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import TrainConfig
from ..distributed import LOCAL, Dist
from ..model import CrossCoder, StepInput, compute_loss, sharding
from ..model.selection import big_kernels, serial_small_ops
from . import ddp
from .schedules import l1_coeff_at, lr_lambda


def make_optimizer(
    params: list[torch.nn.Parameter], tc: TrainConfig, device: torch.device
) -> torch.optim.Adam:
    """Adam; the fused kernel (one pass per parameter) on CPU and CUDA float32 parameters."""
    fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
    return torch.optim.Adam(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused or None)


class TrainStep:
    """One optimisation step: forward, losses, backward, clipping, Adam, LR schedule, dead-latent counters.

    No host synchronisation on CUDA: metrics are stacked into one device vector per step, summed on the
    device and read by :meth:`read_metrics` (once per log). ``dtype="bfloat16"`` runs the forward under
    autocast with float32 master weights; on CUDA TF32 matmuls are allowed for float32. On CPU with
    several torch threads, only the large kernels (GEMMs, passes over ``[batch, d_latent]``, Adam) run
    multi-threaded, the many small ones on one thread (:func:`~crosscoder.model.selection.serial_small_ops`).
    """

    def __init__(
        self,
        model: CrossCoder,
        tc: TrainConfig,
        total_steps: int,
        device: torch.device,
        dist: Dist | None = None,
        data: Dist | None = None,
    ) -> None:
        self.model, self.tc, self.total, self.device = model, tc, total_steps, device
        self.dist = dist or LOCAL  # every rank: metrics are averaged over it
        # The data-parallel ranks (rows shared out, gradients averaged): every rank, or with latent shards
        # (model.shard) the ranks holding the same shard.
        self.data = data or self.dist
        self.shard = model.shard
        d_latent = self.shard.d_latent if self.shard is not None else model.cfg.d_latent
        self.aux_k = tc.resolved_aux_k(model.cfg.arch, d_latent)
        self.dead_tokens = tc.resolved_dead_tokens
        self.params = list(model.parameters())
        if self.shard is not None:
            sharded = set(sharding.latent_dims(model))
            self.replicated = [p for n, p in model.named_parameters() if n not in sharded]
        self.opt = make_optimizer(self.params, tc, device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(total_steps, tc.lr_warmup_frac, tc.lr_decay_frac)
        )
        self.since_fired = torch.zeros(model.cfg.d_latent, dtype=torch.long, device=device)
        self.loss_fn = torch.compile(compute_loss) if tc.compile else compute_loss
        self.ddp = ddp.wrap(model, self.data, device, self.loss_fn)  # None on one process
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.keys: list[str] = []
        self.acc: torch.Tensor | None = None
        self.n_acc = 0

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.tc.dtype == "bfloat16")

    def __call__(self, x: torch.Tensor, step: int) -> float:
        """Train on ``x [batch, n_models, d_model]`` at step ``step`` (0-based); returns the L1
        coefficient."""
        # Compiled steps keep torch's threading (their kernels are fused and large).
        threads = torch.get_num_threads() if self.device.type == "cpu" and not self.tc.compile else 1
        with serial_small_ops(threads):
            return self._step(x, step)

    def _step(self, x: torch.Tensor, step: int) -> float:
        tc = self.tc
        l1 = l1_coeff_at(step, self.total, tc.l1_coeff, tc.l1_warmup_frac)
        dead = self.since_fired >= self.dead_tokens
        d = self.data
        inp = StepInput(
            sparsity_coeff=l1,
            l2=tc.l2_loss,
            aux_k=self.aux_k,
            aux_coeff=tc.aux_coeff,
            dead=dead,
            progress=step / self.total,
            dist=d if d.enabled else None,
        )
        with self.autocast():
            if self.ddp is None:
                out = self.loss_fn(self.model, x, inp)
            else:  # the same call inside DistributedDataParallel (gradients averaged during backward)
                out = self.ddp(x, inp)
        loss, metrics, latents = out.loss, out.metrics, out.latents
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.model.constrain_grads()  # the latent layout (dedicated blocks, tied shared decoders)
        with big_kernels():
            if tc.max_grad_norm <= 0:
                gnorm = torch.zeros((), device=self.device)
            elif self.shard is not None:
                gnorm = sharding.clip_grad_norm_(self.params, self.replicated, tc.max_grad_norm, self.shard)
            else:
                gnorm = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
            self.opt.step()
        self.sched.step()
        fired = ddp.global_fired(latents.fired(), d)
        self.since_fired.add_(x.shape[0] * d.world_size).masked_fill_(fired, 0)
        metrics["grad_norm"] = gnorm.detach()
        metrics["dead_fraction"] = dead.float().mean()
        vec = torch.stack([v.float() for v in metrics.values()])
        if self.acc is None:
            self.keys, self.acc = list(metrics), vec
        else:
            self.acc = self.acc + vec
        self.n_acc += 1
        return l1

    def read_metrics(self) -> dict[str, float]:
        """Mean of each metric since the last read (one host read); resets the accumulator."""
        if self.acc is None:
            return {}
        vals = ddp.mean_over_ranks(self.acc / self.n_acc, self.dist).tolist()
        out = dict(zip(self.keys, vals, strict=True))
        self.acc, self.n_acc = None, 0
        return out
