"""MACs and parameters per layer, each checked against a number computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netcarve
from netcarve.errors import ConfigError
from netcarve.measure import count_model, get_counter, register_counter
from netcarve.measure import counting as counting_mod


def _single(module: nn.Module, *inputs) -> counting_mod.LayerCost:
    cost = count_model(module, inputs if len(inputs) > 1 else inputs[0])
    assert len(cost.layers) == 1
    return cost.layers[0]


def test_conv2d_plain():
    # out (2, 8, 6, 6) = 576 elements, each 3 in-channels x 3x3 = 27 MACs
    lc = _single(nn.Conv2d(3, 8, 3), torch.randn(2, 3, 8, 8))
    assert lc.macs == 576 * 27
    assert lc.params == 8 * 3 * 9 + 8
    assert lc.input_shape == [2, 3, 8, 8] and lc.output_shape == [2, 8, 6, 6]
    assert lc.type == "Conv2d" and lc.name == ""


def test_conv2d_grouped_strided():
    # groups=2: each output sees 4/2 = 2 channels; out (1, 6, 4, 4) with stride 2, pad 1, k 3 on 8x8
    lc = _single(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), torch.randn(1, 4, 8, 8))
    assert lc.output_shape == [1, 6, 4, 4]
    assert lc.macs == 96 * 2 * 9
    assert lc.params == 6 * 2 * 9


def test_conv2d_depthwise():
    # depthwise: groups = C = 16, one input channel per output, k 3x3, out (1, 16, 8, 8)
    lc = _single(nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.randn(1, 16, 8, 8))
    assert lc.macs == 16 * 64 * 9
    assert lc.params == 16 * 9 + 16


def test_conv2d_rectangular_kernel_and_conv1d():
    lc = _single(nn.Conv2d(2, 3, (1, 5)), torch.randn(1, 2, 4, 9))  # out (1, 3, 4, 5)
    assert lc.macs == 60 * 2 * 5
    lc = _single(nn.Conv1d(4, 6, 3), torch.randn(2, 4, 10))  # out (2, 6, 8)
    assert lc.macs == 96 * 4 * 3


def test_conv_transpose2d():
    # every input element is multiplied into (C_out / groups) * k*k outputs: 1*2*3*3 inputs x 4 x 4
    lc = _single(nn.ConvTranspose2d(2, 4, 2, stride=2), torch.randn(1, 2, 3, 3))
    assert lc.output_shape == [1, 4, 6, 6]
    assert lc.macs == 18 * 4 * 4


def test_linear_2d_and_3d():
    lc = _single(nn.Linear(10, 5), torch.randn(3, 10))
    assert lc.macs == 3 * 5 * 10
    assert lc.params == 55
    # (B, T, F) input: every one of the B*T rows is a matrix-vector product
    lc = _single(nn.Linear(10, 5, bias=False), torch.randn(2, 7, 10))
    assert lc.macs == 2 * 7 * 5 * 10
    assert lc.params == 50


def test_norms_cost_one_mac_per_element():
    lc = _single(nn.BatchNorm2d(4), torch.randn(2, 4, 3, 3))
    assert lc.macs == 2 * 4 * 9
    assert lc.params == 8  # weight + bias; running stats are buffers
    lc = _single(nn.LayerNorm(6), torch.randn(2, 5, 6))
    assert lc.macs == 60
    assert lc.params == 12
    assert _single(nn.GroupNorm(2, 4), torch.randn(1, 4, 2, 2)).macs == 16


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.ReLU(), (2, 3, 4, 4)),
        (nn.GELU(), (2, 5)),
        (nn.MaxPool2d(2), (1, 3, 4, 4)),
        (nn.AdaptiveAvgPool2d(1), (1, 3, 4, 4)),
        (nn.Dropout(0.5), (2, 5)),
        (nn.Flatten(), (2, 3, 2)),
        (nn.Identity(), (2, 3)),
        (nn.Softmax(dim=-1), (2, 3)),
    ],
)
def test_zero_mac_layers(module, shape):
    assert _single(module, torch.randn(*shape)).macs == 0


def test_embedding_is_a_lookup():
    lc = _single(nn.Embedding(50, 8), torch.randint(0, 50, (2, 7)))
    assert lc.macs == 0 and lc.params == 400


def test_lstm_single_layer_by_hand():
    # per step: gates 4H(I+H) = 4*8*(5+8) = 416, elementwise c=f*c+i*g (2H) + h=o*tanh(c) (H) = 24
    lstm = nn.LSTM(5, 8, batch_first=True)
    lc = _single(lstm, torch.randn(3, 7, 5))
    assert lc.macs == 3 * 7 * (4 * 8 * 13 + 3 * 8)
    assert lc.params == sum(p.numel() for p in lstm.parameters()) == 4 * 8 * (5 + 8) + 2 * 4 * 8


def test_lstm_two_layers_bidirectional_by_hand():
    # layer 0: input 5; layer 1: input 2*H = 12 (both directions); each layer runs both directions
    lstm = nn.LSTM(5, 6, num_layers=2, bidirectional=True)  # sequence-first input (T, B, I)
    per_step = 2 * (4 * 6 * (5 + 6) + 18) + 2 * (4 * 6 * (12 + 6) + 18)
    lc = _single(lstm, torch.randn(4, 2, 5))
    assert lc.macs == 4 * 2 * per_step == 8 * (2 * 282 + 2 * 450)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_lstm_with_projection_by_hand():
    # proj_size P=3: recurrent width R=3, gates 4H(I+R) + 3H + projection H*P
    lstm = nn.LSTM(4, 6, proj_size=3, batch_first=True)
    lc = _single(lstm, torch.randn(1, 5, 4))
    assert lc.macs == 5 * (4 * 6 * (4 + 3) + 18 + 18)


def test_gru_by_hand():
    # per step: gates 3H(I+H) = 3*4*(3+4) = 84; r*(W_hn h + b) (H) + (1-z)*n + z*h (2H) = 12
    gru = nn.GRU(3, 4, batch_first=True)
    lc = _single(gru, torch.randn(2, 6, 3))
    assert lc.macs == 2 * 6 * 96
    # unbatched input (T, I)
    assert _single(nn.GRU(3, 4), torch.randn(6, 3)).macs == 6 * 96


def test_cells_and_vanilla_rnn():
    assert _single(nn.LSTMCell(3, 4), torch.randn(2, 3)).macs == 2 * (4 * 4 * 7 + 12)
    assert _single(nn.GRUCell(3, 4), torch.randn(2, 3)).macs == 2 * (3 * 4 * 7 + 12)
    assert _single(nn.RNN(3, 4, batch_first=True), torch.randn(2, 5, 3)).macs == 10 * 4 * 7


class AttentionMatmul(nn.Module):
    """Parameter-free softmax(q k^T) v, matched by class name."""

    def forward(self, q, k, v):
        return torch.matmul((q @ k.transpose(-2, -1)).softmax(-1), v)


def test_attention_matmul_by_class_name():
    b, h, t, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    lc = _single(AttentionMatmul(), q, k, v)
    assert lc.macs == 2 * b * h * t * t * d
    assert lc.params == 0


def test_transformer_zoo_attention_rows():
    model = netcarve.create_model("transformer_tiny")
    x = netcarve.example_input(model, batch=2)
    cost = count_model(model, x)
    rows = cost.by_name()
    t, dim, heads = x.shape[1], model.embed.out_features, model.blocks[0].attn.num_heads
    for i in range(len(model.blocks)):
        row = rows[f"blocks.{i}.attn.matmul"]
        assert row.type == "AttentionMatmul"
        assert row.macs == 2 * 2 * heads * t * t * (dim // heads)
    # pos_embed is a parameter owned by the (non-leaf) model itself: counted on the root row
    assert rows[""].params == model.pos_embed.numel()
    assert cost.total_params == sum(p.numel() for p in model.parameters())


def test_multihead_attention_by_hand():
    e, t, b = 8, 5, 2
    mha = nn.MultiheadAttention(e, 2, batch_first=True)
    x = torch.randn(b, t, e)
    cost = count_model(mha, (x, x, x))
    root = cost.by_name()[""]
    # q, k, v and output projections 4*T*E*E, attention scores + weighted sum 2*T*T*E, per sample
    assert root.macs == b * (4 * t * e * e + 2 * t * t * e)
    assert cost.total_params == sum(p.numel() for p in mha.parameters())


def test_transformer_encoder_with_key_padding_mask_counts_every_layer():
    """An nn.TransformerEncoder given a key padding mask runs on nested tensors in eval mode (PyTorch's fast path,
    which calls none of its submodules): counted on the regular path, every layer is seen (was an error)."""
    e, t, b, ff = 16, 6, 2, 24

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(e, 2, ff, batch_first=True), 2)

        def forward(self, x):
            pad = torch.zeros(x.shape[:2], dtype=torch.bool)
            pad[:, -2:] = True
            return self.enc(x, src_key_padding_mask=pad)

    cost = count_model(Padded(), torch.randn(b, t, e)).by_name()
    for i in range(2):
        assert cost[f"enc.layers.{i}.linear1"].macs == b * t * e * ff
        assert cost[f"enc.layers.{i}.self_attn"].macs == b * (4 * t * e * e + 2 * t * t * e)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_head_pruned_attention_by_hand():
    from netcarve.layers import HeadPrunedMultiheadAttention

    e, t, s, b, h, hd = 8, 5, 3, 2, 3, 2  # 3 heads of 2: inner width 6, embed_dim 8; keys of length 3
    m = HeadPrunedMultiheadAttention(e, h, hd, batch_first=True)
    q, kv = torch.randn(b, t, e), torch.randn(b, s, e)
    cost = count_model(m, (q, kv, kv))
    rows = cost.by_name()
    inner = h * hd
    assert rows[""].macs == b * (t * e * inner + 2 * s * e * inner + 2 * t * s * inner)
    assert rows["out_proj"].macs == b * t * inner * e  # its own Linear hook
    # with every head kept it costs what nn.MultiheadAttention does
    full = HeadPrunedMultiheadAttention(e, 2, 4, batch_first=True)
    assert count_model(full, (q, q, q)).total_macs == count_model(nn.MultiheadAttention(e, 2, batch_first=True),
                                                                    (q, q, q)).total_macs


def test_shared_parameters_counted_once_and_shared_module_per_call():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied weight
            self.act = nn.ReLU()

        def forward(self, x):
            return self.b(self.act(self.a(self.a(x))))  # `a` called twice

    model = Tied()
    cost = count_model(model, torch.randn(3, 4))
    rows = cost.by_name()
    assert rows["a"].macs == 2 * 3 * 16 and rows["a"].calls == 2
    assert rows["a"].params == 20 and rows["b"].params == 4  # b owns only its bias
    assert cost.total_params == sum(p.numel() for p in model.parameters()) == 24
    assert cost.total_macs == 3 * 3 * 16


def test_uncalled_leaf_keeps_its_params():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.spare = nn.Linear(2, 3)

        def forward(self, x):
            return self.used(x)

    cost = count_model(Unused(), torch.randn(1, 2))
    spare = cost.by_name()["spare"]
    assert spare.macs == 0 and spare.calls == 0 and spare.input_shape is None
    assert cost.total_params == 6 + 9


def test_register_custom_counter_and_duplicate():
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    assert get_counter(Scale) is None
    register_counter(Scale, lambda m, inputs, out: out.numel())
    try:
        assert _single(Scale(), torch.randn(3, 5)).macs == 15
        with pytest.raises(ConfigError):
            register_counter(Scale, lambda m, i, o: 0)
        register_counter(Scale, lambda m, i, o: 1, overwrite=True)
        assert _single(Scale(), torch.randn(3, 5)).macs == 1
    finally:
        counting_mod._COUNTERS.pop(Scale, None)


def test_subclass_inherits_counter_and_training_mode_restored():
    class MyConv(nn.Conv2d):
        pass

    m = MyConv(2, 2, 1)
    m.train()
    lc = _single(m, torch.randn(1, 2, 3, 3))
    assert lc.macs == 18 * 2
    assert m.training


def _cifar_resnet_conv_fc_macs(n: int) -> int:
    """Hand count for CIFAR ResNet-(6n+2) on 32x32: stem, 3 stages of 2n 3x3 convs, linear 64->10."""
    stem = 32 * 32 * 16 * 3 * 9
    stage1 = 2 * n * (32 * 32 * 16 * 16 * 9)
    stage2 = 16 * 16 * 32 * 16 * 9 + (2 * n - 1) * (16 * 16 * 32 * 32 * 9)  # first conv: stride 2, 16 -> 32
    stage3 = 8 * 8 * 64 * 32 * 9 + (2 * n - 1) * (8 * 8 * 64 * 64 * 9)
    return stem + stage1 + stage2 + stage3 + 64 * 10


def test_resnet20_and_resnet56_totals():
    assert _cifar_resnet_conv_fc_macs(3) == 40_551_040
    for name, n, params in (("resnet20", 3, 269_722), ("resnet56", 9, 853_018)):
        model = netcarve.create_model(name)
        cost = count_model(model, netcarve.example_input(model))
        conv_fc = sum(lc.macs for lc in cost.layers if lc.type in ("Conv2d", "Linear"))
        assert conv_fc == _cifar_resnet_conv_fc_macs(n)
        bns = [lc for lc in cost.layers if lc.type == "BatchNorm2d"]
        # one BN after every conv: 16x32x32 for stem + stage 1, 32x16x16 and 64x8x8 after
        assert sum(lc.macs for lc in bns) == 16 * 1024 * (1 + 2 * n) + 2 * n * 32 * 256 + 2 * n * 64 * 64
        assert cost.total_macs == conv_fc + sum(lc.macs for lc in bns)
        assert cost.total_params == params


def test_every_zoo_model_counts():
    for name in netcarve.list_models():
        model = netcarve.create_model(name)
        cost = count_model(model, netcarve.example_input(model))
        assert cost.total_macs > 0, name
        assert cost.total_params == sum(p.numel() for p in model.parameters()), name
        assert cost.to_dict()["total_macs"] == cost.total_macs


def test_mixed_training_flags_are_restored():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.ReLU())
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    count_model(model, torch.randn(1, 2, 3, 3))
    assert [m.training for m in model] == [True, False, True] and model.training
