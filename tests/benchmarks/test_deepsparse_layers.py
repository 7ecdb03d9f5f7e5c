"""The DeepSparse per-layer benchmark's bookkeeping (no DeepSparse needed): DeepSparse's units matched to runs of plan
steps by output shape and conv count, and the output shapes and non-zero multiply-adds taken from the compiled plan."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn as nn

from netcarve.runtime import compile as compile_plan

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str, as_name: str):
    spec = importlib.util.spec_from_file_location(as_name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = mod
    spec.loader.exec_module(mod)
    return mod


# the benchmark imports its sibling _cxx_probe by that name (benchmarks/ itself stays off sys.path: it holds modules
# named like installed packages, e.g. coverage.py)
if "_cxx_probe" not in sys.modules:
    _load("_cxx_probe", "_cxx_probe")
dl = _load("deepsparse_layers", "netcarve_bench_deepsparse_layers")


def _unit(name, ops, channels, y):
    return {"name": name, "canonical_name": ops, "output_dims": {"channels": channels, "y": y}}


def _step(name, kind):
    return {"name": name, "kind": kind, "kernel": "sparse" if kind == "conv" else "aten", "ms": 1.0}


def test_units_match_runs_of_steps_by_output_and_conv_count():
    steps = [_step("c0", "conv"), _step("c1", "conv"), _step("pool", "maxpool"), _step("c2", "conv"),
             _step("c3", "conv"), _step("c4", "conv"), _step("flatten", "flatten"), _step("fc", "linear")]
    shapes = {"c0": (64, 32), "c1": (64, 32), "pool": (64, 16), "c2": (128, 16), "c3": (128, 16), "c4": (128, 16),
              "flatten": (8192, 1), "fc": (10, 1)}
    units = [_unit("pyramid_0", "getitem", 64, 32),
             _unit("pyramid_1", "getitem_3,max_pool2d", 64, 16),  # a conv and the pooling after it
             _unit("shuffle_2", "<none>", 7, 7),  # matches nothing: left unmatched, consumes no step
             _unit("pyramid_3", "getitem_6,getitem_9", 128, 16),  # two convs of the same output shape
             _unit("ks_convolution_4", "getitem_12", 128, 16),
             _unit("gemm_5", "output", 10, 1)]
    got = [(u["name"], [s["name"] for s in run]) for u, run in dl._match(units, steps, shapes)]
    assert got == [("pyramid_0", ["c0"]), ("pyramid_1", ["c1", "pool"]), ("shuffle_2", []),
                   ("pyramid_3", ["c2", "c3"]), ("ks_convolution_4", ["c4"]), ("gemm_5", ["flatten", "fc"])]


def test_nonzero_macs_and_output_shapes():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1),
                      nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()
    with torch.no_grad():
        m[2].weight[:, :4] = 0.0  # half the second conv's weights zero
        m[4].weight[:5] = 0.0
    shapes, macs = dl._shapes_and_macs(compile_plan(m, torch.randn(2, 3, 8, 8)))
    assert shapes["0"] == (8, 8) and shapes["2"] == (4, 4) and shapes["4"] == (10, 1)
    assert macs["0"] == 8 * 3 * 9 * 2 * 8 * 8
    assert macs["2"] == 4 * 4 * 9 * 2 * 4 * 4  # non-zero weights x output positions (batch 2, 4x4)
    assert macs["4"] == 5 * 64 * 2
