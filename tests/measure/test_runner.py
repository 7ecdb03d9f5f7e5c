"""The engine worker's timing helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netcarve.measure._runner import TorchLayerTimer, central_mean, run_rounds


def test_run_rounds_counts_and_interleaving():
    calls = []
    times, steps = run_rounds(lambda: calls.append("f"), 2, 3, 2, lambda: calls.append("s") or 1, "call")
    assert len(times) == 2 and all(len(t) == 3 for t in times) and all(v >= 0 for t in times for v in t)
    assert steps == [[1, 1, 1], [1, 1, 1]]
    assert calls[:6] == ["f", "s", "f", "s", "f", "s"]  # warm-up covers both, then alternate
    calls.clear()
    run_rounds(lambda: calls.append("f"), 0, 2, 1, lambda: calls.append("s"), "round")
    assert calls == ["f", "f", "s", "s"]


def test_central_mean_keeps_columns_consistent_with_a_typical_total():
    # a stall lands on a different column in each run: per-column medians would give [1, 1, 1]
    rows = [[1, 1, 1], [5, 1, 1], [1, 5, 1], [1, 1, 5], [1, 1, 1], [9, 9, 9], [2, 4, 1]]
    # totals 3 7 7 7 3 27 7: median 7; per-column medians would sum to 3
    assert central_mean(rows, fraction=0.4) == pytest.approx([7 / 3] * 3)
    assert sum(central_mean(rows)) == pytest.approx(7)
    assert central_mean([]) == []


def test_layer_timer_self_times_add_up():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)

        def forward(self, x):
            return self.b(self.a(x)) + x  # the add is the block's own work

    model = nn.Sequential(Block(), Block())
    x = torch.randn(32, 64)
    timer = TorchLayerTimer(model)
    with torch.inference_mode():
        for _ in range(3):
            row = timer.step(lambda: model(x))
    names = [n for n, _ in timer.entries]
    assert names == ["", "0", "0.a", "0.b", "1", "1.a", "1.b"]
    assert all(v >= 0 for v in row) and row[names.index("0.a")] > 0
    assert timer.child_calls[0] == 2 and timer.child_calls[names.index("0")] == 2
    assert not timer.handles  # hooks are off between instrumented calls
    # raw self times add up exactly to the root's inclusive time
    timer.reset()
    timer.attach()
    try:
        model(x)
    finally:
        timer.detach()
    assert sum(timer.self_s) > 0
