"""Latency: result structure per engine, process isolation, fallbacks, errors, per-layer completeness."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import netcarve
from netcarve.errors import ConfigError, EngineUnavailableError
from netcarve.measure import ENGINES, engine_available, measure_latency
from netcarve.measure import latency as latency_mod

FAST = dict(warmup=2, repeats=5, rounds=2)


def _need(engine: str) -> None:
    if not engine_available(engine):
        pytest.skip(f"engine {engine!r} is not installed (pip install {engine})")


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    model = netcarve.create_model("lenet")
    return model, netcarve.example_input(model, batch=2)


@pytest.mark.parametrize("engine", ENGINES)
def test_result_structure(engine, lenet):
    _need(engine)
    model, x = lenet
    r = measure_latency(model, x, engine=engine, threads=1, per_layer=True, **FAST)
    assert (r.engine, r.threads, r.batch, r.warmup, r.repeats) == (engine, 1, 2, 2, 5)
    assert r.isolated
    assert len(r.rounds) == 2 and all(v > 0 for v in r.rounds)
    assert r.p50_ms == min(r.rounds)
    assert r.p90_ms >= r.p50_ms > 0
    assert r.env["threads"] == 1 and r.env["threads_effective"] == 1
    assert r.env["cpu_model"] is not None and "isa" in r.env
    assert r.extra["max_abs_diff"] is not None and r.extra["max_abs_diff"] < 1e-4
    # the ONNX engines run in a process that never imported torch (netcarve shares torch's thread pool)
    loaded = r.extra["child_loaded"]
    assert loaded["torch"] is (engine in ("torch", "netcarve"))
    assert loaded[engine if engine != "torch" else "netcarve"] is True
    paths = {n for n, _ in model.named_modules()}
    if engine == "deepsparse":  # a peer without per-layer timings
        assert r.per_layer is None
        return
    assert r.per_layer
    for row in r.per_layer:
        assert set(row) >= {"name", "type", "latency_ms"}
        assert row["name"] in paths and row["latency_ms"] >= 0
    convs = {row["name"] for row in r.per_layer if row["type"] == "Conv2d" and row["latency_ms"] > 0}
    assert convs == {"conv1", "conv2", "conv3"}
    assert r.per_layer_sum_ms > 0
    json.dumps(r.to_dict())


def test_torch_per_layer_charges_glue_to_the_block():
    model = netcarve.create_model("resnet20")
    r = measure_latency(model, netcarve.example_input(model), threads=1, per_layer=True, **FAST)
    rows = {row["name"]: row for row in r.per_layer}
    # containers are timed too: a block's own time is its residual add (+ shortcut call overhead)
    assert rows["layer1.0"]["type"] == "BasicBlock" and rows["layer1.0"]["latency_ms"] > 0
    assert rows[""]["type"] == "CifarResNet"
    assert rows["layer2.0.shortcut"]["type"] == "ShortcutA"
    # every module that ran has a row, and nothing else
    assert set(rows) == {n for n, _ in model.named_modules()}
    assert not any("unattributed" in name for name in rows)
    oh = r.extra["hook_overhead_us"]
    assert 0 <= oh["floor"] < 50 and 0 <= oh["per_child_call"] < 50


@pytest.mark.parametrize(
    "engine, low, high",
    [
        ("torch", 0.85, 1.15),
        # the ONNX Runtime profiler slows every kernel by a few microseconds (see latency.py)
        pytest.param("onnxruntime", 0.85, 1.6, marks=pytest.mark.slow),
        # OpenVINO's per-node profile adds a little per node too: 1.18-1.28 in a noisy phase of a Zen 4 VM (2026-12-05,
        # three tries in one CI run); a layer counted twice or missed would be far outside (~2 or ~0.5)
        pytest.param("openvino", 0.85, 1.3, marks=pytest.mark.slow),
    ],
)
def test_resnet56_per_layer_sum_matches_whole_model(engine, low, high):
    _need(engine)
    torch.manual_seed(0)
    model = netcarve.create_model("resnet56")
    x = netcarve.example_input(model)
    # One thread: on a 2-core machine shared with other jobs two OpenMP threads can stall for whole
    # time slices at every barrier, which measures the neighbours rather than the model. Wall-clock
    # ratios on a machine other processes are loading can still land outside the band by chance
    # (measured on a quiet machine: 1.03-1.05 for torch), so up to three independent measurements
    # are taken and one must fall inside; a systematic gap fails all three.
    seen = []
    for _ in range(3):
        r = measure_latency(model, x, engine=engine, threads=1, per_layer=True)
        assert not any("could not be traced" in n for n in r.notes), r.notes
        seen.append(
            (round(r.per_layer_sum_ms / r.p50_ms, 3), round(r.p50_ms, 3), [round(v, 2) for v in r.rounds])
        )
        if low <= seen[-1][0] <= high:
            break
    else:
        pytest.fail(f"{engine}: per-layer sum / whole-model p50 outside [{low}, {high}]: {seen}")


def test_model_without_spec_is_timed_in_process_with_a_note():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    r = measure_latency(model, torch.randn(4, 8), threads=1, per_layer=True, **FAST)
    assert not r.isolated
    assert any("in-process" in n and "netcarve_spec" in n for n in r.notes)
    assert r.p50_ms > 0 and {row["name"] for row in r.per_layer} == {"", "0", "1", "2"}
    assert torch.get_num_threads() >= 1


def test_isolate_false_runs_onnx_engine_in_process(lenet):
    _need("onnxruntime")
    model, x = lenet
    r = measure_latency(model, x, engine="onnxruntime", threads=1, isolate=False, **FAST)
    assert not r.isolated and r.p50_ms > 0 and r.per_layer is None


def test_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="unknown engine"):
        measure_latency(model, torch.randn(1, 2), engine="tensorrt")
    with pytest.raises(ConfigError, match="threads"):
        measure_latency(model, torch.randn(1, 2), threads=0)
    with pytest.raises(ConfigError, match="example_input"):
        measure_latency(model, [1, 2])


def test_engine_missing_in_parent(monkeypatch):
    monkeypatch.setattr(latency_mod, "engine_available", lambda engine: False)
    with pytest.raises(EngineUnavailableError, match="pip install openvino"):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), engine="openvino")


def test_engine_missing_in_child(lenet, tmp_path):
    _need("onnxruntime")
    # the child finds a broken "onnxruntime" first on its path
    (tmp_path / "onnxruntime.py").write_text("raise ImportError('simulated: no onnxruntime here')\n")
    model, x = lenet
    with pytest.raises(EngineUnavailableError, match="simulated.*pip install onnxruntime"):
        measure_latency(
            model,
            x,
            engine="onnxruntime",
            threads=1,
            engine_options={"env": {"PYTHONPATH": str(tmp_path)}},
            **FAST,
        )


def test_openvino_runs_f32_by_default(lenet):
    _need("openvino")
    model, x = lenet
    r = measure_latency(model, x, engine="openvino", threads=1, **FAST)
    # bf16 (OpenVINO's default on CPUs with avx512_bf16 / AMX) would be off by ~1e-2
    assert r.extra["max_abs_diff"] < 1e-4


def test_import_is_lean():
    # importing netcarve.measure must not pull in an engine or the exporter's dependencies
    code = (
        "import sys, netcarve.measure;"
        "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime', 'openvino') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_compare_latency_keeps_best_process_of_each_variant():
    import netcarve
    from netcarve.measure import compare_latency
    from netcarve.models import example_input

    a = netcarve.create_model("lenet").eval()
    b = netcarve.create_model("lenet", width=8).eval()
    models = {"a": a, "b": b}
    res = compare_latency(models, {k: example_input(m, 4) for k, m in models.items()}, engine="torch",
                          threads=1, processes=2, warmup=2, repeats=5, rounds=2)
    assert set(res) == {"a", "b"}
    for r in res.values():
        assert len(r.extra["process_p50_ms"]) == 2
        assert r.p50_ms == min(r.extra["process_p50_ms"]) > 0
    with pytest.raises(netcarve.ConfigError):
        compare_latency(models, {}, processes=0)



class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(20, 16), nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        return self.fc((self.emb(input_ids) * attention_mask[..., None]).mean(1))


@pytest.mark.parametrize("engine", ["torch", "onnxruntime", "openvino", "netcarve"])
def test_inputs_by_name_and_several_inputs(engine):
    """A model of two inputs timed from a dict by forward argument name (keys in any order) and from a tuple, on every
    engine (netcarve's runtime compiles several inputs too), its outputs matching the model's."""
    _need(engine)
    m = _TwoInputs().eval()
    ids, mask = torch.randint(0, 20, (2, 6)), torch.ones(2, 6)
    for x in ({"attention_mask": mask, "input_ids": ids}, (ids, mask)):
        r = measure_latency(m, x, engine=engine, threads=1, **FAST)
        assert r.p50_ms > 0 and r.extra["max_abs_diff"] <= 1e-4 * r.extra["max_ref_abs"], r.extra
    with pytest.raises(ConfigError, match="takes no argument 'labels'"):
        measure_latency(m, {"input_ids": ids, "labels": ids}, engine=engine, threads=1, **FAST)
