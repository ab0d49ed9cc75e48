"""The training engine: one optimizer step behind a small interface (plain torch here; DeepSpeed slots in).

    engine = TorchEngine(model, cfg.train, image_shape)
    stats = engine.step(x, x_target)          # one stats dict: loss, nelbo, recon, kl/<l>, kl_u, grad_norm,
                                              # skipped, nonfinite_loss, nonfinite_grad
    engine.set_lr(lr); engine.ema             # EMA weights for validation, test and sampling
    engine.state_dict() / load_state_dict()   # optimizer + EMA + counters, for exact resume

A step is applied only when the loss and the gradient norm are finite and, with `grad_skip > 0`, the norm is
below the threshold (VDVAE-style skipping); otherwise it is counted as skipped and nothing changes (weights,
optimizer moments, EMA). EMA after every applied step: theta_ema <- d theta_ema + (1 - d) theta with
d = min(train.ema, (1 + n) / (10 + n)) after n applied steps when `train.ema_warmup` (the default), or the paper's
constant d = train.ema (0.999) with `train.ema_warmup=false`.
Mixed precision: bf16 autocast on the forward pass, except the convolutions that read a residual stream or output
mu, log-var or logits (`blocks.Float32Conv2d`); the ELBO terms are float32 (model.py), parameters and
optimizer state stay float32.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dvp.objectives import elbo_stats


def autocast(precision: str, device: torch.device) -> Any:
    """The forward-pass precision context: bf16 autocast or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class TorchEngine:
    """Single-process engine: Adamax with coupled weight decay, clipping, skipping, EMA, bf16 autocast."""

    def __init__(self, model: nn.Module, train_cfg: DictConfig, image_shape: tuple[int, int, int]) -> None:
        self.cfg, self.image_shape = train_cfg, image_shape
        self.device = next(model.parameters()).device
        self.memory_format = torch.channels_last if train_cfg.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = [q for p, q in zip(self.model.parameters(), self.ema.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.Adamax(self.params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                            eps=1e-8)
        self.forward = torch.compile(self.model) if train_cfg.compile else self.model
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.applied_steps = 0

    def autocast(self) -> Any:
        return autocast(self.cfg.precision, self.device)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, x: Tensor, x_target: Tensor) -> dict[str, float]:
        """One optimizer step on a batch; returns the stats dict (floats)."""
        self.model.train()
        x = x.to(self.device, memory_format=self.memory_format)
        x_target = x_target.to(self.device, memory_format=self.memory_format)
        with self.autocast():
            terms = self.forward(x, x_target)
        stats = elbo_stats(terms, self.image_shape)
        self.optimizer.zero_grad(set_to_none=True)
        stats["loss"].backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        out = {k: float(v.detach()) for k, v in stats.items()}
        out["grad_norm"] = float(grad_norm)
        out["nonfinite_loss"] = float(not math.isfinite(out["loss"]))
        out["nonfinite_grad"] = float(not math.isfinite(out["grad_norm"]))
        skip = (out["nonfinite_loss"] or out["nonfinite_grad"]
                or (self.cfg.grad_skip > 0 and out["grad_norm"] >= self.cfg.grad_skip))
        if skip:
            self.skipped_total += 1
            self.consecutive_skips += 1
        else:
            self.optimizer.step()
            self._update_ema()
            self.consecutive_skips = 0
        out["skipped"] = float(skip)
        out["skipped_total"] = float(self.skipped_total)
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        """theta_ema <- d theta_ema + (1 - d) theta; d = min(ema, (1 + n) / (10 + n)) after n applied steps with
        `ema_warmup`, else d = ema.

        The warm-up of d (TensorFlow's num_updates) departs from the paper's constant 0.999: it keeps short runs
        from validating near-initial weights (with d = 0.999 the EMA still holds 37% of the initialisation after
        1,000 steps); after a few thousand steps d = ema either way.
        """
        self.applied_steps += 1
        decay = self.cfg.ema
        if self.cfg.ema_warmup:
            decay = min(decay, (1 + self.applied_steps) / (10 + self.applied_steps))
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "counters": {"skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips,
                             "applied_steps": self.applied_steps}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped_total = state["counters"]["skipped_total"]
        self.consecutive_skips = state["counters"]["consecutive_skips"]
        self.applied_steps = state["counters"]["applied_steps"]
