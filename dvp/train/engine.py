"""Training engines: the only owners of the parameters, the optimizer state and the EMA.

    engine = make_engine(model, cfg, image_shape, ctx)     # dvp.train.engines: TorchEngine or DeepSpeedEngine
    stats = engine.step(x, step, votes)  # x: the GLOBAL batch of optimizer step `step`; returns at once a
                                       # StepStats (a mapping read on first use), the same on every rank: loss,
                                       # nelbo, recon, kl_z, kl_u, kl/<l>, grad_norm, skipped, skipped_total,
                                       # nonfinite_loss, nonfinite_grad; stats.votes: votes() summed over the
                                       # ranks in the same all-reduce (optional); stats.consecutive_skips
    engine.set_lr(lr)
    model = engine.eval_view("ema")    # full float32 weights (gathered where partitioned) in a separate module
    state = engine.full_state()        # model, ema, optimizer moments by parameter name, counters (collective)
    engine.save_native(dir, tag, client_state); engine.load_native(dir, tag)   # the engine's own checkpoint
                                       # (DeepSpeed's shards and each rank's RNG; the torch engine has none)

The loop, evaluation and checkpoints use only this interface. A step (`Engine.step`, written once here): the EMA
decay of the step into the optimizer's param groups, then each micro-batch's forward and backward (the engine's
`_forward_backward`), then the engine's `_optimizer_step`, which returns what the optimizer did (`StepOutcome`:
||g||, applied) instead of leaving it in attributes.

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
Host synchronisation (a GPU waits for nothing): a step queues its work and returns. The batch goes to the device
from pinned memory without waiting, the votes likewise; the EMA decay and the counters (applied, skipped,
consecutive skips) are device tensors; the statistics, votes, decision and counters leave the device in one
asynchronous copy (`StepStats`), which the loop reads one step late (so the host waits for step n while step
n + 1 is queued) except at a logged step, its one blocking read. What syncs besides is the libraries': torch's
GradScaler reads its overflow flag each fp16 step, DeepSpeed ZeRO-3 (and ZeRO 1-2 under fp16) its norm.
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dvp.core.noise import Noise, noise_seed, shard
from dvp.data.batches import model_inputs
from dvp.model.precision import memory_format
from dvp.parallel.context import DistContext
from dvp.train.optim import AdamaxEMA, StepOutcome

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


class StepStats(Mapping[str, float]):
    """One step's statistics on their way to the host: `packet` = [the ranks' summed stats (`keys`), summed
    votes, ||g||, a, applied steps, skipped steps, consecutive skips], copied to pinned host memory without
    waiting on a GPU. The first read waits for that copy only (a CUDA event), not for the steps queued since."""

    def __init__(self, packet: Tensor, keys: list[str], n_votes: int, rows: int) -> None:
        self._keys, self._n_votes, self._rows = keys, n_votes, rows
        self._copied: torch.cuda.Event | None = None
        if packet.device.type == "cuda":
            self._host = packet.to("cpu", non_blocking=True)      # into pinned memory, queued after the step
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = packet
        self._values: dict[str, float] | None = None
        self._votes: list[float] = []
        self._consecutive = 0

    def _read(self) -> dict[str, float]:
        if self._values is None:
            if self._copied is not None:
                self._copied.synchronize()
            values = self._host.tolist()
            k, v = len(self._keys), self._n_votes
            grad_norm, applied, _, skipped_total, self._consecutive = values[k + v:]
            out = {key: value / self._rows for key, value in zip(self._keys, values[:k])}
            self._votes = values[k:k + v]
            out["grad_norm"] = grad_norm
            out["nonfinite_loss"] = float(not math.isfinite(out["loss"]))
            out["nonfinite_grad"] = float(not math.isfinite(grad_norm))
            out["skipped"] = float(not applied)
            out["skipped_total"] = skipped_total
            self._values = out
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    @property
    def votes(self) -> list[float]:
        """The ranks' `votes()` of this step, summed."""
        self._read()
        return self._votes

    @property
    def consecutive_skips(self) -> int:
        """Skipped steps in a row up to this one."""
        self._read()
        return int(self._consecutive)


