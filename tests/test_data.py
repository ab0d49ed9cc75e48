"""Tests of dvp.data on files written in the datasets' real formats (IDX, Keras npz, MATLAB, pickle)."""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from torch.utils.data import random_split

from dvp.core.errors import DataError
from dvp.core.noise import Noise
from dvp.data.batches import BatchIterator, dynamic_binarize
from dvp.data.datasets import DataSplits, load_data

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


# ------------------------------------------------------------------------------------------ fixtures

def _unique_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """``n`` random uint8 images whose first two pixels encode their index, so every image is distinct."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return images


def _ids(x: torch.Tensor) -> list[int]:
    """Recover the indices encoded by :func:`_unique_images` from images scaled to [-1, 1]."""
    flat = torch.round(x.flatten(1)[:, :2] * 127.5 + 127.5).long()
    return (flat[:, 0] + 256 * flat[:, 1]).tolist()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write ``array`` (uint8) as an IDX file: big-endian magic 0x0000_08_<ndim>, dims, raw bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _write_mnist_idx(root: Path, x_train: np.ndarray, x_test: np.ndarray, compress: bool) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, images in (("train", x_train), ("t10k", x_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(images), dtype=np.uint8) % 10, compress)
    return raw


class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as in the official CIFAR batches.

    The official files were written by Python 2's cPickle, so ``pickle.load(f, encoding="bytes")`` gives
    ``b"data"`` keys and ``encoding="latin1"`` (torchvision) gives ``"data"`` keys; this writer does the same.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _write_py2_pickle(path: Path, obj: object) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def _write_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Five train batches of ``per_batch`` images, a test batch and batches.meta; returns N×3072 rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = _unique_images(5 * per_batch, (3072,), seed=1)
    test = _unique_images(n_test, (3072,), seed=2)
    batches = [(f"data_batch_{i + 1}", train[i * per_batch:(i + 1) * per_batch]) for i in range(5)]
    for name, rows in batches + [("test_batch", test)]:
        _write_py2_pickle(folder / name, {
            b"batch_label": f"{name} (test fixture)".encode(),
            b"labels": [int(i % 10) for i in range(len(rows))],
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))],
        })
    _write_py2_pickle(folder / "batches.meta", {
        b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                         b"dog", b"frog", b"horse", b"ship", b"truck"],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    })
    return train, test


def _scaled(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).float() - 127.5) / 127.5


def _check_splits(splits: DataSplits, sizes: tuple[int, int, int], shape: tuple[int, int, int]) -> None:
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    assert splits.shape == shape
    for x in (splits.train, splits.val, splits.test):
        assert x.dtype == torch.float32 and x.shape[1:] == shape
        assert x.min() >= -1 and x.max() <= 1


# ------------------------------------------------------------------------------------------ digits

def test_digits_default_split_and_range() -> None:
    splits = load_data("digits", None)
    _check_splits(splits, (1300, 200, 297), (1, 8, 8))
    assert splits.name == "digits"
    assert splits.train.min() == -1 and splits.train.max() == 1
    # the three splits partition the 1797 images (compare as multisets: digits has duplicate images)
    from sklearn.datasets import load_digits
    original = torch.from_numpy(load_digits().images).float().div(16).mul(2).sub(1).flatten(1)
    together = torch.cat([splits.train, splits.val, splits.test]).flatten(1)
    assert torch.equal(_sorted_rows(together), _sorted_rows(original))


def test_digits_read_without_sklearn_are_load_digits_exactly() -> None:
    from sklearn.datasets import load_digits

    from dvp.data.datasets import _digits_images
    ours, theirs = _digits_images(), load_digits().images
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(sorted(x.tolist()))


def test_digits_split_is_seeded_and_val_size_is_configurable() -> None:
    a, b = load_data("digits", None, split_seed=7), load_data("digits", None, split_seed=7)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and torch.equal(a.test, b.test)
    assert not torch.equal(a.test, load_data("digits", None, split_seed=8).test)
    assert len(load_data("digits", None, val_size=100).train) == 1797 - 297 - 100
    with pytest.raises(DataError, match="val_size"):
        load_data("digits", None, val_size=1500)


def test_unknown_dataset_lists_allowed_names() -> None:
    with pytest.raises(DataError, match="digits, mnist, omniglot, cifar10, npz"):
        load_data("svhn", None)


# ------------------------------------------------------------------------------------------ MNIST

@pytest.fixture()
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    return _unique_images(40, (28, 28), seed=0), _unique_images(10, (28, 28), seed=3)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_mnist_idx_through_torchvision(tmp_path: Path, mnist_arrays, compress: bool) -> None:
    x_train, x_test = mnist_arrays
    raw = _write_mnist_idx(tmp_path, x_train, x_test, compress)
    before = sorted(p.name for p in raw.iterdir())
    splits = load_data("mnist", tmp_path, val_size=8, split_seed=5)
    _check_splits(splits, (32, 8, 10), (1, 28, 28))
    assert torch.equal(splits.test[:, 0], _scaled(x_test))  # test set whole and in file order
    train_ids, val_ids = _ids(splits.train), _ids(splits.val)
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(40))
    # the split is torch's random_split with a generator seeded by split_seed
    reference = random_split(range(40), [32, 8], generator=torch.Generator().manual_seed(5))
    assert [train_ids, val_ids] == [list(part) for part in reference]
    assert torch.equal(splits.val[:, 0], _scaled(x_train[val_ids]))
    assert sorted(p.name for p in raw.iterdir()) == before  # the data folder is left untouched


def test_mnist_npz_matches_idx_and_accepts_file_or_dir(tmp_path: Path, mnist_arrays) -> None:
    x_train, x_test = mnist_arrays
    _write_mnist_idx(tmp_path / "idx", x_train, x_test, compress=True)
    (tmp_path / "keras").mkdir()
    npz = tmp_path / "keras" / "mnist.npz"
    np.savez_compressed(npz, x_train=x_train, y_train=np.zeros(40, np.uint8), x_test=x_test,
                        y_test=np.zeros(10, np.uint8))
    from_idx = load_data("mnist", tmp_path / "idx", val_size=8)
    for root in (tmp_path / "keras", npz, str(npz)):
        from_npz = load_data("mnist", root, val_size=8)
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(from_npz, split), getattr(from_idx, split))


def test_mnist_missing_names_paths_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_data("mnist", tmp_path, val_size=8)
    message = str(err.value)
    assert str(tmp_path / "mnist.npz") in message and str(tmp_path / "MNIST" / "raw") in message
    assert "data.root=" in message and "data.download=true" in message
    with pytest.raises(DataError, match="data.root"):
        load_data("mnist", None)


_GOOD_TEST = np.zeros((2, 28, 28), np.uint8)


@pytest.mark.parametrize("bad, expected", [
    ({"x_train": np.zeros((4, 28, 27), np.uint8), "x_test": _GOOD_TEST}, "x_train has shape"),
    ({"x_train": np.zeros((4, 28, 28), np.float32), "x_test": _GOOD_TEST}, "dtype float32"),
    ({"x_train": np.zeros((4, 28, 28), np.uint8)}, "missing arrays x_test"),
])
def test_mnist_malformed_npz(tmp_path: Path, bad: dict, expected: str) -> None:
    np.savez(tmp_path / "mnist.npz", **bad)
    with pytest.raises(DataError, match=expected) as err:
        load_data("mnist", tmp_path, val_size=1)
    assert str(tmp_path / "mnist.npz") in str(err.value)


def test_mnist_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "mnist.npz").write_bytes(b"definitely not a zip archive")
    with pytest.raises(DataError, match="cannot be read as an .npz") as err:
        load_data("mnist", tmp_path, val_size=1)
    assert str(tmp_path / "mnist.npz") in str(err.value)


def test_mnist_idx_bad_magic_and_truncation(tmp_path: Path, mnist_arrays) -> None:
    x_train, x_test = mnist_arrays
    raw = _write_mnist_idx(tmp_path, x_train, x_test, compress=False)
    images = raw / "t10k-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(struct.pack(">I", 2049) + good[4:])
    with pytest.raises(DataError, match="magic number 2049, expected 2051") as err:
        load_data("mnist", tmp_path, val_size=8)
    assert str(images) in str(err.value)
    images.write_bytes(good[:-100])
    with pytest.raises(DataError) as err:
        load_data("mnist", tmp_path, val_size=8)
    assert str(raw) in str(err.value) and "t10k" in str(err.value)


def test_mnist_truncated_gzip(tmp_path: Path, mnist_arrays) -> None:
    raw = _write_mnist_idx(tmp_path, *mnist_arrays, compress=True)
    images = raw / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        load_data("mnist", tmp_path, val_size=8)
    assert str(images) in str(err.value)


@pytest.mark.skipif(not REAL_MNIST.is_file(),
                    reason=f"real MNIST not present at {REAL_MNIST} (../shared beside the repo)")
def test_real_mnist() -> None:
    splits = load_data("mnist", REAL_MNIST.parent)
    _check_splits(splits, (55000, 5000, 10000), (1, 28, 28))
    all_train = torch.cat([splits.train, splits.val])
    assert abs(((all_train + 1) / 2).mean().item() - 0.1307) < 5e-4
    assert abs(((splits.train + 1) / 2).mean().item() - 0.1307) < 2e-3
    assert abs(((splits.test + 1) / 2).mean().item() - 0.1325) < 5e-4
    assert splits.train.min() == -1 and splits.train.max() == 1


# ------------------------------------------------------------------------------------------ OMNIGLOT

def test_omniglot_orientation_matches_iwae(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.random((784, 30))
    testdata = rng.random((784, 5))
    # an asymmetric test image: column 0, laid out row-major, has ink only in its top row
    top_row = np.zeros((28, 28))
    top_row[0, :] = 1.0
    testdata[:, 0] = top_row.reshape(784)
    scipy.io.savemat(tmp_path / "chardata.mat", {"data": data, "testdata": testdata})

    splits = load_data("omniglot", tmp_path, val_size=6, split_seed=1)
    _check_splits(splits, (24, 6, 5), (1, 28, 28))
    # IWAE / VampPrior: reshape_data(data.T) = data.T.reshape((-1, 28, 28)).reshape((-1, 784), order="F"),
    # later viewed as 1×28×28 images
    iwae = testdata.T.reshape((-1, 28, 28)).reshape((-1, 28 * 28), order="F").reshape(-1, 28, 28)
    assert torch.allclose(splits.test[:, 0], torch.from_numpy(iwae).float() * 2 - 1)
    first = (splits.test[0, 0] + 1) / 2
    assert torch.equal(first, torch.from_numpy(top_row.T).float())  # ink in the left column, i.e. transposed
    # train and val come from `data` in the same orientation, without overlap
    iwae_train = torch.from_numpy(data.T.reshape((-1, 28, 28)).reshape((-1, 784), order="F")).float() * 2 - 1
    rows = {tuple(r) for r in iwae_train.tolist()}
    got = [tuple(r) for r in torch.cat([splits.train, splits.val]).flatten(1).tolist()]
    assert len(set(got)) == 30 and set(got) == rows
    from_file = load_data("omniglot", tmp_path / "chardata.mat", val_size=6, split_seed=1)
    assert torch.equal(from_file.val, splits.val)


def test_omniglot_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="IWAE") as err:
        load_data("omniglot", tmp_path)
    assert str(tmp_path / "chardata.mat") in str(err.value)
    scipy.io.savemat(tmp_path / "chardata.mat", {"data": np.zeros((783, 3)), "testdata": np.zeros((784, 2))})
    with pytest.raises(DataError, match="'data' has shape") as err:
        load_data("omniglot", tmp_path, val_size=1)
    assert str(tmp_path / "chardata.mat") in str(err.value)
    scipy.io.savemat(tmp_path / "chardata.mat", {"data": np.zeros((784, 3))})
    with pytest.raises(DataError, match="no variable 'testdata'"):
        load_data("omniglot", tmp_path, val_size=1)
    scipy.io.savemat(tmp_path / "chardata.mat",
                     {"data": np.full((784, 3), 255.0), "testdata": np.zeros((784, 2))})
    with pytest.raises(DataError, match="expected \\[0, 1\\]"):
        load_data("omniglot", tmp_path, val_size=1)


# ------------------------------------------------------------------------------------------ CIFAR10

def test_cifar10_pickle_batches(tmp_path: Path) -> None:
    train_rows, test_rows = _write_cifar(tmp_path)
    # the fixture has the official layout: bytes keys under encoding="bytes", as on the CIFAR page
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert set(pickle.load(f, encoding="bytes")) == {b"batch_label", b"labels", b"data", b"filenames"}
    # stock torchvision rejects these (md5 of the official release), which is why dvp relaxes that check
    with pytest.raises(RuntimeError, match="corrupted"):
        torchvision.datasets.CIFAR10(tmp_path, train=True)

    splits = load_data("cifar10", tmp_path, val_size=5, split_seed=3)
    _check_splits(splits, (15, 5, 6), (3, 32, 32))
    assert torch.equal(splits.test, _scaled(test_rows.reshape(-1, 3, 32, 32)))
    train_ids, val_ids = _ids(splits.train), _ids(splits.val)
    assert sorted(train_ids + val_ids) == list(range(20)) and not set(train_ids) & set(val_ids)
    assert torch.equal(splits.train, _scaled(train_rows[train_ids].reshape(-1, 3, 32, 32)))
    again = load_data("cifar10", tmp_path / "cifar-10-batches-py", val_size=5, split_seed=3)
    assert torch.equal(again.train, splits.train) and torch.equal(again.val, splits.val)


def test_cifar10_missing_and_corrupt(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    content = batch.read_bytes()
    batch.unlink()
    with pytest.raises(DataError, match="data.download=true") as err:
        load_data("cifar10", tmp_path, val_size=5)
    assert str(batch) in str(err.value)
    batch.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError) as err:
        load_data("cifar10", tmp_path, val_size=5)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


# ------------------------------------------------------------------------------------------ generic npz

@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_uint8_layouts(tmp_path: Path, layout: str) -> None:
    base = _unique_images(50, (3, 6, 5), seed=4)  # N×C×H×W
    test = _unique_images(7, (3, 6, 5), seed=5)
    if layout == "NHW":
        base, test = base[:, 0], test[:, 0]
        as_nchw = lambda a: a[:, None]  # noqa: E731
    elif layout == "NHWC":
        base, test = base.transpose(0, 2, 3, 1), test.transpose(0, 2, 3, 1)
        as_nchw = lambda a: a.transpose(0, 3, 1, 2)  # noqa: E731
    else:
        as_nchw = lambda a: a  # noqa: E731
    np.savez(tmp_path / "images.npz", x_train=base, x_test=test)
    splits = load_data("npz", tmp_path)  # a directory with exactly one .npz
    channels = 1 if layout == "NHW" else 3
    _check_splits(splits, (45, 5, 7), (channels, 6, 5))
    assert torch.equal(splits.test, _scaled(as_nchw(test)))
    assert torch.equal(splits.val, _scaled(as_nchw(base)[_ids(splits.val)]))


def test_npz_float_and_errors(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((20, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x_train=x, x_test=x[:3])
    splits = load_data("npz", tmp_path / "a.npz", val_size=4)
    assert (len(splits.train), len(splits.val)) == (16, 4)
    assert torch.allclose(splits.test, torch.from_numpy(x[:3]) * 2 - 1)

    np.savez(tmp_path / "b.npz", x_train=x * 3, x_test=x)
    with pytest.raises(DataError, match="holds 2 .npz files"):
        load_data("npz", tmp_path)
    with pytest.raises(DataError, match="expected \\[0, 1\\]") as err:
        load_data("npz", tmp_path / "b.npz")
    assert str(tmp_path / "b.npz") in str(err.value)
    two_channels = np.zeros((5, 2, 4, 4), np.uint8)
    np.savez(tmp_path / "c.npz", x_train=two_channels, x_test=two_channels)
    with pytest.raises(DataError, match="has shape \\(5, 2, 4, 4\\)"):
        load_data("npz", tmp_path / "c.npz")
    with pytest.raises(DataError, match="not found"):
        load_data("npz", tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------ BatchIterator

def _indices(n: int) -> torch.Tensor:
    """Examples whose value is their index (N×1×1×1)."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)


