"""Channel-group discovery (netcarve.graph) on hand-written models and on the zoo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netcarve
from netcarve.compact import mask_channels, prune_channels
from netcarve.errors import ConfigError, UnsupportedModelError
from netcarve.graph import (
    ChannelHandler,
    build_channel_groups,
    get_channel_handler,
    register_channel_handler,
    unregister_channel_handler,
)


# ---------------------------------------------------------------------- hand-written models
class Chain(nn.Module):
    """conv-bn-relu-conv-bn-relu-pool(2) -> flatten (16 ch x 4x4) -> fc1 -> relu -> fc2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(self.flatten(x))))


class ViewFlatten(nn.Module):
    """conv -> relu -> x.view(x.size(0), -1) -> fc (and torch.flatten on a second branch-free variant)."""

    def __init__(self, use_view: bool = True):
        super().__init__()
        self.use_view = use_view
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x.view(x.size(0), -1) if self.use_view else torch.flatten(x, 1)
        return self.fc(x)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(F.relu(out + x)).mean((2, 3))


class Depthwise(nn.Module):
    """MobileNetV2-style: expand 1x1 - bn - relu6 - dw 3x3 - bn - relu6 - project 1x1 -> mean -> fc."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu6(self.bn1(self.expand(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.fc(self.project(x).mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.gconv(self.conv1(x))).sum()


class ChannelScale(nn.Module):
    """A custom per-channel scale layer (x * scale[c]); fx would trace it, a handler makes it a leaf."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = ChannelScale(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.scale(self.conv1(x)))).flatten(1)


@pytest.fixture
def scale_handler():
    h = register_channel_handler(
        ChannelScale,
        ChannelHandler(role="passthrough", params={"scale": 0}, ndims=(4,)),
    )
    yield h
    unregister_channel_handler(ChannelScale)


# ---------------------------------------------------------------------- tests
def test_chain_groups_flatten_block_and_describe():
    m = Chain()
    mode_before = m.training
    stats_before = m.bn1.running_mean.clone()
    gs = build_channel_groups(m, torch.randn(2, 3, 8, 8))
    assert gs.names() == ["conv1", "conv2", "fc1"]
    g1, g2, g3 = gs["conv1"], gs["conv2"], gs["fc1"]
    assert (g1.producer, g1.consumers, g1.passthrough, g1.num_channels) == ("conv1", ("conv2",), ("bn1",), 8)
    assert g1.slots[0].params == (("weight", 0), ("bias", 0))  # producer rows
    assert dict(g1.slots[2].params) == {"weight": 1}  # consumer columns
    assert (g2.consumers, g2.passthrough, g2.num_channels) == (("fc1",), ("bn2",), 16)
    fc_slot = g2.slots[-1]
    assert fc_slot.role == "consumer" and fc_slot.block == 16  # each channel owns 4x4 = 16 fc1 inputs
    assert g2.slots[0].params == (("weight", 0),)  # conv2 has no bias
    assert (g3.consumers, g3.num_channels) == (("fc2",), 12)
    assert gs.skipped_names() == ["fc2"] and "model output" in gs.skipped[0].reason
    text = gs.describe()
    assert "group 'conv2': 16 channels" in text and "16 features per channel" in text
    assert "consumer     fc1 (Linear): input channels: weight[dim 1]" in g2.describe()
    # tracing with the example input must not touch the model's state
    assert m.training == mode_before and torch.equal(m.bn1.running_mean, stats_before)


@pytest.mark.parametrize("use_view", [True, False])
def test_view_and_torch_flatten_to_linear(use_view):
    gs = build_channel_groups(ViewFlatten(use_view), torch.randn(2, 2, 3, 3))
    g = gs["conv"]
    assert g.consumers == ("fc",) and g.slots[-1].block == 9


def test_residual_add_couples_producers_into_one_group():
    gs = build_channel_groups(Residual(), torch.randn(2, 3, 8, 8))
    assert gs.names() == ["stem", "conv1"]
    assert gs["conv1"].passthrough == ("bn1",) and gs["conv1"].consumers == ("conv2",)
    g = gs["stem"]
    assert g.producers == ("stem", "conv2") and g.coupled and g.num_channels == 8
    assert g.passthrough == ("bn2",) and g.consumers == ("conv1", "head")
    assert len(g.joins) == 1 and gs.group_of("conv2") is g
    assert "coupled (2 producers) by residual adds" in g.describe()
    assert gs.skipped_names() == ["head"] and "model output" in gs.skipped[0].reason


