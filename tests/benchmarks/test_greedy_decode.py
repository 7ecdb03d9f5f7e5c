"""The greedy-decoding benchmark's loop and its netcarve engine (``compile(..., dynamic=True)``: a plan per target
length) give eager PyTorch's tokens; the dynamic-plans benchmark's worker checks every new size against the model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"netcarve_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_netcarve_decodes_the_tokens_of_eager_pytorch(tmp_path):
    gd = _load("greedy_decode")
    sys.path.insert(0, str(BENCH))
    from runtime_torch_encoder import build, tokens

    m = build(True, "seq2seq")
    src = tokens("seq2seq", 2)[0]
    with torch.no_grad():
        ref = gd._decode(m, src, 4)
        step, _ = gd._engine_step("netcarve", m, src, 4, 2, tmp_path, "sparse")
        assert torch.equal(gd._decode(step, src, 4), ref) and ref.shape == (2, 5)
    assert len(step.shapes) == 4  # (the example's length 2, then 1, 3 and 4)


def test_dynamic_plans_worker():
    dp = _load("dynamic_plans")
    row = dp.worker(sparse=True, share=True, sizes=3, threads=1)
    assert row["new_plans"] == 3 and len(row["compile_ms"]) == 3 and row["compile_ms_median"] > 0
