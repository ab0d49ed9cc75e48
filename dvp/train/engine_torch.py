"""The single-process reference engine: plain torch with the same optimizer, clipping, skipping and EMA as the
DeepSpeed engine, against which every DeepSpeed run is checked (see dvp.train.engine for the interface)."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dvp.core.noise import Noise
from dvp.model.objectives import elbo_stats
from dvp.model.precision import autocast
from dvp.parallel.context import DistContext
from dvp.train.engine import Engine
from dvp.train.optim import AdamaxEMA, StepOutcome


class TorchEngine(Engine):
    """The single-process reference engine: plain torch, the same optimizer, clip, skip and EMA as DeepSpeed's."""

    def __init__(self, model: nn.Module, cfg: DictConfig, image_shape: tuple[int, int, int], ctx: DistContext,
                 state: dict[str, Any] | None = None) -> None:
        if ctx.world_size > 1:
            raise ValueError("TorchEngine runs in one process; use dist.engine=deepspeed for more")
        super().__init__(model, cfg, image_shape, ctx)
        t = cfg.train
        self.model = model.to(self.device, memory_format=self.memory_format)
        if state is not None:
            self.model.load_state_dict(state["model"])
        self.params = dict((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        self.optimizer = AdamaxEMA(self.params.values(), lr=t.lr, weight_decay=t.weight_decay, clip=t.grad_clip,
                                   skip=t.grad_skip)
        self.optimizer.init_state()
        self.model.train()       # for good: evaluation uses a separate module (`eval_view`)
        if state is not None:
            self._load_optimizer(state)
        self.forward = torch.compile(self.model) if t.compile else self.model

    def _forward_backward(self, x_enc: Tensor, x_target: Tensor, noise: Noise) -> dict[str, Tensor]:
        with autocast(self.cfg.train.precision, self.device):
            terms = self.forward(x_enc, x_target, noise=noise)
        stats = elbo_stats(terms, self.image_shape)
        loss = stats["loss"] / self.accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return stats

    def _optimizer_step(self) -> StepOutcome:
        """AdamaxEMA's step (through the fp16 loss scale, which skips it on an overflow), then the gradients
        freed for the next step's accumulation."""
        if self.scaler:
            outcome = self.scaler.step(self.optimizer)     # the optimizer's outcome, None when skipped
            self.scaler.update()
        else:
            outcome = self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome.not_reached(self.device) if outcome is None else outcome

    def full_weights(self, which: str) -> dict[str, Tensor]:
        state = self.optimizer.state
        return {n: (state[p]["ema"] if which == "ema" else p.detach()).clone() for n, p in self.params.items()}

    def buffers(self) -> dict[str, Tensor]:
        """The persistent buffers (state_dict entries that are not trained parameters), never partitioned."""
        return {n: b.clone() for n, b in self.model.state_dict().items() if n not in self.params}

    def full_optimizer(self) -> dict[str, Any]:
        state = self.optimizer.state
        first = next(iter(self.params.values()))
        return {"step": float(state[first]["step"]),
                "tensors": {n: {k: state[p][k].clone() for k in ("exp_avg", "exp_inf")}
                            for n, p in self.params.items()}}

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        for name, p in self.params.items():
            s = self.optimizer.state[p]
            s["step"].fill_(state["optimizer"]["step"])
            for key in ("exp_avg", "exp_inf"):
                s[key].copy_(state["optimizer"]["tensors"][name][key])
            s["ema"].copy_(state["ema"][name])
        self.load_counters(state["counters"])
