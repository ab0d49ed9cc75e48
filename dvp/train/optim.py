"""The client optimizer of both engines: Adamax with the global gradient-norm clip, VDVAE-style skipping and the
EMA of the weights it updates, all inside `step()`.

    opt = AdamaxEMA(params, lr=1e-2, weight_decay=1e-6, clip=5.0, skip=0.0); opt.init_state()
    opt.decay = 0.999; opt.step()      # opt.applied, opt.grad_norm tell what happened

||g|| = sqrt(sum_i ||g_i||^2) over every gradient of the run; `norm_reduce` sums the local squared norm over
processes when each holds a disjoint partition (DeepSpeed ZeRO 1-3), so the norm, and every decision made from
it, is the same number on every rank. The squares are summed in float64 and the norm rounded to float32, so it
comes out the same however the gradient is partitioned (and the clipped weights bitwise the same). The step is applied only when ||g|| is finite and, with skip > 0, below
`skip`; then g <- g min(1, clip / (||g|| + 1e-6)) (torch's clip_grad_norm_), the Adamax update with coupled
weight decay, and theta_ema <- decay theta_ema + (1 - decay) theta on the updated tensors.

Why here: the optimizer sees exactly the float32 tensors that are updated (the parameters, or under ZeRO the
rank's partition of the float32 master weights), so the EMA tracks the float32 master weights and is partitioned
like them (per-rank EMA bytes ~ 1/N at ZeRO 1-3); it is optimizer state (key `ema`), so DeepSpeed saves, loads
and gathers it with the moments (`safe_get_full_optimizer_state(p, "ema")`). DeepSpeed computes its gradient
norm inside its own `step()` and drops it at ZeRO 0, too late to decide a skip; so clipping is done here, with
DeepSpeed's `gradient_clipping` off, identically under every stage and precision.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def _identity(t: Tensor) -> Tensor:
    return t


class AdamaxEMA(torch.optim.Adamax):
    """Adamax (eps 1e-8, coupled weight decay) + global-norm clip + skip + EMA state `ema`."""

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float, clip: float, skip: float,
                 norm_reduce: Callable[[Tensor], Tensor] = _identity) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, eps=1e-8)
        self.clip, self.skip = clip, skip
        self.norm_reduce = norm_reduce
        self.decay = 0.0             # EMA decay of the next applied step, set by the engine
        self.applied = False         # whether the last step() changed anything
        self.grad_norm = math.nan    # ||g|| seen by the last step() (nan when step() was not reached)

    def params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        params = self.params()
        grads = [p.grad for p in params if p.grad is not None]
        sq = (torch.stack([g.double().pow(2).sum() for g in grads]).sum() if grads
              else torch.zeros((), dtype=torch.float64, device=params[0].device))
        norm = float(self.norm_reduce(sq).sqrt().float())   # float64 sums, rounded: the same however partitioned
        self.grad_norm = norm
        self.applied = math.isfinite(norm) and not (self.skip > 0 and norm >= self.skip)
        if not self.applied:
            return
        if self.clip > 0:
            torch._foreach_mul_(grads, min(1.0, self.clip / (norm + 1e-6)))
        super().step()
        torch._foreach_lerp_([self.state[p]["ema"] for p in params], params, 1.0 - self.decay)

    @torch.no_grad()
    def init_state(self, tensors: list[Tensor] | None = None) -> None:
        """Create the state of `tensors` (default: the param groups') now, as Adamax would at its first step
        (step 0, zero moments), with the EMA at theta_0; so the state exists (to be linked, saved or overwritten
        on resume) before any step. ZeRO-3 puts its partitions in the groups only while it steps them."""
        for p in self.params() if tensors is None else tensors:
            state = self.state[p]
            state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["ema"] = p.detach().clone()
