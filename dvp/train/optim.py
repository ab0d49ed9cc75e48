"""The client optimizer of both engines: Adamax with the global gradient-norm clip, VDVAE-style skipping and the
EMA of the weights it updates, all inside `step()`, in foreach kernels and without a host synchronisation.

    opt = AdamaxEMA(params, lr=1e-2, weight_decay=1e-6, clip=5.0, skip=0.0); opt.init_state()
    opt.param_groups[0]["ema_decay"] = 0.999     # a hyperparameter like lr (a float, or a 0-dim device tensor)
    outcome = opt.step()     # StepOutcome: grad_norm (0-dim float32 tensor), applied (0-dim bool tensor)

||g|| = sqrt(sum_i ||g_i||^2) over every gradient of the run; `norm_reduce` sums the local squared norm over
processes when each holds a disjoint partition (DeepSpeed ZeRO 1-3), so the norm, and every decision made from
it, is the same number on every rank. The squares are summed in float64 and the norm rounded to float32, so it
comes out the same however the gradient is partitioned (and the clipped weights bitwise the same). The step is
applied (a = 1) only when ||g|| is finite and, with skip > 0, below `skip`; then g <- g min(1, clip / (||g|| +
1e-6)) (torch's clip_grad_norm_), the Adamax update with coupled weight decay (g <- g + wd theta),
    t <- t + a,  m <- m + a (1 - b1) (g - m),  u <- max(u b2^a, a (|g| + eps)),
    theta <- theta - a lr m / ((1 - b1^t) max(u, eps)),
and theta_ema <- theta_ema + a (1 - decay) (theta - theta_ema) on the updated tensors, decay being the param
group's `ema_decay` (set by the engine before each step, as `lr` is). The decision a is a tensor, not a Python
bool: a skipped step (a = 0, its gradient set to 0 first so that no NaN reaches the state) leaves t, m, u, theta
and the EMA bitwise unchanged. `step()` returns what happened, (||g||, a) as device tensors, which the engine
sends to the host with the step's statistics in one transfer.

Why here: the optimizer sees exactly the float32 tensors that are updated (the parameters, or under ZeRO the
rank's partition of the float32 master weights), so the EMA tracks the float32 master weights and is partitioned
like them (per-rank EMA bytes ~ 1/N at ZeRO 1-3); it is optimizer state (key `ema`), so DeepSpeed saves, loads
and gathers it with the moments (`safe_get_full_optimizer_state(p, "ema")`). DeepSpeed computes its gradient
norm inside its own `step()` and drops it at ZeRO 0, too late to decide a skip; so clipping is done here, with
DeepSpeed's `gradient_clipping` off, identically under every stage and precision.
Kernels: one foreach kernel per operation over all tensors (a few launches per step on a GPU, not per
tensor), except the masking of the gradient (one `where` per gradient tensor: no foreach select exists; under
ZeRO 1-3 the gradient is one flat partition).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor


def _identity(t: Tensor) -> Tensor:
    return t


def _lerp_(tensors: list[Tensor], ends: list[Tensor], weight: Tensor) -> None:
    """t <- t + w (end - t) for a 0-dim tensor w kept on the device (torch._foreach_lerp_ takes w only as a
    Python number or per-element tensors: a 0-dim tensor would be read to the host)."""
    steps = torch._foreach_sub(ends, tensors)
    torch._foreach_mul_(steps, weight)
    torch._foreach_add_(tensors, steps)


class StepOutcome(NamedTuple):
    """What one optimizer step did, as 0-dim device tensors (never read to the host here)."""
    grad_norm: Tensor    # ||g|| (float32; nan when the step was not reached, e.g. an fp16 overflow found first)
    applied: Tensor      # a: whether the update was applied (bool)

    @staticmethod
    def not_reached(device: torch.device) -> StepOutcome:
        """The outcome of a step whose optimizer was never called (the loss scaler skipped it): not applied."""
        return StepOutcome(torch.full((), math.nan, device=device), torch.zeros((), dtype=torch.bool, device=device))


class AdamaxEMA(torch.optim.Adamax):
    """Adamax (eps 1e-8, coupled weight decay) + global-norm clip + skip + EMA state `ema`, as tensor ops."""

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float, clip: float, skip: float,
                 norm_reduce: Callable[[Tensor], Tensor] = _identity) -> None:
        # capturable: the step count stays on the parameters' device (also when DeepSpeed loads its state)
        super().__init__(params, lr=lr, weight_decay=weight_decay, eps=1e-8, capturable=True)
        self.clip, self.skip = clip, skip
        self.norm_reduce = norm_reduce
        for group in self.param_groups:
            group["ema_decay"] = 0.0      # EMA decay of the next applied step (the engine sets it, a tensor)

    def params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def decide(self, grads: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """(||g||, a): the global gradient norm (float32) and whether the step is applied (bool): tensors."""
        sq = (torch.stack(torch._foreach_powsum(grads, 2, dtype=torch.float64)).sum() if grads
              else torch.zeros((), dtype=torch.float64, device=device))
        norm = self.norm_reduce(sq).sqrt().float()   # float64 sums, rounded: the same however partitioned
        applied = torch.isfinite(norm)
        if self.skip > 0:
            applied = applied & (norm < self.skip)
        return norm, applied

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> StepOutcome:  # type: ignore[override]
        """One clipped, possibly skipped Adamax step with the EMA; returns (||g||, a) without reading them."""
        params = self.params()
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        grad_norm, applied = self.decide(grads, params[0].device)
        a = applied.float()
        scale = (torch.clamp(self.clip / (grad_norm + 1e-6), max=1.0) if self.clip > 0
                 else torch.ones_like(grad_norm))
        scale = torch.where(applied, scale, 0.0)                     # finite also when ||g|| is not
        grads = [torch.where(applied, g, 0.0) for g in grads]      # a skipped step's NaNs reach nothing
        torch._foreach_mul_(grads, scale)
        group = self.param_groups[0]
        self._adamax(with_grad, grads, applied, group["lr"], group["weight_decay"], *group["betas"], group["eps"])
        _lerp_([self.state[p]["ema"] for p in params], params, (a * (1.0 - group["ema_decay"])).float())
        return StepOutcome(grad_norm, applied)

    def _adamax(self, params: list[Tensor], grads: list[Tensor], applied: Tensor, lr: float, weight_decay: float,
                beta1: float, beta2: float, eps: float) -> None:
        """The masked Adamax update of the module docstring (torch's foreach Adamax when a = 1)."""
        if not params:
            return
        a = applied.float()
        state = [self.state[p] for p in params]
        steps, exp_avgs, exp_infs = ([s[k] for s in state] for k in ("step", "exp_avg", "exp_inf"))
        torch._foreach_add_(steps, [a] * len(steps))           # elementwise: `a` is never read to the host
        if weight_decay != 0:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        _lerp_(exp_avgs, grads, a * (1 - beta1))
        torch._foreach_mul_(exp_infs, torch.where(applied, beta2, 1.0))
        torch._foreach_abs_(grads)
        torch._foreach_add_(grads, eps)
        torch._foreach_mul_(grads, a)
        torch._foreach_maximum_(exp_infs, grads)
        bias_corrections = torch._foreach_pow(beta1, torch._foreach_clamp_min(steps, 1.0))   # b1^t, t >= 1
        torch._foreach_sub_(bias_corrections, 1.0)                                         # -(1 - b1^t)
        denominators = torch._foreach_clamp_min(exp_infs, eps)
        torch._foreach_mul_(denominators, bias_corrections)
        updates = torch._foreach_div(exp_avgs, denominators)
        torch._foreach_mul_(updates, a * lr)
        torch._foreach_add_(params, updates)

    @torch.no_grad()
    def init_state(self, tensors: list[Tensor] | None = None) -> None:
        """Create the state of `tensors` (default: the param groups') now, as Adamax would at its first step
        (step 0, zero moments), with the EMA at theta_0; so the state exists (to be linked, saved or overwritten
        on resume) before any step. ZeRO-3 puts its partitions in the groups only while it steps them. The
        step count lives on the tensor's device, so the update never waits for the host."""
        for p in self.params() if tensors is None else tensors:
            state = self.state[p]
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["ema"] = p.detach().clone()
