"""Every unreadable or foreign checkpoint (or data.root) file: one line naming the file and what it is."""
from __future__ import annotations

import io
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dvp.core.config import compose
from dvp.core.errors import CheckpointError, DataError
from dvp.data.datasets import load_data
from dvp.model.vae import build_model
from dvp.train.checkpoint import (
    check_weights_match,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)

IMAGE_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """The state dict of a small real model."""
    return build_model(compose(["model.num_ch=16"]), IMAGE_SHAPE).state_dict()


def _complete_state(weights: dict[str, torch.Tensor]) -> dict:
    """What the trainer saves, minus the parts `load_checkpoint` does not require."""
    return {"config": {"model": {"num_ch": 16}}, "image_shape": list(IMAGE_SHAPE),
            "engine": {"model": weights, "ema": weights}}


def _saved(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    save_checkpoint(path, _complete_state(weights))
    return path


def _load_error(path: Path) -> str:
    """The CheckpointError message of loading `path`, checked to be one line naming the file."""
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


class _Exploit:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_complete_checkpoint_loads(tmp_path: Path, weights) -> None:
    state = load_checkpoint(_saved(tmp_path / "last.pt", weights))
    assert state["image_shape"] == list(IMAGE_SHAPE)
    for part in ("model", "ema"):
        assert all(torch.equal(state["engine"][part][key], value) for key, value in weights.items())


def _zip_of(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("content, expected", [
    (b"", "is not a dvp checkpoint: empty file"),
    (b"hello world\n", "is not a dvp checkpoint: a text file (starts 'hello wor...')"),
    ("r\u00e9sum\u00e9: not a checkpoint".encode(), "a text file (starts 'r\u00e9sum\u00e9: n...')"),
    (_zip_of(**{"notes.txt": b"hi"}), "a zip archive but not a torch checkpoint (it holds 'notes.txt')"),
    (_zip_of(**{"x_train.npy": b"", "x_test.npy": b""}), "a numpy .npz archive, not a torch checkpoint"),
    (pickle.dumps({"format": "dvp-checkpoint", "weights": [1.0, 2.0]}),
     "a plain Python pickle, not a torch checkpoint"),
], ids=["empty", "text", "utf8-text", "zip", "npz", "plain-pickle"])
def test_foreign_files_say_what_they_are(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    assert expected in _load_error(path)


@pytest.mark.parametrize("prefix", [b"", b"\x80", b"\x80\x02", b"PK\x03\x04"], ids=["raw", "pickle-opcode",
                                                                               "pickle-v2", "zip-magic"])
def test_random_bytes_are_never_called_code(tmp_path: Path, prefix: bytes) -> None:
    path = tmp_path / "noise.pt"
    for seed in range(10):
        rng = random.Random(seed)
        path.write_bytes(prefix + rng.randbytes(rng.randrange(1, 4000)))
        message = _load_error(path)
        assert "refused" not in message and "could run code" not in message, message
        assert "is not a dvp checkpoint: " in message
        if prefix != b"PK\x03\x04":
            assert "random or binary data" in message, message


def test_a_checkpoint_cut_short_is_truncated(tmp_path: Path, weights) -> None:
    good = _saved(tmp_path / "last.pt", weights).read_bytes()
    cut = tmp_path / "cut.pt"
    for length in (1, 3, 4, 29, 30, 200, len(good) // 2, len(good) - 22, len(good) - 1):
        cut.write_bytes(good[:length])
        message = _load_error(cut)
        assert "is not a dvp checkpoint: truncated torch file" in message and "best.pt or last.pt" in message


def test_a_legacy_format_checkpoint_loads_and_cut_short_is_damaged(tmp_path: Path, weights) -> None:
    path = tmp_path / "legacy.pt"
    state = {"format": "dvp-checkpoint", "version": 1, **_complete_state(weights)}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path)["image_shape"] == list(IMAGE_SHAPE)
    good = path.read_bytes()
    for length in (20, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:length])
        assert "damaged or truncated torch file" in _load_error(path)


@pytest.mark.parametrize("save", [
    lambda obj, path: torch.save(obj, path),
    lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
    lambda obj, path: path.write_bytes(pickle.dumps(obj)),
], ids=["torch", "torch-legacy", "plain-pickle"])
def test_pickled_code_is_refused_and_never_run(tmp_path: Path, save) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    save({"format": "dvp-checkpoint", "version": 1, "payload": _Exploit(marker)}, path)
    message = _load_error(path)
    assert "refused" in message and "system" in message
    assert not marker.exists()


def test_a_foreign_torch_file_and_another_version(tmp_path: Path, weights) -> None:
    foreign = tmp_path / "resnet.pt"
    torch.save({"state_dict": weights}, foreign)
    assert "is not a dvp checkpoint (no 'format: dvp-checkpoint' tag)" in _load_error(foreign)
    torch.save([torch.zeros(2)], foreign)
    assert "no 'format: dvp-checkpoint' tag" in _load_error(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "dvp-checkpoint", "version": 2, **_complete_state(weights)}, newer)
    assert "has checkpoint version 2; this dvp reads 1" in _load_error(newer)


def _drop(state: dict, dotted: str) -> None:
    *parents, key = dotted.split(".")
    for parent in parents:
        state = state[parent]
    del state[key]


def _set(state: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for parent in parents:
        state = state[parent]
    state[key] = value


@pytest.mark.parametrize("edit, expected", [
    (lambda s: _drop(s, "config"), "missing 'config'"),
    (lambda s: _drop(s, "image_shape"), "missing 'image_shape'"),
    (lambda s: _drop(s, "engine"), "missing 'engine'"),
    (lambda s: _drop(s, "engine.ema"), "missing 'engine.ema'"),
    (lambda s: _drop(s, "engine.model"), "missing 'engine.model'"),
    (lambda s: _set(s, "config", ["model.num_ch=16"]), "'config' is list"),
    (lambda s: _set(s, "image_shape", [8, 8]), "'image_shape' is list [8, 8], not a list of 3 positive ints"),
    (lambda s: _set(s, "image_shape", "1x8x8"), "'image_shape' is str '1x8x8'"),
    (lambda s: _set(s, "engine", [1, 2]), "'engine' is list [1, 2], not a dict"),
    (lambda s: _set(s, "engine.ema", {}), "'engine.ema' holds no weights"),
    (lambda s: _set(s, "engine.ema", torch.zeros(3)), "'engine.ema' is Tensor"),
    (lambda s: _set(s, "engine.model", {"w": 3}), "'engine.model' entry 'w' is int 3, not a tensor"),
], ids=["no-config", "no-image_shape", "no-engine", "no-ema", "no-model", "config-list", "shape-2d",
        "shape-str", "engine-list", "ema-empty", "ema-tensor", "model-int"])
def test_missing_or_wrong_parts_are_named(tmp_path: Path, weights, edit, expected: str) -> None:
    state = _complete_state(dict(weights))
    state["engine"] = dict(state["engine"])
    edit(state)
    path = tmp_path / "part.pt"
    save_checkpoint(path, state)
    message = _load_error(path)
    assert "is not a complete dvp checkpoint: " in message and expected in message, message


def test_a_directory_and_a_missing_path(tmp_path: Path) -> None:
    assert _load_error(tmp_path) == f"checkpoint {tmp_path} is a directory, not a file"
    missing = tmp_path / "best.pt"
    assert _load_error(missing) == f"checkpoint {missing} does not exist"


# ------------------------------------------------------------------------------------- check_weights_match

def _weights_error(expected, found) -> str:
    path = Path("run/checkpoints/best.pt")
    with pytest.raises(CheckpointError) as err:
        check_weights_match(path, expected, found, "ema")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ema weights: "), message
    assert message.endswith("(the checkpoint's config and weights disagree)")
    return message


def test_weights_of_the_same_config_match_whatever_their_values(weights) -> None:
    """Keys and shapes are compared, not values: another initialisation of the same config passes."""
    torch.manual_seed(1)
    same_config = build_model(compose(["model.num_ch=16"]), IMAGE_SHAPE).state_dict()
    assert any(not torch.equal(same_config[k], weights[k]) for k in weights)
    assert check_weights_match(Path("best.pt"), same_config, weights, "ema") is None     # no CheckpointError


def test_a_different_shape_names_the_first_key_and_both_shapes(weights) -> None:
    wider = build_model(compose(["model.num_ch=32"]), IMAGE_SHAPE).state_dict()
    key = next(k for k in weights if weights[k].shape != wider[k].shape)
    message = _weights_error(weights, wider)
    assert (f"shapes differ from the config at key '{key}': checkpoint {list(wider[key].shape)}, "
            f"config {list(weights[key].shape)}") in message


def test_a_missing_or_an_unexpected_key_is_named(weights) -> None:
    first = next(iter(weights))
    lacking = {k: v for k, v in weights.items() if k != first}
    message = _weights_error(weights, lacking)
    assert f"the config's model has key '{first}' that the checkpoint lacks" in message
    message = _weights_error(weights, {**weights, "extra.weight": torch.zeros(1)})
    assert "the checkpoint has key 'extra.weight' that the config's model lacks" in message


# ---------------------------------------------------------------------------------- remove_stale_temporaries

def test_remove_stale_temporaries_removes_only_killed_saves(tmp_path: Path, weights) -> None:
    _saved(tmp_path / "last.pt", weights)
    fd, killed = tempfile.mkstemp(dir=tmp_path, prefix=".last.pt.", suffix=".tmp")   # as save_checkpoint
    os.write(fd, b"partial")
    os.close(fd)
    other = tmp_path / ".best.pt.abc123.tmp"
    other.write_bytes(b"")
    kept = [tmp_path / "notes.tmp", tmp_path / ".last.pt", tmp_path / "last.pt.tmp"]
    for path in kept:
        path.write_bytes(b"keep")
    (tmp_path / ".dir.pt.x.tmp").mkdir()
    (tmp_path / ".link.pt.y.tmp").symlink_to(tmp_path / "last.pt")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".last.pt.z.tmp").write_bytes(b"")

    assert remove_stale_temporaries(tmp_path) == sorted([Path(killed), other])
    assert not Path(killed).exists() and not other.exists()
    assert all(path.exists() for path in kept) and (tmp_path / "sub" / ".last.pt.z.tmp").exists()
    assert (tmp_path / ".dir.pt.x.tmp").is_dir() and (tmp_path / ".link.pt.y.tmp").is_symlink()
    assert load_checkpoint(tmp_path / "last.pt")["image_shape"] == list(IMAGE_SHAPE)
    assert remove_stale_temporaries(tmp_path) == []
    assert remove_stale_temporaries(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------- data.root files

def _data_error(name: str, root: Path) -> str:
    with pytest.raises(DataError) as err:
        load_data(name, root, val_size=1)
    message = str(err.value)
    assert "\n" not in message and "containing pickled data" not in message, message
    return message


@pytest.mark.parametrize("name, as_dir", [("mnist", False), ("mnist", True), ("npz", False), ("npz", True)],
                         ids=["keras-file", "keras-dir", "npz-file", "npz-dir"])
def test_a_text_file_as_data_root_is_called_a_text_file(tmp_path: Path, name: str, as_dir: bool) -> None:
    file = tmp_path / ("mnist.npz" if as_dir else "notes.txt")
    file.write_text("hello world, these are notes\n")
    message = _data_error(name, tmp_path if as_dir else file)
    assert message.startswith(f"{file}: cannot be read as an .npz archive: it is a text file "
                              "(starts 'hello wor...'); set data.root="), message


@pytest.mark.parametrize("content, expected", [
    (b"", "it is empty"),
    (b"\x00\x01\x02\xff" * 50, "it is binary data (first bytes 00 01 02 ff 00 01 02 ff"),
    (pickle.dumps({"x_train": [1]}), "it is a Python pickle (it was not unpickled)"),
], ids=["empty", "binary", "pickle"])
def test_other_non_npz_data_roots_say_what_they_are(tmp_path: Path, content: bytes, expected: str) -> None:
    file = tmp_path / "mnist.npz"
    file.write_bytes(content)
    assert f"{file}: cannot be read as an .npz archive: {expected}" in _data_error("npz", file)


def test_a_single_npy_and_a_missing_data_root(tmp_path: Path) -> None:
    file = tmp_path / "x.npy"
    np.save(file, np.zeros((2, 28, 28), np.uint8))
    assert "it is a single .npy array (an .npz archive holding x_train, x_test is needed)" in \
        _data_error("npz", file)
    missing = tmp_path / "nowhere"
    message = _data_error("mnist", missing)
    assert message.startswith(f"mnist: data.root {missing} does not exist; set data.root="), message
