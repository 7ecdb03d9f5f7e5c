"""SPM (Sparsity Pattern Mask) storage of PCNN 1-D regular sparse weights (methods card A3).

A ``pcnn`` weight is cut into length-``L`` vectors (the rows of the GEMM view in consecutive chunks), each
keeping exactly ``keep`` entries at one of ``P`` allowed patterns. SPM stores per vector only the pattern id
(``ceil(log2 P)`` bits) and the ``keep`` values packed densely, plus the ``(P, L)`` pattern table once per
layer (the decoder's lookup table). No per-weight index.

``spm_encode(weight, scheme_or_library, keep)`` projects ``weight`` onto the scheme's set and packs it;
``spm_decode(spm)`` rebuilds the dense weight: for a weight already in the set (``W * mask`` from the
scheme's projection) ``spm_decode(spm_encode(W * mask, scheme)) == W * mask`` exactly.

Sizes (:class:`SPMWeight`): ``index_bits`` per vector, ``index_bytes`` (all ids, bit-packed),
``value_bytes``, ``table_bytes`` (the pattern table, bit-packed) and ``overhead`` = index bits / value bits
(e.g. P = 16, keep = 4 fp32 values: 4 / 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .schemes import PCNN, _library_tensor, gemm_view


def _id_dtype(num_patterns: int) -> torch.dtype:
    if num_patterns <= 256:
        return torch.uint8
    if num_patterns <= 2**15:
        return torch.int16
    return torch.int32


@dataclass
class SPMWeight:
    """One SPM-encoded weight.

    ``shape``: the dense weight's shape; ``length`` (L) and ``keep`` (n); ``patterns``: ``(P, L)`` bool
    pattern table; ``ids``: ``(num_vectors,)`` pattern index per vector (uint8 for P <= 256, else int16 /
    int32); ``values``: ``(num_vectors, keep)`` the kept values of each vector in position order.
    """

    shape: tuple[int, ...]
    length: int
    keep: int
    patterns: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.length, self.keep = int(self.length), int(self.keep)
        if self.length < 1 or not (1 <= self.keep <= self.length):
            raise ConfigError(f"SPMWeight: need 1 <= keep <= length, got keep={self.keep}, length={self.length}")
        numel = math.prod(self.shape)
        if numel % self.length:
            raise ConfigError(f"SPMWeight: shape {self.shape} does not split into vectors of length {self.length}")
        nvec = numel // self.length
        p = self.patterns
        if p.dim() != 2 or p.shape[1] != self.length or p.shape[0] < 1 or p.dtype != torch.bool:
            raise ConfigError(f"SPMWeight: patterns must be a (P, {self.length}) bool tensor, got "
                              f"{tuple(p.shape)} {p.dtype}")
        if bool((p.sum(1) != self.keep).any()):
            raise ConfigError(f"SPMWeight: every pattern must keep exactly keep={self.keep} positions")
        if tuple(self.ids.shape) != (nvec,) or self.ids.is_floating_point():
            raise ConfigError(f"SPMWeight: ids must be an integer tensor of shape ({nvec},), got "
                              f"{tuple(self.ids.shape)} {self.ids.dtype}")
        if nvec and (int(self.ids.min()) < 0 or int(self.ids.max()) >= p.shape[0]):
            raise ConfigError(f"SPMWeight: pattern ids must be in [0, {p.shape[0]})")
        if tuple(self.values.shape) != (nvec, self.keep):
            raise ConfigError(f"SPMWeight: values must have shape ({nvec}, {self.keep}), got {tuple(self.values.shape)}")

    # ---- sizes
    @property
    def num_vectors(self) -> int:
        return self.ids.shape[0]

    @property
    def num_patterns(self) -> int:
        return self.patterns.shape[0]

    @property
    def index_bits(self) -> int:
        """Bits of one pattern id: ``ceil(log2 P)`` (0 for a single pattern)."""
        return (self.num_patterns - 1).bit_length()

    @property
    def value_bits(self) -> int:
        """Bits of one stored value (its dtype)."""
        return self.values.element_size() * 8

    @property
    def index_bytes(self) -> int:
        """All pattern ids, bit-packed."""
        return -(-self.num_vectors * self.index_bits // 8)

    @property
    def value_bytes(self) -> int:
        return self.num_vectors * self.keep * self.values.element_size()

    @property
    def table_bytes(self) -> int:
        """The ``(P, L)`` pattern table, bit-packed (once per layer; not part of ``overhead``)."""
        return -(-self.num_patterns * self.length // 8)

    @property
    def overhead(self) -> float:
        """Index bits per value bits: ``index_bits / (keep * value_bits)``."""
        return self.index_bits / (self.keep * self.value_bits)

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain fields (JSON-ready) plus the three tensors; ``torch.save``-able; :meth:`from_dict` reverses."""
        return {"format": "spm", "shape": list(self.shape), "length": self.length, "keep": self.keep,
                "patterns": self.patterns, "ids": self.ids, "values": self.values}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SPMWeight:
        if not isinstance(d, dict) or d.get("format", "spm") != "spm":
            raise ConfigError("SPMWeight.from_dict: expected a dict written by SPMWeight.to_dict")
        try:
            return cls(shape=tuple(d["shape"]), length=d["length"], keep=d["keep"],
                       patterns=torch.as_tensor(d["patterns"]).bool(), ids=torch.as_tensor(d["ids"]),
                       values=torch.as_tensor(d["values"]))
        except KeyError as e:
            raise ConfigError(f"SPMWeight.from_dict: missing field {e.args[0]!r}") from None


