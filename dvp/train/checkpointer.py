"""A run's checkpoints, with one owner: what they hold, when a save is committed, and how a run resumes.

    checkpoints = Checkpointer(run_dir, ctx)
    saved = checkpoints.read_last(required=cfg.train.resume)      # last.pt's contents; None: a new run
    engine, state = checkpoints.restore(cfg, model, data.shape, batches, saved)    # new or resumed
    checkpoints.save(checkpoints.last, engine, state, batches.state_dict())      # collective; best.pt likewise

Layout of run_dir/checkpoints:
    last.pt, best.pt    consolidated, one file each (`checkpoint.save_checkpoint`: atomic, weights_only): the
                        config, image shape, the engine's full state (model, EMA, optimizer moments by parameter
                        name, counters), the loop state, the batch position, rank 0's RNG and `native` (where the
                        engine's own checkpoint of this state is; None when it has none): what dvp-eval and
                        dvp-sample read, and what a resume at any world size or engine reads.
    deepspeed/step<N>/  the engine's own checkpoint of last.pt at step N (`Engine.save_native`: DeepSpeed's
                        shards, its `latest` file moved last, and each rank's RNG); the torch engine writes none.
Commit point: every rank writes its part first; then rank 0 replaces last.pt (os.replace) and only then deletes
the older shard folders. A crash anywhere in a save leaves the previous last.pt and the shards it names usable.
Resume: at the world size, ZeRO stage and engine that wrote the shards, from them (each rank's partition and RNG
as saved); at any other, from the consolidated state, which the engine re-partitions (rank 0's RNG from
last.pt). A checkpoint that does not fit the run is a CheckpointError before anything is written.
A run's checkpoint as a folder (`RUN_FILES`: config.yaml, metrics.jsonl, last.pt, best.pt): `export_run` links a
run dir's into a folder, `import_run` copies one back, `saved_step` tells which step a run dir's last.pt holds
(Ray Train registers and restores these folders, dvp.tune.worker).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from dvp.core.config import to_dict
from dvp.core.errors import CheckpointError, ConfigError
from dvp.core.paths import replace_atomically
from dvp.data.batches import BatchIterator
from dvp.parallel.context import DistContext
from dvp.train.checkpoint import check_weights_match, load_checkpoint, remove_stale_temporaries, save_checkpoint
from dvp.train.engine import Engine
from dvp.train.engines import engine_kind, make_engine
from dvp.train.rng import accelerator_rng, set_accelerator_rng

NATIVE = "deepspeed"
"""The folder of the engine's own checkpoints, under run_dir/checkpoints."""
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt")
"""A run at its last checkpoint as files, relative to the run dir (best.pt once a validation improved): the state
and the records up to it, laid out so that dvp-eval and dvp-sample read a copy as a run dir (Ray Train's
registered checkpoints, dvp.tune.worker)."""
APPENDED = ("metrics.jsonl",)
"""Run files that training goes on writing: copied, never hard-linked."""


@dataclass
class LoopState:
    """Where the training loop is; saved in every checkpoint."""
    step: int = 0
    epoch: int = 0
    best_val: float = math.inf
    epochs_since_best: int = 0
    records: int | None = None    # records in metrics.jsonl when this state was saved (None: not known)