class AddToInput(nn.Module):
    """The block input is the model input: the sum's channels cannot be pruned."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.conv1(x))))
        out += x
        return self.head(F.relu(out)).flatten(1)


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv1(x) + self.conv2(x).mean((2, 3), keepdim=True)).flatten(1)


def test_residual_skipped_when_an_addend_is_not_prunable():
    gs = build_channel_groups(AddToInput(), torch.randn(2, 3, 5, 5))
    assert gs.names() == ["conv1"]
    skipped = {s.producer: s for s in gs.skipped}
    assert "to the model input 'x'" in skipped["conv2"].reason
    assert skipped["conv2"].paths[:2] == ("conv2", "bn2")



def test_lower_rank_addend_aligned_from_the_right_couples():
    # (N, C, H, W) + (C, 1, 1): numpy broadcasting puts the addend's channels on dim 1 too
    m = RankBroadcast().eval()
    x = torch.randn(2, 3, 5, 5)
    gs = build_channel_groups(m, x)
    assert gs.names() == ["conv1"] and gs.groups[0].producers == ("conv1", "conv2")
    r = prune_channels(m, x, ratio=0.5, groups=gs)
    torch.testing.assert_close(r.model(x), mask_channels(m, gs, r.keep)(x))


class RankMisaligned(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(3, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):  # (N, 4, H, W) + (N, 1, 1, 4): the addend's 4 lands on the width
        return self.head(self.conv1(x) + self.fc(x.mean((2, 3)))[:, None, None, :]).flatten(1)


def test_misaligned_broadcast_blocks():
    gs = build_channel_groups(RankMisaligned(), torch.randn(2, 3, 5, 4))
    assert len(gs) == 0 and any("broadcasting" in s.reason for s in gs.skipped if s.producer != "head")


def test_channel_aligned_broadcast_couples_like_a_residual():
    """``a + b.mean((2, 3), keepdim=True)`` and squeeze-excitation ``x * scale``: the operands' channels are
    aligned (broadcast over space only), so their producers form one coupled group."""
    g = build_channel_groups(Broadcast(), torch.randn(2, 3, 5, 5))["conv1"]
    assert g.coupled and g.producers == ("conv1", "conv2") and g.consumers == ("head",)
    gs = build_channel_groups(SqueezeExcite(), torch.randn(2, 3, 6, 6))
    g = gs["conv"]
    assert g.producers == ("conv", "fc2") and set(g.consumers) == {"fc1", "head"}
    assert gs["fc1"].consumers == ("fc2",)


class RankBroadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv1(x) + self.conv2(x).mean((0, 2, 3))[:, None, None]).flatten(1)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(x * s).mean((2, 3))


def test_depthwise_is_pruned_with_its_group():
    gs = build_channel_groups(Depthwise(), torch.randn(2, 4, 6, 6))
    g = gs["expand"]
    assert g.passthrough == ("bn1", "dw", "bn2") and g.consumers == ("project",) and g.num_channels == 12
    dw = next(s for s in g.slots if s.path == "dw")
    assert dw.role == "passthrough" and dw.params == (("weight", 0),)
    assert gs["project"].consumers == ("fc",)  # mean over (2, 3) keeps the channels


def test_grouped_conv_with_in_eq_out_is_a_partitioned_passthrough():
    gs = build_channel_groups(Grouped(), torch.randn(1, 4, 5, 5))
    g = gs["conv1"]
    assert g.passthrough == ("gconv",) and g.consumers == ("conv2",) and g.num_channels == 8
    slot = next(s for s in g.slots if s.path == "gconv")
    assert slot.role == "passthrough" and slot.partitions == 2 and g.partitions == 2
    assert "kept evenly in 2 partitions of 4" in g.describe() and "2 channel groups" in g.describe()
    assert [s.producer for s in gs.skipped] == ["conv2"]  # gconv starts no group; conv2 reaches the output


class TwoGrouped(nn.Module):
    """One group read by grouped convs with 2 and 4 groups: the group keeps channels evenly in 4 parts."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.g2 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.g4 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.conv1(x)
        return self.head(self.g2(x) + self.g4(x))


