import json

import pytest
import torch
from torch import nn

import netcarve
from netcarve.errors import CheckpointError, ConfigError
from netcarve.models import register_model


class _Tiny(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.rnn = nn.GRU(width, 6, num_layers=2, batch_first=True)
        self.fc = nn.Linear(6, 4)
        self.input_shape = (3, 5, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))  # (B, C, 5, 5)
        seq = h.flatten(2).transpose(1, 2)  # (B, 25, C)
        out, _ = self.rnn(seq)
        return self.fc(out[:, -1])


@pytest.fixture(autouse=True, scope="module")
def _registered_tiny():
    """Register the test model only while these tests run (registry-parametrized zoo tests must not see it)."""
    from netcarve.models._registry import _MODELS

    register_model("_test_tiny_serialize", family="test", input_shape=(3, 5, 5))(_Tiny)
    yield
    del _MODELS._items["_test_tiny_serialize"]


def _narrow(model: nn.Module, keep: int) -> nn.Module:
    """Hand-narrow conv/bn/GRU-input as a pruner would."""
    c = model.conv
    model.conv = nn.Conv2d(3, keep, 3, padding=1, bias=False)
    model.conv.weight.data = c.weight.data[:keep].clone()
    model.bn = nn.BatchNorm2d(keep)
    old = model.rnn
    model.rnn = nn.GRU(keep, 6, num_layers=2, batch_first=True)
    sd = old.state_dict()
    sd["weight_ih_l0"] = sd["weight_ih_l0"][:, :keep]
    model.rnn.load_state_dict(sd)
    return model


def test_roundtrip_exact_outputs(tmp_path):
    torch.manual_seed(0)
    m = netcarve.create_model("_test_tiny_serialize", width=8).eval()
    x = torch.randn(2, 3, 5, 5)
    netcarve.save(m, tmp_path / "ck", metadata={"top1": 12.5})
    m2 = netcarve.load(tmp_path / "ck")
    assert torch.equal(m(x), m2(x))
    assert m2.netcarve_metadata == {"top1": 12.5}
    # a path to the manifest or weights file inside is accepted too
    assert torch.equal(netcarve.load(tmp_path / "ck" / "model.safetensors")(x), m(x))


def test_pruned_shapes_rebuild_from_manifest(tmp_path):
    torch.manual_seed(0)
    m = _narrow(netcarve.create_model("_test_tiny_serialize", width=8), keep=5).eval()
    x = torch.randn(2, 3, 5, 5)
    netcarve.save(m, tmp_path / "ck")
    man = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert man["layers"]["conv"]["args"]["out_channels"] == 5
    m2 = netcarve.load(tmp_path / "ck")
    assert m2.conv.out_channels == 5 and m2.rnn.input_size == 5
    assert torch.equal(m(x), m2(x))


def test_corrupt_weights_clear_error(tmp_path):
    m = netcarve.create_model("_test_tiny_serialize")
    netcarve.save(m, tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        netcarve.load(tmp_path / "ck")


def test_corrupt_manifest_clear_error(tmp_path):
    netcarve.save(netcarve.create_model("_test_tiny_serialize"), tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is corrupt"):
        netcarve.load(tmp_path / "ck")


def test_manifest_weights_mismatch(tmp_path):
    netcarve.save(netcarve.create_model("_test_tiny_serialize", width=8), tmp_path / "a")
    netcarve.save(netcarve.create_model("_test_tiny_serialize", width=4), tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="conv.weight"):
        netcarve.load(tmp_path / "a")


def test_missing_and_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        netcarve.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        netcarve.load(tmp_path)


def test_save_requires_registry_model(tmp_path):
    with pytest.raises(ConfigError, match="create_model"):
        netcarve.save(nn.Linear(2, 2), tmp_path / "x")


def test_manifest_naming_a_transformers_model_is_checked(tmp_path, monkeypatch):
    netcarve.save(netcarve.create_model("_test_tiny_serialize"), tmp_path / "ck")
    path = tmp_path / "ck" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"] = {"name": "transformers:BertForSequenceClassification", "kwargs": {"config": {}}}
    path.write_text(json.dumps(manifest))
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match="Hugging Face model .* install transformers to load it"):
        netcarve.load(tmp_path / "ck")
    fake = type(__import__("sys"))("transformers")  # installed, but the name is not one of its model classes
    fake.PreTrainedModel = type("PreTrainedModel", (nn.Module,), {})
    fake.BertForSequenceClassification = nn.Linear
    monkeypatch.setitem(__import__("sys").modules, "transformers", fake)
    with pytest.raises(CheckpointError, match="not a transformers model class"):
        netcarve.load(tmp_path / "ck")


def test_non_finite_weights_are_refused(tmp_path):
    m = netcarve.create_model("_test_tiny_serialize")
    with torch.no_grad():
        m.fc.weight[0, 0] = float("nan")
    netcarve.save(m, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="NaN or inf.*fc.weight"):
        netcarve.load(tmp_path / "ck")


class _Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.conv(x))))).mean((2, 3))


def test_pruned_conv_transpose_roundtrip(tmp_path):
    from netcarve.compact import prune_channels
    from netcarve.models._registry import _MODELS

    register_model("_test_up_serialize", family="test", input_shape=(3, 8, 8))(_Up)
    try:
        torch.manual_seed(0)
        m = netcarve.create_model("_test_up_serialize").eval()
        x = torch.randn(2, 3, 8, 8)
        r = prune_channels(m, x, ratio=0.5)
        assert r.model.up.weight.shape == (4, 3, 3, 3) and r.model.up.output_padding == (1, 1)
        netcarve.save(r.model, tmp_path / "ck")
        back = netcarve.load(tmp_path / "ck")
        assert back.up.output_padding == (1, 1) and torch.equal(back(x), r.model(x))
    finally:
        del _MODELS._items["_test_up_serialize"]
