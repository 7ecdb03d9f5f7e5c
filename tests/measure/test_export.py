"""ONNX export: numerics equal to torch for every zoo model, node names traceable to module paths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import netcarve
from netcarve.errors import ConfigError, UnsupportedModelError
from netcarve.measure import to_onnx
from netcarve.measure.export import module_of_node

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the exported graphs")


def _calibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give BatchNorm realistic running statistics (one batch of cumulative averaging), as a trained
    model has. With the default mean 0 / var 1, a random deep residual net's logits reach 1e4..1e9,
    where float32 rounding alone exceeds 1e-4; with calibrated stats they are O(1)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _run_ort(path, inputs: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


# deeper copies of resnet20/56 (same blocks, more of them) run with the slow tests to keep the default
# run short; every other registered model runs always
_DEEP_COPIES = {"resnet32", "resnet44", "resnet110"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _DEEP_COPIES else n for n in netcarve.list_models()],
)
def test_zoo_model_exports_and_matches_torch(name, tmp_path):
    torch.manual_seed(0)
    model = netcarve.create_model(name)
    _calibrate_bn(model, netcarve.example_input(model, batch=16, seed=1))
    x = netcarve.example_input(model, batch=2, seed=2)
    with torch.no_grad():
        ref = model(x).numpy()
    path = to_onnx(model, x, tmp_path / f"{name}.onnx")  # a failure to export fails this test
    (out,) = _run_ort(path, {"input": x.numpy()})
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < 1e-4, (name, float(np.abs(ref).max()))

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    paths = {n for n, _ in model.named_modules()}
    for node in proto.graph.node:
        mod = module_of_node(node)
        assert mod in paths, (node.name, mod)
        assert node.name.startswith(f"{mod}/"), node.name
    assert len({n.name for n in proto.graph.node}) == len(proto.graph.node)
    # every parametrised leaf that ran shows up as some node's module (BN may be folded into its conv)
    named = {module_of_node(n) for n in proto.graph.node}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.LSTM, nn.GRU)):
            assert mname in named, mname


def test_torch_transformer_encoder_exports_off_its_fast_path(tmp_path):
    """torch's nn.TransformerEncoder in eval mode under no_grad takes a fused fast path that neither exporter
    converts; to_onnx exports its regular path (same outputs) and restores the fast-path switch."""

    class Causal(nn.Module):  # with a causal mask (the dynamo exporter fails on it: data-dependent checks)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(5))

        def forward(self, x):
            return self.enc(self.fc(x), self.mask)

    torch.manual_seed(0)
    model = Causal().eval()
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        ref = model(x).numpy()
    before = torch.backends.mha.get_fastpath_enabled()
    path = to_onnx(model, x, tmp_path / "encoder.onnx")
    assert torch.backends.mha.get_fastpath_enabled() == before
    (out,) = _run_ort(path, {"input": x.numpy()})
    assert np.abs(out - ref).max() < 1e-4


def test_batchnorm_folded_into_conv_is_attributed_to_the_conv(tmp_path):
    model = netcarve.create_model("resnet20")
    path = to_onnx(model, netcarve.example_input(model), tmp_path / "r20.onnx")
    proto = onnx.load(str(path))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert {module_of_node(n) for n in convs} == {
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    }
    assert not any(module_of_node(n).split(".")[-1].startswith("bn") for n in proto.graph.node)
    # the residual add lives in the block's own forward: charged to the block, not to a leaf
    adds = [n for n in proto.graph.node if n.op_type == "Add"]
    assert adds and all(module_of_node(n).count(".") == 1 for n in adds)  # "layerK.i"


def test_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = netcarve.create_model("resnet8")
    _calibrate_bn(model, netcarve.example_input(model, batch=16, seed=1))
    path = to_onnx(model, netcarve.example_input(model, batch=1), tmp_path / "r8.onnx", dynamic_batch=True)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic
    for b in (1, 5):
        x = netcarve.example_input(model, batch=b, seed=3)
        (out,) = _run_ort(path, {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4)


def test_training_flag_restored_and_eval_semantics(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9), nn.BatchNorm1d(4))
    model.train()
    x = torch.randn(3, 4)
    path = to_onnx(model, x, tmp_path / "m.onnx")
    assert model.training
    model.eval()
    (out,) = _run_ort(path, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-5)


class _DataDependent(nn.Module):
    """``torch.export`` cannot capture a Python branch on a tensor value; tracing specialises it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_falls_back_to_torchscript_exporter(tmp_path):
    model = _DataDependent()
    x = torch.ones(2, 4)
    path = to_onnx(model, x, tmp_path / "dd.onnx")
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["netcarve.exporter"] == "torchscript"
    assert {module_of_node(n) for n in proto.graph.node} >= {"fc"}
    (out,) = _run_ort(path, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-6)


class _Unexportable(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x).S  # no ONNX operator for SVD


def test_unexportable_model_raises_naming_both_exporters(tmp_path):
    with pytest.raises(UnsupportedModelError, match="dynamo.*torchscript"):
        to_onnx(_Unexportable(), torch.randn(3, 3), tmp_path / "x.onnx")


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg11_bn", "lenet"])
def test_channel_pruned_model_exports_and_matches_torch(name, tmp_path):
    """A physically pruned model (narrower layers) exports and runs in onnxruntime with the same outputs."""
    from netcarve.compact import prune_channels

    torch.manual_seed(0)
    model = netcarve.create_model(name)
    _calibrate_bn(model, netcarve.example_input(model, batch=16, seed=1))
    pruned = prune_channels(model, netcarve.example_input(model), ratio=0.5, round_to=8).model.eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    x = netcarve.example_input(pruned, batch=2, seed=2)
    with torch.no_grad():
        ref = pruned(x).numpy()
    (out,) = _run_ort(to_onnx(pruned, x, tmp_path / f"{name}-pruned.onnx"), {"input": x.numpy()})
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


class _Keywords(nn.Module):
    """Called as ``model(**batch)``: ids, an optional argument between (left out: its default) and a mask; a Python
    branch on a tensor value when ``branchy`` (torch.export cannot capture it: the TorchScript exporter's case)."""

    def __init__(self, branchy=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 3)
        self.branchy = branchy

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        h = self.emb(input_ids) * attention_mask[..., None]
        if self.branchy and h.sum() > 0:
            h = h * 2
        return self.fc(h.mean(1))


@pytest.mark.parametrize("branchy", [False, True], ids=["dynamo", "torchscript"])
def test_dict_input_by_argument_name(branchy, tmp_path):
    """An example input given as a dict by forward argument name (keys in any order, an argument between them left
    out) exports with the graph's inputs named by it, in forward's order, and onnxruntime fed by name matches
    ``model(**batch)``; a key forward does not take is a clear error."""
    m = _Keywords(branchy).eval()
    ids = torch.randint(0, 20, (3, 5))
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    batch = {"attention_mask": mask, "input_ids": ids}
    path = to_onnx(m, batch, tmp_path / "kw.onnx", dynamic_batch=not branchy)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert {p.key: p.value for p in proto.metadata_props}["netcarve.exporter"] == ("torchscript" if branchy else
                                                                                   "dynamo")
    (out,) = _run_ort(path, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, m(**batch).numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="forward takes no argument 'labels'"):
        to_onnx(m, {**batch, "labels": ids}, tmp_path / "bad.onnx")
