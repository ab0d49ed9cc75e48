"""Checkpoints: one self-contained file per checkpoint, written atomically and loaded without unpickling code.

A checkpoint is a plain dict of tensors and Python scalars/containers:
    {"format": "dvp-checkpoint", "version": 1, "config": <resolved config as a dict>,
     "image_shape": [C, H, W], "engine": {"model", "ema", "optimizer", "counters"},
     "loop": {step, epoch, best_val, ...}, "batches": <BatchIterator state>, "rng": {"torch": ByteTensor}}
The model and EMA state dicts include the DCT normalisation `dct_scale`, so evaluation and sampling need
nothing else. Writes go to a temporary file `.NAME.*.tmp` in the same directory, are fsync'ed and renamed
over the target (os.replace), so a crash mid-save leaves the previous checkpoint intact (and at worst a
temporary file, see `remove_stale_temporaries`). Loading first judges the file by its first bytes, so that an
empty, text, random, truncated or foreign file is named as such, then uses `torch.load(weights_only=True)`:
a file that would run code is refused. Every failure is a one-line `CheckpointError` that names the file.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import reprlib
import stat
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dvp.core.errors import CheckpointError
from dvp.core.file_kind import first_zip_entry, is_legacy_torch, pickle_imports, text_start

FORMAT, VERSION = "dvp-checkpoint", 1

_ZIP_MAGIC = b"PK\x03\x04"          # torch's default (zip) serialization
_PICKLE_MAGIC = b"\x80"             # a pickle of protocol >= 2: torch's legacy serialization, or plain pickle
_HEAD_BYTES = 4096                  # what is read to judge a file
_PICKLE_SCAN_BYTES = 256 * 1024     # how much of a plain pickle is parsed (not run) to tell it from noise
_TEMPORARY_PATTERN = ".*.pt.*.tmp"  # what `save_checkpoint` leaves behind when killed mid-save
_DAMAGED_HINT = "use another checkpoint (checkpoints/best.pt or last.pt) or start a new run_dir"
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+?)\.? (?:was not an allowed global|whose module)")


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
    """Load a complete dvp checkpoint without running code.

    Raises:
        CheckpointError: one line naming the file and what it is not: missing, a directory, empty, text,
            random bytes, a zip or pickle that is not a torch file, a truncated or damaged torch file, a torch
            file holding pickled objects other than tensors (refused), a foreign torch file (no dvp format
            tag), another checkpoint version, or a dvp checkpoint lacking config, image_shape or weights.
    """
    path = Path(path)
    problem = _foreign_file_problem(path, _read_head(path))
    if problem is not None:
        raise CheckpointError(f"{path} is not a dvp checkpoint: {problem}")
    state = _torch_load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dvp checkpoint (no 'format: {FORMAT}' tag)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; "
                              f"this dvp reads {VERSION}")
    problem = _structure_problem(state)
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete dvp checkpoint: {problem}")
    return state


def check_weights_match(path: Path, expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                        what: str) -> None:
    """Require a checkpoint's `weights` to have exactly the keys and shapes of `expected`.

    Call it before `load_state_dict`, e.g. `check_weights_match(path, model.state_dict(),
    state["engine"]["ema"], "ema")`, to turn torch's multi-line size-mismatch report into one line.

    Args:
        path: the checkpoint file, named in the message.
        expected: the state dict of a model built from the config (only the shapes are compared).
        weights: the checkpoint's state dict for that model.
        what: which weights these are ("ema", "model"), named in the message.

    Raises:
        CheckpointError: naming the first key (in `expected`'s order) that the checkpoint lacks or whose shape
            differs, else the first key of `weights` that the model lacks.
    """
    problem = _weights_problem(expected, weights)
    if problem is not None:
        raise CheckpointError(f"{path}: {what} weights: {problem} "
                              "(the checkpoint's config and weights disagree)")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the `.NAME.pt.*.tmp` files that `save_checkpoint` leaves when its process is killed mid-save.

    Only regular files directly in `directory` are removed (no symlinks, no subdirectories); a missing
    directory removes nothing. Call it only while no other process is saving into `directory`, e.g. when a
    run starts or resumes. Returns the removed paths, sorted.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for candidate in sorted(directory.glob(_TEMPORARY_PATTERN)):
        if stat.S_ISREG(candidate.lstat().st_mode):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


# ------------------------------------------------------------------------------------- judging the file

def _read_head(path: Path) -> bytes:
    """The first bytes of `path`; CheckpointError when it is missing, not a regular file or unreadable."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    try:
        with path.open("rb") as f:
            return f.read(_HEAD_BYTES)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.strerror or err})") from None


def _foreign_file_problem(path: Path, head: bytes) -> str | None:
    """What the file is when its first bytes show it is no torch file (None when it may be one)."""
    if head.startswith(_ZIP_MAGIC) or (head and _ZIP_MAGIC.startswith(head)):
        return _zip_problem(path, head)
    if head.startswith(_PICKLE_MAGIC):
        return None if is_legacy_torch(head) else _pickle_problem(path)
    if not head:
        return "empty file"
    start = text_start(head)
    if start is not None:
        return f"a text file (starts {start})"
    return f"random or binary data, not a torch file (first bytes {head[:8].hex(' ')})"


