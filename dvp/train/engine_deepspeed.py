"""The DeepSpeed engine: data parallelism over any number of processes, ZeRO stage 0-3 (`dist.zero_stage`),
fp32 / bf16 / fp16 (`train.precision`), on the process group of `dvp.parallel`.

    engine = DeepSpeedEngine(model, cfg, image_shape, ctx)     # same interface as engine.TorchEngine
    engine.save_native(dir, tag, client_state); engine.load_native(dir, tag)   # DeepSpeed's shards + rank RNG

Choices, and why:
- Precision: DeepSpeed's `torch_autocast` mode, not its bf16/fp16 modes. Those cast the parameters to 16 bits,
  which would also cast the float32 heads and residual-stream 1x1 convs (`blocks.Float32Conv2d`) and quantise
  0.001-sized EMA updates; under torch_autocast the parameters, gradients (all-reduced in float32:
  `lower_precision_safe_modules` is empty) and optimizer state stay float32, so the single-process engine's
  precision policy holds as is. fp16 gets dynamic loss scaling by a torch GradScaler at every stage: ours
  (`engine.LossScale`, train.fp16_init_scale), put in DeepSpeed's place. DeepSpeed calls the scaler's
  update() only in the optimizer step that it reaches: at ZeRO 1-3 a step whose scaled gradient overflows ends
  before it (DeepSpeed finds the overflow in the gradient norm), so the scale never backed off and every later
  step overflowed too; `_optimizer_step` backs it off then, as torch's GradScaler does in the torch engine.
- Optimizer: our `optim.AdamaxEMA` as the client optimizer (`zero_allow_untested_optimizer`); it clips, skips and
  keeps the EMA in its state, so ZeRO partitions, saves and gathers the EMA with the moments.
- Batch: `train_micro_batch_size_per_gpu` = dist.micro_batch and `gradient_accumulation_steps` =
  train.batch_size / (world x micro); DeepSpeed divides each micro-batch loss by the accumulation steps and
  averages gradients over ranks, so the gradient is the global batch mean.
- Communication: gradient buckets of clamp(n_params / 4, 2^16, 5e7) elements (`bucket_size`): a model above
  256k parameters is reduced in 4 or more buckets, so with `overlap_comm` (ZeRO 2 and 3: DeepSpeed reduces each
  bucket on a side stream while backward computes the next) communication overlaps compute; at least 2^16
  elements (256 kB: fewer would be latency-bound messages), at most 5e7 (200 MB of float32 per buffer, two
  with overlap_comm), where DeepSpeed's default 5e8 would allocate 2 GB per rank whatever the model's size. ZeRO 1
  reduces after backward (DeepSpeed installs its
  gradient hooks at stage 1 only with overlap_comm, which we leave off there: DeepSpeed's default), ZeRO 0 in
  its own buckets after backward. The bucketing changes no number: each gradient element is the same sum over
  ranks whatever bucket it travels in (tests/test_distributed.py's bitwise world-size checks).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dvp.core.noise import Noise
from dvp.model.objectives import elbo_stats
from dvp.parallel.context import DistContext, deepspeed_environment
from dvp.train.engine import Engine
from dvp.train.optim import AdamaxEMA, StepOutcome
from dvp.train.rng import load_rank_rng, save_rank_rng


def bucket_size(n_params: int) -> int:
    """Elements per gradient bucket: clamp(n_params / 4, 2^16, 5e7) (see the module docstring)."""
    return int(min(5e7, max(2 ** 16, n_params // 4)))


def deepspeed_config(cfg: DictConfig, world_size: int, micro: int, n_params: int) -> dict[str, Any]:
    """The DeepSpeed config of a run (no train_batch_size: DeepSpeed derives it, so any world size works)."""
    t = cfg.train
    bucket = bucket_size(n_params)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.batch_size // (world_size * micro),
        "gradient_clipping": 0.0,                        # clipped (and skipped) in optim.AdamaxEMA
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": cfg.dist.zero_stage, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket, "overlap_comm": cfg.dist.zero_stage >= 2},
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }
    if cfg.dist.zero_stage in (1, 2):
        # DeepSpeed's own gradient norm (a host read each step) only where its fp16 overflow check needs it:
        # AdamaxEMA computes the norm that clips and skips
        ds["zero_optimization"]["compute_grad_norm"] = t.precision == "fp16"
    if cfg.dist.zero_stage == 3:     # one optimizer call over the whole partition: the clip norm is global
        ds["zero_optimization"]["sub_group_size"] = 2 ** 40
        del ds["zero_optimization"]["allgather_bucket_size"]        # not a stage-3 key
    if t.precision in ("bf16", "fp16"):
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if t.precision == "bf16" else "float16",
                                "lower_precision_safe_modules": []}
    return ds


class DeepSpeedEngine(Engine):
    """`deepspeed.initialize` over the model with AdamaxEMA; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: DictConfig, image_shape: tuple[int, int, int], ctx: DistContext,
                 state: dict[str, Any] | None = None) -> None:
        import deepspeed
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        super().__init__(model, cfg, image_shape, ctx)
        t = cfg.train
        model = model.to(self.device, memory_format=self.memory_format)
        if state is not None:
            model.load_state_dict(state["model"])
        self.stage = cfg.dist.zero_stage
        partitioned = {"norm_reduce": ctx.all_reduce_sum} if self.stage >= 1 else {}   # ZeRO 0: whole grads
        optimizer = AdamaxEMA([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                              weight_decay=t.weight_decay, clip=t.grad_clip, skip=t.grad_skip, **partitioned)
        self._outcome: StepOutcome | None = None     # what the optimizer's last step() returned, until read
        self._keep_outcome(optimizer)
        deepspeed_environment(ctx)
        self.ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, ctx.world_size, self.micro,
                                                                   sum(p.numel() for p in model.parameters())),
                                           dist_init_required=False)
        self.optimizer = optimizer
        self.partitions = (list(self.ds.optimizer.fp32_partitioned_groups_flat) if self.stage == 3
                           else optimizer.params())       # the float32 tensors this rank updates
        optimizer.init_state(self.partitions)
        if self.stage in (1, 2):
            self.ds.optimizer._lazy_init_hp_params_optimizer_state()   # link the state to the parameters now
        if ctx.world_size == 1 and self.stage == 0:
            self.ds.enable_backward_allreduce = False   # one process: the all-reduce would only copy every gradient
        self.module = self.ds.module
        self.ds.train()          # for good: evaluation uses a separate module (`eval_view`)
        self.params = dict((n, p) for n, p in self.module.named_parameters() if p.requires_grad)
        if self.scaler is not None:       # ours in DeepSpeed's place: configurable, backed off in `_optimizer_step`
            owner = self.ds.optimizer if self.stage > 0 else self.ds
            name = "torch_autocast_gradscaler" if self.stage > 0 else "torch_autocast_z0_gradscaler"
            if getattr(owner, name, None) is None:
                raise RuntimeError(f"DeepSpeed has no {name} under fp16 torch_autocast: check its version")
            setattr(owner, name, self.scaler)
        if t.compile:
            self.ds.compile()
        if state is not None:
            self._load_optimizer(state)

    def _forward_backward(self, x_enc: Tensor, x_target: Tensor, noise: Noise) -> dict[str, Tensor]:
        """DeepSpeed's forward and backward (it divides the loss by the accumulation steps), then its step(),
        which steps the optimizer only at the last micro-batch (DeepSpeed counts micro-batches in step())."""
        stats = elbo_stats(self.ds(x_enc, x_target, noise=noise), self.image_shape)
        self.ds.backward(stats["loss"])
        self.ds.step()
        return stats

    def _optimizer_step(self) -> StepOutcome:
        """What AdamaxEMA.step returned when DeepSpeed called it in the last micro-batch's `ds.step()` (kept by
        `_keep_outcome`), or not reached: then, at ZeRO 1-3 under fp16, DeepSpeed found the overflow first and
        skipped the step before the scaler's update(), so the scale backs off here."""
        outcome, self._outcome = self._outcome, None
        if self.scaler is not None and self.stage > 0 and self.ds.optimizer.overflow:
            self.scaler.back_off()
        return StepOutcome.not_reached(self.device) if outcome is None else outcome

    def _keep_outcome(self, optimizer: AdamaxEMA) -> None:
        """DeepSpeed, not this engine, calls the optimizer's step() (inside `ds.step()`, through its ZeRO
        optimizer or fp16 scaler) and drops what it returns; so the engine's own wrapper of that step() keeps
        the returned `StepOutcome` for `_optimizer_step`. The EMA decay needs no such path: it is a param-group
        hyperparameter (`ema_decay`, like `lr`), which DeepSpeed's wrappers pass through untouched."""
        step = optimizer.step

        def kept(*args: Any, **kwargs: Any) -> StepOutcome:
            self._outcome = step(*args, **kwargs)
            return self._outcome
        optimizer.step = kept     # type: ignore[method-assign]

    # ---- full (gathered) views of the partitioned state --------------------------------------------------------
    def _full(self, p: Tensor, key: str | None) -> Tensor:
        """Parameter `p`'s float32 master ('key' None) or optimizer state `key`, whole, on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        if self.stage == 0:
            return (p.detach() if key is None else self.optimizer.state[p][key]).clone()
        full = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return full.reshape(_shape(p)).clone()

    def full_weights(self, which: str) -> dict[str, Tensor]:
        return {n: self._full(p, "ema" if which == "ema" else None) for n, p in self.params.items()}

    def buffers(self) -> dict[str, Tensor]:
        """The persistent buffers (state_dict entries that are not trained parameters), never partitioned."""
        return {n: b.clone() for n, b in self.module.state_dict().items() if n not in self.params}

    def full_optimizer(self) -> dict[str, Any]:
        return {"step": float(self.optimizer.state[self.partitions[0]]["step"]),
                "tensors": {n: {k: self._full(p, k) for k in ("exp_avg", "exp_inf")}
                            for n, p in self.params.items()}}

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        """Re-partition a full state (any world size, any engine) onto this engine's partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state
        for flat in self.partitions:
            self.optimizer.state[flat]["step"].fill_(state["optimizer"]["step"])
        for name, p in self.params.items():
            values = {**state["optimizer"]["tensors"][name], "ema": state["ema"][name]}
            for key, value in values.items():
                value = value.to(self.device, torch.float32)
                if self.stage == 0:
                    self.optimizer.state[p][key].copy_(value)
                else:
                    safe_set_full_optimizer_state(p, value, key)
        self.load_counters(state["counters"])

    # ---- DeepSpeed's own checkpoint ----------------------------------------------------------------------------
    def save_native(self, directory: Path, tag: str, client_state: dict[str, Any]) -> bool:
        """Every rank's shards under directory/tag (DeepSpeed moves directory/latest to `tag` last) and its RNG."""
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state)
        save_rank_rng(directory / tag, self.ctx)
        return True

    def load_native(self, directory: Path, tag: str) -> None:
        """Load the shards and this rank's RNG saved at this world size."""
        _, client = self.ds.load_checkpoint(str(directory), tag=tag, load_lr_scheduler_states=False)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {directory / tag}")
        if self.stage in (1, 2):   # loading relinks the parameters but not their optimizer state: link it again
            self.ds.optimizer._hp_optimizer_states_linked = False
            self.ds.optimizer._lazy_init_hp_params_optimizer_state()
        load_rank_rng(directory / tag, self.ctx)


def _shape(p: Tensor) -> torch.Size:
    """A parameter's full shape (ZeRO-3 empties p and keeps it in ds_shape)."""
    return getattr(p, "ds_shape", p.shape)
