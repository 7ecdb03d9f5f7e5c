"""Batch-wise tensor transforms: RandomCrop, RandomHorizontalFlip, Normalize, make_transform."""

from __future__ import annotations

import pytest
import torch

from netcarve.data import Compose, Normalize, RandomCrop, RandomHorizontalFlip, make_transform
from netcarve.errors import ConfigError

IMAGENET = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _batch(b=16, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def test_random_crop_keeps_shape_dtype_and_is_a_shifted_window():
    x = _batch()
    out = RandomCrop(32, padding=4)(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):  # each output is one of the 81 windows of the zero-padded input
        windows = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], wdw) for wdw in windows)


def test_random_crop_size_and_no_padding():
    x = _batch(h=10, w=12)
    assert RandomCrop((6, 8), padding=0)(x).shape == (16, 3, 6, 8)
    assert torch.equal(RandomCrop(None, padding=0)(x), x)
    assert RandomCrop(None, padding=None)(x).shape == x.shape
    with pytest.raises(ConfigError):
        RandomCrop(40, padding=2)(x)


def test_flip_is_exact_reversal():
    x = _batch()
    flip = RandomHorizontalFlip(p=1.0)
    assert torch.equal(flip(x), x.flip(-1))
    assert torch.equal(flip(flip(x)), x)
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)
    half = RandomHorizontalFlip(0.5)(x, generator=torch.Generator().manual_seed(3))
    flipped = [torch.equal(half[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(half[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_augmentation_is_determined_by_the_generator():
    x = _batch(b=64)
    t = Compose([RandomCrop(32, 4), RandomHorizontalFlip()])
    a = t(x, generator=torch.Generator().manual_seed(7))
    b = t(x, generator=torch.Generator().manual_seed(7))
    c = t(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    own = RandomCrop(32, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(own(x), RandomCrop(32, 4)(x, generator=torch.Generator().manual_seed(7)))


def test_normalize_numbers_images():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    out = Normalize.from_preprocess(IMAGENET)(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    expect = [(0 / 255 - 0.485) / 0.229, (51 / 255 - 0.456) / 0.224, (255 / 255 - 0.406) / 0.225]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expect), atol=1e-6)
    assert x.dtype == torch.uint8  # input untouched
    raw = Normalize.from_preprocess({})(x)  # identity preprocessing: raw 0..255 floats (MLPerf ResNet-8)
    assert torch.equal(raw, x.float())


def test_normalize_scalar_and_float_input_not_modified():
    x = torch.full((2, 1, 8, 8), 16.0)
    out = Normalize(mean=0.5, std=0.25, scale=1 / 16)(x)
    assert torch.allclose(out, torch.full_like(x, 2.0)) and torch.equal(x, torch.full((2, 1, 8, 8), 16.0))


def test_normalize_sequences_per_channel_groups():
    # cifar10-rows layout: 96 features = 32 R, 32 G, 32 B
    x = torch.cat([torch.full((2, 32, 32), v, dtype=torch.uint8) for v in (0, 51, 255)], dim=-1)
    out = Normalize.from_preprocess(IMAGENET, kind="sequence")(x)
    img = Normalize.from_preprocess(IMAGENET)(torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1))
    for c in range(3):
        assert torch.allclose(out[:, :, c * 32 : (c + 1) * 32], img[0, c, 0, 0].expand(2, 32, 32))
    with pytest.raises(ConfigError, match="channels"):
        Normalize.from_preprocess(IMAGENET, kind="sequence")(torch.zeros(2, 8, 8))
    with pytest.raises(ConfigError, match="channel"):
        Normalize.from_preprocess(IMAGENET)(torch.zeros(2, 1, 8, 8))


def test_make_transform():
    x = _batch(b=8)
    plain = make_transform(IMAGENET, augment=False)
    assert torch.equal(plain(x), Normalize.from_preprocess(IMAGENET)(x))
    aug = make_transform(IMAGENET, augment=True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert aug(x, generator=g()).shape == x.shape and torch.equal(
        aug(x, generator=g()), aug(x, generator=g())
    )
    assert not torch.equal(aug(x, generator=g()), plain(x))
    seq = make_transform(IMAGENET, augment=True, kind="sequence")
    xs = x.permute(0, 2, 1, 3).reshape(8, 32, 96)
    assert torch.equal(seq(xs, generator=g()), Normalize.from_preprocess(IMAGENET, kind="sequence")(xs))
    with pytest.raises(ConfigError):
        make_transform(IMAGENET, kind="tokens")
