"""Shared test options: where the real data of ../shared/data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

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


# ---------------------------------------------------------------------- shared test models
class SepAttention(nn.Module):
    """User attention with separate q, k, v projections and ``heads`` heads."""

    def __init__(self, dim=12, heads=3):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        hd = self.q.out_features // self.heads

        def split(y):
            return y.reshape(b, t, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-2, -1) / hd**0.5, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, self.heads * hd))


class SepModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.attn = SepAttention()
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)).mean(1))


@pytest.fixture
def sep_model():
    """A model with user attention (separate q, k, v, ``heads`` heads) whose handler is registered with
    ``attention_heads_handler`` for the test; yields the model class."""
    from netcarve.graph import attention_heads_handler, register_channel_handler, unregister_channel_handler

    register_channel_handler(SepAttention, attention_heads_handler(qkv=("q", "k", "v"), proj="o", num_heads="heads"))
    yield SepModel
    unregister_channel_handler(SepAttention)
