"""Packed formats: unpack(pack(w)) == w for every registered format, sizes, refusals, persistence, corruption."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from netcarve.errors import CheckpointError, ConfigError
from netcarve.pack import (
    PackedWeight,
    PackFormat,
    check_packed,
    get_format,
    list_formats,
    load_packed,
    pack,
    register_format,
    save_packed,
    unpack,
)
from netcarve.sparsity import make_scheme


def _in_set(shape, scheme, level=None, dtype=torch.float32, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    s = make_scheme(scheme, **options)
    return w * s.project(w, level if level is not None else s.default_level())


# one weight generator per format (odd sizes on purpose); a new format without a case fails the test below
CASES = {
    "csr": ({}, lambda dt, seed: _in_set((37, 11, 3, 3), "unstructured", 0.9, dt, seed)),
    "bsr": ({"block": [4, 16]}, lambda dt, seed: _in_set((30, 77), "block", 0.8, dt, seed, block=[4, 16])),
    "nm": ({"n": 2, "m": 4}, lambda dt, seed: _in_set((13, 5, 3, 3), "nm", None, dt, seed, n=2, m=4)),
    "pattern": ({}, lambda dt, seed: _in_set((24, 19, 3, 3), "pattern", None, dt, seed, connectivity=0.7)),
    "spm": ({"length": 9}, lambda dt, seed: _in_set((17, 6, 3, 3), "pcnn", None, dt, seed, length=9, keep=3)),
}


def test_every_format_has_a_conformance_case():
    assert set(CASES) == set(list_formats())


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_exact(name, dtype):
    opts, make = CASES[name]
    for seed in range(3):
        w = make(dtype, seed)
        p = pack(w, name, **opts)
        assert p.format == name and p.shape == tuple(w.shape)
        back = unpack(p)
        assert back.dtype == w.dtype and back.shape == w.shape
        assert torch.equal(back, w)
        assert p.nbytes < p.dense_bytes  # every case is sparse enough to be smaller packed
        check_packed(p)
        json.dumps(p.describe())


@pytest.mark.parametrize("name", sorted(CASES))
def test_all_zero_and_degenerate_weights(name):
    opts, make = CASES[name]
    w = make(torch.float32, 0)
    z = torch.zeros_like(w)
    assert torch.equal(unpack(pack(z, name, **opts)), z)
    one = torch.zeros_like(w)
    one.view(-1)[5] = 3.0  # a single non-zero fits every format
    assert torch.equal(unpack(pack(one, name, **opts)), one)


@pytest.mark.parametrize("name", ["csr", "bsr"])
def test_dense_weights_round_trip_in_general_formats(name):
    w = torch.randn(9, 35)
    p = pack(w, "bsr", block=[4, 8]) if name == "bsr" else pack(w, "csr")
    assert torch.equal(unpack(p), w)


def test_csr_matches_torch_sparse_csr():
    w = _in_set((20, 31), "unstructured", 0.7)
    p = pack(w, "csr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = w.to_sparse_csr()
    assert torch.equal(p.tensors["indptr"].long(), ref.crow_indices())
    assert torch.equal(p.tensors["indices"].long(), ref.col_indices())
    assert torch.equal(p.tensors["values"], ref.values())


def test_bsr_stores_only_non_zero_tiles_and_pads_the_edges():
    w = torch.zeros(10, 20)
    w[0, 0] = 1.0  # tile (0, 0)
    w[9, 19] = 2.0  # tile (2, 2) of a 4x8 grid padded to 12 x 24
    p = pack(w, "bsr", block="4x8")
    assert p.tensors["values"].shape == (2, 4, 8)
    assert p.tensors["indptr"].tolist() == [0, 1, 1, 2] and p.tensors["indices"].tolist() == [0, 2]
    assert torch.equal(unpack(p), w)


def test_nm_positions_are_distinct_and_refuse_overfull_runs():
    w = torch.zeros(2, 8)
    w[0, 1] = 1.0  # one non-zero in a run: the second slot is a zero at a free position
    p = pack(w, "nm", n=2, m=4)
    idx = p.tensors["indices"]
    assert (idx[..., 1] > idx[..., 0]).all()
    assert torch.equal(unpack(p), w)
    w[1, 4:7] = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match=r"run 1 of row 1 \(columns 4\.\.7\) has 3 non-zeros"):
        pack(w, "nm", n=2, m=4)


def test_pattern_storage_is_filter_kernel_reordered():
    w = _in_set((16, 12, 3, 3), "pattern", None, connectivity=0.6)
    p = pack(w, "pattern")
    t = p.tensors
    ptr = t["indptr"].long()
    per_filter = (ptr[1:] - ptr[:-1]).tolist()
    assert per_filter == sorted(per_filter, reverse=True)  # most kernels first
    # stored per-filter counts belong to the filters named by ``order``
    alive = (w.reshape(16, 12, 9) != 0).any(-1).sum(1)
    assert alive[t["order"].long()].tolist() == per_filter
    for i in range(16):  # inside a filter, kernels of one pattern are contiguous
        ids = t["ids"][ptr[i]:ptr[i + 1]].tolist()
        assert ids == sorted(ids)
    assert t["values"].shape[1] == 4 and t["library"].sum(1).eq(4).all()
    # pattern-only storage has no per-weight index: 4 values + 1 id + 1 channel per kernel
    assert p.stored_values == 4 * int(alive.sum())


def test_pattern_with_a_given_library_and_refusals():
    lib = [[0, 1, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 1, 0]]
    w = torch.zeros(2, 2, 3, 3)
    w[0, 0].view(-1)[[1, 3, 4]] = torch.tensor([1.0, 2.0, 3.0])  # covered by pattern 0 (one stored zero)
    w[1, 1].view(-1)[[4, 7]] = torch.tensor([4.0, 5.0])
    p = pack(w, "pattern", library=lib)
    assert p.options == {"library": lib} and torch.equal(unpack(p), w)
    w[1, 0].view(-1)[[0, 8]] = 1.0
    with pytest.raises(ConfigError, match=r"kernel 2 has non-zeros at \[0, 8\], which no pattern"):
        pack(w, "pattern", library=lib)
    with pytest.raises(ConfigError, match="4-D conv weight"):
        pack(torch.zeros(4, 9), "pattern")
    with pytest.raises(ConfigError, match="same"):
        pack(w, "pattern", library=[[1] * 9, [1] + [0] * 8])


def test_spm_format_agrees_with_spm_encode():
    from netcarve.sparsity import spm_decode, spm_encode

    w = _in_set((8, 4, 3, 3), "pcnn", None, length=9, keep=4)
    p = pack(w, "spm", length=9)
    assert torch.equal(unpack(p), spm_decode(spm_encode(w, keep=4)))
    with pytest.raises(ConfigError, match="do not split into vectors of length 7"):
        pack(w, "spm", length=7)


def test_bad_options_and_inputs_are_clear():
    with pytest.raises(ConfigError, match="unknown packed format 'coo'"):
        pack(torch.zeros(2, 2), "coo")
    with pytest.raises(ConfigError, match="block must be"):
        pack(torch.zeros(2, 2), "bsr", block="4by4")
    with pytest.raises(ConfigError, match="need 1 <= n <= m"):
        pack(torch.zeros(2, 2), "nm", n=5, m=4)
    with pytest.raises(ConfigError, match=">= 2 dims"):
        pack(torch.zeros(5), "csr")
    with pytest.raises(ConfigError, match="floating-point"):
        pack(torch.zeros(2, 2, dtype=torch.int64), "csr")
    with pytest.raises(ConfigError, match="bad options"):
        pack(torch.zeros(2, 2), "csr", block=3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_round_trip(tmp_path, name):
    opts, make = CASES[name]
    w = make(torch.float32, 1)
    path = save_packed({"layer.weight": pack(w, name, **opts)}, tmp_path / "w.safetensors")
    back = load_packed(path)
    assert list(back) == ["layer.weight"] and back["layer.weight"].format == name
    assert torch.equal(unpack(back["layer.weight"]), w)


def _tampered(tmp_path, name, key, fn):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    opts, make = CASES[name]
    path = save_packed({"w": pack(make(torch.float32, 0), name, **opts)}, tmp_path / "w.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[f"w/{key}"] = fn(tensors[f"w/{key}"]).contiguous()
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("name,key,fn,msg", [
    ("csr", "indices", lambda t: t + 1000, "outside"),
    ("csr", "indptr", lambda t: t.flip(0), "must rise"),
    ("bsr", "values", lambda t: t[:, :2], "values"),
    ("nm", "indices", lambda t: t.flip(-1), "ascending"),
    ("pattern", "order", lambda t: torch.zeros_like(t), "permutation"),
    ("pattern", "ids", lambda t: t + 100, "outside"),
    ("spm", "ids", lambda t: t + 100, "pattern ids"),
])
def test_corrupt_files_are_refused(tmp_path, name, key, fn, msg):
    path = _tampered(tmp_path, name, key, fn)
    with pytest.raises(CheckpointError, match=msg):
        load_packed(path)


def test_foreign_and_truncated_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a netcarve packed-weights file"):
        load_packed(tmp_path / "plain.safetensors")
    path = save_packed({"w": pack(torch.eye(4), "csr")}, tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_packed(path)
    with pytest.raises(CheckpointError, match="no such"):
        load_packed(tmp_path / "missing.safetensors")


def test_register_a_custom_format():
    class Dense(PackFormat):
        def pack(self, weight):
            return self._packed(weight, values=weight.detach().clone())

        def unpack(self, p):
            return p.tensors["values"].clone()

        def check(self, p):
            self._expect(p, "values", p.shape, (torch.float32,))

    try:
        register_format("dense_test", Dense)
        w = torch.randn(3, 4)
        assert isinstance(pack(w, "dense_test"), PackedWeight) and torch.equal(unpack(pack(w, "dense_test")), w)
        assert get_format("dense_test") is Dense
        with pytest.raises(ConfigError, match="already registered"):
            register_format("dense_test", Dense)
        with pytest.raises(ConfigError, match="PackFormat subclass"):
            register_format("not_a_format", dict)
    finally:
        from netcarve.pack.formats import _FORMATS

        _FORMATS._items.pop("dense_test", None)
