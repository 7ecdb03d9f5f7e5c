"""benchmarks/runtime_hf.py: its variants build and netcarve's compiled output matches the model (needs transformers,
which is not a netcarve dependency: skipped without it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


@pytest.mark.parametrize("variant", ["pruned", "pruned-hidden", "block90"])
def test_variant_compiles_and_matches(variant):
    pytest.importorskip("transformers", reason="transformers is not a netcarve dependency; install it to run this")
    import runtime_hf

    model = runtime_hf.build(variant)
    if variant == "pruned":  # 2 of 4 heads and half the feed-forward units per layer
        layer = model.bert.encoder.layer[0]
        assert layer.attention.self.query.out_features == 128 and layer.intermediate.dense.out_features == 512
    if variant == "pruned-hidden":  # ... and the hidden size halved: every block reads and writes 128 features
        layer = model.bert.encoder.layer[0]
        assert layer.attention.self.query.in_features == 128 and layer.output.dense.out_features == 128
        assert model.bert.embeddings.word_embeddings.embedding_dim == 128
    rec = runtime_hf.check(model, runtime_hf.inputs(2))
    assert rec["native"] and rec["max_rel_error"] <= 1e-4
    if variant == "block90":
        assert "sparse" in rec["kernels"].values()
