"""Packed sparse weight formats: named, self-describing and lossless.

A format turns a dense weight with zeros (the handoff contract of :mod:`netcarve.sparsity`) into the compact
arrays a sparse kernel reads, and back: ``unpack(pack(w, fmt)) == w`` bit for bit, for every weight the
format accepts. A weight a format cannot hold exactly (e.g. a run with 3 non-zeros for ``nm`` 2:4) is refused
with a :class:`~netcarve.errors.ConfigError` naming where, never packed lossily: project it with the
matching scheme first.

Every format works on the GEMM view of a weight (rows = output units, columns = the reduction axis:
``in_channels * kh * kw`` for a conv, ``in_features`` for a linear or an LSTM/GRU gate matrix) unless noted.

=========  ==========================================================================================
format     tensors (besides the shape, dtype and options kept in :class:`PackedWeight`)
=========  ==========================================================================================
csr        ``indptr`` int32 (R+1), ``indices`` int32 (nnz) column per value, ``values`` (nnz)
bsr        ``block=[bh, bw]``; the view zero-padded to whole blocks; ``indptr`` int32 per block row,
           ``indices`` int32 block column per stored block, ``values`` (nblocks, bh, bw)
nm         ``n``, ``m``; columns zero-padded to a multiple of m; ``values`` (R, G, n) and ``indices``
           uint8 (R, G, n): the position inside each run of m (distinct, ascending)
pattern    4-D conv weights (F, C, kh, kw), PatDNN's filter-kernel-reorder storage: ``library`` bool
           (P, kh*kw) with the same number E of entries per pattern; ``order`` int32 (F): the filters
           reordered (most kernels first, then by pattern composition), ``indptr`` int32 (F+1) kernels
           per reordered filter, ``channels`` int32 (nk) input channel of each kept kernel, ``ids``
           (uint8 / int16) its pattern, ``values`` (nk, E) its E weights in position order.
           All-zero kernels (connectivity pruning) are not stored.
spm        PCNN's 1-D regular format (:mod:`netcarve.sparsity.spm`): ``length`` L, ``keep``; ``patterns``
           bool (P, L), ``ids`` per length-L vector, ``values`` (nvec, keep)
=========  ==========================================================================================

``pattern`` and ``spm`` take an optional ``library`` (flat 0/1 lists); without one the library is the set of
non-zero shapes the weight actually uses (shapes with fewer than E entries are folded into a pattern that
covers them, or padded to E entries). Stored zeros (a pattern position holding 0) are allowed.

:func:`save_packed` / :func:`load_packed` write a dict of packed weights to one safetensors file whose
header describes every entry (format, version, shape, dtype, options); loading re-validates every index, so a
corrupt or foreign file is a :class:`~netcarve.errors.CheckpointError`, not a crash inside a kernel.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._registry import Registry
from ..errors import CheckpointError, ConfigError
from ..sparsity.schemes import _library_tensor, _parse_block
from ..sparsity.spm import _id_dtype

FORMAT_VERSION = 1
HEADER_KEY = "netcarve.packed"

_FORMATS: Registry[type[PackFormat]] = Registry("packed format")


def _gemm(weight: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(f"{who}: expected a weight tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ConfigError(f"{who}: packed formats take weights with >= 2 dims, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ConfigError(f"{who}: expected a floating-point weight, got {weight.dtype}")
    return weight.detach().reshape(weight.shape[0], -1)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"packed weight: unknown dtype {name!r}")
    return dt


@dataclass
class PackedWeight:
    """One packed weight: ``format`` (a registered name), the dense ``shape`` and values ``dtype``, the
    format's ``options`` (JSON-safe) and its named ``tensors``."""

    format: str
    shape: tuple[int, ...]
    dtype: str
    options: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (values and indices; bool tables count one byte per entry)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def dense_bytes(self) -> int:
        return self.numel * _dtype(self.dtype).itemsize

    @property
    def stored_values(self) -> int:
        """Number of value slots stored (including explicit zeros of a pattern / run / block)."""
        return int(self.tensors["values"].numel())

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary: format, shape, dtype, options, bytes and the tensors' shapes and dtypes."""
        return {"format": self.format, "version": FORMAT_VERSION, "shape": list(self.shape), "dtype": self.dtype,
                "options": self.options, "nbytes": self.nbytes, "dense_bytes": self.dense_bytes,
                "stored_values": self.stored_values,
                "tensors": {k: [list(v.shape), _dtype_name(v.dtype)] for k, v in self.tensors.items()}}

    def unpack(self) -> torch.Tensor:
        return unpack(self)