class Checkpointer:
    """Saves and restores the run in `run_dir` on the processes of `ctx` (see the module docstring)."""

    def __init__(self, run_dir: Path, ctx: DistContext) -> None:
        self.ctx = ctx
        self.folder = run_dir / "checkpoints"
        self.last, self.best = self.folder / "last.pt", self.folder / "best.pt"
        self.native = self.folder / NATIVE

    def read_last(self, required: bool) -> dict[str, Any] | None:
        """last.pt's contents (loaded on every rank), or None for a new run; `required` (train.resume): a
        ConfigError when there is none."""
        if required and not self.last.exists():
            raise ConfigError(f"train.resume=true but {self.last} does not exist")
        return load_checkpoint(self.last) if self.last.exists() else None

    def remove_stale_temporaries(self) -> None:
        """Rank 0, before the run writes: delete what saves killed midway left (see `checkpoint`)."""
        remove_stale_temporaries(self.folder)

    # ---- resuming -----------------------------------------------------------------------------------------------
    def restore(self, cfg: DictConfig, model: nn.Module, image_shape: tuple[int, int, int],
                batches: BatchIterator, saved: dict[str, Any] | None) -> tuple[Engine, LoopState]:
        """The engine (resumed from `saved` when given), `batches` moved to the saved position, and the loop
        state: from the engine's own checkpoint where it fits this run, else from the consolidated state."""
        if saved is None:
            return make_engine(model, cfg, image_shape, self.ctx), LoopState()
        for which in ("model", "ema"):
            check_weights_match(self.last, model.state_dict(), saved["engine"][which], which)
        native = saved.get("native")
        from_native = native is not None and self._native_fits(native, cfg)
        try:
            engine = make_engine(model, cfg, image_shape, self.ctx, state=None if from_native else saved["engine"])
            if from_native:
                engine.load_native(self.native, native["tag"])
                engine.load_counters(saved["engine"]["counters"])
            elif self.ctx.is_main:   # rank 0's RNG is the one last.pt holds (training draws do not depend on it)
                torch.set_rng_state(saved["rng"]["torch"])
                set_accelerator_rng(saved["rng"], self.ctx.device)
            batches.load_state_dict(saved["batches"])
            state = LoopState(**saved["loop"])
        except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise CheckpointError(f"{self.last} does not fit this run ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())}); start a new run_dir") from None
        return engine, state

    def _native_fits(self, native: dict[str, Any], cfg: DictConfig) -> bool:
        """Whether the engine's own checkpoint that last.pt names was written by the engine, world size and ZeRO
        stage of this run (and is still there)."""
        return (native["world_size"] == self.ctx.world_size and native["zero_stage"] == cfg.dist.zero_stage
                and engine_kind(cfg, self.ctx.world_size) == "deepspeed" and (self.native / native["tag"]).is_dir())

    # ---- saving -------------------------------------------------------------------------------------------------
    def save(self, path: Path, engine: Engine, state: LoopState, batches: dict[str, int]) -> None:
        """Save `engine`, the loop `state` and the `batches` position to `path` (last.pt or best.pt), collectively
        (every rank calls it; the caller defers signals around it).

        Every rank: the engine's full state (gathered) and, for last.pt, the engine's own checkpoint under
        deepspeed/step<N>. Then rank 0 replaces `path` atomically, the commit point, and deletes older shard
        folders only after it."""
        full = engine.full_state()
        native = None
        if path == self.last:
            tag = f"step{state.step}"
            if engine.save_native(self.native, tag, {"loop": asdict(state), "batches": batches}):
                native = {"tag": tag, "world_size": self.ctx.world_size, "zero_stage": engine.cfg.dist.zero_stage}
        self.ctx.barrier()
        if self.ctx.is_main:
            save_checkpoint(path, {"config": to_dict(engine.cfg), "image_shape": list(engine.image_shape),
                                   "engine": full, "loop": asdict(state), "batches": batches,
                                   "rng": {"torch": torch.get_rng_state(), **accelerator_rng(self.ctx.device)},
                                   "native": native})
            if native is not None:
                for old in self.native.glob("step*"):
                    if old.name != native["tag"] and old.is_dir():
                        shutil.rmtree(old, ignore_errors=True)
        self.ctx.barrier()


# ---- a run's checkpoint as a folder ---------------------------------------------------------------------------
def saved_step(run_dir: Path) -> int:
    """The step of run_dir's last.pt (-1: none)."""
    last = run_dir / "checkpoints" / "last.pt"
    return int(load_checkpoint(last)["loop"]["step"]) if last.is_file() else -1


def export_run(run_dir: Path, folder: Path) -> None:
    """`RUN_FILES` of `run_dir` into the new `folder`: hard links (nothing copied until the folder is
    persisted), copies of `APPENDED` files and across file systems."""
    for name in RUN_FILES:
        source, target = run_dir / name, folder / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            if name in APPENDED:
                shutil.copyfile(source, target)
                continue
            try:
                os.link(source, target)
            except OSError:      # another file system
                shutil.copyfile(source, target)


def import_run(folder: Path, run_dir: Path) -> None:
    """`RUN_FILES` of an exported `folder` into `run_dir`, each replaced atomically (rank 0, before training)."""
    for name in RUN_FILES:
        if (folder / name).is_file():
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(run_dir / name, lambda tmp, src=folder / name: shutil.copyfile(src, tmp))
