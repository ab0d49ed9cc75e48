"""Training engines: the only owners of the parameters, the optimizer state and the EMA.

    engine = make_engine(model, cfg, image_shape, ctx)     # dvp.train.engines: TorchEngine or DeepSpeedEngine
    stats = engine.step(x, step, votes)  # x: the GLOBAL batch of optimizer step `step`; one stats dict, the
                                       # same on every rank: loss, nelbo, recon, kl_z, kl_u, kl/<l>, grad_norm,
                                       # skipped, skipped_total, nonfinite_loss, nonfinite_grad; engine.votes:
                                       # votes() summed over the ranks in the same all-reduce (optional)
    engine.set_lr(lr)
    model = engine.eval_view("ema")    # full float32 weights (gathered where partitioned) in a separate module
    state = engine.full_state()        # model, ema, optimizer moments by parameter name, counters (collective)

The loop, evaluation and checkpoints use only this interface.

World-size invariance: the global batch of B = train.batch_size images is split into contiguous rank slices
(`noise.shard`) and each slice into micro-batches of `dist.micro_batch` images; every random draw of a
micro-batch comes from `noise.Noise` seeded by (train.seed, step) and sliced at the micro-batch's global rows, so
the gradient sum_i d(loss_i)/d(theta) / B, and the model, do not depend on the world size or the micro-batching
up to float reduction order. A step is applied only when the global gradient norm is finite and below
`train.grad_skip` (when > 0): `optim.AdamaxEMA` decides from the all-reduced norm, so every rank agrees, and the
skip is counted once. EMA decay: d = min(train.ema, (1 + n) / (10 + n)) at the n-th applied step with
`train.ema_warmup` (TensorFlow's num_updates: short runs do not validate near-initial weights), else the paper's
constant train.ema.
Mixed precision (train.precision=bf16|fp16): autocast on the forward pass, except the convolutions that read a
residual stream or output mu, log-var or logits (`blocks.Float32Conv2d`); the ELBO terms are float32
(model.py); parameters, gradients, optimizer state and EMA stay float32; fp16 adds dynamic loss scaling.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dvp.data.batches import model_inputs
from dvp.dist.context import DistContext
from dvp.dist.noise import Noise, noise_seed, shard
from dvp.model.precision import memory_format
from dvp.train.optim import AdamaxEMA

Votes = Callable[[], list[float]]
"""A rank's flags ('a signal arrived', 'out of time', ...) that `step` sums over the ranks with its statistics."""


class LossScale(torch.amp.GradScaler):
    """torch's dynamic loss scaling for fp16: s starts at train.fp16_init_scale; a step with a non-finite
    scaled gradient is skipped and s <- s / 2; 2000 applied steps in a row double s. `back_off` is the update()
    of a skipped step whose overflow someone else found (DeepSpeed ZeRO 1-3), as update() after a found inf."""

    def back_off(self) -> None:
        state = self.state_dict()
        backed_off = state["scale"] * self.get_backoff_factor()
        self.load_state_dict({**state, "scale": backed_off, "_growth_tracker": 0})


def loss_scale(cfg: DictConfig, device: torch.device) -> LossScale | None:
    """The fp16 loss scaler of a run (None unless train.precision=fp16)."""
    if cfg.train.precision != "fp16":
        return None
    return LossScale(device.type, init_scale=cfg.train.fp16_init_scale)


def micro_batch(cfg: DictConfig, world_size: int) -> int:
    """Images per rank per forward pass: dist.micro_batch, or the rank's whole share train.batch_size / world."""
    return cfg.dist.micro_batch or cfg.train.batch_size // world_size