def _zip_problem(path: Path, head: bytes) -> str | None:
    """What a zip file is when it is not a complete torch archive (one holding `<name>/data.pkl`)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:   # zipfile parses untrusted bytes; any failure means a damaged archive
        first = first_zip_entry(head)
        if first is not None and not first.endswith("data.pkl"):
            return f"a damaged or truncated zip archive, not a torch checkpoint (first entry {first!r})"
        return ("truncated torch file (its zip archive ends before the central directory: the file was cut "
                f"short, e.g. by a crash or an incomplete copy); {_DAMAGED_HINT}")
    if any(name.endswith("/data.pkl") for name in names):
        return None
    if names and all(name.endswith(".npy") for name in names):
        return "a numpy .npz archive, not a torch checkpoint"
    shown = ", ".join(repr(name) for name in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"a zip archive but not a torch checkpoint (it holds {shown or 'nothing'})"


def _pickle_problem(path: Path) -> str:
    """What a file starting with a pickle opcode but not torch's legacy magic number is: a pickle or noise."""
    with path.open("rb") as f:
        data = f.read(_PICKLE_SCAN_BYTES + 1)
    stream = io.BytesIO(data[:_PICKLE_SCAN_BYTES])
    try:
        pickletools.dis(stream, out=io.StringIO())   # checks opcodes, stack and memo; runs nothing
    except Exception:   # dis parses untrusted bytes
        if len(data) <= _PICKLE_SCAN_BYTES or stream.tell() < _PICKLE_SCAN_BYTES:
            return f"random or binary data, not a torch file (first bytes {data[:8].hex(' ')})"
    imports = pickle_imports(data[:_PICKLE_SCAN_BYTES])
    if imports:
        return (f"a plain Python pickle that imports {', '.join(imports[:3])}; refused (it was never "
                "unpickled: loading it could run code)")
    return "a plain Python pickle, not a torch checkpoint"


# -------------------------------------------------------------------------------------- loading the file

def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    """`torch.load(weights_only=True)` with every failure turned into a one-line CheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:   # damaged files raise RuntimeError, EOFError, KeyError, struct.error, ...
        refused = _REFUSED_GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if refused is not None:
            raise CheckpointError(
                f"{path} was refused: it holds pickled Python objects other than tensors and plain "
                f"containers ({refused.group(1)}), and loading those could run code; use a checkpoint "
                "written by dvp"
            ) from None
        raise CheckpointError(f"{path} is not a dvp checkpoint: damaged or truncated torch file "
                              f"({_error_reason(err)}); {_DAMAGED_HINT}") from None


def _error_reason(err: Exception) -> str:
    """The informative first sentence of a (possibly long, multi-line) torch error, at most 150 characters."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0].split(". ")[0] if lines else ""
    module = type(err).__module__
    kind = type(err).__name__ if module == "builtins" else f"{module}.{type(err).__name__}"
    return f"{kind}: {reason[:150]}" if reason else kind


# ------------------------------------------------------------------------------------ checking the content

def _structure_problem(state: dict[str, Any]) -> str | None:
    """What a tagged checkpoint lacks: config (dict), image_shape (3 ints), engine.model / engine.ema."""
    for key in ("config", "image_shape", "engine"):
        if key not in state:
            return f"missing {key!r}"
    if not isinstance(state["config"], dict):
        return f"'config' is {_describe(state['config'])}, not a dict"
    shape = state["image_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        return f"'image_shape' is {_describe(shape)}, not a list of 3 positive ints"
    engine = state["engine"]
    if not isinstance(engine, dict):
        return f"'engine' is {_describe(engine)}, not a dict"
    for part in ("model", "ema"):
        problem = _state_dict_problem(engine.get(part), f"engine.{part}")
        if problem is not None:
            return problem
    return None


def _state_dict_problem(weights: Any, where: str) -> str | None:
    """What keeps `weights` (found at `where`) from being a non-empty dict of named tensors."""
    if weights is None:
        return f"missing {where!r}"
    if not isinstance(weights, dict):
        return f"{where!r} is {_describe(weights)}, not a dict of tensors"
    if not weights:
        return f"{where!r} holds no weights"
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            return f"{where!r} entry {key!r} is {_describe(value)}, not a tensor"
    return None


def _describe(value: Any) -> str:
    """A short one-line description of a value: its type and a clipped repr."""
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _weights_problem(expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> str | None:
    """The first key that `weights` lacks or shapes differently from `expected`, else the first extra key."""
    for key, tensor in expected.items():
        if key not in weights:
            return f"the config's model has key {key!r} that the checkpoint lacks"
        if weights[key].shape != tensor.shape:
            return (f"shapes differ from the config at key {key!r}: checkpoint {list(weights[key].shape)}, "
                    f"config {list(tensor.shape)}")
    extra = next((key for key in weights if key not in expected), None)
    if extra is not None:
        return f"the checkpoint has key {extra!r} that the config's model lacks"
    return None
