"""BatchLoader determinism, epochs and resumption; make_loaders."""

from __future__ import annotations

import pytest
import torch

from netcarve.data import BatchLoader, get_dataset, make_loaders, make_transform
from netcarve.errors import ConfigError

DIGITS_PRE = {"scale": 1 / 16, "mean": 0.5, "std": 0.5}


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", "train")


def test_batches_shapes_dtypes_and_len(digits):
    loader = BatchLoader(digits, 100, shuffle=False)
    assert len(loader) == 14  # 1347 samples
    batches = _epoch(loader)
    assert len(batches) == 14 and batches[-1][0].shape == (47, 1, 8, 8)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    assert torch.equal(torch.cat([x for x, _ in batches]), digits.x.float())
    assert len(BatchLoader(digits, 100, drop_last=True)) == 13
    assert len(_epoch(BatchLoader(digits, 100, drop_last=True))) == 13
    with pytest.raises(ConfigError):
        BatchLoader(digits, 0)


def test_shuffle_is_a_permutation_and_deterministic_per_seed(digits):
    t = make_transform(DIGITS_PRE, augment=True)
    a = _epoch(BatchLoader(digits, 64, shuffle=True, transform=t, seed=3))
    b = _epoch(BatchLoader(digits, 64, shuffle=True, transform=t, seed=3))
    c = _epoch(BatchLoader(digits, 64, shuffle=True, transform=t, seed=4))
    assert _same(a, b) and not _same(a, c)
    ys = torch.cat([y for _, y in a])
    assert torch.equal(ys.sort().values, digits.y.sort().values) and not torch.equal(ys, digits.y)


def test_epochs_differ_and_set_epoch_reproduces_them(digits):
    t = make_transform(DIGITS_PRE, augment=True)
    run = BatchLoader(digits, 128, shuffle=True, transform=t, seed=0)
    e0, e1, e2 = _epoch(run), _epoch(run), _epoch(run)  # the epoch advances after each full pass
    assert run.epoch == 3 and not _same(e0, e1)
    resumed = BatchLoader(digits, 128, shuffle=True, transform=t, seed=0)
    resumed.set_epoch(2)
    assert _same(_epoch(resumed), e2)
    resumed.set_epoch(1)
    assert _same(list(resumed.iter_from(4)), e1[4:])  # mid-epoch resume
    again = BatchLoader(digits, 128, shuffle=True, transform=t, seed=0)
    again.load_state_dict({"seed": 0, "epoch": 1})
    assert _same(_epoch(again), e1) and again.state_dict() == {"seed": 0, "epoch": 2}


def test_interrupted_pass_does_not_advance_the_epoch(digits):
    loader = BatchLoader(digits, 128, shuffle=True, seed=0)
    first = next(iter(loader))
    assert loader.epoch == 0
    assert torch.equal(next(iter(loader))[1], first[1])


def test_generator_sets_the_seed(digits):
    a = BatchLoader(digits, 128, shuffle=True, generator=torch.Generator().manual_seed(5))
    b = BatchLoader(digits, 128, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert a.seed == b.seed and _same(_epoch(a), _epoch(b))


def test_make_loaders_digits_rows():
    train, test = make_loaders("digits-rows", DIGITS_PRE, 256, seed=1, subset=(200, None))
    assert len(train.dataset) == 200 and len(test.dataset) == 450
    assert train.shuffle and not test.shuffle and len(train) == 1 and len(test) == 2
    x, y = next(iter(test))
    assert x.shape == (256, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert torch.equal(x, (test.dataset.x[:256].float() / 16 - 0.5) / 0.5)


@pytest.mark.data
def test_make_loaders_real_cifar(cifar_root):
    pre = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    train, test = make_loaders("cifar10", pre, 128, data_dir=cifar_root, subset=(1000, 500))
    x, y = next(iter(train))
    assert x.shape == (128, 3, 32, 32) and y.shape == (128,) and len(test) == 4
    xt, _ = next(iter(test))
    # ImageNet statistics are close to CIFAR-10's: normalised test images have mean ~0, std ~1
    assert abs(float(xt.mean())) < 0.5 and 0.7 < float(xt.std()) < 1.4


def test_digits_training_augmentation_never_mirrors():
    """Mirrored digits are not digits: the data set turns flips off for its training transform."""
    import torch

    from netcarve.data import get_dataset_info, make_loaders

    assert get_dataset_info("digits").augment == {"flip": False}
    train, _ = make_loaders("digits", {"scale": 1.0}, 4096, augment=True, seed=0)
    names = [type(t).__name__ for t in train.transform.transforms]
    assert "RandomHorizontalFlip" not in names and "RandomCrop" in names
    cifar_names = [
        type(t).__name__
        for t in __import__("netcarve.data", fromlist=["make_transform"])
        .make_transform({"scale": 1.0}, True, "image")
        .transforms
    ]
    assert "RandomHorizontalFlip" in cifar_names
    assert torch.is_tensor(next(iter(train))[0])