class PackFormat:
    """Base class of a registered format: ``pack(weight) -> PackedWeight``, ``unpack(p) -> Tensor`` and
    ``check(p)`` (raises on inconsistent tensors; called on every load)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    tensor_names: ClassVar[tuple[str, ...]] = ()

    def options(self) -> dict[str, Any]:
        return {}

    def pack(self, weight: torch.Tensor) -> PackedWeight:  # pragma: no cover - abstract
        raise NotImplementedError

    def unpack(self, p: PackedWeight) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, p: PackedWeight) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- helpers for subclasses
    def _packed(self, weight: torch.Tensor, **tensors: torch.Tensor) -> PackedWeight:
        return PackedWeight(self.name, tuple(weight.shape), _dtype_name(weight.dtype), self.options(),
                            {k: v.contiguous() for k, v in tensors.items()})

    def _fail(self, p: PackedWeight, msg: str):
        raise CheckpointError(f"packed weight ({self.name}, shape {list(p.shape)}): {msg}")

    def _expect(self, p: PackedWeight, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]):
        t = p.tensors.get(name)
        if t is None:
            self._fail(p, f"missing tensor {name!r}")
        if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
            self._fail(p, f"tensor {name!r} is {list(t.shape)} {_dtype_name(t.dtype)}, expected {list(shape)} "
                          f"{'/'.join(_dtype_name(d) for d in dtypes)}")
        return t

    def _check_indptr(self, p: PackedWeight, name: str, rows: int, total: int) -> torch.Tensor:
        ptr = self._expect(p, name, (rows + 1,), (torch.int32, torch.int64)).long()
        if int(ptr[0]) != 0 or int(ptr[-1]) != total or bool((ptr[1:] < ptr[:-1]).any()):
            self._fail(p, f"{name!r} must rise from 0 to {total}")
        return ptr

    def _check_range(self, p: PackedWeight, name: str, t: torch.Tensor, high: int) -> None:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
            self._fail(p, f"{name!r} holds values outside [0, {high})")


def register_format(name: str, cls: type[PackFormat] | None = None, *, overwrite: bool = False):
    """Register a :class:`PackFormat` subclass (decorator when ``cls`` is omitted)."""
    return _FORMATS.register_subclass(name, cls, PackFormat, overwrite=overwrite, who="register_format")


def get_format(name: str) -> type[PackFormat]:
    return _FORMATS.get(name)


def list_formats(pattern: str = "*") -> list[str]:
    return _FORMATS.list(pattern)


def make_format(name: str | PackFormat, **options) -> PackFormat:
    if isinstance(name, PackFormat):
        if options:
            raise ConfigError("make_format: options given together with a format instance")
        return name
    cls = get_format(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"packed format {name!r}: bad options {sorted(options)} ({e})") from None


def pack(weight: torch.Tensor, format: str | PackFormat = "csr", **options) -> PackedWeight:  # noqa: A002
    """Pack a dense weight with zeros into ``format`` (lossless; refuses weights it cannot hold exactly)."""
    with torch.no_grad():
        return make_format(format, **options).pack(weight)


def unpack(p: PackedWeight) -> torch.Tensor:
    """The dense weight of a :class:`PackedWeight` (``unpack(pack(w)) == w``)."""
    if not isinstance(p, PackedWeight):
        raise ConfigError(f"unpack: expected a PackedWeight, got {type(p).__name__}")
    fmt = make_format(p.format, **p.options)
    with torch.no_grad():
        return fmt.unpack(p)


def check_packed(p: PackedWeight) -> None:
    """Validate a packed weight's tensors (shapes, dtypes, index ranges); raises CheckpointError."""
    try:
        fmt = make_format(p.format, **p.options)
    except ConfigError as e:
        raise CheckpointError(f"packed weight: {e}") from None
    v = p.tensors.get("values")
    if v is None or _dtype_name(v.dtype) != p.dtype:
        raise CheckpointError(f"packed weight ({p.format}, shape {list(p.shape)}): 'values' missing or not "
                              f"of dtype {p.dtype}")
    fmt.check(p)


# ------------------------------------------------------------------------------------------------ csr


