"""The coverage benchmark's external architectures build and run, and its per-model record is complete."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import coverage_models as cm  # noqa: E402

# benchmarks/coverage.py is loaded under another name: "coverage" is also the coverage.py package
_spec = importlib.util.spec_from_file_location("netcarve_bench_coverage", BENCH / "coverage.py")
coverage = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = coverage
_spec.loader.exec_module(coverage)


def test_registry_has_at_least_twelve_architectures_with_sources():
    assert len(cm.MODELS) >= 12
    assert set(cm.MODELS) == set(cm.SOURCES) == set(cm.NOTES)


@pytest.mark.parametrize("name", list(cm.MODELS))
def test_architecture_forward_shape(name):
    model = cm.create(name)
    assert not model.training
    x = cm.example_input(name)
    xs = x if isinstance(x, tuple) else (x,)  # (the encoder-decoder takes source and target ids)
    assert [tuple(t.shape) for t in xs] == [(1, *s) for s in cm.input_shapes(name)]
    with torch.no_grad():
        y = model(*xs)
    assert tuple(y.shape) == cm.output_shape(name)
    assert torch.isfinite(y).all()


def test_coverage_record_fields():
    have_tp = importlib.util.find_spec("torch_pruning") is not None
    for name, source in (("lenet", "netcarve"), ("squeezenet1_1", "external")):
        rec = coverage.coverage_record(name, source, timeout=None)
        assert rec["model"] == name and rec["source"] == source
        assert rec["input_shape"]
        nc = rec["netcarve"]
        for key in ("status", "groups", "skipped", "skip_reasons", "prunable_fraction", "macs_reduction",
                    "params_reduction", "equivalent", "seconds"):
            assert key in nc, key
        assert nc["status"] in {"ok", "error", "no prunable groups", "not equivalent", "no reduction",
                                "wrong output shape"}
        assert 0.0 <= nc["prunable_fraction"] <= 1.0
        if name == "lenet":  # a plain conv/linear stack: everything but the classifier is prunable
            assert nc["status"] == "ok", nc
            assert nc["equivalent"] is True
            assert nc["macs_reduction"] > 1.2
            assert nc["skip_reasons"] == {"reaches the model output": 1}
        tp = rec["torch_pruning"]
        assert "status" in tp and "seconds" in tp
        if have_tp and name == "lenet":
            assert tp["status"] == "ok", tp
            assert tp["equivalence"] == "passed"
            assert tp["macs_reduction"] > 1.2
    tot = coverage.totals([rec])
    assert tot["models"] == 1 and set(tot) >= {"netcarve", "torch_pruning"}


def test_shorten_reason_drops_paths():
    r = "view (not a flatten) at view_3 in stage2.0; reshaping the channel dim (e.g. a channel shuffle) is not supported"
    assert coverage.shorten_reason(r) == ("view (not a flatten) at view; reshaping the channel dim "
                                          "(e.g. a channel shuffle) is not supported")
    assert coverage.shorten_reason("used by blocks.0.norm1 (LayerNorm), which has no channel handler") == \
        "no channel handler for LayerNorm"


def test_hf_model_names_and_dict_inputs_without_transformers():
    import coverage_hf

    names = coverage.model_names(hf=True)
    assert names == [(n, "huggingface") for n in coverage_hf.MODELS] and len(names) >= 10
    assert set(coverage_hf.NOTES) <= set(coverage_hf.MODELS)

    class ByName(torch.nn.Module):
        def forward(self, input_ids, scale):
            return {"logits": input_ids.float() * scale}

    out = coverage.run(ByName(), {"input_ids": torch.ones(1, 3, dtype=torch.long), "scale": torch.tensor(2.0)})
    assert out.tolist() == [[2.0, 2.0, 2.0]]


def test_hf_coverage_record():
    pytest.importorskip("transformers", reason="transformers is not a netcarve dependency; install it to run this")
    rec = coverage.coverage_record("hf_bert", "huggingface", timeout=None)
    assert rec["input_shape"] == [[16], [16]] and rec["reference"].startswith("transformers ")
    nc = rec["netcarve"]
    assert nc["status"] == "ok" and nc["equivalent"] is True and nc["macs_reduction"] > 1.2, nc
