"""profile_model's JSON shape and the text table."""

from __future__ import annotations

import json

import pytest
import torch

import netcarve
from netcarve.measure import count_model, engine_available, format_profile_table, profile_model

FAST = dict(warmup=2, repeats=5, rounds=2)


@pytest.fixture(scope="module")
def lenet_profile():
    torch.manual_seed(0)
    model = netcarve.create_model("lenet")
    return model, profile_model(model, engine="torch", threads=1, batch=3, **FAST)


def test_json_shape(lenet_profile):
    model, prof = lenet_profile
    assert set(prof) >= {"layers", "total", "env", "engine", "batch", "threads"}
    assert (prof["engine"], prof["batch"], prof["threads"]) == ("torch", 3, 1)
    assert prof["input_shape"][0] == 3 and prof["model"] == "lenet"
    for row in prof["layers"]:
        assert set(row) >= {"name", "type", "macs", "params", "latency_ms", "share"}
    cost = count_model(model, netcarve.example_input(model, batch=3))
    assert prof["total"]["macs"] == cost.total_macs
    assert prof["total"]["params"] == cost.total_params == sum(p.numel() for p in model.parameters())
    assert sum(r["macs"] for r in prof["layers"]) == cost.total_macs
    assert sum(r["params"] for r in prof["layers"]) == cost.total_params
    assert prof["total"]["latency_ms"] > 0
    assert sum(r["share"] for r in prof["layers"]) == pytest.approx(1.0)
    assert prof["total"]["per_layer_sum_ms"] == pytest.approx(sum(r["latency_ms"] for r in prof["layers"]))
    names = [r["name"] for r in prof["layers"]]
    assert names == [n for n, _ in model.named_modules() if n in names]  # module order
    json.dumps(prof)


def test_without_per_layer_and_with_explicit_input():
    model = netcarve.create_model("lenet")
    x = netcarve.example_input(model, batch=1)
    prof = profile_model(model, x, threads=1, batch=4, per_layer=False, **FAST)
    assert prof["input_shape"][0] == 4  # the sample is repeated to the requested batch
    assert all(r["latency_ms"] is None and r["share"] is None for r in prof["layers"])
    assert prof["total"]["latency_ms"] > 0 and prof["total"]["per_layer_sum_ms"] is None
    assert "-" in format_profile_table(prof)


def test_onnxruntime_folded_batchnorm_has_zero_time():
    if not engine_available("onnxruntime"):
        pytest.skip("engine 'onnxruntime' is not installed (pip install onnxruntime)")
    model = netcarve.create_model("lenet")
    prof = profile_model(model, engine="onnxruntime", threads=1, **FAST)
    rows = {r["name"]: r for r in prof["layers"]}
    assert rows["bn1"]["latency_ms"] == 0.0 and rows["bn1"]["macs"] > 0  # folded into conv1
    assert rows["conv1"]["latency_ms"] > 0
    assert prof["env"]["onnxruntime"] is not None


def test_table(lenet_profile):
    model, prof = lenet_profile
    table = format_profile_table(prof)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "type", "MACs", "params", "latency", "ms", "share", "%"]
    body = lines[2 : 2 + len(prof["layers"])]
    assert len({len(line) for line in body}) == 1  # fixed width
    assert body[0].startswith("(model)")
    assert any(line.startswith("conv1 ") and "Conv2d" in line for line in body)
    assert any(line.startswith("total") for line in lines)
    assert "engine torch, batch 3, threads 1" in table


def test_bad_batch():
    with pytest.raises(netcarve.ConfigError):
        profile_model(netcarve.create_model("lenet"), batch=0)


class _ByName(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.fc(h.mean(1))


def test_inputs_by_argument_name_are_resized_per_tensor():
    x = {"input_ids": torch.randint(0, 20, (1, 5)), "attention_mask": torch.ones(1, 5)}
    prof = profile_model(_ByName(), x, threads=1, batch=3, per_layer=False, **FAST)
    assert prof["input_shape"] == {"input_ids": [3, 5], "attention_mask": [3, 5]}
    assert prof["total"]["macs"] == 3 * 8 * 2
