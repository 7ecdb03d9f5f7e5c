"""The built-in UCI digits: split sizes, stratification, determinism, row sequences."""

from __future__ import annotations

import hashlib

import torch

from netcarve.data import digits_split_indices, get_dataset
from netcarve.data.digits import DIGITS_FILE, _read_digits


def test_asset_is_the_documented_file():
    digest = hashlib.sha256(DIGITS_FILE.read_bytes()).hexdigest()
    assert digest == "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
    assert digest in (DIGITS_FILE.parent / "README.md").read_text()


def test_split_sizes_and_stratification():
    tr, te = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert (len(tr), len(te)) == (1347, 450)
    assert tr.x.shape == (1347, 1, 8, 8) and tr.x.dtype == torch.uint8 and tr.y.dtype == torch.int64
    assert tr.input_shape == (1, 8, 8) and tr.kind == "image" and tr.num_classes == 10
    assert int(tr.x.max()) == 16 and int(tr.x.min()) == 0
    total = tr.class_counts() + te.class_counts()
    frac = te.class_counts().double() / total.double()
    assert ((frac - 0.25).abs() <= 0.5 / total.double() + 1e-9).all()  # round(0.25 * n_c) per class


def test_splits_are_disjoint_and_cover_the_file():
    y = _read_digits(str(DIGITS_FILE))[:, 64]
    tr, te = digits_split_indices(y, "train"), digits_split_indices(y, "test")
    assert len(set(tr.tolist()) & set(te.tolist())) == 0
    assert sorted(tr.tolist() + te.tolist()) == list(range(1797))
    assert torch.equal(get_dataset("digits", "test").y, torch.from_numpy(y[te]))


def test_split_is_deterministic_and_seed_dependent():
    a, b = get_dataset("digits", "test"), get_dataset("digits", "test")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    c = get_dataset("digits", "test", split_seed=1)
    assert len(c) == len(a) and not torch.equal(c.x, a.x)
    d = get_dataset("digits", "test", test_fraction=0.5)
    assert 890 <= len(d) <= 905


def test_digits_rows_is_an_8x8_sequence():
    img, seq = get_dataset("digits", "train"), get_dataset("digits-rows", "train")
    assert seq.kind == "sequence" and seq.input_shape == (8, 8) and seq.channels == 1
    assert torch.equal(seq.x, img.x[:, 0]) and torch.equal(seq.y, img.y)