@register_format("csr")
class CSR(PackFormat):
    summary = "compressed sparse rows of the GEMM view: row pointers, int32 column per value"

    def pack(self, weight):
        g = _gemm(weight, "pack(csr)")
        nz = g != 0
        cols = nz.nonzero()[:, 1]
        indptr = torch.zeros(g.shape[0] + 1, dtype=torch.int64)
        indptr[1:] = nz.sum(1).cumsum(0)
        return self._packed(weight, indptr=indptr.int(), indices=cols.int(), values=g[nz])

    def unpack(self, p):
        rows, cols = p.shape[0], p.numel // p.shape[0]
        ptr = p.tensors["indptr"].long()
        row = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])
        out = torch.zeros(rows, cols, dtype=p.tensors["values"].dtype)
        out[row, p.tensors["indices"].long()] = p.tensors["values"]
        return out.reshape(p.shape)

    def check(self, p):
        rows, cols = p.shape[0], p.numel // max(1, p.shape[0])
        v = p.tensors.get("values")
        if v is None or v.dim() != 1:
            self._fail(p, "'values' must be a 1-D tensor")
        self._check_indptr(p, "indptr", rows, v.numel())
        idx = self._expect(p, "indices", (v.numel(),), (torch.int32, torch.int64))
        self._check_range(p, "indices", idx, cols)


# ------------------------------------------------------------------------------------------------ bsr


