"""Helpers of the runtime tests: kernel settings changed for a block and restored after it."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def at_threads(threads: int | None):
    """``threads`` torch threads for the block if given; the thread count is restored after it (also when the block
    sets threads)."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)


@contextmanager
def forced_parallel(kernels, threads: int | None = None):
    """Every kernel splits its work over the thread pool (parallel threshold 0), at ``threads`` torch threads if
    given; the threshold and the thread count are restored after the block (also when the block sets threads)."""
    old_threshold = kernels.parallel_threshold()
    with at_threads(threads):
        kernels.set_parallel_threshold(0)
        try:
            yield
        finally:
            kernels.set_parallel_threshold(old_threshold)


@contextmanager
def _switched(kernels, name: str, on: bool):
    """``set_<name>(on)`` for the block, ``set_<name>(not on)`` (the default) after it."""
    getattr(kernels, f"set_{name}")(on)
    try:
        yield
    finally:
        getattr(kernels, f"set_{name}")(not on)


def switched_off(kernels, name: str):
    """A kernel path switched off (``set_<name>(False)``) for the block, back on (its default) after it."""
    return _switched(kernels, name, False)


def switched_on(kernels, name: str):
    """A kernel path that is off by default switched on (``set_<name>(True)``) for the block, off again after it."""
    return _switched(kernels, name, True)