def test_grouped_convs_with_different_groups_need_the_lcm():
    g = build_channel_groups(TwoGrouped(), torch.randn(1, 3, 6, 6))["conv1"]
    assert g.partitions == 4 and set(g.passthrough) == {"g2", "g4"}


def test_grouped_conv_changing_width_is_skipped_with_the_reason():
    class Widen(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 8, 1)
            self.gconv = nn.Conv2d(8, 16, 3, padding=1, groups=2)
            self.conv2 = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.conv2(self.gconv(self.conv1(x))).sum()

    gs = build_channel_groups(Widen(), torch.randn(1, 4, 5, 5))
    reasons = {s.producer: s.reason for s in gs.skipped}
    assert "grouped Conv2d with in_channels != out_channels (8 -> 16, groups=2)" in reasons["gconv"]
    assert "gconv" in reasons["conv1"]  # its consumer cannot be sliced
    assert len(gs) == 0


def test_custom_handler(scale_handler):
    assert get_channel_handler(ChannelScale(3)) is scale_handler
    gs = build_channel_groups(WithScale(), torch.randn(2, 3, 5, 5))
    g = gs["conv1"]
    assert g.passthrough == ("scale",) and g.consumers == ("conv2",)
    assert g.slots[1].params == (("scale", 0),) and g.slots[1].scored == ("scale",)


def test_without_handler_custom_layer_is_traced_through_and_blocks():
    gs = build_channel_groups(WithScale(), torch.randn(2, 3, 5, 5))
    assert len(gs) == 0
    assert "multiplied at mul in scale by view in scale" in gs.skipped[0].reason


def test_register_handler_validates():
    with pytest.raises(ConfigError):
        register_channel_handler(int, ChannelHandler(role="elementwise"))
    with pytest.raises(ConfigError):
        register_channel_handler(nn.ReLU, ChannelHandler(role="elementwise"))  # built-in, no overwrite
    with pytest.raises(ConfigError):
        ChannelHandler(role="sideways")
    with pytest.raises(ConfigError):
        ChannelHandler(role="passthrough")  # needs params


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv3(self.conv2(self.conv2(self.conv1(x))))


def test_shared_module_is_skipped():
    gs = build_channel_groups(Shared(), torch.randn(1, 3, 4, 4))
    reasons = {s.producer: s.reason for s in gs.skipped}
    assert "called 2 times" in reasons["conv1"] and "called 2 times" in reasons["conv2"]
    assert len(gs) == 0


class ChannelRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(y) * (y.size(1) / 4) + y.shape[0]


def test_channel_count_read_blocks_but_batch_read_does_not():
    gs = build_channel_groups(ChannelRead(), torch.randn(2, 3, 4, 4))
    # y.size(1) reads the channel count; y.shape[0] (the batch) is harmless
    assert gs.skipped[0].producer == "conv1"
    assert gs.skipped[0].reasons == ("reads the channel count at size in the model forward",)


