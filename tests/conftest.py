"""Shared test options: where the real data of ../shared/data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--data-dir", default=None,
                     help="data root holding cifar10/ and pretrained/ (default: $NETCARVE_DATA or ../shared/data)")


def find_data_root(config=None) -> Path | None:
    cands = []
    if config is not None and config.getoption("--data-dir"):
        cands.append(Path(config.getoption("--data-dir")))
    if os.environ.get("NETCARVE_DATA"):
        cands.append(Path(os.environ["NETCARVE_DATA"]))
    cands += [REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in cands:
        if (c / "cifar10" / "test.npz").is_file():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def data_root(request) -> Path:
    root = find_data_root(request.config)
    if root is None:
        pytest.skip("real CIFAR-10 / pretrained files not found: pass --data-dir, set NETCARVE_DATA, "
                    "or place shared/data beside the repo")
    return root


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tests run small models: one torch thread avoids OpenMP spin-waits on a busy 2-core box.
    Latency measurements run in their own processes with their own thread counts."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
