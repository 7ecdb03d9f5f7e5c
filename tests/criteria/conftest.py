"""Fixtures for these tests: one intra-op thread (tiny models; avoids OpenMP spin-waits on a busy box)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