class Mlp3d(nn.Module):
    """Linear on (B, T, F): the hidden features are the last dim."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(10, 6)
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x)))).mean(1)


def test_linear_on_sequences():
    gs = build_channel_groups(Mlp3d(), torch.randn(2, 5, 6))
    assert gs.names() == ["fc1"] and gs["fc1"].consumers == ("fc2",)


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.conv3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv1(x)
        z = torch.cat([y, y], 1)
        return self.conv2(y[:, :2]), self.conv3(z[:, :4])


def test_indexing_is_skipped_also_after_a_cat():
    gs = build_channel_groups(Sliced(), torch.randn(1, 3, 2, 2))
    r = gs.skipped[0].reason
    assert (
        gs.skipped[0].producer == "conv1"
        and "at getitem in the model forward" in r
        and "at getitem_1 in the model forward" in r  # reached through the cat (twice: offsets 0 and 4)
    )


# ---------------------------------------------------------------------- tracing failures
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


def test_untraceable_model_raises_unsupported_naming_it():
    # fx stops on the data-dependent branch, and so does torch.export (its fallback): one short error naming both
    with pytest.raises(UnsupportedModelError) as ei:
        build_channel_groups(DataDependent(), torch.randn(1, 3, 4, 4))
    msg = str(ei.value)
    assert "DataDependent" in msg and "torch.fx" in msg and "torch.export" in msg
    assert "\n" not in msg and len(msg) < 800  # short: no deep traceback
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


class Gate(nn.Module):
    """Untraceable inner module: data-dependent control flow."""

    def forward(self, x):
        return x if x.mean() > 0 else -x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.gate = Gate()
        self.conv3 = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.conv3(self.gate(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def test_untraceable_submodule_becomes_opaque():
    gs = build_channel_groups(WithGate(), torch.randn(1, 3, 4, 4))
    assert gs.names() == ["conv1"]
    assert "gate" in gs.opaque and "control flow" in gs.opaque["gate"]
    conv2 = next(s for s in gs.skipped if s.producer == "conv2")
    assert "gate" in conv2.reason and "gate" in conv2.paths


class SlicedBuffer(nn.Module):
    """A position table sliced by the input's length (pytorch/examples' PositionalEncoding)."""

    def __init__(self, d=8):
        super().__init__()
        self.register_buffer("pe", torch.randn(1, 16, d))

    def forward(self, x):
        return x + self.pe[:, : x.size(1)]


class LoopsOverBuffer(nn.Module):
    """Takes a Python value from a buffer's shape: traces only with the buffer as a constant."""

    def __init__(self, d=8):
        super().__init__()
        self.register_buffer("scales", torch.rand(3) + 0.5)

    def forward(self, x):
        for i in range(self.scales.shape[0]):
            x = x * self.scales[i]
        return x


class WithBuffers(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.fc1, self.inner, self.fc2 = nn.Linear(4, 8), inner, nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.inner(self.fc1(x)))


@pytest.mark.parametrize("inner", [SlicedBuffer, LoopsOverBuffer])
def test_buffers_indexed_by_input_size_trace_through(inner):
    """A buffer sliced by ``x.size(1)`` is traced through (retried with buffers as graph values) instead of kept
    opaque, and a module that takes Python values from a buffer still traces as before."""
    from netcarve.graph.trace import trace_model

    torch.manual_seed(0)
    m = WithBuffers(inner()).eval()
    x = torch.randn(2, 5, 4)
    t = trace_model(m, x)
    assert t.opaque == {}
    with torch.no_grad():
        assert torch.allclose(t.graph_module(x), m(x))
        y = torch.randn(3, 7, 4)  # another length: the slice follows it
        assert torch.allclose(t.graph_module(y), m(y))


