"""A plain dense crosscoder training step, written from the equations: the baseline of ``bench_step.py``.

It does what the published crosscoder trainers do, in the most direct way:

* encode and decode with ``einsum`` (``pre = einsum("bmd,mdh->bh", x, W_enc) + b_enc``,
  ``x_hat = einsum("bh,hmd->bmd", f, W_dec) + b_dec``), autograd for everything;
* BatchTopK by sorting the ``batch * d_latent`` flattened scores ``relu(pre) * w`` and keeping the first
  ``k * batch`` (a dense 0/1 mask; ``select="topk"``: one ``topk`` over the flattened scores instead, as
  the dictionary_learning fork does), the threshold EMA read back with ``.item()``;
* AuxK (when some latent is dead, checked on the host) by a per-row ``topk`` over all latents with the
  live ones masked out, scattered into a dense ``[batch, d_latent]`` matrix and decoded densely;
* ``.item()`` on every metric every step; ``torch.optim.Adam`` with its default implementation,
  ``clip_grad_norm_``, ``LambdaLR``; dead-latent counters updated from the dense latents.

Losses and metrics are those of ``crosscoder.model.losses`` (same definitions, written out again here).
"""

from __future__ import annotations

import torch


class ReferenceStep:
    """One dense training step. ``arch`` is "vanilla" (ReLU + decoder-norm-weighted L1) or "batchtopk"."""

    def __init__(
        self,
        arch: str,
        n_models: int,
        d_model: int,
        d_latent: int,
        k: int = 32,
        lr: float = 1e-3,
        l1_coeff: float = 1.0,
        aux_k: int = 512,
        aux_coeff: float = 1 / 32,
        dead_tokens: int = 10_000_000,
        max_grad_norm: float = 1.0,
        threshold_beta: float = 0.999,
        total_steps: int = 1000,
        init: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
        select: str = "sort",
    ) -> None:
        self.arch, self.k, self.l1_coeff, self.select = arch, k, l1_coeff, select
        self.aux_k = aux_k if arch == "batchtopk" else 0
        self.aux_coeff, self.dead_tokens, self.max_grad_norm = aux_coeff, dead_tokens, max_grad_norm
        self.beta, self.threshold = threshold_beta, -1.0
        if init is None:
            g = torch.Generator().manual_seed(seed)
            w_dec = torch.randn(d_latent, n_models, d_model, generator=g)
            w_dec = 0.08 * w_dec / w_dec.norm(dim=-1, keepdim=True)
            init = {
                "W_enc": w_dec.permute(1, 2, 0).clone(),
                "b_enc": torch.zeros(d_latent),
                "W_dec": w_dec,
                "b_dec": torch.zeros(n_models, d_model),
            }
        self.W_enc = torch.nn.Parameter(init["W_enc"].clone())  # [m, d, h]
        self.b_enc = torch.nn.Parameter(init["b_enc"].clone())  # [h]
        self.W_dec = torch.nn.Parameter(init["W_dec"].clone())  # [h, m, d]
        self.b_dec = torch.nn.Parameter(init["b_dec"].clone())  # [m, d]
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: max(0.0, 1.0 - s / (total_steps + 1))
        )
        self.since_fired = torch.zeros(d_latent, dtype=torch.long)

    def step(self, x: torch.Tensor) -> dict[str, float]:
        """``x [batch, n_models, d_model]`` -> metrics (host floats)."""
        b = x.shape[0]
        pre = torch.einsum("bmd,mdh->bh", x, self.W_enc) + self.b_enc
        acts = torch.relu(pre)
        w = self.W_dec.norm(dim=-1).sum(-1)  # [h] decoder-norm weight
        if self.arch == "batchtopk":
            scores = (acts * w).flatten()
            if self.select == "sort":
                order = torch.sort(scores, descending=True).indices[: self.k * b]
            else:
                order = scores.topk(self.k * b).indices
            mask = torch.zeros_like(scores).scatter(0, order, 1.0).view_as(acts)
            f = acts * mask
            kept = scores[order].detach()
            smallest = kept[kept > 0].min().item() if bool((kept > 0).any()) else None
            if smallest is not None:
                self.threshold = (
                    smallest
                    if self.threshold < 0
                    else self.beta * self.threshold + (1 - self.beta) * smallest
                )
        else:
            f = acts
        x_hat = torch.einsum("bh,hmd->bmd", f, self.W_dec) + self.b_dec
        l2 = (x - x_hat).pow(2).sum((1, 2)).mean()
        l1 = (f * w).sum(-1).mean()
        loss = l2 + self.l1_coeff * l1 if self.arch == "vanilla" else l2
        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum().item())
        aux = 0.0
        if self.aux_k > 0 and n_dead > 0:
            masked = torch.where(dead, acts, torch.zeros_like(acts))
            vals, idx = masked.topk(min(self.aux_k, acts.shape[1]), dim=-1)
            dense = torch.zeros_like(acts).scatter(-1, idx, vals)
            e = (x - x_hat).detach()
            e_hat = torch.einsum("bh,hmd->bmd", dense, self.W_dec)
            aux_loss = (e - e_hat).pow(2).sum() / (e - e.mean(0, keepdim=True)).pow(2).sum()
            loss = loss + self.aux_coeff * aux_loss
            aux = aux_loss.item()
        self.opt.zero_grad()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        fired = (f > 0).any(0)
        self.since_fired += b
        self.since_fired[fired] = 0
        err = (x - x_hat).detach().pow(2)
        dev = (x - x.mean(0, keepdim=True)).pow(2)
        out = {
            "loss": loss.item(),
            "l2_loss": l2.item(),
            "l1_loss": l1.item(),
            "l0_loss": (f > 0).float().sum(-1).mean().item(),
            "aux_loss": aux,
            "explained_variance": (1 - err.sum() / dev.sum()).item(),
            "grad_norm": gnorm.item(),
            "dead_fraction": dead.float().mean().item(),
        }
        for i in range(x.shape[1]):
            out[f"explained_variance_{i}"] = (1 - err[:, i].sum() / dev[:, i].sum()).item()
        return out
