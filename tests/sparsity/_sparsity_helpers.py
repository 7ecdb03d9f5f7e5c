"""Tiny models and deterministic loaders shared by the sparsity tests."""

import torch
from torch import nn


class ListLoader(list):
    """A fixed list of (x, y) batches (deterministic; ``fit`` needs len())."""

    batch_size = 32


class InterruptingLoader(ListLoader):
    """Raises KeyboardInterrupt once, after ``after`` batches in total (a killed run)."""

    def __init__(self, batches, after: int):
        super().__init__(batches)
        self.after = after
        self.seen = 0

    def __iter__(self):
        for b in super().__iter__():
            self.seen += 1
            if self.seen == self.after:
                raise KeyboardInterrupt("simulated kill")
            yield b


def make_data(n: int = 256, seed: int = 0, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (x.flatten(1)[:, : x[0].numel() // 2].mean(1) > x.flatten(1)[:, x[0].numel() // 2 :].mean(1)).long()
    return ListLoader([(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)])


class TinyCNN(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2),
        )  # fmt: skip
