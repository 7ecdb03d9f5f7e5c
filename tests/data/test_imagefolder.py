"""ImageFolder-style data sets of users' own images (PNGs written by the test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from netcarve.data import get_dataset, load_image_folder
from netcarve.errors import ConfigError, DataError


def _write(folder, name, color, size=(10, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(folder / name)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "pets"
    _write(root / "train" / "dog", "a.png", (200, 10, 10))
    _write(root / "train" / "dog", "b.PNG", (210, 10, 10))
    _write(root / "train" / "cat", "a.bmp", (10, 10, 200))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    _write(root / "val" / "dog", "c.png", (205, 5, 5))
    return root


def test_train_and_val_splits(tree):
    tr = get_dataset("imagefolder", "train", data_dir=tree, image_size=8)
    te = get_dataset("imagefolder", "test", data_dir=tree, image_size=8)
    assert tr.classes == ("cat", "dog") and te.classes == ("cat", "dog")  # sorted, from train/
    assert tr.x.shape == (3, 3, 8, 8) and tr.x.dtype == torch.uint8 and tr.y.tolist() == [0, 1, 1]
    assert te.y.tolist() == [1] and te.x[0, :, 0, 0].tolist() == [205, 5, 5]
    assert tr.x[0, :, 3, 3].tolist() == [10, 10, 200]


def test_flat_folder_serves_both_splits_and_grey(tmp_path):
    _write(tmp_path / "a", "1.jpg", (100, 100, 100), size=(8, 8))
    _write(tmp_path / "b", "1.png", (0, 0, 0), size=(8, 8))
    ds = get_dataset("imagefolder", "test", data_dir=tmp_path, image_size=(4, 6), channels=1)
    assert ds.x.shape == (2, 1, 4, 6) and ds.channels == 1 and ds.input_shape == (1, 4, 6)


def test_errors(tmp_path, tree):
    with pytest.raises(ConfigError, match="data_dir"):
        get_dataset("imagefolder", "train")
    with pytest.raises(DataError, match="does not exist"):
        get_dataset("imagefolder", "train", data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        get_dataset("imagefolder", "train", data_dir=tmp_path / "empty")
    (tree / "train" / "bird").mkdir()
    with pytest.raises(DataError, match="bird.*no images"):
        get_dataset("imagefolder", "train", data_dir=tree)


def test_unreadable_image_is_named(tree):
    (tree / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tree / "train")


def test_test_class_not_in_train_is_an_error(tree):
    _write(tree / "val" / "fox", "x.png", (1, 2, 3))
    with pytest.raises(DataError, match="fox"):
        get_dataset("imagefolder", "test", data_dir=tree)
