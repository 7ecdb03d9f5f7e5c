"""The kernel build's staging of sources (the binary must not depend on where the checkout lives)."""

from __future__ import annotations

import os
from pathlib import Path

from netcarve.runtime import _build


def test_sources_are_staged_once_inside_the_build_dir(tmp_path):
    paths = _build.staged_sources(tmp_path)
    assert [Path(p).name for p in paths] == list(_build.SOURCES)
    for name in _build.SOURCES + _build.HEADERS:
        staged = tmp_path / "src" / name
        assert staged.read_bytes() == (_build.CSRC / name).read_bytes()
    assert all(Path(p).parent == tmp_path / "src" for p in paths)
    # a second checkout (or call) leaves the copies alone: unchanged times, so ninja sees nothing new
    past = 1_000_000_000
    for name in _build.SOURCES + _build.HEADERS:
        os.utime(tmp_path / "src" / name, (past, past))
    assert _build.staged_sources(tmp_path) == paths
    assert all((tmp_path / "src" / n).stat().st_mtime == past for n in _build.SOURCES + _build.HEADERS)
    assert not list((tmp_path / "src").glob(".*.tmp"))


def test_the_loaded_kernels_were_built_from_staged_sources(kernels):
    st = _build.kernel_status()
    src = Path(st["build_dir"]) / "src"
    for name in _build.SOURCES + _build.HEADERS:
        assert (src / name).read_bytes() == (_build.CSRC / name).read_bytes()