class OptionalArgs(nn.Module):
    """forward with optional arguments that steer control flow: fx cannot trace them as graph inputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, mask=None, scale=2.0, *, features=False):
        h = torch.relu(self.fc1(x))
        if mask is not None:
            h = h * mask
        return h if features else self.fc2(h * scale)


def test_optional_forward_arguments_left_out_trace_as_their_defaults():
    """Arguments the example input leaves out are traced as their defaults (no placeholders, no fx checks left in
    the graph), so the model traces, groups and prunes; given as a tuple, the mask is a graph input again."""
    from netcarve.graph.trace import trace_model

    torch.manual_seed(0)
    m = OptionalArgs().eval()
    x, mask = torch.randn(2, 4), torch.rand(2, 8)
    t = trace_model(m, x)
    assert [n.target for n in t.graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any("assert" in str(n.target) for n in t.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(t.graph_module(x), m(x))
    t2 = trace_model(m, (x, mask))
    assert [n.target for n in t2.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    with torch.no_grad():
        assert torch.allclose(t2.graph_module(x, mask), m(x, mask))
    gs = build_channel_groups(m, x)
    assert [g.producer for g in gs.groups] == ["fc1"]

    class Two(nn.Module):  # a required second argument left out, or a third input too many: named
        def forward(self, x, y):
            return x + y

    with pytest.raises(UnsupportedModelError, match=r"forward argument 'y' \(input 2\) is not in the example input"):
        trace_model(Two(), x)
    with pytest.raises(UnsupportedModelError, match=r"3 example inputs for a forward of 2 arguments \(x, y\)"):
        trace_model(Two(), (x, x, x))


def test_bad_example_input_is_reported():
    with pytest.raises(UnsupportedModelError, match="Chain.*example input"):
        build_channel_groups(Chain(), torch.randn(2, 5, 8, 8))


# ---------------------------------------------------------------------- zoo models
def _zoo(name: str):
    if name not in netcarve.list_models():
        pytest.skip(f"zoo model {name!r} is not registered yet")
    m = netcarve.create_model(name)
    return m, build_channel_groups(m, netcarve.example_input(m, batch=2))


def test_zoo_lenet():
    _, gs = _zoo("lenet")
    assert gs.names() == ["conv1", "conv2", "conv3"]
    assert gs["conv3"].consumers == ("fc",) and gs["conv3"].passthrough == ("bn3",)
    assert gs.skipped_names() == ["fc"]


def test_zoo_vgg11_bn():
    m, gs = _zoo("vgg11_bn")
    convs = [p for p, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert gs.names() == convs  # every conv, the last one feeding the classifier input
    assert gs[convs[-1]].consumers == ("classifier",)
    for p in convs:
        assert len(gs[p].passthrough) == 1 and "BatchNorm2d" in gs[p].describe()
    assert gs.skipped_names() == ["classifier"]


def test_zoo_resnet20():
    _, gs = _zoo("resnet20")
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    stages = ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    assert sorted(gs.names()) == sorted(inner + stages)
    for p in inner:
        blk = p.rsplit(".", 1)[0]
        assert gs[p].consumers == (f"{blk}.conv2",) and gs[p].passthrough == (f"{blk}.bn1",)
    # stage 1: stem + every block's conv2 (identity shortcuts); read by the stage-2 option-A shortcut
    g = gs["conv1"]
    assert g.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    assert g.consumers == tuple(f"layer1.{b}.conv1" for b in range(3)) + ("layer2.0.conv1", "layer2.0.shortcut")
    # stages 2 and 3: the option-A shortcut is a parameter-free producer of the stage's group
    for s, last in ((2, "layer3.0.shortcut"), (3, "linear")):
        g = gs[f"layer{s}.0.conv2"]
        assert g.producers == (f"layer{s}.0.conv2", f"layer{s}.0.shortcut", f"layer{s}.1.conv2",
                               f"layer{s}.2.conv2")  # fmt: skip
        assert g.consumers[-1] == last and g.num_channels == 16 * 2 ** (s - 1)
        sc = next(x for x in g.slots if x.path == f"layer{s}.0.shortcut")
        assert sc.params == () and sc.io_widths == (8 * 2 ** (s - 1), 16 * 2 ** (s - 1))
    assert gs.skipped_names() == ["linear"]


def test_zoo_resnet8_conv_shortcuts():
    _, gs = _zoo("resnet8")
    g1, g2 = gs["conv1"], gs["stack2.conv2"]
    assert g1.producers == ("conv1", "stack1.conv2")
    assert set(g1.consumers) == {"stack1.conv1", "stack2.conv1", "stack2.shortcut"}
    assert g2.producers == ("stack2.conv2", "stack2.shortcut") and g2.passthrough == ("stack2.bn2",)
    assert set(g2.consumers) == {"stack3.conv1", "stack3.shortcut"}
    assert gs["stack3.conv2"].consumers == ("fc",)
    assert gs.skipped_names() == ["fc"]


def test_zoo_mobilenetv2():
    m, gs = _zoo("mobilenetv2")
    expands = [p for p, _ in m.named_modules() if p.endswith("expand_conv")]
    for p in expands:
        blk = p.rsplit(".", 1)[0]
        g = gs[p]
        assert g.passthrough == (f"{blk}.expand_bn", f"{blk}.dw_conv", f"{blk}.dw_bn")
        assert g.consumers == (f"{blk}.project_conv",)
    # block 0 has no expansion: the stem's channels flow through its depthwise conv
    assert gs["conv1"].passthrough == ("bn1", "blocks.0.dw_conv", "blocks.0.dw_bn")
    assert gs["conv2"].consumers == ("classifier",)
    # stride-1 same-width blocks: the projections of one stage form one coupled group
    g = gs["blocks.3.project_conv"]
    assert g.producers == ("blocks.3.project_conv", "blocks.4.project_conv", "blocks.5.project_conv")
    assert g.consumers == ("blocks.4.expand_conv", "blocks.5.expand_conv", "blocks.6.expand_conv")
    assert gs.skipped_names() == ["classifier"]
