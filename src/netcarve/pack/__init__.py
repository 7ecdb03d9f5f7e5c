"""Packed sparse formats (CSR, BSR, N:M, PatDNN pattern storage, PCNN SPM): lossless, named, self-describing.

Plain tensor functions (the bottom layer, beside :mod:`netcarve.sparsity.schemes`): ``pack(weight, format,
**options) -> PackedWeight``, ``unpack(p) -> weight`` with ``unpack(pack(w)) == w``, a registry of formats
(``register_format`` / ``get_format`` / ``list_formats``) and one-file persistence (``save_packed`` /
``load_packed``). See :mod:`netcarve.pack.formats`.
"""

from .formats import (
    BSR,
    CSR,
    FORMAT_VERSION,
    NMFormat,
    PackedWeight,
    PackFormat,
    PatternFormat,
    SPMFormat,
    check_packed,
    get_format,
    list_formats,
    load_packed,
    make_format,
    pack,
    register_format,
    save_packed,
    unpack,
)

__all__ = [
    "BSR",
    "CSR",
    "FORMAT_VERSION",
    "NMFormat",
    "PackFormat",
    "PackedWeight",
    "PatternFormat",
    "SPMFormat",
    "check_packed",
    "get_format",
    "list_formats",
    "load_packed",
    "make_format",
    "pack",
    "register_format",
    "save_packed",
    "unpack",
]