def test_batch_iterator_epoch_permutation_is_seeded() -> None:
    x = _indices(23)
    it = BatchIterator(x, batch_size=5, shuffle=True, seed=11, drop_last=False)
    assert len(it) == 5
    epochs = []
    for epoch in range(3):
        assert it.epoch == epoch
        batches = list(it)
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        order = torch.cat(batches).flatten().long()
        expected = torch.randperm(23, generator=torch.Generator().manual_seed(11 + epoch))
        assert torch.equal(order, expected)
        epochs.append(order)
    assert it.epoch == 3 and not torch.equal(epochs[0], epochs[1])
    other = BatchIterator(x, batch_size=5, shuffle=True, seed=11, drop_last=False)
    assert torch.equal(torch.cat(list(other)).flatten().long(), epochs[0])


def test_batch_iterator_without_shuffle_and_drop_last() -> None:
    x = _indices(23)
    it = BatchIterator(x, batch_size=5, shuffle=False, seed=0, drop_last=True)
    assert len(it) == 4
    batches = list(it)
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    assert torch.equal(torch.cat(batches).flatten(), torch.arange(20, dtype=torch.float32))
    with pytest.raises(ValueError, match="no batch"):
        BatchIterator(x, batch_size=30, shuffle=True, seed=0, drop_last=True)
    assert len(BatchIterator(x, batch_size=30, shuffle=True, seed=0, drop_last=False)) == 1


