"""A process's random generator states in checkpoints: the CPU generator's and its accelerator's, keyed by device
type, so that a checkpoint written on a GPU resumes on the CPU (and one written on the CPU on a GPU), each state
going only where it fits.

    states = accelerator_rng(device)          # {} on the CPU, {"cuda": ByteTensor} on a GPU
    set_accelerator_rng(states, device)       # a state of another device type is left out
    save_rank_rng(directory, ctx); load_rank_rng(directory, ctx)    # directory/rng_rank<r>.pt: CPU + accelerator

Training draws do not depend on these states (its noise is seeded by (train.seed, step), see dvp.core.noise);
they are saved so that a resumed process goes on exactly as the uninterrupted one, whatever else draws.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dvp.core.paths import replace_atomically
from dvp.parallel.context import DistContext, accelerator_rng_state, set_accelerator_rng_state


def accelerator_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """The accelerator RNG state of `device` keyed by its type ({'cuda': state}); none on the CPU."""
    return {} if device.type == "cpu" else {device.type: accelerator_rng_state()}


def set_accelerator_rng(states: dict[str, Any], device: torch.device) -> None:
    """Restore the accelerator RNG state saved for `device`'s type, if any (a CPU ignores a GPU's state)."""
    if device.type != "cpu" and device.type in states:
        set_accelerator_rng_state(states[device.type])


def rank_rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng_rank{rank}.pt"


def save_rank_rng(directory: Path, ctx: DistContext) -> None:
    """This rank's CPU and accelerator RNG in directory/rng_rank<r>.pt (atomically)."""
    state = {"cpu": torch.get_rng_state(), **accelerator_rng(ctx.device)}
    replace_atomically(rank_rng_file(directory, ctx.rank), lambda tmp: torch.save(state, tmp))


def load_rank_rng(directory: Path, ctx: DistContext) -> None:
    """Restore this rank's RNG if it was saved at this world size (on any device: tensors load to the CPU)."""
    path = rank_rng_file(directory, ctx.rank)
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.set_rng_state(state["cpu"])
        set_accelerator_rng(state, ctx.device)
