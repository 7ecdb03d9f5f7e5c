"""Mapping engine node names back to module paths, on hand-built graphs (no engine needed)."""

from __future__ import annotations

import onnx
import onnx.helper as oh
import pytest

from netcarve.measure._attribution import OnnxGraphIndex, map_openvino_nodes, map_ort_nodes
from netcarve.measure.export import _set_node_meta


def _node(op, inputs, outputs, name, module):
    n = oh.make_node(op, inputs, outputs, name=name)
    _set_node_meta(n, "netcarve.module", module)
    return n


@pytest.fixture()
def index(tmp_path):
    """conv1/Conv -> relu/Relu -> block/Add(+x) -> fc/MatMul -> output, as exported by to_onnx."""
    f = onnx.TensorProto.FLOAT
    nodes = [
        _node("Conv", ["input", "w"], ["conv2d"], "conv1/Conv", "conv1"),
        _node("Relu", ["conv2d"], ["relu"], "relu/Relu", "relu"),
        _node("Add", ["relu", "input"], ["add"], "block/Add", "block"),
        _node("MatMul", ["add", "w2"], ["output"], "fc/MatMul", "fc"),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("input", f, None)],
        [oh.make_tensor_value_info("output", f, None)],
        [oh.make_tensor("w", f, [1], [1.0]), oh.make_tensor("w2", f, [1], [1.0])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(oh.make_model(graph), str(path))
    return OnnxGraphIndex(path)


def test_names_tensors_and_suffixes(index):
    assert index.node_from_name("block/Add") == "block/Add"
    assert index.node_from_name("add") == "block/Add"  # a tensor name -> its producer
    assert index.node_from_name("relu_nchwc") == "relu/Relu"  # ORT names NCHWc nodes after a tensor
    assert index.node_from_name("fc/MatMul/MatMulAddFusion") == "fc/MatMul"
    assert index.node_from_name("add_token_3") is None  # short tensor names never match as prefixes
    assert index.node_from_name("ReorderInput") is None


def test_fused_activation_charged_to_the_conv(index):
    # ORT fused conv + relu and named the node after the relu's output; the kernel is a Conv
    assert index.module_for("relu/Relu", "Conv") == "conv1"
    assert index.module_for("relu/Relu", "Relu") == "relu"
    assert index.module_for("relu/Relu", "FusedConv") == "conv1"


def test_ort_mapping_with_engine_made_nodes(index, tmp_path):
    f = onnx.TensorProto.FLOAT
    # the optimised graph ORT saved: reorders around an NCHWc conv, fused names
    opt_nodes = [
        oh.make_node("ReorderInput", ["input"], ["r0"], name="ReorderInput", domain="com.microsoft.nchwc"),
        oh.make_node("Conv", ["r0", "w"], ["r1"], name="relu_nchwc", domain="com.microsoft.nchwc"),
        oh.make_node(
            "ReorderOutput", ["r1"], ["relu"], name="ReorderOutput_token_7", domain="com.microsoft.nchwc"
        ),
        oh.make_node("Add", ["relu", "input"], ["add"], name="block/Add"),
        oh.make_node("MatMul", ["add", "w2"], ["output"], name="fc/MatMul"),
    ]
    g = oh.make_graph(opt_nodes, "o", [oh.make_tensor_value_info("input", f, None)], [])
    opt = tmp_path / "opt.onnx"
    onnx.save(oh.make_model(g), str(opt))
    profiled = [
        ["ReorderInput", "ReorderInput"],
        ["relu_nchwc", "Conv"],
        ["ReorderOutput_token_7", "ReorderOutput"],
        ["block/Add", "Add"],
        ["fc/MatMul", "MatMul"],
    ]
    mapping, unresolved = map_ort_nodes(index, profiled, opt)
    assert unresolved == []
    assert mapping == {
        "ReorderInput": "conv1",  # done for its consumer
        "relu_nchwc": "conv1",
        "ReorderOutput_token_7": "conv1",  # converts its producer's output
        "block/Add": "block",
        "fc/MatMul": "fc",
    }


def test_ort_unmappable_node_is_reported(index):
    mapping, unresolved = map_ort_nodes(index, [["mystery", "Foo"]], "/nonexistent.onnx")
    assert mapping == {"mystery": ""} and unresolved == ["mystery"]


def test_openvino_mapping(index):
    nodes = {
        "profiled": [{"name": n} for n in ("input_abcd_acdb_conv1/Conv", "conv1/Conv", "MVN_3", "output")],
        "graph": {
            "input_abcd_acdb_conv1/Conv": {
                "type": "Reorder",
                "original": [],
                "inputs": ["input"],
                "consumers": ["conv1/Conv"],
            },
            "conv1/Conv": {
                "type": "Convolution",
                "original": ["conv1/Conv", "relu/Relu"],
                "inputs": [],
                "consumers": ["MVN_3"],
            },
            "MVN_3": {
                "type": "MVN",
                "original": ["MVN_3"],
                "inputs": ["conv1/Conv"],
                "consumers": ["output"],
            },
            # OpenVINO names the producer of a graph output after the output tensor
            "output": {
                "type": "FullyConnected",
                "original": ["output"],
                "inputs": ["MVN_3"],
                "consumers": [],
            },
        },
        # the front end decomposed block/Add into MVN_3 -> Multiply_4 -> "block/Add"
        "frontend": {
            "MVN_3": {"type": "MVN", "inputs": ["relu/Relu"], "consumers": ["Multiply_4"]},
            "Multiply_4": {"type": "Multiply", "inputs": ["MVN_3"], "consumers": ["block/Add"]},
            "block/Add": {"type": "Add", "inputs": ["Multiply_4"], "consumers": ["fc/MatMul"]},
            "relu/Relu": {"type": "Relu", "inputs": [], "consumers": ["MVN_3"]},
        },
    }
    mapping, unresolved = map_openvino_nodes(index, nodes)
    assert unresolved == []
    assert mapping == {
        "input_abcd_acdb_conv1/Conv": "conv1",
        "conv1/Conv": "conv1",
        "MVN_3": "block",
        "output": "fc",
    }