@register_format("bsr")
class BSR(PackFormat):
    summary = "block sparse rows: dense bh x bw tiles of the GEMM view, int32 block column per tile"

    def __init__(self, block: Any = (4, 16)):
        self.block = _parse_block(block, "packed format 'bsr': block")

    def options(self):
        return {"block": list(self.block)}

    def _grid(self, shape):
        rows, cols = shape[0], math.prod(shape[1:])
        bh, bw = self.block
        return rows, cols, -(-rows // bh), -(-cols // bw)

    def pack(self, weight):
        g = _gemm(weight, "pack(bsr)")
        rows, cols, rb, cb = self._grid(weight.shape)
        bh, bw = self.block
        padded = torch.zeros(rb * bh, cb * bw, dtype=g.dtype)
        padded[:rows, :cols] = g
        tiles = padded.reshape(rb, bh, cb, bw).permute(0, 2, 1, 3)
        keep = (tiles != 0).any(-1).any(-1)
        indptr = torch.zeros(rb + 1, dtype=torch.int64)
        indptr[1:] = keep.sum(1).cumsum(0)
        return self._packed(weight, indptr=indptr.int(), indices=keep.nonzero()[:, 1].int(), values=tiles[keep])

    def unpack(self, p):
        rows, cols, rb, cb = self._grid(p.shape)
        bh, bw = self.block
        v = p.tensors["values"]
        ptr = p.tensors["indptr"].long()
        brow = torch.repeat_interleave(torch.arange(rb), ptr[1:] - ptr[:-1])
        tiles = torch.zeros(rb, cb, bh, bw, dtype=v.dtype)
        tiles[brow, p.tensors["indices"].long()] = v
        return tiles.permute(0, 2, 1, 3).reshape(rb * bh, cb * bw)[:rows, :cols].reshape(p.shape)

    def check(self, p):
        _, _, rb, cb = self._grid(p.shape)
        v = p.tensors.get("values")
        if v is None or v.dim() != 3 or tuple(v.shape[1:]) != self.block:
            self._fail(p, f"'values' must be (nblocks, {self.block[0]}, {self.block[1]})")
        self._check_indptr(p, "indptr", rb, v.shape[0])
        idx = self._expect(p, "indices", (v.shape[0],), (torch.int32, torch.int64))
        self._check_range(p, "indices", idx, cb)


# ------------------------------------------------------------------------------------------------- nm


@register_format("nm")
class NMFormat(PackFormat):
    summary = "N:M: n values + their uint8 positions per run of m along the reduction axis"

    def __init__(self, n: int = 2, m: int = 4):
        try:
            self.n, self.m = int(n), int(m)
        except (TypeError, ValueError):
            raise ConfigError(f"packed format 'nm': n and m must be integers, got n={n!r}, m={m!r}") from None
        if not (1 <= self.n <= self.m <= 256):
            raise ConfigError(f"packed format 'nm': need 1 <= n <= m <= 256, got n={self.n}, m={self.m}")

    def options(self):
        return {"n": self.n, "m": self.m}

    def _runs(self, shape) -> tuple[int, int, int]:
        rows, cols = shape[0], math.prod(shape[1:])
        return rows, cols, -(-cols // self.m)

    def pack(self, weight):
        g = _gemm(weight, "pack(nm)")
        rows, cols, runs = self._runs(weight.shape)
        padded = torch.zeros(rows, runs * self.m, dtype=g.dtype)
        padded[:, :cols] = g
        r = padded.reshape(rows, runs, self.m)
        nz = r != 0
        counts = nz.sum(-1)
        if bool((counts > self.n).any()):
            i, k = (int(x) for x in (counts > self.n).nonzero()[0])
            raise ConfigError(
                f"pack(nm): run {k} of row {i} (columns {k * self.m}..{min(cols, (k + 1) * self.m) - 1}) has "
                f"{int(counts[i, k])} non-zeros, {self.n}:{self.m} holds at most {self.n}; project the weight with "
                f"the 'nm' scheme first")
        # the n slots: the non-zero positions first, then the lowest zero positions (distinct, so unpacking
        # can scatter without overwriting), ascending
        key = (~nz).to(torch.int32) * self.m + torch.arange(self.m)
        pos = key.sort(-1).indices[..., : self.n].sort(-1).values
        return self._packed(weight, values=r.gather(-1, pos), indices=pos.to(torch.uint8))

    def unpack(self, p):
        rows, cols, runs = self._runs(p.shape)
        v = p.tensors["values"]
        out = torch.zeros(rows, runs, self.m, dtype=v.dtype)
        out.scatter_(-1, p.tensors["indices"].long(), v)
        return out.reshape(rows, -1)[:, :cols].reshape(p.shape)

    def check(self, p):
        rows, _, runs = self._runs(p.shape)
        v = p.tensors.get("values")
        if v is None or tuple(v.shape) != (rows, runs, self.n):
            self._fail(p, f"'values' must be ({rows}, {runs}, {self.n})")
        idx = self._expect(p, "indices", (rows, runs, self.n), (torch.uint8,))
        self._check_range(p, "indices", idx, self.m)
        if self.n > 1 and bool((idx[..., 1:] <= idx[..., :-1]).any()):
            self._fail(p, "'indices' must be strictly ascending inside every run")


# ------------------------------------------------------------------------------ pattern libraries


def _library_arg(library: Any, length: int, who: str) -> torch.Tensor | None:
    if library is None:
        return None
    lib = _library_tensor(library, who=who, length=length, entries=None)
    e = lib.sum(1)
    if bool((e != e[0]).any()):
        raise ConfigError(f"{who}: every library pattern must keep the same number of entries")
    return lib


def _fit(nz: torch.Tensor, lib: torch.Tensor | None, who: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each row of the bool matrix ``nz`` (n, L) a pattern of ``lib`` (P, L) that covers its non-zeros
    (the first such pattern); without ``lib`` build the smallest library of equal-size patterns that covers
    every row. Returns ``(library, ids)``."""
    if lib is None:
        alive = nz[nz.any(1)] if nz.shape[0] else nz
        shapes, counts = (torch.unique(alive, dim=0, return_counts=True) if alive.shape[0]
                          else (nz.new_zeros((0, nz.shape[1])), torch.zeros(0, dtype=torch.long)))
        e = int(shapes.sum(1).max()) if shapes.shape[0] else 1
        pops = shapes.sum(1)
        full = shapes[pops == e][counts[pops == e].argsort(descending=True, stable=True)]
        pats = [p for p in full]
        for s in shapes[pops < e]:  # fold into a covering pattern, else pad with the lowest free positions
            if not any(bool((s & ~p).sum() == 0) for p in pats):
                p = s.clone()
                p[(~s).nonzero()[: e - int(s.sum()), 0]] = True
                if not any(bool((p == q).all()) for q in pats):
                    pats.append(p)
        if not pats:  # an all-zero weight: one pattern, unused
            p = torch.zeros(nz.shape[1], dtype=torch.bool)
            p[:e] = True
            pats = [p]
        lib = torch.stack(pats)
    outside = nz.to(torch.float32) @ (~lib).to(torch.float32).T  # (n, P) non-zeros outside each pattern
    fits = outside == 0
    ok = fits.any(1)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0])
        raise ConfigError(f"{who}: {what} {i} has non-zeros at {nz[i].nonzero()[:, 0].tolist()}, which no pattern "
                          f"of the library covers; project the weight with the matching scheme first")
    return lib, fits.to(torch.int8).argmax(1)


# -------------------------------------------------------------------------------------------- pattern


@register_format("pattern")
class PatternFormat(PackFormat):
    summary = "PatDNN filter-kernel-reorder storage: kept kernels as (channel, pattern id, E values)"

    def __init__(self, library: Any = None):
        self.library = library

    def options(self):
        if self.library is None:
            return {}
        return {"library": [[int(x) for x in torch.as_tensor(p).reshape(-1).tolist()] for p in self.library]}

    def pack(self, weight):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise ConfigError(f"pack(pattern): expects a 4-D conv weight (F, C, kh, kw), got "
                              f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        _gemm(weight, "pack(pattern)")
        f, c, kh, kw = weight.shape
        k = weight.detach().reshape(f * c, kh * kw)
        nz = k != 0
        alive = nz.any(1)
        lib, ids_all = _fit(nz, _library_arg(self.library, kh * kw, "pack(pattern)"), "pack(pattern)", "kernel")
        # filter-kernel reorder: most kernels first, then by pattern composition (PatDNN's FKR)
        per_filter = alive.reshape(f, c)
        comp = torch.zeros(f, lib.shape[0], dtype=torch.long)
        fid = torch.arange(f).repeat_interleave(c)[alive]
        comp.index_put_((fid, ids_all[alive]), torch.ones_like(fid), accumulate=True)
        keys = [(-int(per_filter[i].sum()), tuple((-comp[i]).tolist()), i) for i in range(f)]
        order = torch.tensor([k_[2] for k_ in sorted(keys)], dtype=torch.long)
        chans, pids, rows, counts = [], [], [], []
        ch = torch.arange(c)
        for i in order.tolist():
            a = per_filter[i]
            ci = ch[a]
            pi = ids_all[i * c: (i + 1) * c][a]
            srt = (pi.long() * c + ci).argsort()  # kernels of one pattern contiguous, channels ascending
            chans.append(ci[srt])
            pids.append(pi[srt])
            rows.append(i * c + ci[srt])
            counts.append(int(a.sum()))
        chans_t = torch.cat(chans) if chans else torch.zeros(0, dtype=torch.long)
        pids_t = torch.cat(pids) if pids else torch.zeros(0, dtype=torch.long)
        rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        positions = torch.stack([p.nonzero()[:, 0] for p in lib])  # (P, E)
        values = k[rows_t].gather(1, positions[pids_t.long()]) if rows_t.numel() else k.new_zeros(
            (0, positions.shape[1]))
        indptr = torch.zeros(f + 1, dtype=torch.int64)
        indptr[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        return self._packed(weight, library=lib, order=order.int(), indptr=indptr.int(), channels=chans_t.int(),
                            ids=pids_t.to(_id_dtype(lib.shape[0])), values=values)

    def unpack(self, p):
        f, c, kh, kw = p.shape
        t = p.tensors
        v = t["values"]
        positions = torch.stack([q.nonzero()[:, 0] for q in t["library"]])
        ptr = t["indptr"].long()
        filt = torch.repeat_interleave(t["order"].long(), ptr[1:] - ptr[:-1])
        rows = filt * c + t["channels"].long()
        out = torch.zeros(f * c, kh * kw, dtype=v.dtype)
        if rows.numel():
            sub = torch.zeros(rows.numel(), kh * kw, dtype=v.dtype)
            sub.scatter_(1, positions[t["ids"].long()], v)
            out[rows] = sub
        return out.reshape(p.shape)

    def check(self, p):
        if len(p.shape) != 4:
            self._fail(p, "pattern weights are 4-D (F, C, kh, kw)")
        f, c, kh, kw = p.shape
        lib = p.tensors.get("library")
        if lib is None or lib.dtype != torch.bool or lib.dim() != 2 or lib.shape[1] != kh * kw or lib.shape[0] < 1:
            self._fail(p, f"'library' must be a (P, {kh * kw}) bool tensor")
        e = lib.sum(1)
        if bool((e != e[0]).any()):
            self._fail(p, "library patterns differ in their number of entries")
        order = self._expect(p, "order", (f,), (torch.int32, torch.int64))
        if not torch.equal(order.long().sort().values, torch.arange(f)):
            self._fail(p, "'order' is not a permutation of the filters")
        v = p.tensors.get("values")
        if v is None or v.dim() != 2 or v.shape[1] != int(e[0]):
            self._fail(p, f"'values' must be (kernels, {int(e[0])})")
        ptr = self._check_indptr(p, "indptr", f, v.shape[0])
        chans = self._expect(p, "channels", (v.shape[0],), (torch.int32, torch.int64))
        self._check_range(p, "channels", chans, c)
        ids = self._expect(p, "ids", (v.shape[0],), (torch.uint8, torch.int16, torch.int32))
        self._check_range(p, "ids", ids, lib.shape[0])
        filt = torch.repeat_interleave(torch.arange(f), ptr[1:] - ptr[:-1])
        if torch.unique(filt * c + chans.long()).numel() != chans.numel():
            self._fail(p, "a kernel is stored twice")


# ------------------------------------------------------------------------------------------------ spm


@register_format("spm")
class SPMFormat(PackFormat):
    summary = "PCNN 1-D regular: per length-L vector a pattern id and its `keep` values (SPM)"

    def __init__(self, length: int = 9, library: Any = None):
        try:
            self.length = int(length)
        except (TypeError, ValueError):
            raise ConfigError(f"packed format 'spm': length must be an integer, got {length!r}") from None
        if self.length < 1:
            raise ConfigError(f"packed format 'spm': length must be >= 1, got {self.length}")
        self.library = library

    def options(self):
        out: dict[str, Any] = {"length": self.length}
        if self.library is not None:
            out["library"] = [[int(x) for x in torch.as_tensor(p).reshape(-1).tolist()] for p in self.library]
        return out

    def pack(self, weight):
        g = _gemm(weight, "pack(spm)")
        if g.numel() % self.length:
            raise ConfigError(f"pack(spm): the weight's {g.numel()} entries do not split into vectors of length "
                              f"{self.length}")
        vecs = g.reshape(-1, self.length)
        lib, ids = _fit(vecs != 0, _library_arg(self.library, self.length, "pack(spm)"), "pack(spm)", "vector")
        values = vecs[lib[ids]].reshape(ids.numel(), int(lib[0].sum()))
        return self._packed(weight, patterns=lib, ids=ids.to(_id_dtype(lib.shape[0])), values=values)

    def _spm(self, p):
        from ..sparsity.spm import SPMWeight

        t = p.tensors
        return SPMWeight(shape=p.shape, length=self.length, keep=int(t["patterns"][0].sum()), patterns=t["patterns"],
                         ids=t["ids"], values=t["values"])

    def unpack(self, p):
        from ..sparsity.spm import spm_decode

        return spm_decode(self._spm(p))

    def check(self, p):
        pats = p.tensors.get("patterns")
        if pats is None or pats.dtype != torch.bool or pats.dim() != 2:
            self._fail(p, "'patterns' must be a (P, L) bool tensor")
        try:
            self._spm(p)
        except ConfigError as e:
            self._fail(p, str(e))


# ---------------------------------------------------------------------------------------- save / load


def save_packed(weights: dict[str, PackedWeight], path: str | os.PathLike) -> Path:
    """Write packed weights (by name, e.g. the model's parameter names) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    header, flat = {}, {}
    for name, p in weights.items():
        if not isinstance(p, PackedWeight):
            raise ConfigError(f"save_packed: {name!r} is a {type(p).__name__}, not a PackedWeight")
        if "/" in name:
            raise ConfigError(f"save_packed: names may not contain '/', got {name!r}")
        d = p.describe()
        header[name] = {k: d[k] for k in ("format", "version", "shape", "dtype", "options")}
        header[name]["tensors"] = sorted(p.tensors)
        for k, t in p.tensors.items():
            flat[f"{name}/{k}"] = t.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    os.replace(tmp, path)
    return path


def load_packed(path: str | os.PathLike) -> dict[str, PackedWeight]:
    """Read a file written by :func:`save_packed`; every entry is re-validated (CheckpointError if corrupt)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such packed-weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if HEADER_KEY not in meta:
                raise CheckpointError(f"{path}: not a netcarve packed-weights file (no {HEADER_KEY!r} header)")
            header = json.loads(meta[HEADER_KEY])
            keys = set(f.keys())
            out = {}
            for name, h in header.items():
                if int(h.get("version", 0)) > FORMAT_VERSION:
                    raise CheckpointError(f"{path}: {name!r} uses packed-format version {h['version']}; this "
                                          f"netcarve reads up to {FORMAT_VERSION}")
                missing = [k for k in h["tensors"] if f"{name}/{k}" not in keys]
                if missing:
                    raise CheckpointError(f"{path}: {name!r} lacks tensors {missing}")
                p = PackedWeight(h["format"], tuple(h["shape"]), h["dtype"], h.get("options") or {},
                                 {k: f.get_tensor(f"{name}/{k}") for k in h["tensors"]})
                try:
                    check_packed(p)
                except CheckpointError as e:
                    raise CheckpointError(f"{path}: {name!r}: {e}") from None
                out[name] = p
    except (SafetensorError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read packed weights ({type(e).__name__}: {e})") from None
    return out
