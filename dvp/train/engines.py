"""Which engine a run uses: `make_engine` builds the one `dist.engine` names (auto: DeepSpeed for more than one
process, the plain torch engine otherwise).

    engine = make_engine(model, cfg, image_shape, ctx, state=None)
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import nn

from dvp.parallel.context import DistContext
from dvp.train.engine import Engine
from dvp.train.engine_torch import TorchEngine


def engine_kind(cfg: DictConfig, world_size: int) -> str:
    """'torch' or 'deepspeed': dist.engine, where auto means DeepSpeed for more than one process."""
    if cfg.dist.engine != "auto":
        return cfg.dist.engine
    return "deepspeed" if world_size > 1 else "torch"


def make_engine(model: nn.Module, cfg: DictConfig, image_shape: tuple[int, int, int], ctx: DistContext,
                state: dict[str, Any] | None = None) -> Engine:
    """The engine `dist.engine` names (auto: DeepSpeed for world size > 1), optionally resumed from a
    `full_state()` (any engine, any world size)."""
    if engine_kind(cfg, ctx.world_size) == "deepspeed":
        from dvp.train.engine_deepspeed import DeepSpeedEngine  # imports deepspeed (seconds): only when used
        return DeepSpeedEngine(model, cfg, image_shape, ctx, state)
    return TorchEngine(model, cfg, image_shape, ctx, state)