@pytest.mark.parametrize("flip", [False, True])
def test_batch_iterator_resumes_mid_epoch(flip: bool) -> None:
    x = torch.randn(37, 3, 4, 5)
    reference = BatchIterator(x, batch_size=4, shuffle=True, seed=2, drop_last=True, flip=flip)
    uninterrupted = list(reference) + list(reference)  # epochs 0 and 1

    first = BatchIterator(x, batch_size=4, shuffle=True, seed=2, drop_last=True, flip=flip)
    seen = list(first)  # epoch 0
    for batch in first:  # 3 batches of epoch 1, then stop (e.g. preemption)
        seen.append(batch)
        if len(seen) == len(first) + 3:
            break
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 3}

    resumed = BatchIterator(x, batch_size=4, shuffle=True, seed=2, drop_last=True, flip=flip)
    resumed.load_state_dict(state)
    seen += list(resumed)
    assert len(seen) == len(uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(seen, uninterrupted))
    assert resumed.state_dict() == {"epoch": 2, "position": 0}
    with pytest.raises(ValueError, match="position"):
        resumed.load_state_dict({"epoch": 0, "position": len(resumed) + 1})


def test_batch_iterator_flips_only_when_asked() -> None:
    x = torch.randn(64, 3, 4, 5)
    plain = torch.cat(list(BatchIterator(x, batch_size=16, shuffle=False, seed=0, drop_last=False)))
    assert torch.equal(plain, x)
    flipping = BatchIterator(x, batch_size=16, shuffle=False, seed=0, drop_last=False, flip=True)
    flipped = torch.cat(list(flipping))
    is_flipped = [torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x)]
    is_same = [torch.equal(f, o) for f, o in zip(flipped, x)]
    assert all(a != b for a, b in zip(is_flipped, is_same))  # every image is either mirrored or untouched
    assert 10 < sum(is_flipped) < 54


# ------------------------------------------------------------------------------------------ binarisation

def test_dynamic_binarize_is_bernoulli_of_grey_level() -> None:
    x = torch.linspace(-1, 1, 11).repeat(4000, 1)
    draws = dynamic_binarize(x, Noise(seed=0, n=len(x), lo=0, hi=len(x)))
    assert draws.shape == x.shape and draws.dtype == x.dtype
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(draws.mean(0), (x[0] + 1) / 2, atol=0.03)
    assert draws[:, 0].sum() == 0 and draws[:, -1].sum() == 4000
    again = dynamic_binarize(x, Noise(seed=0, n=len(x), lo=0, hi=len(x)))
    assert torch.equal(draws, again)
    halves = [dynamic_binarize(x[lo:hi], Noise(seed=0, n=len(x), lo=lo, hi=hi)) for lo, hi in ((0, 1500), (1500, 4000))]
    assert torch.equal(torch.cat(halves), draws)          # a process holding rows lo:hi draws exactly those rows
