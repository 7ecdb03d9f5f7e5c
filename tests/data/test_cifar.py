"""CIFAR-10 readers: the official pickle layout (tiny folder written here), the npz layout (tiny and real)."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from netcarve.data import CIFAR10_CLASSES, find_cifar10, get_dataset, read_cifar10_npz
from netcarve.errors import DataError


def _chw(x_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x_hwc).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------- pickle layout


def test_pickle_layout_reads_images_labels_and_class_names(tmp_path, make_pickle_cifar):
    ref = make_pickle_cifar(tmp_path / "cifar-10-batches-py")
    tr = get_dataset("cifar10", "train", data_dir=tmp_path)
    te = get_dataset("cifar10", "test", data_dir=tmp_path)
    assert tr.x.dtype == torch.uint8 and tr.x.shape == (40, 3, 32, 32) and tr.input_shape == (3, 32, 32)
    assert torch.equal(tr.x, _chw(ref["train_x"])) and torch.equal(tr.y, torch.from_numpy(ref["train_y"]))
    assert torch.equal(te.x, _chw(ref["test_x"])) and te.y.dtype == torch.int64
    assert tr.classes == CIFAR10_CLASSES and tr.num_classes == 10 and tr.kind == "image" and tr.channels == 3


@pytest.mark.parametrize("where", ["root", "folder"])
def test_data_dir_may_be_the_root_or_the_folder(tmp_path, make_pickle_cifar, make_npz_cifar, where):
    make_pickle_cifar(tmp_path / "p" / "cifar-10-batches-py")
    make_npz_cifar(tmp_path / "n" / "cifar10")
    p = tmp_path / "p" if where == "root" else tmp_path / "p" / "cifar-10-batches-py"
    n = tmp_path / "n" if where == "root" else tmp_path / "n" / "cifar10"
    assert find_cifar10(p) == (tmp_path / "p" / "cifar-10-batches-py", "pickle")
    assert find_cifar10(n) == (tmp_path / "n" / "cifar10", "npz")


def test_pickle_rows_dataset(tmp_path, make_pickle_cifar):
    make_pickle_cifar(tmp_path / "cifar-10-batches-py")
    img = get_dataset("cifar10", "test", data_dir=tmp_path)
    seq = get_dataset("cifar10-rows", "test", data_dir=tmp_path)
    assert seq.kind == "sequence" and seq.input_shape == (32, 96) and seq.channels == 3
    # step t = image row t; features = R row, G row, B row (channel-major)
    for c in range(3):
        assert torch.equal(seq.x[:, :, c * 32 : (c + 1) * 32], img.x[:, c])


def test_corrupt_pickle_names_the_file(tmp_path, make_pickle_cifar):
    folder = tmp_path / "cifar-10-batches-py"
    make_pickle_cifar(folder)
    data = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="data_batch_2"):
        get_dataset("cifar10", "train", data_dir=folder)
    assert len(get_dataset("cifar10", "test", data_dir=folder)) == 10  # the test split is unaffected


def test_pickle_with_foreign_objects_is_refused(tmp_path, make_pickle_cifar):
    folder = tmp_path / "cifar-10-batches-py"
    make_pickle_cifar(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": print, b"labels": []}))
    with pytest.raises(DataError, match="test_batch"):
        get_dataset("cifar10", "test", data_dir=folder)


def test_pickle_with_wrong_shape_names_the_file(tmp_path, make_pickle_cifar):
    folder = tmp_path / "cifar-10-batches-py"
    make_pickle_cifar(folder)
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"test_batch.*\(N, 3072\)"):
        get_dataset("cifar10", "test", data_dir=folder)


def test_missing_batch_number_is_an_error(tmp_path, make_pickle_cifar):
    folder = tmp_path / "cifar-10-batches-py"
    make_pickle_cifar(folder, n_train_batches=3)
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match="contiguously"):
        get_dataset("cifar10", "train", data_dir=folder)


# -------------------------------------------------------------------------------------- npz layout


def test_npz_layout_tiny(tmp_path, make_npz_cifar):
    ref = make_npz_cifar(tmp_path / "cifar10")
    tr = get_dataset("cifar10", "train", data_dir=tmp_path)
    assert torch.equal(tr.x, _chw(ref["train_x"])) and torch.equal(tr.y, torch.from_numpy(ref["train_y"]))
    assert tr.source == str(tmp_path / "cifar10")


def test_truncated_npz_names_the_file(tmp_path, make_npz_cifar):
    make_npz_cifar(tmp_path / "cifar10")
    f = tmp_path / "cifar10" / "test.npz"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(DataError, match="test.npz"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


def test_npz_with_wrong_dtype_names_the_file(tmp_path, make_npz_cifar):
    make_npz_cifar(tmp_path / "cifar10")
    np.savez(
        tmp_path / "cifar10" / "test.npz", x=np.zeros((2, 32, 32, 3), np.float32), y=np.zeros(2, np.int64)
    )
    with pytest.raises(DataError, match=r"test.npz.*uint8"):
        read_cifar10_npz(tmp_path / "cifar10" / "test.npz")


def test_missing_test_file_is_named(tmp_path, make_npz_cifar):
    make_npz_cifar(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "test.npz").unlink()
    assert len(get_dataset("cifar10", "train", data_dir=tmp_path)) == 40
    with pytest.raises(DataError, match="test.npz"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


def test_subset_is_class_balanced_and_deterministic(tmp_path, make_npz_cifar):
    make_npz_cifar(tmp_path / "cifar10", n_per_file=50)
    a = get_dataset("cifar10", "train", data_dir=tmp_path, subset=30)
    assert a.class_counts().tolist() == [3] * 10
    full = get_dataset("cifar10", "train", data_dir=tmp_path)
    first3 = torch.cat([torch.nonzero(full.y == c).flatten()[:3] for c in range(10)]).sort().values
    assert torch.equal(a.x, full.x[first3])
    r1 = get_dataset("cifar10", "train", data_dir=tmp_path, subset=30, subset_seed=5)
    r2 = get_dataset("cifar10", "train", data_dir=tmp_path, subset=30, subset_seed=5)
    assert torch.equal(r1.x, r2.x) and r1.class_counts().tolist() == [3] * 10
    assert not torch.equal(r1.x, a.x)


# ------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def real_test(cifar_root):
    return get_dataset("cifar10", "test", data_dir=cifar_root)


@pytest.mark.data
def test_real_test_set_counts_and_bytes(real_test, cifar_root):
    assert real_test.x.shape == (10000, 3, 32, 32) and real_test.x.dtype == torch.uint8
    assert real_test.class_counts().tolist() == [1000] * 10
    meta = json.loads((cifar_root / "cifar10" / "meta.json").read_text())
    assert list(real_test.classes) == meta["classes"]
    hwc = real_test.x.permute(0, 2, 3, 1).contiguous().numpy()
    assert hashlib.sha256(hwc.tobytes()).hexdigest() == meta["files"]["test.npz"]["x_sha256_raw_bytes"]
    assert (
        hashlib.sha256(real_test.y.numpy().tobytes()).hexdigest()
        == meta["files"]["test.npz"]["y_sha256_raw_bytes"]
    )


@pytest.mark.data
def test_real_train_set(cifar_root):
    tr = get_dataset("cifar10", "train", data_dir=cifar_root / "cifar10")
    assert tr.x.shape == (50000, 3, 32, 32)
    assert tr.class_counts().tolist() == [5000] * 10


@pytest.mark.data
def test_real_rows_and_subset(cifar_root, real_test):
    seq = get_dataset("cifar10-rows", "test", data_dir=cifar_root, subset=100)
    assert seq.input_shape == (32, 96) and seq.class_counts().tolist() == [10] * 10
    img = real_test.subset(100)
    assert torch.equal(seq.x[:, 5, 32:64], img.x[:, 1, 5, :])  # row 5, green