class Engine:
    """What both engines share: micro-batches with global noise, the stats reduction, counters, the view."""

    def __init__(self, model: nn.Module, cfg: DictConfig, image_shape: tuple[int, int, int],
                 ctx: DistContext) -> None:
        self.cfg, self.image_shape, self.ctx, self.device = cfg, image_shape, ctx, ctx.device
        self.micro = micro_batch(cfg, ctx.world_size)
        self.accumulation = cfg.train.batch_size // (ctx.world_size * self.micro)
        self.memory_format = memory_format(cfg.train.channels_last, self.device)
        self.view = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.skipped_total = self.consecutive_skips = self.applied_steps = 0
        self.votes: list[float] = []       # the last step's `votes()`, summed over the ranks
        self.scaler = loss_scale(cfg, self.device)   # fp16's dynamic loss scale (None otherwise)
        self.optimizer: AdamaxEMA

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def micro_batches(self, x: Tensor, step: int) -> Iterator[tuple[Tensor, Tensor, Noise]]:
        """(encoder input, target, noise) of this rank's micro-batches of global batch `x` at `step`."""
        rows = len(x)
        lo_rank, _ = shard(rows, self.ctx.rank, self.ctx.world_size)
        seed = noise_seed(self.cfg.train.seed, "train", step)
        for m in range(self.accumulation):
            lo = lo_rank + m * self.micro
            noise = Noise(seed, rows, lo, lo + self.micro)
            x_mb = x[lo:lo + self.micro].to(self.device, memory_format=self.memory_format)
            x_enc, x_target = model_inputs(x_mb, self.cfg.data.binarize, self.cfg.data.encoder_sees, noise)
            yield x_enc, x_target, noise

    def _before_step(self) -> None:
        n = self.applied_steps + 1
        t = self.cfg.train
        self.optimizer.decay = min(t.ema, (1 + n) / (10 + n)) if t.ema_warmup else t.ema
        self.optimizer.applied = torch.zeros((), dtype=torch.bool, device=self.device)   # until step() says
        self.optimizer.grad_norm = torch.full((), math.nan, device=self.device)

    def _after_step(self, sums: dict[str, Tensor], rows: int, votes: Votes | None) -> dict[str, float]:
        """Global means of the micro-batch sums, and the ranks' summed `votes()` (kept in `self.votes`), in
        one all-reduce; with the optimizer's decision, read in the step's one host synchronisation."""
        keys = sorted(sums)
        local = [sums[k].detach().float() for k in keys]
        mine = torch.tensor(votes() if votes is not None else [], dtype=torch.float32).to(self.device)
        total = self.ctx.all_reduce_sum(torch.cat([torch.stack(local), mine]))
        decision = torch.stack([self.optimizer.grad_norm.float(), self.optimizer.applied.float()])
        *values, grad_norm, applied = torch.cat([total, decision.to(self.device)]).tolist()
        out = {k: v / rows for k, v in zip(keys, values)}
        self.votes = values[len(keys):]
        out["grad_norm"] = grad_norm
        out["nonfinite_loss"] = float(not math.isfinite(out["loss"]))
        out["nonfinite_grad"] = float(not math.isfinite(grad_norm))
        if applied:
            self.applied_steps += 1
            self.consecutive_skips = 0
        else:
            self.skipped_total += 1
            self.consecutive_skips += 1
        out["skipped"] = float(not applied)
        out["skipped_total"] = float(self.skipped_total)
        return out

    @staticmethod
    def _accumulate(sums: dict[str, Tensor], stats: dict[str, Tensor], n: int) -> None:
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * n

    # ---- state ------------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        """The step counters and, under fp16, the loss scale s and its count of applied steps since the last
        change (so a resumed fp16 run scales as the uninterrupted one)."""
        out: dict[str, float] = {"skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips,
                                 "applied_steps": self.applied_steps}
        if self.scaler is not None and self.scaler.is_enabled():
            scale = self.scaler.state_dict()
            out |= {"loss_scale": float(scale["scale"]), "loss_scale_growth": int(scale["_growth_tracker"])}
        return out

    def load_counters(self, counters: dict[str, float]) -> None:
        """Restore `counters()`; a checkpoint of another precision (no loss scale) keeps train.fp16_init_scale."""
        self.skipped_total = int(counters["skipped_total"])
        self.consecutive_skips = int(counters["consecutive_skips"])
        self.applied_steps = int(counters["applied_steps"])
        if self.scaler is not None and self.scaler.is_enabled() and "loss_scale" in counters:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": float(counters["loss_scale"]),
                                         "_growth_tracker": int(counters["loss_scale_growth"])})

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def full_weights(self, which: str) -> dict[str, Tensor]:
        """Full float32 parameters ('raw') or their EMA ('ema') by name, on every rank (collective)."""
        raise NotImplementedError

    def full_optimizer(self) -> dict[str, dict[str, Tensor]]:
        """Full Adamax moments and EMA by parameter name, plus the step count (collective)."""
        raise NotImplementedError

    def buffers(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def eval_view(self, which: str = "ema") -> nn.Module:
        """A module with the full EMA ('ema') or raw ('raw') float32 weights, for validation, test and sampling
        (collective: every rank calls it). It is a separate copy: evaluating it never touches training state."""
        weights = {**self.full_weights(which), **self.buffers()}
        self.view.load_state_dict(weights)
        return self.view.eval()

    def full_state(self) -> dict[str, Any]:
        """Everything a resume needs, unpartitioned and engine-independent (collective): model, ema, optimizer,
        counters. Loadable by either engine at any world size."""
        buffers = self.buffers()
        return {"model": {**self.full_weights("raw"), **buffers}, "ema": {**self.full_weights("ema"), **buffers},
                "optimizer": self.full_optimizer(), "counters": self.counters()}
