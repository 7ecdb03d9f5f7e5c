"""The runtime coverage benchmark's per-model record: strict lowering, fallback steps, checked outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from netcarve.runtime import kernel_status

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("netcarve_bench_runtime_coverage", BENCH / "runtime_coverage.py")
rc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rc
_spec.loader.exec_module(rc)


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    if not kernel_status()["available"]:
        pytest.skip(f"native kernels unavailable: {kernel_status()['reason']}")


def test_native_model_record():
    r = rc.record("resnet8", "netcarve")
    assert r["strict"] == "ok" and r["ok"] and r["python_steps"] == 0 and r["fallback_nodes"] == []
    assert r["rel_err"] <= rc.RTOL and r["steps"] > 10


def test_fallback_model_record(monkeypatch):
    """A model with a layer the plan does not lower (every coverage model lowers natively since 2026-12-07): the
    strict compile's error names it, the fallback plan runs it as a python step and matches."""

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.ELU(), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean((2, 3)))

    monkeypatch.setattr(rc, "build", lambda name, source: (Odd().eval(), torch.randn(2, 3, 8, 8)))
    r = rc.record("odd", "external")
    assert "module 'act' (ELU)" in r["strict"] and r["ok"]
    assert r["python_steps"] == 1 and any("ELU" in n for n in r["fallback_nodes"])
    assert r["python_steps"] < r["steps"]
