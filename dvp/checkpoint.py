"""Checkpoints: one self-contained file per checkpoint, written atomically and loaded without unpickling code.

A checkpoint is a plain dict of tensors and Python scalars/containers:
    {"format": "dvp-checkpoint", "version": 1, "config": <resolved config as a dict>, "image_shape": [C, H, W],
     "engine": {"model", "ema", "optimizer", "counters"}, "loop": {step, epoch, best_val, ...},
     "batches": <BatchIterator state>, "rng": {"torch": ByteTensor}}
The model and EMA state dicts include the DCT normalisation `dct_scale`, so evaluation and sampling need nothing
else. Writes go to a temporary file in the same directory, are fsync'ed and renamed over the target
(os.replace), so a crash mid-save leaves the previous checkpoint intact. Loading uses
`torch.load(weights_only=True)`: a file that would run code is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT, VERSION = "dvp-checkpoint", 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write `state` (plus format tags) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a dvp checkpoint safely; raise CheckpointError for a missing, truncated, foreign or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain containers and was "
                              f"refused (it could run code when loaded): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch file ({str(e).splitlines()[0]}); "
                              "use another checkpoint (checkpoints/best.pt or last.pt) or start a new run_dir"
                              ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dvp checkpoint (no 'format: {FORMAT}' tag)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this dvp reads {VERSION}")
    return state