def micro_batch(cfg: DictConfig, world_size: int) -> int:
    """Images per rank per forward pass: dist.micro_batch, or the rank's whole share train.batch_size / world."""
    return cfg.dist.micro_batch or cfg.train.batch_size // world_size


class Engine(ABC):
    """What both engines share: the step (micro-batches with global noise, the stats reduction, counters), the
    view, the full state. An engine supplies the forward and backward of one micro-batch, the optimizer step,
    the full (gathered) weights and optimizer state, and, where it has its own checkpoint format, `save_native`
    and `load_native` (no-ops here)."""

    def __init__(self, model: nn.Module, cfg: DictConfig, image_shape: tuple[int, int, int],
                 ctx: DistContext) -> None:
        self.cfg, self.image_shape, self.ctx, self.device = cfg, image_shape, ctx, ctx.device
        self.micro = micro_batch(cfg, ctx.world_size)
        self.accumulation = cfg.train.batch_size // (ctx.world_size * self.micro)
        self.memory_format = memory_format(cfg.train.channels_last, self.device)
        self.view = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.counts = torch.zeros(3, dtype=torch.float64, device=self.device)  # applied, skipped, in a row
        self.scaler = loss_scale(cfg, self.device)   # fp16's dynamic loss scale (None otherwise)
        self.optimizer: AdamaxEMA

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def step(self, x: Tensor, step: int, votes: Votes | None = None) -> StepStats:
        """One optimizer step on the global batch `x` (optimizer step number `step`): this rank's slice in
        micro-batches, each forward and backward by the engine, then its optimizer step, which returns what it
        did; returns at once the step's statistics on their way to the host (see the module docstring)."""
        self._set_ema_decay()
        sums: dict[str, Tensor] = {}
        for x_enc, x_target, noise in self.micro_batches(x, step):
            stats = self._forward_backward(x_enc, x_target, noise)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v.detach().float() * len(x_enc)
        return self._after_step(sums, len(x), votes, self._optimizer_step())

    @abstractmethod
    def _forward_backward(self, x_enc: Tensor, x_target: Tensor, noise: Noise) -> dict[str, Tensor]:
        """The ELBO statistics (`elbo_stats`) of one micro-batch, its gradient accumulated (loss / accumulation)."""

    @abstractmethod
    def _optimizer_step(self) -> StepOutcome:
        """The optimizer step on the accumulated gradient, and what it did (`StepOutcome.not_reached` when the
        fp16 loss scale skipped it), as device tensors."""

    def micro_batches(self, x: Tensor, step: int) -> Iterator[tuple[Tensor, Tensor, Noise]]:
        """(encoder input, target, noise) of this rank's micro-batches of global batch `x` at `step`."""
        rows = len(x)
        lo_rank, hi_rank = shard(rows, self.ctx.rank, self.ctx.world_size)
        mine = x[lo_rank:hi_rank]
        if self.device.type == "cuda":
            mine = mine.pin_memory()             # so each copy below is queued, not waited for
        seed = noise_seed(self.cfg.train.seed, "train", step)
        for m in range(self.accumulation):
            lo = m * self.micro
            noise = Noise(seed, rows, lo_rank + lo, lo_rank + lo + self.micro)
            x_mb = mine[lo:lo + self.micro].to(self.device, non_blocking=True).contiguous(
                memory_format=self.memory_format)
            x_enc, x_target = model_inputs(x_mb, self.cfg.data.binarize, self.cfg.data.encoder_sees, noise)
            yield x_enc, x_target, noise

    def _set_ema_decay(self) -> None:
        """The EMA decay of the next applied step, d = min(train.ema, (1 + n) / (10 + n)) with n - 1 steps applied
        (train.ema_warmup) else train.ema, as the param groups' `ema_decay` (computed on the device)."""
        t = self.cfg.train
        n = self.counts[0] + 1                                          # on the device: no host read
        decay = torch.clamp((1 + n) / (10 + n), max=t.ema) if t.ema_warmup else t.ema
        for group in self.optimizer.param_groups:
            group["ema_decay"] = decay

    def _after_step(self, sums: dict[str, Tensor], rows: int, votes: Votes | None,
                    outcome: StepOutcome) -> StepStats:
        """Global means of the micro-batch sums and the ranks' summed `votes()` in one all-reduce; the counters
        updated by the optimizer's decision a (consecutive skips: (c + 1)(1 - a)); all of it on its way to the
        host, not waited for."""
        keys = sorted(sums)
        local = torch.stack([sums[k].detach().float() for k in keys])
        mine = self._to_device(votes() if votes is not None else [])
        total = self.ctx.all_reduce_sum(torch.cat([local, mine]))
        a = outcome.applied.double()
        applied, skipped, in_a_row = self.counts.unbind()
        self.counts = torch.stack([applied + a, skipped + 1 - a, (in_a_row + 1) * (1 - a)])
        decision = torch.stack([outcome.grad_norm.double(), a])
        return StepStats(torch.cat([total.double(), decision, self.counts]), keys, len(mine), rows)

    def _to_device(self, values: list[float]) -> Tensor:
        """A few host numbers on the device, without waiting for the work queued there (pinned on a GPU)."""
        host = torch.tensor(values, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def skipped_total(self) -> int:
        """Skipped steps so far (a read of the device: off the step's path)."""
        return int(self.counts[1])

    @property
    def consecutive_skips(self) -> int:
        return int(self.counts[2])

    def counters(self) -> dict[str, float]:
        """The step counters and, under fp16, the loss scale s and its count of applied steps since the last
        change (so a resumed fp16 run scales as the uninterrupted one)."""
        applied, skipped, in_a_row = (int(c) for c in self.counts.tolist())
        out: dict[str, float] = {"skipped_total": skipped, "consecutive_skips": in_a_row, "applied_steps": applied}
        if self.scaler is not None and self.scaler.is_enabled():
            scale = self.scaler.state_dict()
            out |= {"loss_scale": float(scale["scale"]), "loss_scale_growth": int(scale["_growth_tracker"])}
        return out

    def load_counters(self, counters: dict[str, float]) -> None:
        """Restore `counters()`; a checkpoint of another precision (no loss scale) keeps train.fp16_init_scale."""
        self.counts = torch.tensor([counters[k] for k in ("applied_steps", "skipped_total", "consecutive_skips")],
                                   dtype=torch.float64, device=self.device)
        if self.scaler is not None and self.scaler.is_enabled() and "loss_scale" in counters:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": float(counters["loss_scale"]),
                                         "_growth_tracker": int(counters["loss_scale_growth"])})

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @abstractmethod
    def full_weights(self, which: str) -> dict[str, Tensor]:
        """Full float32 parameters ('raw') or their EMA ('ema') by name, on every rank (collective)."""

    @abstractmethod
    def full_optimizer(self) -> dict[str, dict[str, Tensor]]:
        """Full Adamax moments and EMA by parameter name, plus the step count (collective)."""

    @abstractmethod
    def buffers(self) -> dict[str, Tensor]:
        """The persistent buffers (state_dict entries that are not trained parameters), never partitioned."""

    def eval_view(self, which: str = "ema") -> nn.Module:
        """A module with the full EMA ('ema') or raw ('raw') float32 weights, for validation, test and sampling
        (collective: every rank calls it). It is a separate copy: evaluating it never touches training state."""
        weights = {**self.full_weights(which), **self.buffers()}
        self.view.load_state_dict(weights)
        return self.view.eval()

    def save_native(self, directory: Path, tag: str, client_state: dict[str, Any]) -> bool:
        """Write this engine's own checkpoint (partitioned state, each rank's RNG) under directory/tag,
        collectively; returns whether it wrote one. The torch engine has none: its full state is all there is."""
        return False

    def load_native(self, directory: Path, tag: str) -> None:
        """Load what `save_native` wrote under directory/tag at this world size (nothing for the torch engine)."""

    def full_state(self) -> dict[str, Any]:
        """Everything a resume needs, unpartitioned and engine-independent (collective): model, ema, optimizer,
        counters. Loadable by either engine at any world size."""
        buffers = self.buffers()
        return {"model": {**self.full_weights("raw"), **buffers}, "ema": {**self.full_weights("ema"), **buffers},
                "optimizer": self.full_optimizer(), "counters": self.counters()}