def _scheme_for(scheme_or_library: Any, keep: int | None) -> PCNN:
    if isinstance(scheme_or_library, PCNN):
        if keep is not None and int(keep) != scheme_or_library.keep:
            raise ConfigError(f"spm_encode: keep={keep} differs from the scheme's keep={scheme_or_library.keep}")
        return scheme_or_library
    if scheme_or_library is None:
        if keep is None:
            raise ConfigError("spm_encode needs a pcnn scheme, a pattern library, or keep (length-9 vectors)")
        return PCNN(keep=keep)
    lib = _library_tensor(scheme_or_library, who="spm_encode", length=None, entries=keep)
    return PCNN(length=lib.shape[1], keep=int(lib[0].sum()), patterns=lib.shape[0], library=lib)


def spm_encode(weight: torch.Tensor, scheme_or_library: Any = None, keep: int | None = None) -> SPMWeight:
    """Project ``weight`` onto a ``pcnn`` set and pack it as SPM.

    ``scheme_or_library``: a :class:`~netcarve.sparsity.schemes.PCNN` scheme (its library, or the one it
    derives from ``weight``), an explicit pattern library (flat 0/1 lists of length L, each with ``keep``
    ones; ``keep`` inferred when omitted), or None with ``keep`` (length 9, data-derived library).
    """
    scheme = _scheme_for(scheme_or_library, keep)
    with torch.no_grad():
        w = weight.detach()
        lib, ids = scheme.assign(w)
        vecs = gemm_view(w).reshape(-1, scheme.length)
        values = vecs[lib[ids]].reshape(-1, scheme.keep).clone()
        return SPMWeight(shape=tuple(w.shape), length=scheme.length, keep=scheme.keep, patterns=lib.clone(),
                         ids=ids.to(_id_dtype(lib.shape[0])), values=values)


def spm_decode(spm: SPMWeight) -> torch.Tensor:
    """The dense weight (zeros off the patterns) of an :class:`SPMWeight`."""
    if not isinstance(spm, SPMWeight):
        raise ConfigError(f"spm_decode: expected an SPMWeight, got {type(spm).__name__}")
    vals = spm.values
    out = torch.zeros((spm.num_vectors, spm.length), dtype=vals.dtype, device=vals.device)
    out[spm.patterns.to(vals.device)[spm.ids.long().to(vals.device)]] = vals.reshape(-1)
    return out.reshape(spm.shape)
