"""Dataset objects and the registry: get_dataset / list_datasets / register_dataset, subset, to_rows."""

from __future__ import annotations

import pytest
import torch

from netcarve.data import Dataset, get_dataset, get_dataset_info, list_datasets, register_dataset, to_rows
from netcarve.errors import ConfigError


def test_builtin_datasets_are_registered():
    names = list_datasets()
    for n in ("digits", "digits-rows", "cifar10", "cifar10-rows", "imagefolder"):
        assert n in names
    assert list_datasets("cifar*") == ["cifar10", "cifar10-rows"]
    assert get_dataset_info("digits").needs_data_dir is False
    assert get_dataset_info("cifar10-rows").kind == "sequence"


def test_bad_name_split_and_option():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*digits"):
        get_dataset("nope")
    with pytest.raises(ConfigError, match="split"):
        get_dataset("digits", "validation")
    with pytest.raises(ConfigError, match="bad options"):
        get_dataset("digits", "train", colour=True)


def test_register_custom_dataset():
    @register_dataset("test-tiny-seq", kind="sequence", needs_data_dir=False)
    def tiny(split="train", data_dir=None, n=6):
        """A tiny test set."""
        x = torch.arange(n * 4 * 2, dtype=torch.float32).view(n, 4, 2)
        return Dataset("test-tiny-seq", split, x, torch.arange(n) % 2, ("a", "b"), kind="sequence")

    ds = get_dataset("test-tiny-seq", "test", n=4)
    assert ds.input_shape == (4, 2) and ds.num_classes == 2 and len(ds) == 4
    assert get_dataset_info("test-tiny-seq").description == "A tiny test set."
    with pytest.raises(ConfigError, match="already registered"):
        register_dataset("test-tiny-seq")(tiny)


def test_dataset_validates_its_tensors():
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="int64"):
        Dataset("t", "train", x, torch.zeros(4, dtype=torch.int32), ("a",))
    with pytest.raises(ConfigError, match="labels"):
        Dataset("t", "train", x, torch.tensor([0, 1, 2, 3]), ("a", "b"))
    with pytest.raises(ConfigError, match="4 dims"):
        Dataset("t", "train", x[:, 0], torch.zeros(4, dtype=torch.int64), ("a",))
    with pytest.raises(ConfigError, match="samples"):
        Dataset("t", "train", x, torch.zeros(3, dtype=torch.int64), ("a",))


def test_subset_prefix_property_and_errors():
    ds = get_dataset("digits", "train")
    small, big = ds.subset(20), ds.subset(50)
    assert small.class_counts().tolist() == [2] * 10
    assert big.class_counts().tolist() == [5] * 10
    assert set(small.x.flatten(1).sum(1).tolist()) <= set(big.x.flatten(1).sum(1).tolist())
    assert ds.subset(25).class_counts().tolist() == [3] * 5 + [2] * 5
    assert ds.subset(10**6) is ds
    with pytest.raises(ConfigError):
        ds.subset(0)


def test_to_rows_layout():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    ds = Dataset("img", "train", x, torch.tensor([0, 1]), ("a", "b"), channels=3)
    seq = to_rows(ds)
    assert seq.name == "img-rows" and seq.input_shape == (4, 15) and seq.channels == 3
    n, t, c, w = 1, 2, 1, 3
    assert seq.x[n, t, c * 5 + w] == x[n, c, t, w]
    with pytest.raises(ConfigError):
        to_rows(seq)
